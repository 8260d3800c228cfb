"""The topology: a validated model of `changeover.toml`.

Loading never raises anything but `ConfigError`, whose message names the file,
the key and what was expected, so the CLI can print one line and exit.
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import re
import shlex
import stat
import string
import tomllib
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

DEFAULT_CONFIG = "changeover.toml"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or a string such as "250ms", "30s", "10m", "1h"."""
    if isinstance(value, bool):
        raise ValueError('expected a duration such as 30, "30s" or "10m"')
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (m := _DURATION.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise ValueError('expected a duration such as 30, "30s" or "10m"')
    except OverflowError:
        raise ValueError("expected a duration that fits a number of seconds") from None
    if not math.isfinite(seconds):
        raise ValueError("expected a finite duration")
    if seconds < 0:
        raise ValueError("expected a duration of zero or more")
    return seconds


# In the JSON Schema (`changeover schema`): a number or a string such as "30s".
Duration = Annotated[float, BeforeValidator(parse_duration, json_schema_input_type=float | str)]
Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


# --- command templates -----------------------------------------------------------

MEMBER_PLACEHOLDERS = ("version", "member", "host", "port", "cluster", "route")
VERSION_ONLY = ("version",)


class TemplateError(ValueError):
    """A command template that cannot be rendered."""


def check_placeholders(template: str, known: Collection[str]) -> str:
    """`template` if each of its `{name}` placeholders is one of `known`."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)]
    except ValueError as exc:
        raise TemplateError(f"bad placeholder in {template!r}: {exc}") from None
    for name, spec, conv in fields:
        if name is not None and (name not in known or spec or conv):
            names = ", ".join("{" + p + "}" for p in known)
            raise TemplateError(f"unknown placeholder {{{name}}} in {template!r}; known: {names}")
    return template


def template_words(template: str, known: Collection[str]) -> list[str]:
    """The words of a command template split as a POSIX shell would, each with
    its placeholders checked against `known` (substituted later, inside its word)."""
    try:
        words = shlex.split(template, comments=False, posix=True)
    except ValueError as exc:
        raise TemplateError(f"cannot split command {template!r}: {exc}") from None
    if not words:
        raise TemplateError("empty command")
    return [check_placeholders(word, known) for word in words]


def _command(known: Collection[str]) -> AfterValidator:
    """A command template key, checked when the file is loaded (so `check` and
    `plan` refuse it, and a release never meets it half-way)."""

    def check(value: str | None) -> str | None:
        if value is not None:
            template_words(value, known)
        return value

    return AfterValidator(check)


MemberCommand = Annotated[str | None, _command(MEMBER_PLACEHOLDERS)]
VersionCommand = Annotated[str | None, _command(VERSION_ONLY)]
MemberPath = Annotated[str, AfterValidator(lambda v: check_placeholders(v, MEMBER_PLACEHOLDERS))]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str) -> tuple[str, int]:
    """("127.0.0.1", 8080) from "127.0.0.1:8080" or "[::1]:8080"."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    host = host.strip("[]")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    return host, number


class Listen(_Model):
    """An address to listen on, written "HOST:PORT"."""

    host: str
    port: int

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            host, port = parse_hostport(value)
            return {"host": host, "port": port}
        return value

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def url(self, scheme: str = "http", port: int | None = None) -> str:
        """How this host reaches the listener: a wildcard address means loopback."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port or self.port}"


_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def check_host(value: str) -> str:
    """`value` if it is an IP address or a host name a resolver can look up.

    A name must encode to IDNA (`a..b` does not: an empty label) into labels of
    letters, digits, '-' and '_'; an all-numeric last label must be an IPv4
    address (`10.0.1.256` is a typo, not a name).
    """
    expected = f"expected a host name or an IP address, got {value!r}"
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    try:
        ascii_name = value.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(expected) from None
    labels = ascii_name.removesuffix(".").split(".")
    if (
        len(ascii_name) > 253
        or not all(_LABEL.match(label) for label in labels)
        or labels[-1].isdigit()
    ):
        raise ValueError(expected)
    return value


class Member(_Model):
    name: Name
    host: Annotated[str, AfterValidator(check_host)] = "127.0.0.1"
    port: Port
    route: Name | None = None  # sticky-session route; defaults to the member name
    # SSH: how this member is logged into, over the [executor.ssh] defaults
    # (from an inventory's ansible_user / ansible_port, docs/configuration.md)
    ssh_user: str | None = None
    ssh_port: Port | None = None

    @property
    def route_id(self) -> str:
        return self.route or self.name

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


class Cluster(_Model):
    name: Name
    members: list[Member] = Field(min_length=1)
    qa_host: str | None = None  # Host header that reaches this cluster only
    qa_port: Port | None = None  # port of a listener that reaches this cluster only
    group: str | None = None  # the inventory group its members came from ([site] inventory)
    member_port: Port | None = None  # with group: the application port of every member


class HealthCheck(_Model):
    """The balancer's own active health check of every member."""

    path: str = "/health"
    interval: Duration = 1.0
    timeout: Duration = 1.0
    rise: int = Field(default=2, ge=1)
    fall: int = Field(default=2, ge=1)


class ProxyTimeouts(_Model):
    """The embedded balancer's limits on slow peers (checked once a second)."""

    header: Duration = 10.0  # a request head must arrive within this (else 408)
    body: Duration = 60.0  # a request body may pause this long between two reads
    idle: Duration = 60.0  # an idle keep-alive client connection is closed after this
    connect: Duration = 5.0  # to a member; then the next member is tried
    response: Duration = 60.0  # from the request to the response head (else 504)


class BalancerInstance(_Model):
    """One balancer process; several instances form a group changed all-or-nothing.

    Which fields matter depends on the driver (see docs/drivers.md).
    """

    name: Name = "lb1"
    admin_url: str | None = None  # builtin: admin API base URL
    stats_socket: str | None = None  # haproxy: unix path or HOST:PORT of the runtime API
    config_path: str | None = None  # apache/haproxy/nginx: where the rendered config goes
    check_command: list[str] | None = None  # e.g. ["nginx", "-t", "-c", "..."]
    reload_command: list[str] | None = None  # e.g. ["nginx", "-s", "reload", "-c", "..."]
    manager_url: str | None = None  # apache: balancer-manager URL
    state_file: str | None = None  # haproxy server-state-file / builtin admissions
    # nginx: the cluster admission flag files (absolute); default run_dir/state,
    # else /var/lib/changeover/nginx. nginx's workers must be able to reach it.
    state_dir: str | None = None
    # Private directory for the instance's pid, logs and sockets (relative to the
    # config file); default: the distribution's standard locations.
    run_dir: str | None = None
    # apache/haproxy/nginx on another host, reached over SSH with [executor.ssh]'s
    # settings (known_hosts, key, strict host keys); ssh_port/ssh_user override them.
    ssh_host: Annotated[str, AfterValidator(check_host)] | None = None
    ssh_port: Port | None = None
    ssh_user: str | None = None
    # The address this instance's listeners bind instead of balancer.listen's host
    # (public, admin, redirect and QA ports): the host's own address.
    bind_host: Annotated[str, AfterValidator(check_host)] | None = None

    @model_validator(mode="after")
    def _remote_paths(self) -> BalancerInstance:
        if self.ssh_host is None:
            for key in ("ssh_port", "ssh_user"):
                if getattr(self, key) is not None:
                    raise KeyedError(key, "needs ssh_host (the host reached over SSH)")
            return self
        for key in ("config_path", "run_dir", "state_dir", "state_file"):
            value = getattr(self, key)
            if value is not None and not value.startswith("/"):
                raise KeyedError(
                    key,
                    f"must be an absolute path on {self.ssh_host} (the instance is "
                    f"reached over SSH, nothing is relative to this file there), got {value!r}",
                )
        return self


# TLS 1.2 suites with forward secrecy and AEAD only (Mozilla's "intermediate"
# list, OpenSSL names); TLS 1.3 suites are all modern and OpenSSL's defaults.
MODERN_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


def check_tls_name(value: str) -> str:
    """A host name a certificate is chosen for (SNI): a name, or `*.` and a name."""
    expected = f"expected a host name or *.name (SNI carries names only), got {value!r}"
    try:
        check_host(value.removeprefix("*."))
    except ValueError:
        raise ValueError(expected) from None
    if _addresses(value) != frozenset({value.lower()}):  # an IP address, or localhost
        raise ValueError(expected)
    return value.lower()


class TlsHost(_Model):
    """A certificate for some host names: a client asking for one of them (SNI)
    gets this certificate instead of `tls_cert`."""

    names: list[Annotated[str, AfterValidator(check_tls_name)]] = Field(min_length=1)
    cert: str
    key: str


class Balancer(_Model):
    driver: Literal["builtin", "haproxy", "apache", "nginx"] = "builtin"
    listen: Listen = Listen(host="127.0.0.1", port=8080)
    admin_listen: Listen = Listen(host="127.0.0.1", port=8089)
    admin_token: str | None = None  # prefer admin_token_env in production
    admin_token_env: str = "CHANGEOVER_ADMIN_TOKEN"
    # builtin: a read-only token that opens /metrics only (the admin token opens it too)
    metrics_token_env: str = "CHANGEOVER_METRICS_TOKEN"
    sticky_cookie: str = "JSESSIONID"
    route_cookie: str = "CHANGEOVER_ROUTE"  # inserted when the app sets no sticky cookie
    algorithm: Literal["round-robin", "least-conn"] = "round-robin"
    workers: int = Field(default=1, ge=1, le=64)
    state_file: str | None = None
    tls_cert: str | None = None  # the default certificate (no SNI, or a name not below)
    tls_key: str | None = None
    tls_hosts: list[TlsHost] = Field(default_factory=list)  # certificates per host name (SNI)
    tls_min_version: Literal["1.2", "1.3"] = "1.2"
    tls_ciphers: str = MODERN_CIPHERS  # TLS 1.2 suites, OpenSSL names
    # nginx: when its listeners load the certificates. "config": when nginx loads
    # its config (start, reload: a renewal replaces the workers). "handshake": at
    # every new handshake, from the copy the driver installs in the instance's
    # state_dir, so a renewal is a rename and no reload (docs/drivers.md).
    tls_load: Literal["config", "handshake"] = "config"
    # A plain HTTP listener whose every request is redirected to the HTTPS one.
    redirect_listen: Listen | None = None
    member_tls: bool = False  # TLS to the members, their certificates verified
    member_ca: str | None = None  # CA file the members' certificates chain to (default: system's)
    member_tls_name: str | None = None  # the name on every member's certificate (default: its host)
    health: HealthCheck = HealthCheck()
    timeouts: ProxyTimeouts = ProxyTimeouts()  # builtin only
    # builtin: WebSockets still open on a member set OUT are closed (code 1001)
    # spread evenly over this long, never all at once
    close_spread: Duration = Field(default=30.0, gt=0)
    # builtin: after a reload or an upgrade, the old workers finish their requests
    # and tunnels for at most this long; then tunnels get 1001 and the rest is cut
    reload_grace: Duration = Field(default=30.0, gt=0)
    # builtin: the unix socket a new master takes the listeners over through
    # (default $TMPDIR/changeover-<uid>/balancer-<admin port>.sock)
    control_socket: str | None = None
    template_dir: str | None = None  # a site's own copies of the Jinja2 templates
    instances: list[BalancerInstance] = Field(default_factory=list)

    @model_validator(mode="after")
    def _tls_pair(self) -> Balancer:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_cert is None and (self.tls_hosts or self.redirect_listen):
            raise ValueError(
                "tls_hosts and redirect_listen need TLS on the listeners: set tls_cert and tls_key"
            )
        if not self.member_tls and (self.member_ca or self.member_tls_name):
            raise ValueError("member_ca and member_tls_name need member_tls = true")
        if self.tls_load == "handshake" and self.driver != "nginx":
            raise KeyedError(
                "tls_load",
                f'"handshake" is for the nginx driver, not {self.driver} (HAProxy and the '
                "embedded balancer renew certificates without closing a connection; "
                "Apache only by a graceful restart)",
            )
        if self.tls_load == "handshake" and self.tls_cert is None:
            raise KeyedError("tls_load", '"handshake" needs TLS on the listeners: set tls_cert')
        remote = [n for n, i in enumerate(self.instances) if i.ssh_host]
        if self.driver == "builtin" and remote:
            raise KeyedError(
                f"instances[{remote[0]}].ssh_host",
                "is for the haproxy, apache and nginx drivers (the builtin balancer "
                "is reached by its admin_url)",
            )
        seen: set[str] = set()
        for host in self.tls_hosts:
            for name in host.names:
                if name in seen:
                    raise ValueError(f"tls_hosts: {name!r} has two certificates")
                seen.add(name)
        return self

    def token(self) -> str | None:
        """The admin token: the environment variable wins over the file."""
        return os.environ.get(self.admin_token_env) or self.admin_token

    def metrics_token(self) -> str | None:
        """The read-only token of /metrics, from the environment only."""
        return os.environ.get(self.metrics_token_env) or None


class SshSettings(_Model):
    user: str | None = None
    port: Port = 22
    key_file: str | None = None  # default: the SSH agent and ~/.ssh keys
    known_hosts: str | None = None  # default: ~/.ssh/known_hosts
    insecure_ignore_host_keys: bool = False  # labs only: accept any host key
    jump_host: str | None = None  # [user@]host[:port]
    connect_timeout: Duration = 10.0


class Executor(_Model):
    kind: Literal["local", "ssh"] = "local"
    parallel: int = Field(default=0, ge=0)  # members of a cluster at once; 0: all
    max_failed: int = Field(default=0, ge=0)
    timeout: Duration = 120.0  # per command
    ssh: SshSettings = SshSettings()


def _regex(value: str | None) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
    return value


class Upload(_Model):
    src: MemberPath
    dest: MemberPath


class Release(_Model):
    """Commands run on each member; `{version}`, `{member}`, `{host}`, `{port}`,
    `{cluster}` and `{route}` are substituted as single literal arguments."""

    stop: MemberCommand = None
    deploy: MemberCommand = None
    start: MemberCommand = None
    upload: list[Upload] = Field(default_factory=list)
    # A regular expression every released version must match as a whole, beside
    # the fixed rules (not empty, no leading '-', no control character).
    version_pattern: Annotated[str | None, AfterValidator(_regex)] = None


class Smoke(_Model):
    """One HTTP request sent through the cluster's QA entry point."""

    path: str = "/"
    method: Literal["GET", "HEAD", "POST"] = "GET"
    status: int = 200
    body_contains: str | None = None


class Checks(_Model):
    health_path: str = "/health"
    health_status: int = 200
    version_path: str = "/version"
    version_contains: str = "{version}"
    smoke: list[Smoke] = Field(default_factory=list)
    smoke_command: VersionCommand = None  # run locally with CHANGEOVER_QA_URL set
    timeout: Duration = 5.0


# --- [policy.analysis]: metrics judged during the bake ----------------------------

ANALYSIS_PLACEHOLDERS = ("cluster", "members")
ANALYSIS_FIELD = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
Comparison = Literal["<", "<=", ">", ">=", "==", "!="]


def check_promql(value: str) -> str:
    """A PromQL query whose `{{name}}` placeholders are known (PromQL's own label
    matchers use single braces, so `{{` never appears in a query otherwise)."""
    if not value.strip():
        raise ValueError("expected a PromQL query, got an empty string")
    for name in ANALYSIS_FIELD.findall(value):
        if name not in ANALYSIS_PLACEHOLDERS:
            known = ", ".join("{{" + p + "}}" for p in ANALYSIS_PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {{{{{name}}}}} in the query; known: {known}")
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("expected a finite number")
    return value


class AnalysisQuery(_Model):
    """One PromQL query measured every `interval` during the bake, as a metric of
    Argo Rollouts' AnalysisTemplate: the result (every series of it) must be
    `succeed_if threshold`; more than `failure_limit` failed measurements, or more
    than `error_limit` in a row without a value, fail the bake."""

    name: Name
    query: Annotated[str, AfterValidator(check_promql)]
    succeed_if: Comparison
    threshold: Annotated[float, AfterValidator(_finite)]
    interval: Duration = Field(default=5.0, gt=0)
    initial_delay: Duration = 0.0
    failure_limit: int = Field(default=0, ge=0)
    error_limit: int = Field(default=4, ge=0)


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
    return value.rstrip("/")


class Analysis(_Model):
    """Where the bake's metrics come from: a Prometheus server's HTTP API."""

    prometheus: Annotated[str, AfterValidator(_http_url)]
    timeout: Duration = Field(default=5.0, gt=0)  # per query
    bearer_token_env: str | None = None  # sent as `Authorization: Bearer` when set
    queries: list[AnalysisQuery] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Analysis:
        names = [q.name for q in self.queries]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise KeyedError(f"queries[{i}].name", f"{name!r} names two queries")
        return self

    def token(self) -> str | None:
        return os.environ.get(self.bearer_token_env) if self.bearer_token_env else None


class Policy(_Model):
    strategy: Literal["rolling-clusters", "bluegreen"] = "rolling-clusters"
    order: list[Name] | None = None  # default: the order of [[clusters]]
    drain_timeout: Duration = 300.0
    # A sticky session that sent no request for this long is over: a draining
    # cluster is drained once none of its sessions was seen within it and nothing
    # is in flight, or at drain_timeout. Its earlier name `drain_idle` still reads.
    session_idle: Duration = Field(
        default=30.0, gt=0, validation_alias=AliasChoices("session_idle", "drain_idle")
    )
    health_timeout: Duration = 120.0
    approval: Literal["auto", "manual"] = "auto"
    min_healthy: int = Field(default=1, ge=1)
    keep_previous: Duration = 600.0
    bake: Duration = 0.0
    auto_rollback: bool = False
    max_error_ratio: float = Field(default=0.01, ge=0, le=1)
    analysis: Analysis | None = None  # PromQL queries judged during the bake

    @model_validator(mode="after")
    def _analysis_in_bake(self) -> Policy:
        if self.analysis is None:
            return self
        if self.bake <= 0:
            raise KeyedError(
                "analysis", "is judged during the bake: set policy.bake to more than 0"
            )
        for i, q in enumerate(self.analysis.queries):
            if q.initial_delay >= self.bake:
                raise KeyedError(
                    f"analysis.queries[{i}].initial_delay",
                    f"{q.initial_delay:g}s is not shorter than policy.bake ({self.bake:g}s): "
                    "the query would never be measured",
                )
        return self


SqlDialect = Literal["postgres", "mysql", "sqlite"]
_URL_DIALECTS: dict[str, SqlDialect] = {
    "sqlite": "sqlite",
    "postgres": "postgres",
    "postgresql": "postgres",
    "mysql": "mysql",
    "mariadb": "mysql",
}


class Database(_Model):
    """The database both clusters share, and the release's migrations."""

    url: str  # sqlite:///path, postgresql://..., mysql://...
    dialect: SqlDialect | None = None  # default: from the URL
    # Either a directory of ordered .sql files whose names start expand_/contract_ ...
    migrations_dir: str | None = None
    # ... or commands: one that applies, one that prints the SQL it would run.
    apply_command: VersionCommand = None
    sql_command: VersionCommand = None
    phase: Literal["expand", "contract"] = "expand"  # phase of command-driven migrations
    timeout: Duration = 600.0  # for apply_command and sql_command

    @model_validator(mode="after")
    def _one_source(self) -> Database:
        if (self.migrations_dir is None) == (self.apply_command is None):
            raise ValueError("give either migrations_dir or apply_command (with sql_command)")
        if self.apply_command is not None and self.sql_command is None:
            raise ValueError(
                "apply_command needs sql_command: the SQL is checked before anything is applied"
            )
        if self.sql_dialect() == "mysql" and self.migrations_dir is not None:
            raise ValueError(
                "migrations_dir is applied to SQLite and PostgreSQL only; "
                "for MySQL use apply_command and sql_command"
            )
        return self

    def sql_dialect(self) -> SqlDialect:
        """The dialect given, else the one the URL's scheme names (e.g. postgresql+psycopg)."""
        if self.dialect is not None:
            return self.dialect
        scheme = self.url.partition(":")[0].partition("+")[0].lower()
        if scheme not in _URL_DIALECTS:
            # Only what follows the credentials is shown.
            raise ValueError(
                f"cannot tell the dialect from the URL {self.url.rpartition('@')[2]!r}: "
                "use sqlite:///..., postgresql://... or mysql://..., or set dialect"
            )
        return _URL_DIALECTS[scheme]

    def phases(self) -> tuple[Literal["expand", "contract"], ...]:
        """The phases that have migrations: a directory has both, commands their `phase`."""
        return ("expand", "contract") if self.migrations_dir is not None else (self.phase,)


def url_shown(url: str) -> str:
    """A database URL as it may be printed: what follows the credentials."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url.rpartition("@")[2]


def _state_url(value: str | None) -> str | None:
    """A PostgreSQL URL libpq can read (checked here, so a release never meets a bad one)."""
    if value is None:
        return None
    scheme = value.partition(":")[0].lower()
    if scheme not in ("postgresql", "postgres") or not value[len(scheme) :].startswith("://"):
        raise ValueError(
            f"expected a postgresql://[user@]host[:port]/database URL, got {url_shown(value)!r}"
        )
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(value)
    except ProgrammingError as exc:
        # libpq's message may quote the URL, password and all.
        what = str(exc).strip().removeprefix("couldn't parse the connection string: ")
        raise ValueError(
            f"not a URL libpq can read: {what.replace(value, url_shown(value))}"
        ) from None
    return value


class Site(_Model):
    name: Name = "site"
    state_dir: str = ".changeover"  # journal and lock; relative to the config file
    inventory: str | None = None  # an Ansible inventory (INI or YAML) the clusters' groups name
    # The journal, the release lock and approvals in PostgreSQL, shared by every
    # copy of the config (pgjournal.py); None: a SQLite file in state_dir.
    state_url: Annotated[str | None, AfterValidator(_state_url)] = None


class Desk(_Model):
    """`changeover desk`: where its tokens are, besides the environment (docs/desk.md)."""

    tokens_file: str | None = None  # TOML: viewer = [...], operator = [...]


# --- hooks: local commands and webhooks run on release events (hooks.py) ---------

# `pre-release` runs before the first step and stops the release when it fails;
# the others only tell (their failures are journaled, never fail the release).
HookEventName = Literal[
    "pre-release",
    "started",
    "qa-ready",
    "awaiting-approval",
    "swapped",
    "done",
    "failed",
    "rolled-back",
    "aborted",
    "interrupted",
]
HOOK_EVENTS: tuple[HookEventName, ...] = get_args(HookEventName)
NOTIFY_EVENTS = HOOK_EVENTS[1:]
HOOK_PLACEHOLDERS = (
    "event",
    "site",
    "release",
    "kind",
    "version",
    "previous_version",
    "cluster",
    "qa_url",
    "qa_host",
    "message",
)
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"


def _hook_command(value: str | list[str] | None) -> str | list[str] | None:
    """A template split like a release command, or an argument list whose
    every word may hold placeholders; either way each value is one argument."""
    if isinstance(value, str):
        template_words(value, HOOK_PLACEHOLDERS)
    elif isinstance(value, list):
        if not value:
            raise ValueError("expected a non-empty argument list")
        for word in value:
            check_placeholders(word, HOOK_PLACEHOLDERS)
    return value


def _repeated(items: list[str]) -> list[str]:
    return sorted({item for item in items if items.count(item) > 1})


class Hook(_Model):
    """One `[[hooks]]` entry: a local command and/or a webhook POST, run on the
    events `on` names (docs/configuration.md)."""

    name: Name | None = None  # how the journal names it (default: hooks[N])
    on: list[HookEventName] = Field(default_factory=lambda: list(NOTIFY_EVENTS), min_length=1)
    command: Annotated[str | list[str] | None, AfterValidator(_hook_command)] = None
    url: str | None = None
    url_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None  # the URL is a secret
    format: Literal["json", "slack"] = "json"
    # The HMAC-SHA256 key of the signature header: from the environment or a
    # file, never written in changeover.toml itself.
    secret_env: Annotated[str, Field(pattern=_ENV_NAME)] | None = None
    secret_file: str | None = None  # relative to the config file
    timeout: Duration = Field(default=5.0, gt=0)  # each attempt
    retries: int = Field(default=2, ge=0, le=10)  # attempts after the first

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None and not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        return url

    @field_validator("on")
    @classmethod
    def _once_each(cls, on: list[str]) -> list[str]:
        if twice := _repeated(on):
            raise ValueError(f"names {', '.join(twice)} more than once")
        return on

    @model_validator(mode="after")
    def _something_to_run(self) -> Hook:
        web = self.url is not None or self.url_env is not None
        if self.url is not None and self.url_env is not None:
            raise ValueError("give url or url_env, not both")
        if self.command is None and not web:
            raise ValueError("a hook needs a command, a url (or url_env), or both")
        if not web and (self.format != "json" or self.secret_env or self.secret_file):
            raise ValueError("format, secret_env and secret_file need a url (or url_env)")
        if self.secret_env is not None and self.secret_file is not None:
            raise ValueError("give secret_env or secret_file, not both")
        return self


class Topology(_Model):
    site: Site = Site()
    clusters: list[Cluster]
    balancer: Balancer = Balancer()
    executor: Executor = Executor()
    release: Release = Release()
    checks: Checks = Checks()
    policy: Policy = Policy()
    database: Database | None = None
    desk: Desk = Desk()
    hooks: list[Hook] = Field(default_factory=list)
    # Where the file was loaded from (set by `load`), for relative paths.
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("clusters")
    @classmethod
    def _at_least_two(cls, clusters: list[Cluster]) -> list[Cluster]:
        if len(clusters) < 2:
            raise ValueError(
                "expected at least two clusters: a release needs one to serve while another is out"
            )
        return clusters

    @model_validator(mode="after")
    def _separate(self) -> Topology:
        for problem in _separation_problems(self.clusters):
            raise ValueError(problem)
        if self.policy.order is not None:
            names = [c.name for c in self.clusters]
            if sorted(self.policy.order) != sorted(names):
                raise ValueError(
                    f"policy.order must list every cluster exactly once: {names}, "
                    f"got {self.policy.order}"
                )
        return self

    @field_validator("hooks")
    @classmethod
    def _hook_names(cls, hooks: list[Hook]) -> list[Hook]:
        if twice := _repeated([h.name for h in hooks if h.name is not None]):
            raise ValueError(f"hook name {twice[0]!r} is given to more than one hook")
        return hooks

    @model_validator(mode="after")
    def _own_addresses(self) -> Topology:
        for problem in _address_problems(self):
            raise problem
        return self

    # --- lookups -----------------------------------------------------------

    def cluster(self, name: str) -> Cluster:
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)

    def cluster_order(self) -> list[str]:
        return list(self.policy.order or [c.name for c in self.clusters])

    def members(self) -> Iterator[tuple[Cluster, Member]]:
        for c in self.clusters:
            for m in c.members:
                yield c, m

    def state_dir(self) -> Path:
        base = self.source.parent if self.source else Path.cwd()
        return (base / self.site.state_dir).resolve()

    def member_url(self, member: Member) -> str:
        """Where the balancer and the checks reach a member: https with member_tls."""
        scheme = "https" if self.balancer.member_tls else "http"
        return member.base_url.replace("http", scheme, 1)

    def resolve_path(self, value: str) -> Path:
        """A path from the file, relative to the file's folder."""
        base = self.source.parent if self.source else Path.cwd()
        return (base / value).resolve()


def _separation_problems(clusters: list[Cluster]) -> Iterator[str]:
    """Clusters must be completely separate: no shared member, address or route."""
    owners: dict[str, dict[object, str]] = {"name": {}, "address": {}, "route": {}}
    clusters_seen: set[str] = set()
    for c in clusters:
        if c.name in clusters_seen:
            yield f"cluster name {c.name!r} appears twice"
        clusters_seen.add(c.name)
        for m in c.members:
            for kind, key, what in (
                ("name", m.name, f"member name {m.name!r}"),
                ("address", (m.host, m.port), f"member address {m.host}:{m.port}"),
                ("route", m.route_id, f"route {m.route_id!r}"),
            ):
                owner = owners[kind].get(key)
                if owner is not None:
                    where = "twice in cluster" if owner == c.name else f"in clusters {owner!r} and"
                    yield f"{what} appears {where} {c.name!r}: clusters must be completely separate"
                owners[kind][key] = c.name


class KeyedError(ValueError):
    """A problem found by a validator above the key it is about: the message
    names `key` (e.g. clusters[1].qa_port) instead of the validator's table."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


# --- addresses: the balancer's own endpoints ------------------------------------------

_ANY4 = "0.0.0.0"  # every IPv4 address of the port
_ANY = "::"  # every address of the port (IPv6 sockets take IPv4 too: dual-stack)
_LOOPBACK4 = ipaddress.ip_address("127.0.0.1")
_LOOPBACK6 = ipaddress.ip_address("::1")


def _addresses(host: str) -> frozenset[object]:
    """What a host spelling stands for: a wildcard, IP addresses, or the name itself.

    `localhost` is 127.0.0.1 and ::1; an IPv4-mapped IPv6 address is its IPv4
    address; an empty host is the IPv4 wildcard, as for bind(). Other names are
    not resolved: the file may be checked on another machine.
    """
    text = host.strip().strip("[]").lower().removesuffix(".")
    if text in ("", "localhost"):
        return frozenset({_ANY4} if text == "" else {_LOOPBACK4, _LOOPBACK6})
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return frozenset({text})
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified:
        return frozenset({_ANY4 if ip.version == 4 else _ANY})
    return frozenset({ip})


def _listeners_overlap(a: str, b: str) -> bool:
    """Whether two listeners on one port and these hosts take the same connections."""
    one, two = _addresses(a), _addresses(b)
    if _ANY in one or _ANY in two:
        return True
    if _ANY4 in one or _ANY4 in two:  # every IPv4 address, and names (they are local)
        other = two if _ANY4 in one else one
        return any(not isinstance(x, ipaddress.IPv6Address) for x in other)
    return bool(one & two)


def _reaches(member_host: str, listener_host: str) -> bool:
    """Whether connecting to member_host reaches a listener on listener_host (same port).

    A wildcard listener is reached through loopback (and a wildcard target, which
    connects to loopback); another address or a name may well be another machine.
    """
    member, listener = _addresses(member_host), _addresses(listener_host)
    member = frozenset(_LOOPBACK4 if x == _ANY4 else _LOOPBACK6 if x == _ANY else x for x in member)
    local4 = {x for x in member if isinstance(x, ipaddress.IPv4Address) and x.is_loopback}
    local6 = {x for x in member if isinstance(x, ipaddress.IPv6Address) and x.is_loopback}
    if _ANY in listener:
        return bool(local4 or local6)
    if _ANY4 in listener:
        return bool(local4)
    return bool(member & listener)


def _endpoints(topo: Topology) -> list[tuple[str, Listen]]:
    """(key, address) of every listener the balancer opens: the public one, one
    per qa_port (on the public host, like the builtin proxy and the rendered
    configs) and the control channel (HAProxy's is its stats socket instead)."""
    balancer = topo.balancer
    found = [("balancer.listen", balancer.listen)]
    for i, c in enumerate(topo.clusters):
        if c.qa_port is not None:
            found.append(
                (f"clusters[{i}].qa_port", Listen(host=balancer.listen.host, port=c.qa_port))
            )
    if balancer.driver != "haproxy":
        found.append(("balancer.admin_listen", balancer.admin_listen))
    if balancer.redirect_listen is not None:
        found.append(("balancer.redirect_listen", balancer.redirect_listen))
    return found


def _spelled(a: Listen, b: Listen) -> str:
    """Why two spellings are one endpoint ("; ..."), or nothing if spelled alike."""
    if str(a) == str(b):
        return ""
    wild = [x.host or "0.0.0.0" for x in (b, a) if _addresses(x.host) & {_ANY, _ANY4}]
    if wild:
        return f"; {wild[0]} listens on every address of the port"
    return f"; {a.host} and {b.host} are the same host"


def _address_problems(topo: Topology) -> Iterator[KeyedError]:
    """Every listener on an endpoint of its own, and no member on one of them."""
    endpoints = _endpoints(topo)
    for n, (key, listen) in enumerate(endpoints):
        for other_key, other in endpoints[:n]:
            if listen.port == other.port and _listeners_overlap(listen.host, other.host):
                taken = f"is taken by {other_key} ({other}{_spelled(listen, other)})"
                if key.endswith(".qa_port"):
                    yield KeyedError(
                        key,
                        f"port {listen.port} {taken}: expected a port of its own "
                        f"(a qa_port listens on balancer.listen's host, {listen.host})",
                    )
                else:
                    yield KeyedError(key, f"{listen} {taken}: expected an address of its own")
    for i, c in enumerate(topo.clusters):
        for j, m in enumerate(c.members):
            address = Listen(host=m.host, port=m.port)
            for key, listen in endpoints:
                if m.port == listen.port and _reaches(m.host, listen.host):
                    yield KeyedError(
                        f"clusters[{i}].members[{j}]",
                        f"member {m.name!r} at {address} is the balancer's own {key} "
                        f"({listen}{_spelled(address, listen)}): expected the address of an "
                        "application server (requests would loop back into the balancer)",
                    )


class ConfigError(Exception):
    """A topology that cannot be used; the message is one line for the user."""


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+\Z")


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.match(r"(function-[a-z]+|tagged-union)\[", part):  # pydantic's, not a key
            continue
        else:
            # A key TOML would have to quote is shown quoted: `":"`, not `:`.
            key = part if _BARE_KEY.match(part) else json.dumps(part, ensure_ascii=False)
            out += f".{key}" if out else key
    return out or "(top level)"


def _describe(err: Any) -> str:
    kind = err["type"]
    if kind == "missing":
        return "is required but missing"
    if kind == "extra_forbidden":
        return "is not a known key (check the spelling)"
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _where(err: Any) -> str:
    where = _loc(tuple(err["loc"]))
    keyed = err.get("ctx", {}).get("error")
    if isinstance(keyed, KeyedError):
        return keyed.key if where == "(top level)" else f"{where}.{keyed.key}"
    return where


def format_validation(path: Path | str, exc: ValidationError) -> str:
    problems = [f"{path}: {_where(e)}: {_describe(e)}" for e in exc.errors()]
    return problems[0] if len(problems) == 1 else "\n".join(problems)


def parse(data: dict[str, Any], path: Path | str = DEFAULT_CONFIG) -> Topology:
    site, clusters = data.get("site"), data.get("clusters")
    if (isinstance(site, dict) and site.get("inventory") is not None) or (
        isinstance(clusters, list)
        and any(isinstance(c, dict) and c.get("group") is not None for c in clusters)
    ):
        from changeover import inventory  # PyYAML is imported only for a site with one

        try:
            data = inventory.with_members(data, Path(path).resolve().parent)
        except inventory.KeyedInventoryError as exc:
            raise ConfigError(f"{path}: {exc.key}: {exc}") from None
    try:
        topo = Topology.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation(path, exc)) from None
    except RecursionError:
        raise ConfigError(f"{path}: arrays or tables nested too deep") from None
    return topo.model_copy(update={"source": Path(path).resolve()})


MAX_CONFIG_BYTES = 1 << 20  # a topology is a few kilobytes; /dev/zero is endless


class TooLarge(ValueError):
    """A file larger than its kind ever is."""


def read_regular(p: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. FileNotFoundError
    when there is none; ValueError (TooLarge for the size) saying what is wrong."""
    try:
        # Looked at before it is opened: reading a FIFO or a device would block or never end.
        if not stat.S_ISREG(p.stat().st_mode):
            raise ValueError("not a regular file")
        with p.open("rb") as f:
            raw = f.read(limit + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"cannot read: {exc.strerror}") from None
    if len(raw) > limit:
        raise TooLarge(f"larger than {limit} bytes")
    return raw


def load(path: Path | str = DEFAULT_CONFIG) -> Topology:
    p = Path(path)
    try:
        raw = read_regular(p, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file (write one with `changeover init`)") from None
    except TooLarge as exc:
        raise ConfigError(f"{p}: {exc}: not a topology") from None
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{p}: not valid TOML: arrays or tables nested too deep") from None
    return parse(data, p)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of changeover.toml (`changeover schema`), for editors: from
    the models, with what the loader accepts beyond them (an address written
    "HOST:PORT"). Checks a file's shape; the loader's own checks (placeholders,
    addresses, cross-references) go further."""
    schema = Topology.model_json_schema()
    listen = schema["$defs"]["Listen"]
    schema["$defs"]["Listen"] = {
        "anyOf": [{"type": "string", "pattern": r"^.+:[0-9]{1,5}$"}, listen],
        "description": listen.get("description", ""),
    }
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}
