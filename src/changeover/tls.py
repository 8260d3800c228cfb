"""TLS for the embedded balancer and `changeover check`: SSL contexts built
from the balancer's settings, the certificate chosen per host name (SNI), a
reload that keeps the old certificates when the new ones do not load, and the
expiry of the configured certificates.

The listening sockets keep one SSL context for their whole life; its SNI
callback hands each new handshake the context of the name asked for, so a
reload swaps what new handshakes get and never touches an open connection.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import ssl
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from changeover.config import Balancer, Topology

log = logging.getLogger("changeover.proxy")

EXPIRY_WARNING = dt.timedelta(days=21)
ALPN = ["http/1.1"]  # the balancer speaks HTTP/1.1 only: never let a client pick h2
T = TypeVar("T")
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True)
class CertFiles:
    """One certificate and its key, and the host names it is for (none: the default)."""

    cert: Path
    key: Path
    names: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        """A file name for this pair where a balancer keeps copies (nginx with
        tls_load = "handshake"): `default` for tls_cert, else one derived from
        its first name, so it stays the same when entries move or are added."""
        if not self.names:
            return "default"
        return "host-" + hashlib.sha256(self.names[0].encode()).hexdigest()[:12]


def cert_files(topology: Topology) -> list[CertFiles]:
    """The configured certificates, the default (tls_cert) first; empty without TLS."""
    balancer = topology.balancer
    if balancer.tls_cert is None or balancer.tls_key is None:
        return []
    path = topology.resolve_path
    found = [CertFiles(path(balancer.tls_cert), path(balancer.tls_key))]
    found += [CertFiles(path(h.cert), path(h.key), tuple(h.names)) for h in balancer.tls_hosts]
    return found


def server_context(balancer: Balancer, files: CertFiles) -> ssl.SSLContext:
    """A server context with the balancer's versions, ciphers and ALPN and this pair
    loaded; ssl.SSLError or OSError when the pair does not load (or match)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[balancer.tls_min_version]
    context.set_ciphers(balancer.tls_ciphers)
    context.set_alpn_protocols(ALPN)
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(files.cert, files.key)
    return context


def choose(names: Mapping[str, T], server_name: str | None) -> T | None:
    """What a requested name gets: exact, else `*.` one label up; None: the default."""
    if not server_name:
        return None
    name = server_name.lower().removesuffix(".")
    found = names.get(name)
    if found is None and "." in name:
        found = names.get("*." + name.split(".", 1)[1])
    return found


class Certificates:
    """What the TLS listeners of one process serve.

    `listener` is given to every listening socket once. `reload()` loads every
    configured pair again and swaps them in all at once, or raises and keeps
    the old ones. `changed`, when given, says whether another process (the
    master) asked for a reload since the last one: the SNI callback then
    reloads before it answers, so the handshake after a reload gets the new
    certificate in every worker.
    """

    def __init__(self, topology: Topology, changed: Callable[[], bool] | None = None) -> None:
        self.topology = topology
        self.changed = changed
        self.default, self.names = self._load()
        self.listener = server_context(topology.balancer, cert_files(topology)[0])
        self.listener.sni_callback = self._pick

    def _load(self) -> tuple[ssl.SSLContext, dict[str, ssl.SSLContext]]:
        balancer = self.topology.balancer
        default: ssl.SSLContext | None = None
        names: dict[str, ssl.SSLContext] = {}
        for files in cert_files(self.topology):
            try:
                context = server_context(balancer, files)
            except (OSError, ssl.SSLError) as exc:
                raise ValueError(f"cannot load {files.cert} with {files.key}: {exc}") from None
            if not files.names:
                default = context
            names.update(dict.fromkeys(files.names, context))
        assert default is not None
        return default, names

    def reload(self) -> list[str]:
        """Load every pair again: all or nothing. The files loaded, for the log."""
        self.default, self.names = self._load()
        return [str(f.cert) for f in cert_files(self.topology)]

    def _pick(self, sslobj: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        if self.changed is not None and self.changed():
            try:
                self.reload()
            except ValueError as exc:  # the master loaded them: the files changed since
                log.error("certificates not reloaded, the old ones still serve: %s", exc)
        sslobj.context = choose(self.names, server_name) or self.default


def member_context(balancer: Balancer, cafile: Path | None) -> ssl.SSLContext | None:
    """The client context towards TLS members: their certificates verified against
    `cafile` (else the system's CAs) and the name they are reached by."""
    if not balancer.member_tls:
        return None
    context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    context.minimum_version = _VERSIONS[balancer.tls_min_version]
    context.set_alpn_protocols(ALPN)
    return context


def member_ca(topology: Topology) -> Path | None:
    ca = topology.balancer.member_ca
    return topology.resolve_path(ca) if ca else None


def expires(cert: Path) -> dt.datetime:
    """When the first certificate in a PEM file stops being valid (UTC)."""
    from cryptography import x509  # costly to import: only where an expiry is read

    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc


def expiry_warnings(topology: Topology, now: dt.datetime) -> Iterator[str]:
    """One line per configured certificate that expires within EXPIRY_WARNING of
    `now` (or already did), or that cannot be read."""
    for files in cert_files(topology):
        try:
            end = expires(files.cert)
        except (OSError, ValueError) as exc:
            yield f"certificate {files.cert}: cannot read it: {exc}"
            continue
        left = end - now
        if left <= dt.timedelta(0):
            yield f"certificate {files.cert} expired on {end:%Y-%m-%d %H:%M} UTC"
        elif left < EXPIRY_WARNING:
            yield (
                f"certificate {files.cert} expires in {left.days} day(s), on "
                f"{end:%Y-%m-%d %H:%M} UTC (warned from {EXPIRY_WARNING.days} days before)"
            )
