"""What the config-driven drivers (HAProxy, Apache httpd, nginx) share.

- `ConfigFile`: the rendered config on its host (`host.py`: here or over SSH);
  a candidate is checked by the product's own checker (`haproxy -c`,
  `apache2 -t`, `nginx -t`) there before it replaces the file, so a config
  the product rejects is never installed nor reloaded, and the error carries
  the product's own message.
- `converge`: read back until the balancer shows the desired admissions, so a
  change that silently did nothing is an error, not a success.
- `ConfiguredBalancer`: the apply skeleton built from those three; each driver
  says how to read its balancer and how to enact a change (runtime API or reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from changeover.balancers.base import BalancerError, Counter
from changeover.balancers.host import Host, LocalHost, host_for
from changeover.balancers.render import Product, RenderError, RenderOptions, render
from changeover.config import BalancerInstance, Topology
from changeover.model import REACH, Admission, PoolView, differs
from changeover.polling import poll_until


def substitute(argv: Sequence[str], config: Path) -> list[str]:
    """`{config}` in a check or reload command is the config file to use."""
    return [word.replace("{config}", str(config)) for word in argv]


class ConfigFile:
    """A rendered config on its host, replaced only by candidates the product accepts."""

    def __init__(
        self,
        path: Path,
        *,
        product: str,
        check: Sequence[str],
        reload: Sequence[str],
        timeout: float = 30.0,
        host: Host | None = None,
    ) -> None:
        self.path = path
        self.product = product
        self.check_argv = list(check)
        self.reload_argv = list(reload)
        self.timeout = timeout
        self.host: Host = host or LocalHost()

    async def read(self) -> str | None:
        return await self.host.read_text(str(self.path))

    async def check(self, text: str) -> None:
        """Raise BalancerError with the product's message unless it accepts `text`."""
        candidate = self.path.with_name(f".{self.path.name}.changeover-check")
        await self.host.replace(str(candidate), text)
        try:
            result = await self.host.run(
                substitute(self.check_argv, candidate), timeout=self.timeout
            )
        finally:
            with contextlib.suppress(BalancerError):
                await self.host.remove(str(candidate))
        if not result.ok:
            raise BalancerError(
                f"{self.product}{self.host.where} rejected the new config (nothing installed, "
                f"nothing reloaded; the running {self.product} is untouched):\n{result.message()}"
            )

    async def install(self, text: str) -> str | None:
        """Check `text`, then atomically replace the file; return the previous text."""
        previous = await self.read()
        if previous == text:
            return previous
        await self.check(text)
        await self.host.replace(str(self.path), text)
        return previous

    async def restore(self, previous: str | None) -> None:
        """Put back what `install` replaced (the product accepted it before)."""
        if previous is None:
            await self.host.remove(str(self.path))
        else:
            await self.host.replace(str(self.path), previous)

    async def reload(self) -> None:
        result = await self.host.run(substitute(self.reload_argv, self.path), timeout=self.timeout)
        if not result.ok:
            raise BalancerError(
                f"{self.product}{self.host.where} reload failed: {result.message()}"
            )


async def converge(
    read: Callable[[], Awaitable[PoolView]],
    desired: Mapping[str, Admission],
    *,
    timeout: float,
    what: str,
) -> PoolView:
    """Read until every member in `desired` shows its admission; else BalancerError."""
    view = PoolView(())

    async def shown() -> bool:
        nonlocal view
        view = await read()
        return not differs(view, desired)

    if await poll_until(shown, timeout):
        return view
    current = view.admissions()
    detail = ", ".join(
        f"{name} is {current.get(name, 'absent')} (wanted {adm})"
        for name, adm in sorted(differs(view, desired).items())
    )
    raise BalancerError(f"{what}: the change did not take effect within {timeout:g}s: {detail}")


def ordered_changes(
    current: Mapping[str, Admission], target: Mapping[str, Admission]
) -> list[tuple[str, Admission]]:
    """The members whose admission changes, widest admission first: where the
    balancer cannot change several at once, admitting first, draining next and
    taking out last keeps the live pool no smaller than both states allow."""
    changes = [(name, adm) for name, adm in target.items() if current.get(name) != adm]
    return sorted(changes, key=lambda change: -REACH[change[1]].width)


