"""A real HTTP server on 127.0.0.1 for download tests, behaving as GCS and Kaggle do: files
with Range, ETag, Last-Modified and If-Range support, redirects (to signed URLs with a query
string), error statuses, a connection dropped mid-file, a stall, a drip, a file replaced
between requests; it logs every request it gets."""

from __future__ import annotations

import hashlib
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
    drip: float = 0.0  # file: send one byte per this many seconds (a server dripping bytes)
    honour_if_range: bool = True  # False: a server that resumes whatever changed
    version: int = 1  # file: bumped by Origin.replace (ETag and Last-Modified follow it)
    then: bytes | None = None  # file: the content after the (last) dropped connection


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

    def replace(self, path: str, data: bytes) -> None:
        """The file at ``path`` changes (new ETag and Last-Modified), as a re-upload does."""
        with self._lock:
            route = self.routes[path]
            route.data, route.version = data, route.version + 1

    def drip(self, path: str, data: bytes, seconds_per_byte: float) -> str:
        return self.file(path, data, drip=seconds_per_byte)

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
        etag = f'"{hashlib.md5(data).hexdigest()}"'
        modified = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(1e9 + route.version))
        match = re.match(r"bytes=(\d+)-(\d*)$", handler.headers.get("Range", ""))
        if_range = handler.headers.get("If-Range")
        if if_range and route.honour_if_range and if_range not in (etag, modified):
            match = None  # RFC 9110: the file changed, so the whole new file, with 200
        if match and route.honour_range:
            start = int(match.group(1))
            if start >= len(data):
                return self._plain(handler, 416, b"")
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            handler.send_response(206)
            handler.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            data = data[:end + 1]
        else:
            handler.send_response(200)
        handler.send_header("Content-Length", str(len(data) - start))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("ETag", etag)
        handler.send_header("Last-Modified", modified)
        handler.end_headers()
        if not body:
            return None
        payload = data[start:]
        if route.drip:
            for i in range(len(payload)):
                handler.wfile.write(payload[i:i + 1])
                handler.wfile.flush()
                time.sleep(route.drip)
            return None
        with self._lock:
            drop = route.drop_after is not None and route.drops > 0
            if drop:
                route.drops -= 1
        if drop:
            handler.wfile.write(payload[:route.drop_after])
            handler.wfile.flush()
            if route.then is not None and route.drops == 0:
                self.replace(handler.path.split("?", 1)[0], route.then)
            handler.connection.shutdown(socket.SHUT_RDWR)
            handler.close_connection = True
            return None
        for i in range(0, len(payload), 1 << 16):
            handler.wfile.write(payload[i:i + (1 << 16)])
            if route.chunk_delay:
                time.sleep(route.chunk_delay)
        return None
