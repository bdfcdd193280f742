"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto): every k-th request fails or is slow.

    with FaultProxy(upstream="http://127.0.0.1:5000", policy=FaultPolicy(every=4, faults=("503", "reset"))) as p:
        os.environ["AWS_ENDPOINT_URL"] = p.url      # s3fs / boto3 now go through the proxy

Faults (cycled through on every ``every``-th request):

- ``"500"`` / ``"503"``: an S3 error response (InternalError / SlowDown) without forwarding the request;
- ``"reset"``: the connection is reset (RST) before the request is forwarded;
- ``"lost"``: the request IS forwarded and takes effect, then the connection is reset before the response: the
  client cannot tell whether its PUT landed, so only idempotent writes survive it;
- ``"slow"``: forwarded, the response held back for ``delay`` seconds.

``FaultPolicy(always="403")`` (or ``"503"``, ``"reset"``, ``"nobucket"``) fails every request: a permanent error.
``count`` and ``injected`` say how many requests went through and how many were faulted; ``access_keys`` which
access key ids signed them (a test can prove that the credentials it planted were really used).
"""

from __future__ import annotations

import http.client
import itertools
import re
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
    "nobucket": (404, "NoSuchBucket", "The specified bucket does not exist"),
}
FAULTS = ("500", "503", "reset", "lost", "slow")


@dataclass
class FaultPolicy:
    every: int = 0
    """Fault every k-th request (0: none)."""
    faults: tuple[str, ...] = FAULTS
    """Which faults, in turn."""
    delay: float = 1.0
    """Seconds a "slow" response is held back."""
    always: str | None = None
    """Fail every request this way: "403", "nobucket", "500", "503" or "reset"."""


class FaultProxy:
    def __init__(self, upstream: str, policy: FaultPolicy | None = None):
        u = urlparse(upstream)
        self.upstream = (u.hostname, u.port)
        self.policy = policy or FaultPolicy()
        self.count = 0
        self.injected: dict[str, int] = {}
        self.access_keys: set[str] = set()
        self._lock = threading.Lock()
        self._cycle: Iterator[str] = itertools.cycle(self.policy.faults)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients expect from S3

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reset(self) -> None:
                # SO_LINGER 0: close() sends RST, what a dropped connection looks like to the client
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.close_connection = True
                self.connection.close()

            def _error(self, kind: str) -> None:
                status, code, message = _ERRORS[kind]
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                    f"</Message><RequestId>fault-proxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _handle(self) -> None:
                body = self._body()
                if m := re.search(r"Credential=([^/,\s]+)/", self.headers.get("Authorization", "")):
                    proxy.access_keys.add(m.group(1))
                fault = proxy._next_fault()
                if fault in _ERRORS:
                    return self._error(fault)
                if fault == "reset":
                    return self._reset()
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    # the body is already read (and 100-continue answered): forward it whole, with its length
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in ("transfer-encoding", "expect")
                    }
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    if fault == "lost":
                        return self._reset()
                    if fault == "slow":
                        time.sleep(proxy.policy.delay)
                    self.send_response(resp.status, resp.reason)
                    head = self.command == "HEAD"  # its Content-Length is the object's size: pass it through
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection") and (
                            head or k.lower() != "content-length"
                        ):
                            self.send_header(k, v)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def _next_fault(self) -> str | None:
        with self._lock:
            self.count += 1
            p = self.policy
            fault = p.always if p.always else (next(self._cycle) if p.every and self.count % p.every == 0 else None)
            if fault:
                self.injected[fault] = self.injected.get(fault, 0) + 1
            return fault

    def set_policy(self, policy: FaultPolicy) -> None:
        with self._lock:
            self.policy, self._cycle = policy, itertools.cycle(policy.faults)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
