"""nginx (open source, 1.18 or later): a rendered config, and flag files for
the clusters' admissions.

Open-source nginx has no runtime API, and a reload closes every idle client
keep-alive connection at once: a request sent on one at that instant is reset
(this project's release test saw it). So a release's flips do not reload: per
cluster, two flag files in the state directory, which the rendered config
checks on every request (`if (-f ...)`, one stat each):

    <cluster>.no-new   no new sessions            (DRAINING)
    <cluster>.out      no sticky sessions either  (OUT; always with .no-new)

A member's admission is the narrower of its cluster's flags and the admission
rendered for it in the config. What the flags cannot say (members of one
cluster with different admissions) is rendered: a new file, `nginx -t`, a
reload. The control listener answers /changeover/state with both parts as the
running workers see them, so a change that did not take effect is detected.

Which renderings and flag changes a change takes, in which order, is decided by
`steps`, a pure function returning `Render` and `SetFlags`; the driver only
carries them out.

With `balancer.tls_load = "handshake"` nginx loads the certificates at every
new handshake from a version directory in the state directory (`nginxtls.py`):
`reload()` installs the configured pairs there as a new version, checked by
nginx (`nginx -t`, then a handshake through the running workers) before the
link every handshake follows is renamed over to it, and reloads nginx only
when the config itself changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import json
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from changeover.balancers.base import BalancerError, Counter
from changeover.balancers.host import Host
from changeover.balancers.nginxtls import (
    CURRENT,
    CertificateStore,
    Version,
    check_name,
    leaf,
    served_name,
)
from changeover.balancers.process import ConfiguredBalancer, converge, ordered_changes
from changeover.balancers.render import bound, nginx_tls_dir, runtime_paths
from changeover.httpclient import Client, HttpError
from changeover.model import REACH, Admission, MemberState, PoolView, admission_reaching
from changeover.polling import poll_until
from changeover.tls import cert_files


def _width(admission: Admission) -> int:
    return REACH[admission].width


def narrower(a: Admission, b: Admission) -> Admission:
    return min(a, b, key=_width)


def cluster_flags(
    target: Mapping[str, Admission],
    rendered: Mapping[str, Admission],
    cluster_of: Mapping[str, str],
) -> dict[str, Admission] | None:
    """Each cluster's flag admission that narrows `rendered` to exactly `target`;
    None when only a new rendering can (members of one cluster needing
    admissions their rendered ones cannot be narrowed to in one step)."""
    members: dict[str, list[str]] = {}
    for name, cluster in cluster_of.items():
        members.setdefault(cluster, []).append(name)
    flags = {}
    for cluster, names in members.items():
        # If any admission works, the widest one wanted does.
        flag = max((target[n] for n in names), key=_width)
        if any(narrower(flag, rendered[n]) is not target[n] for n in names):
            return None
        flags[cluster] = flag
    return flags


def canonical(
    target: Mapping[str, Admission], cluster_of: Mapping[str, str]
) -> tuple[dict[str, Admission], dict[str, Admission]]:
    """(rendered, flags) for `target` that leave the most to the flags: a cluster
    whose members all share one admission is rendered LIVE and flagged; the
    members of any other cluster are rendered as they are, their cluster LIVE."""
    admissions: dict[str, set[Admission]] = {}
    for name, cluster in cluster_of.items():
        admissions.setdefault(cluster, set()).add(target[name])
    flags = {c: next(iter(a)) if len(a) == 1 else Admission.LIVE for c, a in admissions.items()}
    rendered = {
        name: Admission.LIVE if len(admissions[cluster_of[name]]) == 1 else target[name]
        for name in target
    }
    return rendered, flags


def flag_admission(cluster: str, new: int, sticky: int) -> Admission:
    """A cluster's admission from what nginx read: new sessions, sticky sessions."""
    admission = admission_reaching(new=bool(new), sticky=bool(sticky))
    if admission is not None:
        return admission
    raise BalancerError(
        f"cluster {cluster} has '{cluster}.out' without '{cluster}.no-new' (sticky users "
        f"moved away, new ones still sent there): remove the first or add the second"
    )


async def write_flags(host: Host, state_dir: str, changes: list[tuple[str, Admission]]) -> None:
    """Create and remove flag files on `host`, each step atomic, in an order that
    never leaves a cluster taking new sessions but refusing their sticky requests."""
    for cluster, admission in changes:
        # `.no-new` is there when the cluster takes no new sessions, `.out` when
        # it takes no sticky requests either.
        no_new, out = not REACH[admission].new, not REACH[admission].sticky
        steps = [(f"{cluster}.no-new", no_new), (f"{cluster}.out", out)]
        # Narrowing: .no-new first; widening: .out goes first.
        for name, present in steps if no_new else reversed(steps):
            path = f"{state_dir.rstrip('/')}/{name}"
            if present:
                await host.replace(path, "")
            else:
                await host.remove(path)


