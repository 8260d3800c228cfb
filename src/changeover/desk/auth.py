"""Who may do what at the desk: tokens (from the environment or the file the
config names, never the URL), their roles, and the page's sessions. Pure
decisions over plain data, except `load_tokens`, which reads its inputs."""

from __future__ import annotations

import hmac
import secrets
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from changeover.config import ConfigError, Topology

VIEWER_ENV = "CHANGEOVER_DESK_VIEWER_TOKEN"
OPERATOR_ENV = "CHANGEOVER_DESK_OPERATOR_TOKEN"


class Role(IntEnum):
    """Ordered: an operator may read too."""

    VIEWER = 1
    OPERATOR = 2


@dataclass(frozen=True, slots=True)
class Tokens:
    by_role: tuple[tuple[str, Role], ...]

    def role_of(self, presented: str | None) -> Role | None:
        """The role of a presented token, compared in constant time."""
        if not presented:
            return None
        found = None
        for token, role in self.by_role:
            if hmac.compare_digest(token.encode(), presented.encode()):
                found = role if found is None else max(found, role)
        return found


def load_tokens(topo: Topology, env: Mapping[str, str]) -> Tokens:
    """The environment's tokens and those of `desk.tokens_file` (TOML lists
    `viewer` and `operator`). ConfigError when there is none at all."""
    pairs = [
        (env[name], role)
        for name, role in ((VIEWER_ENV, Role.VIEWER), (OPERATOR_ENV, Role.OPERATOR))
        if env.get(name)
    ]
    if topo.desk.tokens_file:
        path: Path = topo.resolve_path(topo.desk.tokens_file)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"desk.tokens_file {path}: {exc}") from None
        for key, role in (("viewer", Role.VIEWER), ("operator", Role.OPERATOR)):
            listed = data.get(key, [])
            if not isinstance(listed, list) or not all(isinstance(t, str) and t for t in listed):
                raise ConfigError(f"desk.tokens_file {path}: {key} must be a list of strings")
            pairs += [(t, role) for t in listed]
    if not pairs:
        raise ConfigError(
            f"the desk needs a token: set {VIEWER_ENV} and/or {OPERATOR_ENV}, "
            "or desk.tokens_file in the config"
        )
    return Tokens(tuple(pairs))


def bearer(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    scheme, _, token = (header or "").partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


@dataclass(frozen=True, slots=True)
class Session:
    """A page logged in with a token: its role, the name the person gave, and
    the CSRF token its actions must echo in a header."""

    role: Role
    name: str
    csrf: str


SESSION_HOURS = 12.0  # a working day: log in again the next morning


class Sessions:
    """Sessions of this desk process, by the opaque id in their cookie; each
    lasts `hours` from its login."""

    def __init__(
        self, hours: float = SESSION_HOURS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._by_id: dict[str, tuple[float, Session]] = {}
        self._seconds = hours * 3600
        self._clock = clock

    def open(self, role: Role, name: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(role, name, secrets.token_urlsafe(32))
        self._by_id[sid] = (self._clock() + self._seconds, session)
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        now = self._clock()
        for expired in [k for k, (until, _) in self._by_id.items() if until <= now]:
            del self._by_id[expired]
        found = self._by_id.get(sid) if sid else None
        return found[1] if found else None

    def close(self, sid: str | None) -> None:
        if sid:
            self._by_id.pop(sid, None)


def csrf_ok(expected: str, header: str | None) -> bool:
    return header is not None and hmac.compare_digest(expected.encode(), header.encode())
