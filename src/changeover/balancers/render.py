"""Balancer configs rendered from the topology with Jinja2 templates.

One template per product lives in `changeover/templates/`; each is commented so
that it can be read side by side with the product's manual. Rendering is a pure
function: it reads no file but the templates (and Jinja2's cache of them
compiled) and touches no server, so `changeover render` can print a config for
review and a driver can render the exact text it will test with the product's
own checker before installing it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jinja2

from changeover.config import BalancerInstance, Cluster, Listen, Member, Topology
from changeover.model import REACH, Admission
from changeover.tls import cert_files, choose, member_ca

Product = Literal["haproxy", "apache", "nginx"]
PRODUCTS: tuple[Product, ...] = ("haproxy", "apache", "nginx")

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "templates"

# Where each product keeps its runtime files when no private run directory is given:
# the locations Debian's packages use, so a rendered file can replace the stock one.
_SYSTEM_PATHS: dict[Product, dict[str, str]] = {
    "haproxy": {
        "stats_socket": "/run/haproxy/admin.sock",
        "state_file": "/var/lib/haproxy/server-state",
    },
    "apache": {
        "server_root": "/etc/apache2",
        "pid_file": "/run/apache2/apache2.pid",
        "runtime_dir": "/run/apache2",
        "error_log": "/var/log/apache2/error.log",
    },
    "nginx": {
        "pid_file": "/run/nginx.pid",
        "error_log": "/var/log/nginx/error.log",
        "temp_dir": "/var/lib/nginx",
        # Cluster admission flag files, read by the workers on every request.
        "state_dir": "/var/lib/changeover/nginx",
    },
}

_PRIVATE_NAMES: dict[str, str] = {
    "stats_socket": "admin.sock",
    "state_file": "server-state",
    "server_root": ".",
    "pid_file": "{product}.pid",
    "runtime_dir": ".",
    "error_log": "error.log",
    "temp_dir": "tmp",
    "state_dir": "state",
}


_NGINX_MAP_WORDS = frozenset({"default", "hostnames", "include", "volatile"})
# nginx renders one new-session upstream per combination of clusters (2^k - 1).
NGINX_MAX_CLUSTERS = 6
# A path nginx reads as one plain word: no quoting, no "$" variables.
_NGINX_PATH = re.compile(r"/[A-Za-z0-9._/+-]*")
# nginx with tls_load = "handshake": a handshake for "<label>.<CHECK_DOMAIN>" is
# served the pair <label> of the staged certificate version (a reserved name,
# RFC 2606: no client asks for it by mistake), so the driver checks a version
# through nginx's own workers before it serves anyone.
NGINX_TLS_CHECK_DOMAIN = "tls-check.changeover.invalid"


class RenderError(ValueError):
    """The topology cannot be expressed in this product's config."""


@dataclass(frozen=True, slots=True)
class RenderOptions:
    """What a config needs beyond the topology: where the process keeps its files.

    `run_dir` None means the distribution's standard locations; a directory gives
    a private instance (tests, or several balancers on one host).
    """

    instance: BalancerInstance | None = None
    run_dir: Path | None = None
    template_dir: Path | None = None  # a site's own copy of the templates
    extra: Mapping[str, Any] = field(default_factory=dict)

    def path(self, product: Product, key: str) -> str:
        if self.run_dir is None:
            return _SYSTEM_PATHS[product][key]
        name = _PRIVATE_NAMES[key].format(product=product)
        return str((self.run_dir / name).resolve())


def bound(listen: Listen, instance: BalancerInstance | None) -> Listen:
    """`listen` on the instance's own `bind_host` when it names one."""
    if instance is None or instance.bind_host is None:
        return listen
    return listen.model_copy(update={"host": instance.bind_host})


def runtime_paths(product: Product, options: RenderOptions) -> dict[str, str]:
    """The files a product's process uses (pid, logs, sockets), as rendered."""
    paths = {key: options.path(product, key) for key in _SYSTEM_PATHS[product]}
    instance = options.instance
    if product == "haproxy" and instance is not None:
        if instance.stats_socket:
            paths["stats_socket"] = instance.stats_socket
        if instance.state_file:
            paths["state_file"] = instance.state_file
    if product == "nginx" and instance is not None and instance.state_dir:
        paths["state_dir"] = instance.state_dir
    return paths


@dataclass(frozen=True, slots=True)
class MemberContext:
    name: str
    cluster: str
    host: str
    port: int
    route: str
    admission: str
    # The admission's reach (model.REACH): what the templates render it with.
    new: bool  # takes new sessions
    sticky: bool  # takes the requests of its sticky sessions
    address: str  # host:port with IPv6 brackets
    # The route as a regular expression literal: routes may contain dots.
    route_regex: str


@dataclass(frozen=True, slots=True)
class ClusterContext:
    name: str
    qa_host: str | None
    qa_port: int | None
    members: tuple[MemberContext, ...]


@dataclass(frozen=True, slots=True)
class PoolContext:
    """nginx: the new-session upstream of one combination of clusters."""

    mask: str  # one digit per cluster, in file order: 1 = its members are in
    members: tuple[MemberContext, ...]


