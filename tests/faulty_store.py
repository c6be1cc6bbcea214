"""A loopback HTTP object store that misbehaves on purpose, as stuck and overloaded stores do
(issue 32): per file it can stop answering mid-body while keeping the connection open,
trickle at a fixed rate, answer 503 for a while, reset the connection mid-body, or close it
cleanly short of its Content-Length (a dropped connection whose bytes all arrived). Healthy
files are served whole or from a Range offset (206), as S3 and GCS serve them.

    with FaultyStore(directory, {"00003.tar": Fault("stall", after=4096)}) as store:
        store.url("00003.tar")  # http://127.0.0.1:PORT/00003.tar
"""
from __future__ import annotations

import hashlib
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Fault:
    kind: str  # "stall" | "slow" | "unavailable" | "reset" | "close"
    after: int = 0  # stall/reset/close: bytes of the body sent first
    rate: int = 1024  # slow: bytes per second
    times: int | None = None  # unavailable/reset: the first this many requests; None: every one


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 (a free port), serving while in a `with` block."""

    def serve(self, handler):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.port = self.server.server_address[1]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


class FaultyStore(LoopbackServer):
    def __init__(self, directory: Path, faults: dict[str, Fault] | None = None, authorization: str = ""):
        """authorization: the Authorization header every request must carry (else 401), as
        a Hugging Face dataset or a lab's store asks for a bearer token or basic auth."""
        self.directory, self.faults = Path(directory), dict(faults or {})
        self.authorization = authorization
        self.refused: Counter = Counter()  # per file name: requests without the right credentials
        self.requests: Counter = Counter()  # per file name
        self.ranges: list[tuple[str, int]] = []  # (name, offset) of every Range request
        self.stopping = threading.Event()
        store = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                try:
                    self.serve()
                except (BrokenPipeError, ConnectionResetError):  # the client gave up: as it should
                    pass

            do_HEAD = do_GET  # the headers alone (serve stops after them)

            def serve(self):
                name = self.path.lstrip("/").split("?")[0]
                store.requests[name] += 1
                if store.authorization and self.headers.get("Authorization") != store.authorization:
                    store.refused[name] += 1
                    self.send_error(401)
                    return
                path = store.directory / name
                if not path.is_file():
                    self.send_error(404)
                    return
                data = path.read_bytes()
                offset = 0
                match = re.match(r"bytes=(\d+)-$", self.headers.get("Range", ""))
                if match:
                    offset = int(match.group(1))
                    store.ranges.append((name, offset))
                fault = store.faults.get(name)
                active = fault is not None and (fault.times is None or store.requests[name] <= fault.times)
                if active and fault.kind == "unavailable":
                    self.send_error(503, "Slow Down")
                    return
                body = data[offset:]
                self.send_response(206 if offset else 200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')  # as S3 and GCS name a version
                self.end_headers()
                if self.command == "HEAD":
                    return
                if not active:
                    self.wfile.write(body)
                elif fault.kind == "stall":  # the connection stays open, nothing more comes
                    self.wfile.write(body[:fault.after])
                    self.wfile.flush()
                    store.stopping.wait()
                elif fault.kind == "close":  # a clean close (FIN) short of Content-Length: every byte sent arrives
                    self.wfile.write(body[:fault.after])
                    self.wfile.flush()
                    self.close_connection = True
                elif fault.kind == "reset":
                    self.wfile.write(body[:fault.after])
                    self.wfile.flush()
                    # RST instead of FIN: SO_LINGER with a zero timeout
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                elif fault.kind == "slow":
                    step = max(1, fault.rate // 8)
                    for start in range(0, len(body), step):
                        if store.stopping.wait(step / fault.rate):
                            return
                        self.wfile.write(body[start:start + step])
                        self.wfile.flush()

        self.serve(Handler)

    def url(self, name: str = "", host: str = "127.0.0.1") -> str:
        """`host`: a name only a LoopbackProxy resolves, for a store reachable through it alone."""
        return f"http://{host}:{self.port}/{name}"

    def __exit__(self, *exc):
        self.stopping.set()  # stalled and trickling answers end first
        super().__exit__(*exc)
        time.sleep(0.05)


class LoopbackProxy(LoopbackServer):
    """A forward HTTP proxy on loopback, as a cluster's egress proxy: it takes absolute-form
    requests (`GET http://host:port/path`), resolves the hosts it is told about (names no
    one else resolves: a shard store reachable only through it), and streams the answer
    back chunk by chunk (a stalled upstream stalls the client too, as through a real proxy).

        with LoopbackProxy({"shards.internal": "127.0.0.1"}) as proxy:
            os.environ["HTTP_PROXY"] = proxy.url
    """

    def __init__(self, hosts: dict[str, str]):
        import http.client
        from urllib.parse import urlsplit
        self.hosts, self.requests = dict(hosts), []  # requests: the absolute URLs forwarded
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                parts = urlsplit(self.path)
                if not parts.scheme or parts.hostname not in proxy.hosts:
                    self.send_error(502, "unknown host")
                    return
                proxy.requests.append(self.path)
                upstream = http.client.HTTPConnection(proxy.hosts[parts.hostname], parts.port or 80, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "host")}
                upstream.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""),
                                 headers={**headers, "Host": parts.netloc})
                answer = upstream.getresponse()
                try:
                    self.send_response(answer.status, answer.reason)
                    for key, value in answer.getheaders():
                        if key.lower() not in ("connection", "transfer-encoding"):
                            self.send_header(key, value)
                    self.end_headers()
                    while chunk := answer.read1(65536):
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True
                finally:
                    upstream.close()

        self.serve(Handler)
        self.url = f"http://127.0.0.1:{self.port}"
