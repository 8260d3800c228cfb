"""nginx's certificates loaded at every handshake (`balancer.tls_load = "handshake"`).

nginx (1.15.9 and later) loads a certificate whose `ssl_certificate` path holds
a variable at every new handshake, in the worker that makes it. The rendered
config points every TLS server at `<state_dir>/tls/current`, a symbolic link to
a version directory holding a copy of each configured pair (`<label>.pem`,
`<label>.key`), and resolves that link once per handshake (`$realpath_root`,
kept by a map for the handshake), so a handshake reads its certificate and its
key from one version even while the link is replaced. A renewal is therefore:

1. `stage`: a new version directory, each configured pair copied into it with
   its owner and mode (`cp -p`: the key stays as readable as the operator made
   it), and `staging` linked to it;
2. the checks, by nginx itself (the driver runs them): `nginx -t` of the config
   with the version's files named literally (each pair parses and its key
   matches), then a handshake per pair for `<label>.tls-check.changeover.invalid`,
   which the running workers answer from `staging` (they can read the files,
   and serve the very certificate staged);
3. `publish`: `current` renamed over to the new version, and read back by a
   handshake per pair; versions older than the previous one removed.

A version that fails a check is removed and `current` is untouched: the old
certificates keep serving. Replacing one file that holds both the certificate
and the key is not enough: nginx opens the path once for the certificate and
again for the key, so a rename between the two gives a handshake a certificate
and a key that do not match (measured: docs/benchmarks.md).

Which files to copy where, the names, and which versions to keep are pure
functions here; `CertificateStore` runs the commands on the instance's host.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from changeover.balancers.base import BalancerError
from changeover.balancers.host import Host
from changeover.balancers.render import NGINX_TLS_CHECK_DOMAIN
from changeover.tls import CertFiles

CURRENT = "current"  # what every handshake loads
STAGING = "staging"  # what the check server loads
MANIFEST = "labels"  # in each version: its pairs' labels, one a line
_VERSION = re.compile(r"v\d{8}T\d{6}-[0-9a-f]{8}")
_PEM_CERT = re.compile(
    r"-----BEGIN CERTIFICATE-----\s.*?-----END CERTIFICATE-----", re.DOTALL | re.ASCII
)


def version_name(now: dt.datetime, token: str | None = None) -> str:
    """A new version directory's name: sortable by time, unique by its token."""
    return f"v{now:%Y%m%dT%H%M%S}-{token or uuid.uuid4().hex[:8]}"


def copies(files: Sequence[CertFiles], version: str) -> list[tuple[str, str]]:
    """(source, copy) of every file of `files` into the directory `version`."""
    pairs = []
    for f in files:
        pairs += [(str(f.cert), f"{version}/{f.label}.pem")]
        pairs += [(str(f.key), f"{version}/{f.label}.key")]
    return pairs


def carried(previous: Sequence[str], labels: Sequence[str]) -> list[str]:
    """The labels of the version serving now that the new one lacks (an entry of
    `tls_hosts` removed): kept in the new version, so the config still loaded
    until the reload that follows finds their files."""
    return sorted(set(previous) - set(labels))


def check_name(label: str) -> str:
    """The name a handshake asks for to be served the staged pair `label`."""
    return f"{label}.{NGINX_TLS_CHECK_DOMAIN}"


def served_name(files: CertFiles) -> str:
    """A name a client asks for to be served `files` ("" asks for none: the
    default); a wildcard entry's name with a label in place of the `*`."""
    if not files.names:
        return ""
    name = files.names[0]
    return "changeover-check" + name[1:] if name.startswith("*.") else name


def first_certificate(pem: str) -> bytes:
    """The first certificate of a PEM file as DER (what a client is served);
    ValueError when the file holds none."""
    found = _PEM_CERT.search(pem)
    if found is None:
        raise ValueError("no PEM certificate in it")
    return ssl.PEM_cert_to_DER_cert(found.group(0))


def stale(versions: Sequence[str], keep: Sequence[str | None]) -> list[str]:
    """The version directories to remove: every one but those in `keep` (the
    new one, and the one serving until now: a handshake that resolved the link
    just before it moved may still be opening its files)."""
    return sorted(v for v in versions if _VERSION.fullmatch(v) and v not in keep)


@dataclass(frozen=True, slots=True)
class Version:
    """A staged version: its directory, and the certificate each label serves."""

    name: str
    path: str
    served: dict[str, bytes] = field(default_factory=dict)  # label -> leaf (DER)