class ConfiguredBalancer(ABC):
    """A balancer driven through a rendered config file plus, where it has one, a
    runtime channel. `apply` = render -> check -> install -> enact -> read back."""

    product: ClassVar[Product]
    fills: ClassVar[frozenset[Counter]]  # the MemberState counters `read` fills
    default_config: ClassVar[str]
    default_check: ClassVar[tuple[str, ...]]
    default_reload: ClassVar[tuple[str, ...]]

    def __init__(
        self,
        topology: Topology,
        instance: BalancerInstance | None = None,
        *,
        run_dir: Path | None = None,
        template_dir: Path | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.topology = topology
        self.instance = instance or BalancerInstance()
        self.name = self.instance.name
        self.timeout = timeout
        self.options = RenderOptions(
            instance=self.instance, run_dir=run_dir, template_dir=template_dir
        )
        path = Path(self.instance.config_path or self.default_config)
        self.host = host_for(topology, self.instance)
        self.config = ConfigFile(
            path,
            product=self.product,
            check=self.instance.check_command or self.default_check,
            reload=self.instance.reload_command or self.default_reload,
            timeout=max(timeout, 30.0),
            host=self.host,
        )
        # One change at a time per instance: a read-modify-write of the whole config.
        self._lock = asyncio.Lock()
        self._cluster_of = {m.name: c.name for c, m in topology.members()}

    # --- what each driver provides -----------------------------------------

    @abstractmethod
    async def read(self) -> PoolView: ...

    @abstractmethod
    async def _enact(self, current: PoolView, target: Mapping[str, Admission]) -> None:
        """Make the running balancer serve `target` (the installed file already does)."""

    async def close(self) -> None:
        """Release connections (the SSH connection to a remote instance's host)."""
        await self.host.close()

    # --- shared ----------------------------------------------------------------

    def render(
        self, admissions: Mapping[str, Admission], extra: Mapping[str, Any] | None = None
    ) -> str:
        """The config with `admissions`; `extra` adds to the template's context."""
        options = self.options
        if extra:
            options = dataclasses.replace(options, extra={**options.extra, **extra})
        try:
            return render(self.topology, self.product, admissions, options=options)
        except RenderError as exc:
            raise BalancerError(
                f"{self.name}: cannot render the {self.product} config: {exc}"
            ) from None

    def _target(self, current: PoolView, desired: Mapping[str, Admission]) -> dict[str, Admission]:
        unknown = sorted(set(desired) - set(self._cluster_of))
        if unknown:
            raise BalancerError(f"{self.name}: no such member(s): {', '.join(unknown)}")
        target = {name: Admission(adm) for name, adm in current.admissions().items()}
        target.update({name: Admission(adm) for name, adm in desired.items()})
        return target

    async def prepare(self, desired: Mapping[str, Admission]) -> None:
        """Have the product check the config `apply(desired)` would install, and
        install nothing: a group asks every instance first, so one that would
        refuse the change refuses it before any instance has changed."""
        async with self._lock:
            current = await self.read()
            text = self.render(self._file_admissions(self._target(current, desired)))
            if text != await self.config.read():
                await self.config.check(text)

    async def apply(self, desired: Mapping[str, Admission]) -> PoolView:
        async with self._lock:
            current = await self.read()
            target = self._target(current, desired)
            previous = await self.config.install(self.render(self._file_admissions(target)))
            try:
                await self._enact(current, target)
                return await converge(self.read, target, timeout=self.timeout, what=self.name)
            except Exception as exc:
                await self._undo(current, previous, exc)
                raise

    async def _undo(self, before: PoolView, previous: str | None, exc: BaseException) -> None:
        """After a failed change: the old file back, the old admissions re-enacted."""
        await self.config.restore(previous)
        try:
            now = await self.read()
            if differs(now, before.admissions()):
                await self._enact(now, before.admissions())
        except (BalancerError, OSError) as undo_exc:
            exc.add_note(
                f"{self.name}: putting the previous admissions back also failed: {undo_exc}"
            )

    async def reload(self) -> PoolView:
        """Render the current admissions, check, install, reload; verify they survived.
        For a topology change (members, ports, TLS) rather than an admission change."""
        async with self._lock:
            current = await self.read()
            admissions = current.admissions()
            previous = await self.config.install(self.render(admissions))
            try:
                await self._reload(admissions)
                return await converge(self.read, admissions, timeout=self.timeout, what=self.name)
            except Exception:
                await self.config.restore(previous)
                raise

    @abstractmethod
    async def _reload(self, admissions: Mapping[str, Admission]) -> None:
        """Reload the product and return once the new configuration, rendered with
        `admissions`, serves (each product proves it its own way)."""

    def _file_admissions(self, target: Mapping[str, Admission]) -> Mapping[str, Admission]:
        """The admissions to render into the file for `target`: all of them, unless
        the driver keeps some outside the file (nginx's cluster flags)."""
        return target
