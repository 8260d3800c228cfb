"""Throwaway certificates for the TLS tests (trustme): a CA per test, and
certificate files laid out as every product loads them."""

from __future__ import annotations

import datetime as dt
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class Pair:
    """A certificate chain file and its key, `<cert>.key` as HAProxy looks for it."""

    cert: Path
    key: Path
    der: bytes  # the leaf, as a client sees it: ssl.SSLObject.getpeercert(True)


def issue(
    ca: trustme.CA,
    where: Path,
    label: str,
    *names: str,
    not_after: dt.datetime | None = None,
    key_type: trustme.KeyType = trustme.KeyType.ECDSA,
) -> Pair:
    """A certificate for `names` signed by `ca`, written to where/<label>.pem(.key)."""
    leaf = ca.issue_cert(*names, not_after=not_after, key_type=key_type)
    where.mkdir(parents=True, exist_ok=True)
    cert = where / f"{label}.pem"
    key = where / f"{label}.pem.key"
    leaf.private_key_pem.write_to_path(str(key))
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    der = ssl.PEM_cert_to_DER_cert(leaf.cert_chain_pems[0].bytes().decode())
    return Pair(cert, key, der)


def ca_file(ca: trustme.CA, where: Path) -> Path:
    path = where / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def client_context(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    """A client that trusts `ca` only."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def server_context(pair: Pair) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pair.cert, pair.key)
    return context


def tls11_client(ca: trustme.CA) -> ssl.SSLContext:
    """A client that can speak TLS 1.1 at most (this OpenSSL still can, at level 0)."""
    context = client_context(ca)
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context