class CertificateStore:
    """The version directories under `<state_dir>/tls` on the instance's host,
    changed by commands run there (the same argv locally and over SSH)."""

    def __init__(self, host: Host, root: str, timeout: float) -> None:
        self.host = host
        self.root = root.rstrip("/")
        self.timeout = timeout

    async def _run(self, *argv: str) -> str:
        result = await self.host.run(argv, timeout=self.timeout)
        if not result.ok:
            raise BalancerError(
                f"cannot install the certificates in {self.root}{self.host.where}: "
                f"{result.message()}"
            )
        return result.stdout

    async def labels(self, link: str = CURRENT) -> list[str] | None:
        """The labels of the version `link` names; None when there is none."""
        text = await self.host.read_text(f"{self.root}/{link}/{MANIFEST}")
        return None if text is None else text.split()

    async def target(self, link: str) -> str | None:
        """The version `link` names, None when there is no such link."""
        result = await self.host.run(["readlink", f"{self.root}/{link}"], timeout=self.timeout)
        return (result.stdout.strip() or None) if result.ok else None

    async def stage(self, files: Sequence[CertFiles], now: dt.datetime) -> Version:
        """A new version with a copy of every pair of `files` (and of the pairs
        of the serving version they lack), `staging` linked to it."""
        name = version_name(now)
        path = f"{self.root}/{name}"
        # Searchable by nginx's workers whatever the umask (each file keeps its own mode).
        await self._run("mkdir", "-p", "-m", "0755", self.root)
        await self._run("mkdir", "-m", "0755", path)
        try:
            labels = [f.label for f in files]
            for source, copy in copies(files, path):
                await self._run("cp", "-p", "--", source, copy)
            extra = carried(await self.labels() or [], labels)
            for label in extra:
                for suffix in (".pem", ".key"):
                    await self._run(
                        "cp", "-p", "--", f"{self.root}/{CURRENT}/{label}{suffix}", path
                    )
            await self.host.replace(f"{path}/{MANIFEST}", "".join(f"{x}\n" for x in labels + extra))
            served = {}
            for label in labels:
                pem = await self.host.read_text(f"{path}/{label}.pem")
                try:
                    served[label] = first_certificate(pem or "")
                except ValueError as exc:
                    source = next(str(f.cert) for f in files if f.label == label)
                    raise BalancerError(f"{source}: {exc}") from None
            version = Version(name, path, served)
            await self.point(STAGING, version)
        except Exception:
            await self.discard(name)
            raise
        return version

    async def point(self, link: str, version: Version | str) -> None:
        """`link` renamed over to name `version`: a handshake resolves either the
        old version or the new one, never nothing."""
        name = version if isinstance(version, str) else version.name
        temporary = f"{self.root}/.{link}.{uuid.uuid4().hex[:8]}"
        await self._run("ln", "-s", name, temporary)
        try:
            await self._run("mv", "-T", "-f", temporary, f"{self.root}/{link}")
        except BalancerError:
            await self.host.remove(temporary)
            raise

    async def discard(self, name: str) -> None:
        """Remove the version `name` (a staged one that failed its checks)."""
        if _VERSION.fullmatch(name):
            await self.host.run(["rm", "-rf", "--", f"{self.root}/{name}"], timeout=self.timeout)

    async def prune(self, keep: Sequence[str | None]) -> None:
        """Remove every version but those in `keep`."""
        listing = await self._run(
            "find", self.root, "-mindepth", "1", "-maxdepth", "1", "-type", "d"
        )
        names = [line.rsplit("/", 1)[-1] for line in listing.splitlines()]
        for name in stale(names, keep):
            await self.discard(name)


async def leaf(url: str, server_name: str, timeout: float, ask: bool = False) -> Answer:
    """The certificate (DER) a TLS listener at `url` serves for `server_name`
    ("": no SNI), read without verifying it (which one comes is the question);
    with `ask`, also the status of a request for that name on the connection."""
    host, _, port = url.removeprefix("https://").rstrip("/").rpartition(":")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(
            host.strip("[]"), int(port), ssl=context, server_hostname=server_name
        )
        try:
            der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            assert isinstance(der, bytes)
            if not ask:
                return Answer(der, None)
            writer.write(
                f"GET / HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
            )
            status = (await reader.readline()).split(b" ")
            return Answer(der, int(status[1]) if len(status) > 1 and status[1].isdigit() else None)
        finally:
            writer.close()


@dataclass(frozen=True, slots=True)
class Answer:
    certificate: bytes  # the leaf served, DER
    status: int | None  # the status of the request asked on the connection, if any
