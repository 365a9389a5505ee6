"""HTTP through the sandbox's NGINX as a browser would, and a steady request stream.

Used by the real-host tests and by the benchmark's zero-downtime figures.
"""

import http.client
import re
import socket
import ssl
import threading
import time
from collections import Counter

DOMAIN = "ratemyderp.test"


def get(ip: str, path: str = "/") -> tuple[int, str]:
    """GET through NGINX as a browser would: HTTPS when the site has it, else HTTP."""
    status, _release, body = fetch(ip, path)
    return status, body


# The sandbox's certificate is not checked: one context for every request (making one loads
# the system's CA bundle, about 20 ms of CPU, which a stream would pay per request).
_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_TLS.check_hostname, _TLS.verify_mode = False, ssl.CERT_NONE


def fetch(ip: str, path: str = "/") -> tuple[int, str, str]:
    """Like :func:`get`, with the release that answered (its X-Release header, or "")."""
    conn = http.client.HTTPConnection(ip, 80, timeout=10)
    sock = None
    try:
        sock = socket.create_connection((ip, 443), timeout=10)
        # as http.client does for its own connections: no Nagle delay for the request's
        # second TLS record (40 ms of delayed ACK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sock = _TLS.wrap_socket(sock, server_hostname=DOMAIN)
    except OSError:  # no certificate yet: NGINX rejects the TLS handshake
        if sock is not None:
            sock.close()
    try:
        conn.request("GET", path, headers={"Host": DOMAIN})
        res = conn.getresponse()
        return res.status, res.getheader("X-Release", ""), res.read().decode(errors="replace")
    finally:
        conn.close()


def release_served(ip: str) -> str:
    status, body = get(ip)
    assert status == 200, (status, body[:500])
    return re.search(r"release: ([\w.-]+)", body).group(1)


class Stream:
    """``_run`` in a second thread for as long as a ``with`` block lasts (it stops once
    ``_stop`` is set)."""

    def __init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        raise NotImplementedError

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)


class Load(Stream):
    """Requests through NGINX at a fixed rate (one per ``interval``) from a second thread, counted.

    A request slower than the interval delays the next ones (one connection at a time), but
    the schedule does not drift: the stream catches up as soon as the host answers again.
    """

    def __init__(self, ip: str, interval: float = 0.05):
        self.ip, self.interval = ip, interval
        self.sent, self.failed, self.worst = 0, [], 0.0
        self.latencies: list[float] = []  # seconds, per request
        self.releases = Counter()  # answers per release (X-Release header)
        super().__init__()

    def _run(self):
        due = time.monotonic()
        while not self._stop.is_set() and self.sent < 20000:
            started = time.monotonic()
            try:
                status, release, _ = fetch(self.ip, "/health/")
                if status != 200:
                    self.failed.append(status)
                else:
                    self.releases[release] += 1
            except OSError as exc:
                self.failed.append(repr(exc))
            self.sent += 1
            self.latencies.append(time.monotonic() - started)
            self.worst = max(self.worst, self.latencies[-1])
            due += self.interval
            self._stop.wait(max(0.0, due - time.monotonic()))

    def summary(self) -> str:
        """Requests sent and failed, the slowest, and which releases answered."""
        answered = ", ".join(f"{n} by {release or 'no X-Release'}"
                             for release, n in self.releases.items())
        return (f"{self.sent} requests, {len(self.failed)} failed, worst "
                f"{self.worst * 1000:.0f} ms; answered {answered or 'by none'}")