def _new_pools(clusters: tuple[ClusterContext, ...]) -> tuple[PoolContext, ...]:
    pools = []
    for bits in itertools.product("01", repeat=len(clusters)):
        if "1" in bits:
            chosen = (c for c, bit in zip(clusters, bits, strict=True) if bit == "1")
            pools.append(PoolContext("".join(bits), tuple(m for c in chosen for m in c.members)))
    return tuple(pools)


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _member(cluster: Cluster, member: Member, admission: Admission) -> MemberContext:
    return MemberContext(
        name=member.name,
        cluster=cluster.name,
        host=member.host,
        port=member.port,
        route=member.route_id,
        admission=admission.value,
        new=REACH[admission].new,
        sticky=REACH[admission].sticky,
        address=_address(member.host, member.port),
        route_regex=re.sub(r"\.", "[.]", member.route_id),
    )


def resolve_admissions(
    topology: Topology, admissions: Mapping[str, Admission] | None
) -> dict[str, Admission]:
    """Every member's admission: the given ones, LIVE for the rest; unknown names refused."""
    names = [m.name for _, m in topology.members()]
    unknown = sorted(set(admissions or {}) - set(names))
    if unknown:
        raise RenderError(f"unknown member(s) {', '.join(unknown)}; known: {', '.join(names)}")
    given = dict(admissions or {})
    return {name: Admission(given.get(name, Admission.LIVE)) for name in names}


