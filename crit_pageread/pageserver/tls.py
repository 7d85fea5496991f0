"""TLS as CRIU's page server speaks it (GnuTLS on CRIU's side, the `ssl` module on ours).

Both sides present a certificate; each checks the peer's certificate against
its own `--address` (IP address or DNS name in the subjectAltName, else the
common name) unless `no_cn_verify`. CRIU's default files are used when none
are given, as CRIU does.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import ssl
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, RemoteError

CRIU_CACERT = "/etc/pki/CA/cacert.pem"
CRIU_CERT = "/etc/pki/criu/cert.pem"
CRIU_KEY = "/etc/pki/criu/private/key.pem"


@dataclass(frozen=True)
class TlsOptions:
    """Certificate files and the name check, as CRIU's `--tls-*` options."""

    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    no_cn_verify: bool = False

    def _files(self, what: str) -> tuple[str, str, str | None]:
        cert = self.cert or CRIU_CERT
        key = self.key or CRIU_KEY
        for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_cacert", self.cacert)):
            if path is not None and not os.access(path, os.R_OK):
                raise ConfigError(f"{what}: {name} {path}: cannot read the file")
        return cert, key, self.cacert

    def client_context(self, what: str = "[remote]") -> ssl.SSLContext:
        """A context for connecting to a page server (presents our certificate, checks the server's)."""
        cert, key, cacert = self._files(what)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load(ctx, cert, key, cacert, what)
        ctx.check_hostname = not self.no_cn_verify
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def server_context(self, what: str = "serve") -> ssl.SSLContext:
        """A context for serving (presents our certificate, requires and checks the client's)."""
        cert, key, cacert = self._files(what)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _load(ctx, cert, key, cacert, what)
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def _load(ctx: ssl.SSLContext, cert: str, key: str, cacert: str | None, what: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
        if cacert:
            ctx.load_verify_locations(cacert)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
            if os.access(CRIU_CACERT, os.R_OK):
                ctx.load_verify_locations(CRIU_CACERT)
    except ssl.SSLError as exc:
        raise ConfigError(f"{what}: bad TLS certificate or key ({cert}, {key}): {exc.reason or exc}") from None


def wrap_client(sock: socket.socket, ctx: ssl.SSLContext, address: str, peer: str) -> ssl.SSLSocket:
    """Handshake as a client; the server's certificate must name `address` unless the check is off."""
    try:
        return ctx.wrap_socket(sock, server_hostname=address if ctx.check_hostname else None)
    except ssl.SSLCertVerificationError as exc:
        raise RemoteError(f"{peer}: TLS: server certificate rejected: {exc.verify_message or exc}") from None
    except (ssl.SSLError, OSError) as exc:
        raise RemoteError(f"{peer}: TLS handshake failed: {_reason(exc)}") from None


def wrap_server(sock: socket.socket, ctx: ssl.SSLContext, address: str, no_cn_verify: bool, peer: str) -> ssl.SSLSocket:
    """Handshake as a server; the client's certificate must name our `address` unless the check is off."""
    try:
        tls = ctx.wrap_socket(sock, server_side=True)
    except (ssl.SSLError, OSError) as exc:
        raise RemoteError(f"{peer}: TLS handshake failed: {_reason(exc)}") from None
    if not no_cn_verify and not cert_names(tls.getpeercert(), address):
        tls.close()
        raise RemoteError(f"{peer}: TLS: client certificate does not name {address} (use --tls-no-cn-verify)")
    return tls


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, socket.timeout):
        return "timed out"
    return str(exc)


def cert_names(cert: dict[str, Any] | None, address: str) -> bool:
    """True if the certificate names `address`: an IP or DNS subjectAltName, else the common name."""
    if not cert:
        return False
    try:
        ip: Any = ipaddress.ip_address(address)
    except ValueError:
        ip = None
    sans = cert.get("subjectAltName", ())
    dns = [value for kind, value in sans if kind == "DNS"]
    for kind, value in sans:
        if kind == "IP Address" and ip is not None:
            try:
                if ipaddress.ip_address(value.strip()) == ip:
                    return True
            except ValueError:
                continue
    if ip is None and any(_dns_match(name, address) for name in dns):
        return True
    if not dns:
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName" and value.lower() == address.lower():
                    return True
    return False


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern.startswith("*."):
        head, _, rest = host.partition(".")
        return bool(head) and rest == pattern[2:]
    return pattern == host
