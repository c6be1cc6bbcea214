"""Loopback servers, bound to 127.0.0.1 only: an HTTP server for a directory of files (the
demo builder and the tests serve real images to the real img2dataset through it), and an
S3-compatible object store (moto's server mode) for the tests and bench.bench_loader."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # img2dataset makes hundreds of requests
        pass


@contextlib.contextmanager
def serve_directory(directory: str, host: str = "127.0.0.1"):
    """Serve `directory` on a free port for the duration of the block; yields the base URL."""
    server = ThreadingHTTPServer((host, 0), functools.partial(_QuietHandler, directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="loopback-http", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class LoopbackS3:
    """A real S3-compatible server on 127.0.0.1 (moto's server mode, `moto_server`), as a
    team's object store. `start()` points this process's environment at it the standard
    AWS way (credentials and AWS_ENDPOINT_URL, which boto3, s3fs and every process started
    after read; MLflow's artifact store reads MLFLOW_S3_ENDPOINT_URL) and creates `bucket`."""

    def __init__(self, log: Path, bucket: str = "lab"):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.log, self.bucket, self.proc = Path(log), bucket, None
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> "LoopbackS3":
        self.proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                      str(self.port)], stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        os.environ.update(AWS_ACCESS_KEY_ID="lab-key", AWS_SECRET_ACCESS_KEY="lab-secret", AWS_DEFAULT_REGION="us-east-1",
                          AWS_ENDPOINT_URL=self.endpoint, MLFLOW_S3_ENDPOINT_URL=self.endpoint)
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self.log.read_text()[-2000:]}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise TimeoutError(f"moto_server on {self.endpoint} did not answer in {timeout} s") from None
                time.sleep(0.3)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    @staticmethod
    def client():
        import boto3
        return boto3.client("s3")

    def url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def keys(self, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def upload(self, directory: Path, prefix: str):
        client = self.client()
        for path in sorted(Path(directory).rglob("*")):
            if path.is_file():
                client.upload_file(str(path), self.bucket, f"{prefix}/{path.relative_to(directory)}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