def admissions_fingerprint(admissions: Mapping[str, Admission]) -> str:
    """A short digest of a set of admissions, rendered into configs that cannot be
    queried at run time (nginx) so a reload can be proven to have taken effect."""
    text = json.dumps({k: str(v) for k, v in sorted(admissions.items())}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _context(
    topology: Topology,
    product: Product,
    admissions: dict[str, Admission],
    options: RenderOptions,
) -> dict[str, Any]:
    lb = topology.balancer
    clusters = tuple(
        ClusterContext(
            name=c.name,
            qa_host=c.qa_host,
            qa_port=c.qa_port,
            members=tuple(_member(c, m, admissions[m.name]) for m in c.members),
        )
        for c in topology.clusters
    )
    members = tuple(m for c in clusters for m in c.members)
    paths = runtime_paths(product, options)
    tls = _tls_context(topology, paths.get("state_dir"))
    member_tls = None
    if lb.member_tls:
        ca = member_ca(topology)
        member_tls = {"ca": str(ca) if ca else None, "name": lb.member_tls_name}
    health = lb.health
    return {
        "site": topology.site.name,
        "product": product,
        "listen": bound(lb.listen, options.instance),
        "admin": bound(lb.admin_listen, options.instance),
        "tls": tls,
        "redirect": lb.redirect_listen and bound(lb.redirect_listen, options.instance),
        "member_tls": member_tls,
        "sticky_cookie": lb.sticky_cookie,
        # HAProxy's stick table forgets a session this long after its last request.
        "session_idle_ms": max(1, round(topology.policy.session_idle * 1000)),
        "algorithm": lb.algorithm,
        "health": {
            "path": health.path,
            "interval_ms": max(100, round(health.interval * 1000)),
            "timeout_ms": max(100, round(health.timeout * 1000)),
            # mod_proxy_hcheck counts in whole seconds.
            "interval_s": max(1, math.ceil(health.interval)),
            "timeout_s": max(1, math.ceil(health.timeout)),
            "rise": health.rise,
            "fall": health.fall,
        },
        "clusters": clusters,
        "members": members,
        "paths": paths,
        "run_dir": str(options.run_dir.resolve()) if options.run_dir else None,
        "state_dir": paths.get("state_dir"),
        "new_pools": _new_pools(clusters) if product == "nginx" else (),
        "fingerprint": admissions_fingerprint(admissions),
        "admissions_json": json.dumps(
            {m.name: m.admission for m in members}, separators=(",", ":")
        ),
        # nginx, tls_load = "handshake": the certificate version directory to name
        # literally instead (the driver's `nginx -t` of a version before it serves).
        "tls_check_dir": None,
        **options.extra,
    }


_PROTOCOLS = {"1.2": ("TLSv1.2", "TLSv1.3"), "1.3": ("TLSv1.3",)}


def _tls_context(topology: Topology, state_dir: str | None) -> dict[str, Any] | None:
    """The listeners' TLS settings; `public_hosts` are the certificates for names
    that are no QA host (they get a copy of the public listener's routing where a
    product picks the certificate by server block), `qa` each QA host's pair.
    Each pair's `label` names its copy in `dir` (nginx, `load` "handshake")."""
    files = cert_files(topology)
    if not files:
        return None
    lb = topology.balancer
    pair = [
        {"cert": str(f.cert), "key": str(f.key), "names": list(f.names), "label": f.label}
        for f in files
    ]
    by_name = {name: p for p in pair[1:] for name in p["names"]}
    qa_hosts = {c.qa_host.lower() for c in topology.clusters if c.qa_host}
    public = [p | {"names": [n for n in p["names"] if n not in qa_hosts]} for p in pair[1:]]
    return {
        **pair[0],
        "hosts": pair[1:],
        "public_hosts": [p for p in public if p["names"]],
        "qa": {
            c.name: choose(by_name, c.qa_host) or pair[0] for c in topology.clusters if c.qa_host
        },
        "protocols": _PROTOCOLS[lb.tls_min_version],
        "min_version": "TLSv" + lb.tls_min_version,
        "ciphers": lb.tls_ciphers,
        "load": lb.tls_load,
        "dir": nginx_tls_dir(state_dir) if state_dir else None,
        "check_domain": NGINX_TLS_CHECK_DOMAIN,
    }


def nginx_tls_dir(state_dir: str) -> str:
    """Where nginx's certificate versions live (tls_load = "handshake")."""
    return f"{state_dir.rstrip('/')}/tls"


def _check(topology: Topology, product: Product, options: RenderOptions) -> None:
    """Refuse what a product cannot express, with the reason, before rendering."""
    lb = topology.balancer
    if product == "nginx" and not re.fullmatch(r"[A-Za-z0-9_]+", lb.sticky_cookie):
        raise RenderError(
            f"nginx reads the sticky cookie as $cookie_{lb.sticky_cookie}, which only "
            "works for names of letters, digits and underscores"
        )
    if product == "nginx":
        if len(topology.clusters) > NGINX_MAX_CLUSTERS:
            raise RenderError(
                f"nginx renders one upstream per combination of clusters taking new sessions; "
                f"at most {NGINX_MAX_CLUSTERS} clusters (got {len(topology.clusters)})"
            )
        state_dir = runtime_paths(product, options)["state_dir"]
        if not _NGINX_PATH.fullmatch(state_dir):
            raise RenderError(
                f"nginx state_dir must be an absolute path of letters, digits and "
                f"'._/+-' (nginx reads it unquoted, '$' as a variable); got {state_dir!r}"
            )
    for files in cert_files(topology) if product == "haproxy" else []:
        if files.key not in (files.cert, Path(f"{files.cert}.key")):
            raise RenderError(
                "HAProxy 2.6 loads the key from the certificate file or from "
                f"'<certificate>.key': put the key in {files.cert} or {files.cert}.key "
                f"(got {files.key})"
            )
    hosts = {m.host for _, m in topology.members()}
    if product == "nginx" and lb.member_tls and not lb.member_tls_name and len(hosts) > 1:
        raise RenderError(
            "nginx verifies every member's certificate under one name: set "
            "balancer.member_tls_name to the name all the members' certificates carry"
        )


class _CompiledCache(jinja2.FileSystemBytecodeCache):
    """Jinja2's cache of compiled templates, best effort: one that cannot be
    written (a full or read-only disk) only costs the next process a compile."""

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        with contextlib.suppress(OSError):
            super().dump_bytecode(bucket)


def _compiled_cache() -> jinja2.BytecodeCache | None:
    try:
        return _CompiledCache()  # $TMPDIR/_jinja2-cache-<uid>, refused unless private
    except (OSError, RuntimeError):
        return None


@functools.cache
def _environment(template_dir: Path | None) -> jinja2.Environment:
    # One per template directory: compiling a template costs tens of ms, and a
    # flip renders. Jinja2 still reloads a template whose file changed. The
    # compiled code is also kept between processes, in Jinja2's own per-user
    # cache directory (mode 0700, checked to be this user's), keyed by the
    # template's source: a new command's first render does not compile it again.
    dirs = [str(template_dir)] if template_dir else []
    dirs.append(str(TEMPLATE_DIR))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(dirs),
        bytecode_cache=_compiled_cache(),
        undefined=jinja2.StrictUndefined,  # a typo in a template fails loudly
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # configs, not HTML
    )
    env.filters["hostport"] = lambda listen: str(listen) if isinstance(listen, Listen) else listen
    env.filters["ident"] = lambda name: re.sub(r"[^A-Za-z0-9_]", "_", str(name))
    # nginx "map": a key spelled like one of its parameters must be escaped.
    env.filters["map_key"] = lambda key: f"\\{key}" if key in _NGINX_MAP_WORDS else key
    return env


def render(
    topology: Topology,
    driver: str,
    admissions: Mapping[str, Admission] | None = None,
    *,
    options: RenderOptions | None = None,
) -> str:
    """The complete config of `driver` ("haproxy", "apache" or "nginx") for `topology`,
    with each member's admission (LIVE when not given), QA entry points included."""
    if driver not in PRODUCTS:
        raise RenderError(
            f"no template for driver {driver!r}; expected one of {', '.join(PRODUCTS)}"
        )
    product: Product = driver
    options = options or RenderOptions()
    _check(topology, product, options)
    context = _context(topology, product, resolve_admissions(topology, admissions), options)
    template = _environment(options.template_dir).get_template(f"{product}.cfg.j2")
    return template.render(context)
