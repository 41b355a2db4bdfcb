"""A real HTTP server on 127.0.0.1 for download tests: files with Range support, redirects,
error statuses, a connection dropped mid-file, a stall; it logs every request it gets."""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    kind: str  # "file", "redirect", "status", "stall"
    data: bytes = b""
    target: str = ""  # redirect: a path on this server or an absolute URL
    code: int = 200
    drop_after: int | None = None  # file: close the connection after this many bytes ...
    drops: int = 0  # ... this many times
    honour_range: bool = True
    chunk_delay: float = 0.0  # file: seconds between 64 KiB chunks (keeps downloads overlapping)


class Origin:
    """``with Origin() as origin: origin.file("/a.tar.gz", data); origin.url("/a.tar.gz")``."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                origin._serve(self, body=True)

            def do_HEAD(self) -> None:
                origin._serve(self, body=False)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # clients that hang up on purpose (timeouts) are not errors here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)

    # -- setup -----------------------------------------------------------------------------
    def __enter__(self) -> Origin:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def file(self, path: str, data: bytes, **options) -> str:
        self.routes[path] = Route("file", data=data, **options)
        return self.url(path)

    def redirect(self, path: str, target: str, code: int = 302) -> str:
        self.routes[path] = Route("redirect", target=target, code=code)
        return self.url(path)

    def status(self, path: str, code: int) -> str:
        self.routes[path] = Route("status", code=code)
        return self.url(path)

    def stall(self, path: str, seconds: float) -> str:
        self.routes[path] = Route("stall", code=int(seconds * 1000))
        return self.url(path)

    def count(self, path: str, method: str = "GET") -> int:
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and p == path)

    def headers_of(self, path: str) -> list[dict[str, str]]:
        with self._lock:
            return [h for _, p, h in self.requests if p == path]

    # -- serving ---------------------------------------------------------------------------
    def _serve(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        with self._lock:
            self.requests.append((handler.command, path, dict(handler.headers)))
            route = self.routes.get(path)
        if route is None:
            return self._plain(handler, 404, b"not found")
        if route.kind == "status":
            return self._plain(handler, route.code, b"no")
        if route.kind == "stall":
            time.sleep(route.code / 1000)
            return self._plain(handler, 503, b"late")
        if route.kind == "redirect":
            handler.send_response(route.code)
            target = route.target if "://" in route.target else self.url(route.target)
            handler.send_header("Location", target)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return None
        return self._file(handler, route, body)

    @staticmethod
    def _plain(handler: BaseHTTPRequestHandler, code: int, text: bytes) -> None:
        handler.send_response(code)
        handler.send_header("Content-Length", str(len(text)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(text)

    def _file(self, handler: BaseHTTPRequestHandler, route: Route, body: bool) -> None:
        data, start = route.data, 0
        match = re.match(r"bytes=(\d+)-$", handler.headers.get("Range", ""))
        if match and route.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                return self._plain(handler, 416, b"")
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(data) - start))
        handler.send_header("Accept-Ranges", "bytes")
        handler.end_headers()
        if not body:
            return None
        payload = data[start:]
        with self._lock:
            drop = route.drop_after is not None and route.drops > 0
            if drop:
                route.drops -= 1
        if drop:
            handler.wfile.write(payload[:route.drop_after])
            handler.wfile.flush()
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return None
        for i in range(0, len(payload), 1 << 16):
            handler.wfile.write(payload[i:i + (1 << 16)])
            if route.chunk_delay:
                time.sleep(route.chunk_delay)
        return None
