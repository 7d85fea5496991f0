"""Shared by the page-server tests: free ports, waiting for a listener, certificates, memory snapshots."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from criu_harness import read_mem

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "crit_pageread"]


@dataclass
class Pki:
    """A CA and two certificates naming 127.0.0.1 (IP and CN), made with the openssl CLI."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def criu_server(self) -> list[str]:
        return ["--tls", "--tls-cacert", str(self.ca), "--tls-cert", str(self.server_cert),
                "--tls-key", str(self.server_key)]

    def criu_client(self) -> list[str]:
        return ["--tls", "--tls-cacert", str(self.ca), "--tls-cert", str(self.client_cert),
                "--tls-key", str(self.client_key)]

    def ours_server(self) -> list[str]:
        return ["--tls-cacert", str(self.ca), "--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key)]

    def remote_table(self) -> dict[str, str]:
        return {"tls_cacert": str(self.ca), "tls_cert": str(self.client_cert), "tls_key": str(self.client_key)}


def make_pki(directory: Path, name: str = "127.0.0.1") -> Pki:
    """Certificates CRIU (GnuTLS) and `ssl` both accept: CA-signed, subjectAltName IP and DNS."""
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=crit-pageread test CA")
    ext = directory / "leaf.ext"
    ext.write_text(f"subjectAltName=IP:{name},DNS:localhost\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")
    for who in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{who}.key", "-out", f"{who}.csr",
            "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", "-extfile", str(ext))
    d = directory
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def snapshot(pid: int) -> list[tuple[int, bytes]]:
    """Every writable mapping of a (quiet) process, read from /proc/PID/mem: the oracle."""
    out = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split()
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if parts[1].startswith("rw"):
            try:
                out.append((start, read_mem(pid, start, end - start)))
            except OSError:
                continue
    return out


def oracle_bytes(snap: list[tuple[int, bytes]], vaddr: int, length: int) -> bytes | None:
    """The snapshot's bytes at [vaddr, vaddr+length), or None if no single mapping holds them."""
    for start, data in snap:
        if start <= vaddr and vaddr + length <= start + len(data):
            return data[vaddr - start : vaddr - start + length]
    return None


@contextmanager
def serve(images: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[tuple[subprocess.Popen[str], int]]:
    """`crit-pageread serve IMAGES ARGS` on a free port; yields (process, port); stopped after."""
    proc = subprocess.Popen([*CLI, "serve", str(images), "--port", "0", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})})
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            proc.kill()
            raise RuntimeError(f"serve did not start: {line!r} {proc.communicate()[1]}")
        port = int(line.split("listening on ")[1].split()[0].rsplit(":", 1)[1])
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