@dataclass(frozen=True, slots=True)
class NginxState:
    """What the running workers answer on /changeover/state."""

    rendered: dict[str, Admission]  # per member, from the loaded config
    flags: dict[str, Admission]  # per cluster, from the flag files
    tls: str = "none"  # how the loaded config loads certificates: config, handshake

    def admissions(self, cluster_of: Mapping[str, str]) -> dict[str, Admission]:
        return {
            name: narrower(admission, self.flags.get(cluster_of[name], Admission.LIVE))
            for name, admission in self.rendered.items()
        }


@dataclass(frozen=True, slots=True)
class Render:
    """Render the config with these member admissions (checked by `nginx -t`),
    install it, reload, and wait until the workers serve it."""

    admissions: Mapping[str, Admission]


@dataclass(frozen=True, slots=True)
class SetFlags:
    """Change the clusters' flag files from `before` to `after`, and wait until
    the workers see them."""

    before: Mapping[str, Admission]
    after: Mapping[str, Admission]


Step = Render | SetFlags


def steps(
    current: NginxState, target: Mapping[str, Admission], cluster_of: Mapping[str, str]
) -> list[Step]:
    """What takes nginx from `current` to serving `target`, in order; after each
    step it serves exactly the old admissions or exactly the new ones."""
    flags = cluster_flags(target, current.rendered, cluster_of)
    if flags is not None:  # the files alone: no reload
        return _needed([SetFlags(current.flags, flags)], current.rendered)
    # The old admissions rendered and the flags lifted; `target` rendered (one
    # reload changes every member at once); its cluster-wide part moved back
    # into the flags, so later flips need no reload.
    lifted = dict.fromkeys(current.flags, Admission.LIVE)
    rendered, final = canonical(target, cluster_of)
    sequence: list[Step] = [
        Render(current.admissions(cluster_of)),
        SetFlags(current.flags, lifted),
        Render(dict(target)),
        SetFlags(lifted, final),
        Render(rendered),
    ]
    return _needed(sequence, current.rendered)


def _needed(sequence: list[Step], loaded: Mapping[str, Admission]) -> list[Step]:
    """`sequence` without the steps that change nothing: a rendering nginx has
    loaded already, flags that are already set."""
    needed: list[Step] = []
    for step in sequence:
        if isinstance(step, Render):
            if dict(step.admissions) == dict(loaded):
                continue
            loaded = step.admissions
        elif not ordered_changes(step.before, step.after):
            continue
        needed.append(step)
    return needed


