"""A real ACME server for the sandbox (demo and tests): Debian's Pebble, pebble-challtestsrv as DNS.

Pebble listens on the sandbox's host end of the veth (``host_ip``): the ACME directory on
14000, its management interface (the issuing root) on 15000. Its own HTTPS certificate is
made here with openssl (a throwaway CA, the host address in subjectAltName). Every name
resolves to the target through pebble-challtestsrv, so Pebble's validation of an http-01
challenge reaches NGINX on the target's port 80. Both run with their own config and files
in their own directory; their process ids are recorded there too, so a Pebble left running
for the demo is stopped by ``fab sandbox.down`` (:func:`stop_recorded`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACME_PORT = 14000
MANAGEMENT_PORT = 15000
DNS_PORT = 8053
DNS_MANAGEMENT_PORT = 8055


class PebbleError(RuntimeError):
    pass


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass
class Pebble:
    host_ip: str  # where Pebble listens (the host end of the sandbox's veth)
    target_ip: str  # what every name resolves to
    workdir: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def directory(self) -> str:
        return f"https://{self.host_ip}:{ACME_PORT}/dir"

    @property
    def https_ca(self) -> Path:
        """The CA of Pebble's own HTTPS certificate (what an ACME client must trust)."""
        return self.workdir / "https-ca.pem"

    @property
    def issuing_root(self) -> Path:
        """The root that signs the certificates Pebble issues (fetched after start)."""
        return self.workdir / "issuing-root.pem"

    def _make_https_cert(self) -> None:
        w = self.workdir
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-days", "2", "-subj", "/CN=fabstack test Pebble HTTPS CA",
                 "-keyout", "https-ca.key", "-out", "https-ca.pem", cwd=w)
        (w / "san.ext").write_text(f"subjectAltName=IP:{self.host_ip}\n"
                                   "extendedKeyUsage=serverAuth\n")
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-subj", "/CN=pebble", "-keyout", "key.pem", "-out", "cert.csr", cwd=w)
        _openssl("x509", "-req", "-in", "cert.csr", "-CA", "https-ca.pem", "-CAkey",
                 "https-ca.key", "-CAcreateserial", "-days", "2", "-extfile", "san.ext",
                 "-out", "cert.pem", cwd=w)

    def start(self, timeout: float = 30) -> Pebble:
        for binary in ("pebble", "pebble-challtestsrv", "openssl"):
            if not shutil.which(binary):
                raise PebbleError(f"{binary} not found: apt-get install pebble (make setup)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        stop_recorded(self.workdir)  # one left by a process that died: its ports are ours
        self._make_https_cert()
        config = self.workdir / "pebble.json"
        config.write_text(json.dumps({"pebble": {
            "listenAddress": f"{self.host_ip}:{ACME_PORT}",
            "managementListenAddress": f"{self.host_ip}:{MANAGEMENT_PORT}",
            "certificate": str(self.workdir / "cert.pem"),
            "privateKey": str(self.workdir / "key.pem"),
            "httpPort": 80, "tlsPort": 443, "ocspResponderURL": "",
            "externalAccountBindingRequired": False}}))
        dns = f"{self.host_ip}:{DNS_PORT}"
        self._spawn("challtestsrv", ["pebble-challtestsrv", "-defaultIPv4", self.target_ip,
                                     "-defaultIPv6", "", "-dns01", dns, "-http01", "",
                                     "-https01", "", "-tlsalpn01", "", "-management",
                                     f"{self.host_ip}:{DNS_MANAGEMENT_PORT}"], {})
        self._wait_port(DNS_MANAGEMENT_PORT, timeout)
        # No sleeps before validation, no rejected nonces: fast and deterministic.
        self._spawn("pebble", ["pebble", "-config", str(config), "-dnsserver", dns],
                    {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"})
        self._wait_port(ACME_PORT, timeout)
        self._wait_port(MANAGEMENT_PORT, timeout)
        context = ssl.create_default_context(cafile=str(self.https_ca))
        url = f"https://{self.host_ip}:{MANAGEMENT_PORT}/roots/0"
        with urllib.request.urlopen(url, context=context, timeout=10) as answer:
            self.issuing_root.write_bytes(answer.read())
        (self.workdir / "pids").write_text("".join(f"{p.pid}\n" for p in self.procs))
        return self

    def _spawn(self, name: str, argv: list[str], env: dict) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           cwd=self.workdir, env={"PATH": "/usr/bin:/bin", **env},
                                           start_new_session=True))
        log.close()

    def _wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise PebbleError(f"Pebble exited early; see {self.log_tail()}")
            try:
                socket.create_connection((self.host_ip, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise PebbleError(f"nothing listens on {self.host_ip}:{port} after {timeout} s; "
                          f"{self.log_tail()}")

    def log_tail(self) -> str:
        return "\n".join(f"{log.name}: {log.read_text()[-1500:]}"
                         for log in sorted(self.workdir.glob("*.log")))

    def stop(self, timeout: float = 10) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.procs.clear()
        (self.workdir / "pids").unlink(missing_ok=True)


def recorded_pids(workdir: Path) -> list[int]:
    """The ids of a Pebble started in ``workdir`` that still run."""
    pids_file = workdir / "pids"
    pids = [int(p) for p in pids_file.read_text().split()] if pids_file.exists() else []
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            alive.append(pid)
        except ProcessLookupError:
            pass
    return alive


def stop_recorded(workdir: Path, timeout: float = 10) -> None:
    """Stop a Pebble started in ``workdir`` by another process (the demo)."""
    for pid in recorded_pids(workdir):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while recorded_pids(workdir) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in recorded_pids(workdir):
        os.kill(pid, signal.SIGKILL)
    (workdir / "pids").unlink(missing_ok=True)
