"""A loopback HTTP server for a directory of files: the demo builder and the tests
serve real images to the real img2dataset through it. It binds 127.0.0.1 only."""
from __future__ import annotations

import contextlib
import functools
import threading
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