class NginxBalancer(ConfiguredBalancer):
    product = "nginx"
    fills: ClassVar[frozenset[Counter]] = frozenset()  # open-source nginx counts nothing
    default_config = "/etc/nginx/nginx.conf"
    default_check = ("nginx", "-t", "-q", "-c", "{config}")
    default_reload = ("nginx", "-s", "reload", "-c", "{config}")

    _loaded: NginxState | None = None  # as last read

    @property
    def control_url(self) -> str:
        if self.instance.admin_url:
            return self.instance.admin_url.rstrip("/")
        return bound(self.topology.balancer.admin_listen, self.instance).url()

    @property
    def state_dir(self) -> Path:
        return Path(runtime_paths("nginx", self.options)["state_dir"])

    @functools.cached_property
    def _client(self) -> Client:
        # A kept-alive connection could still reach an old worker after a reload.
        return Client(timeout=self.timeout, keep_alive=False)

    @functools.cached_property
    def _health_client(self) -> Client:
        # Health reads may reuse connections: any worker, old or new, proxies them to
        # the same member (nginx opens a fresh upstream connection for each). A
        # connection per read cost the probe's watcher (70 reads/s) as much CPU as a
        # tenth of its traffic.
        return Client(timeout=self.timeout)

    @functools.cached_property
    def certificates(self) -> CertificateStore | None:
        """The certificate versions nginx loads at each handshake, if it does."""
        if self.topology.balancer.tls_load != "handshake":
            return None
        root = nginx_tls_dir(str(self.state_dir))
        return CertificateStore(self.host, root, self.config.timeout)

    async def close(self) -> None:
        await self._client.close()
        await self._health_client.close()
        await super().close()

    async def _reachable(self, path: str) -> str:
        """The control listener's `path` as this process reaches it (through the
        SSH connection's port forward for a remote instance)."""
        return await self.host.reachable_url(self.control_url) + path

    async def _state(self) -> NginxState:
        url = f"{self.control_url}/changeover/state"
        try:
            resp = await self._client.request("GET", await self._reachable("/changeover/state"))
            if resp.status != 200:
                raise BalancerError(f"{self.name}: GET {url}: HTTP {resp.status}")
            data = json.loads(resp.text())
            state = NginxState(
                rendered={name: Admission(adm) for name, adm in data["admissions"].items()},
                flags={
                    cluster: flag_admission(cluster, seen["new"], seen["sticky"])
                    for cluster, seen in data["clusters"].items()
                },
                tls=str(data.get("tls", "none")),
            )
        except (HttpError, ValueError, KeyError, TypeError) as exc:
            raise BalancerError(
                f"{self.name}: cannot read nginx state at {url}{self.host.where}: {exc!r}"
            ) from None
        self._loaded = state
        return state

    async def _healthy(self, member: str) -> bool:
        """nginx's own view: can it reach the member's health URL right now?"""
        try:
            url = await self._reachable(f"/changeover/health/{member}")
            resp = await self._health_client.request("GET", url)
        except (HttpError, BalancerError):
            return False
        return 200 <= resp.status < 400

    def _view(self, state: NginxState, health: Mapping[str, bool]) -> PoolView:
        admissions = state.admissions(self._cluster_of)
        return PoolView(
            tuple(
                MemberState(
                    name=m.name,
                    cluster=c.name,
                    admission=admissions.get(m.name, Admission.OUT),
                    healthy=health.get(m.name, True),
                )
                for c, m in self.topology.members()
            )
        )

    async def read(self) -> PoolView:
        names = [m.name for _, m in self.topology.members()]
        state, *health = await asyncio.gather(
            self._state(), *(self._healthy(name) for name in names)
        )
        return self._view(state, dict(zip(names, health, strict=True)))  # type: ignore[arg-type]

    # --- certificates loaded at each handshake (tls_load = "handshake") ---------

    async def apply(self, desired: Mapping[str, Admission]) -> PoolView:
        store = self.certificates
        if store is not None and await store.labels() is None:
            # A first start: nothing installed the certificates nginx loads yet.
            async with self._lock:
                if await store.labels() is None:
                    await self._renew_certificates(store, (await self.read()).admissions())
        return await super().apply(desired)

    async def reload(self) -> PoolView:
        """With tls_load = "handshake": the configured certificates installed as a
        new version (checked, then serving), and nginx reloaded only if the config
        changed; a certificate-only change reloads nothing. Otherwise a reload."""
        store = self.certificates
        if store is None:
            return await super().reload()
        async with self._lock:
            admissions = (await self.read()).admissions()
            loaded = self._loaded or NginxState(dict(admissions), {})
            # The rendering nginx runs (its flags stay): a certificate-only change
            # renders the very file installed, and nothing is reloaded.
            rendered = {name: loaded.rendered.get(name, adm) for name, adm in admissions.items()}
            version, checked = await self._renew_certificates(store, rendered)
            text = self.render(rendered)
            previous = await self.config.install(text)
            if previous == text:  # the certificates alone: nginx already loads them
                return await converge(self.read, admissions, timeout=self.timeout, what=self.name)
            reloaded = False
            try:
                await self._reload(rendered)
                reloaded = True
                if not checked:  # nginx loaded them from files before: checked now
                    await self._serves(version, staged=True)
                    await self._serves(version, staged=False)
                return await converge(self.read, admissions, timeout=self.timeout, what=self.name)
            except Exception as exc:
                await self.config.restore(previous)
                if reloaded:
                    await self._reload_back(loaded.tls, exc)
                raise

    async def _reload_back(self, tls: str, exc: BaseException) -> None:
        """After a reload whose certificates failed their check: the restored
        config loaded again (its certificates from their files)."""
        try:
            await self.config.reload()
            await self._until(lambda state: state.tls == tls, "load the previous config")
        except BalancerError as undo_exc:
            exc.add_note(f"{self.name}: loading the previous config again also failed: {undo_exc}")

    async def _renew_certificates(
        self, store: CertificateStore, admissions: Mapping[str, Admission]
    ) -> tuple[Version, bool]:
        """Every configured pair as a new version: checked by `nginx -t` (each
        pair parses and its key matches) and, when the running nginx loads
        certificates per handshake, by a handshake through its workers; then
        published and read back. A failed check removes the version and leaves
        the serving one alone. Returns the version and whether the running nginx
        checked it."""
        live = self._loaded is not None and self._loaded.tls == "handshake"
        try:
            version = await store.stage(cert_files(self.topology), dt.datetime.now(dt.UTC))
        except BalancerError as exc:
            raise self._refused(exc) from None
        previous = await store.target(CURRENT)
        try:
            await self.config.check(self.render(admissions, {"tls_check_dir": version.path}))
            if live:
                await self._serves(version, staged=True)
            await store.point(CURRENT, version)
            if live:
                try:
                    await self._serves(version, staged=False)
                except BalancerError:
                    if previous is not None:  # put back before the version goes
                        await store.point(CURRENT, previous)
                    raise
        except BalancerError as exc:
            await store.discard(version.name)
            raise self._refused(exc) from None
        await store.prune(keep=[version.name, previous])
        return version, live

    def _refused(self, exc: BalancerError) -> BalancerError:
        return BalancerError(
            f"{self.name}: new certificates refused, the old ones keep serving: {exc}"
        )

    async def _serves(self, version: Version, *, staged: bool) -> None:
        """Each pair of `version` served by the running workers: from `staging`
        for its check name, or from `current` for a name of its own."""
        listen = bound(self.topology.balancer.listen, self.instance)
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)
        url = await self.host.reachable_url(f"https://{listen.model_copy(update={'host': host})}")
        failures = []
        for files in cert_files(self.topology):
            name = check_name(files.label) if staged else served_name(files)
            failure = await self._serving(url, name, version.served[files.label], staged)
            if failure:
                failures.append(f"{files.cert} for {name or 'no server name'}: {failure}")
        if failures:
            raise BalancerError(
                f"{self.name}: nginx does not serve the new certificates"
                f"{' it was given to check' if staged else ''}: {'; '.join(failures)}\n"
                f"nginx error log says: {await self._log_tail()}"
            )

    async def _serving(self, url: str, name: str, want: bytes, staged: bool) -> str | None:
        """Why `name` is not served `want`, or None. A check name is answered 421
        by the check server; another answer comes from a worker of an older config
        (just reloaded, still finishing), so the check is made again."""
        failure: str | None = None

        async def answered() -> bool:
            nonlocal failure
            try:
                answer = await leaf(url, name, self.timeout, ask=staged)
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                failure = f"the handshake failed ({exc})"
                return True
            if staged and answer.status != 421:
                failure = f"no check server answered (HTTP {answer.status})"
                return False
            failure = None if answer.certificate == want else "another certificate came"
            return True

        await poll_until(answered, self.timeout)
        return failure

    def _file_admissions(self, target: Mapping[str, Admission]) -> Mapping[str, Admission]:
        # What the flags can express keeps the loaded rendering: no reload.
        loaded = self._loaded
        if loaded is None or cluster_flags(target, loaded.rendered, self._cluster_of) is None:
            return target
        return loaded.rendered

    async def _enact(self, current: PoolView, target: Mapping[str, Admission]) -> None:
        # The interpreter of `steps`: the I/O of each step, and the wait for it.
        for step in steps(await self._state(), target, self._cluster_of):
            if isinstance(step, Render):
                await self.config.install(self.render(step.admissions))
                await self._reload(step.admissions)
            else:
                await self._set_flags(step.before, step.after)

    async def _set_flags(
        self, before: Mapping[str, Admission], after: Mapping[str, Admission]
    ) -> None:
        try:
            await write_flags(self.host, str(self.state_dir), ordered_changes(before, after))
        except (OSError, BalancerError) as exc:
            raise BalancerError(
                f"{self.name}: cannot write nginx's admission files in {self.state_dir}"
                f"{self.host.where}: {exc}"
            ) from None
        try:
            await self._until(lambda state: state.flags == dict(after), "read the new files")
        except BalancerError as exc:
            # Files nginx cannot see must not take effect later, when it can.
            with contextlib.suppress(OSError, BalancerError):
                await write_flags(self.host, str(self.state_dir), ordered_changes(after, before))
            raise BalancerError(
                f"{exc}\nnginx does not see the admission files in {self.state_dir}: its worker "
                f"processes must be able to search every directory of that path.\n"
                f"nginx error log says: {await self._log_tail()}"
            ) from None

    async def _reload(self, admissions: Mapping[str, Admission]) -> None:
        await self.config.reload()
        try:
            await self._until(
                lambda state: state.rendered == dict(admissions), "load the new config"
            )
        except BalancerError as exc:
            # The master logs why it kept the old configuration.
            raise BalancerError(f"{exc}\nnginx error log says: {await self._log_tail()}") from None

    async def _until(self, done: Callable[[NginxState], bool], what: str) -> None:
        """Read the state on fresh connections (current workers) until `done`."""

        async def reached() -> bool:
            return done(await self._state())

        if not await poll_until(reached, self.timeout):
            raise BalancerError(f"{self.name}: nginx did not {what} within {self.timeout:g}s")

    async def _log_tail(self, lines: int = 5) -> str:
        path = runtime_paths("nginx", self.options)["error_log"]
        try:
            text = await self.host.read_text(path)
        except (OSError, BalancerError) as exc:
            return f"(cannot read {path}: {exc})"
        if text is None:
            return f"(no {path})"
        return "\n".join(text.splitlines()[-lines:]) or "(empty)"
