"""Connections whose name lookup has a deadline too.

urllib's ``timeout`` bounds connecting and reading, not ``getaddrinfo``: a resolver that
never answers (a dead DNS server in ``/etc/resolv.conf``, a captive network) held a download
for the resolver's own retries, beyond every limit of :class:`imvec.weights.store.Limits`.
Here the lookup runs in a daemon thread that is waited on for the connection's timeout
(the stall bound); past it the attempt fails like a stall and the source is left.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.request

__all__ = ["LookupTimeout", "handlers", "resolve_within"]


class LookupTimeout(socket.timeout):
    """The name lookup took longer than the connection may wait."""


def resolve_within(host: str, port: int, timeout: float | None) -> list[tuple]:
    """``socket.getaddrinfo(host, port, type=SOCK_STREAM)``, given up after ``timeout`` s."""
    if timeout is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    answer: list = []

    def lookup() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)

    thread = threading.Thread(target=lookup, name=f"imvec-lookup-{host}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answer:  # the thread is left to finish on its own: getaddrinfo cannot be stopped
        raise LookupTimeout(f"no answer from the name lookup of {host} for {timeout:.1f} s")
    if isinstance(answer[0], OSError):
        raise answer[0]
    return answer[0]


def _connect(address: tuple[str, int], timeout=socket._GLOBAL_DEFAULT_TIMEOUT,
             source_address=None, **kwargs) -> socket.socket:
    """``socket.create_connection`` with the lookup bounded by the same timeout."""
    host, port = address
    wait = None if timeout is socket._GLOBAL_DEFAULT_TIMEOUT else timeout
    error: OSError | None = None
    for family, kind, proto, _, where in resolve_within(host, port, wait):
        sock = socket.socket(family, kind, proto)
        try:
            if wait is not None:
                sock.settimeout(wait)
            if source_address:
                sock.bind(source_address)
            sock.connect(where)
            return sock
        except OSError as exc:
            error = exc
            sock.close()
    raise error or OSError(f"{host} has no address")


def _bounded(connection_class):
    def make(host, **kwargs):
        conn = connection_class(host, **kwargs)
        conn._create_connection = _connect  # http.client's hook for opening the socket
        return conn
    return make


class _HTTP(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_bounded(http.client.HTTPConnection), req)


class _HTTPS(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_bounded(http.client.HTTPSConnection), req,
                            context=self._context)


def handlers() -> list[urllib.request.BaseHandler]:
    """urllib handlers for http and https whose name lookups are bounded."""
    return [_HTTP(), _HTTPS()]
