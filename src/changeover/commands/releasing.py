"""`plan`, `release`, `rollback`, `resume`, `abort`, `approve` and `unlock`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from changeover.balancers.base import BalancerError
from changeover.balancers.factory import make_balancer
from changeover.commands import EXIT_BAD_INPUT, EXIT_REFUSED
from changeover.commands.common import load_config, run, service, state_exit
from changeover.commands.output import err, fail, out, print_json
from changeover.config import Topology
from changeover.plan import describe, make_plan
from changeover.ports import Review
from changeover.releases import Begin, Outcome, Releases, operator
from changeover.runtime import review


def _reviewed(topo: Topology, begin: Begin) -> Review | None:
    """The migration gate of `plan` (exit 3 with the findings printed when refused)."""
    return run(review(topo, begin))


def plan(config: Path, begin: Begin, json_out: bool, offline: bool) -> None:
    topo = load_config(config)
    found = _reviewed(topo, begin)

    async def go() -> list[Any]:
        view = None
        if not offline:
            balancer = make_balancer(topo)
            try:
                view = await balancer.read()
            except BalancerError as exc:
                # Not a failed release (exit 1): the plan could not be checked against the pool.
                fail(
                    EXIT_BAD_INPUT,
                    f"cannot read the balancer: {exc}; `changeover plan --offline` plans "
                    "without it (no interlock check)",
                )
            finally:
                await balancer.close()
        return make_plan(topo, begin.version, view, first=begin.first)

    steps = run(go())
    if json_out:
        data: dict[str, Any] = {"version": begin.version, "steps": [s.to_dict() for s in steps]}
        if found is not None:
            data["migrations"] = {
                "pending": found.pending,
                "allowed_findings": [dataclasses.asdict(f) for f in found.findings],
            }
        print_json(data)
        return
    out.print(
        f"[bold]plan[/]: release {escape(repr(begin.version))} to {topo.site.name}",
        highlight=False,
    )
    for line in describe(steps):
        out.print(line, highlight=False, markup=False)
    if found is not None:
        pending = "; ".join(f"{p}: {', '.join(n) or 'none'}" for p, n in found.pending.items())
        out.print(f"pending migrations: {pending}", highlight=False, markup=False, soft_wrap=True)
        note = Releases.allowance(found, begin)
        if note:
            out.print(note, highlight=False, markup=False, soft_wrap=True)


def _finish(topo: Topology, done: Outcome, json_out: bool) -> None:
    if json_out:
        print_json(service(topo, lambda r: r.describe(done.release_id)))
    raise typer.Exit(state_exit(done.state))


def release(config: Path, begin: Begin, json_out: bool) -> None:
    topo = load_config(config)
    _finish(topo, service(topo, lambda r: r.release(begin), err if json_out else out), json_out)


def rollback(config: Path, json_out: bool) -> None:
    topo = load_config(config)
    _finish(topo, service(topo, lambda r: r.rollback(), err if json_out else out), json_out)


def resume(config: Path, json_out: bool) -> None:
    topo = load_config(config)
    _finish(topo, service(topo, lambda r: r.resume(), err if json_out else out), json_out)


def _said(message: str, json_out: bool) -> None:
    """The one-line answer of `abort`, `approve` and `unlock`: {"message": ...} in --json."""
    if json_out:
        print_json({"message": message})
    else:
        out.print(message, highlight=False, markup=False)


def abort(config: Path, json_out: bool) -> None:
    topo = load_config(config)
    _said(service(topo, lambda r: r.abort(operator())), json_out)


def approve(config: Path, json_out: bool) -> None:
    topo = load_config(config)
    _said(service(topo, lambda r: r.approve(operator())), json_out)


def unlock(config: Path, force: bool, yes: bool, json_out: bool) -> None:
    if not force:
        fail(EXIT_BAD_INPUT, "unlock needs --force: it breaks the lock of a release in progress")
    topo = load_config(config)
    holder = service(topo, lambda r: r.lock_holder())
    if holder is None:
        _said("the site is not locked", json_out)
        return
    if not yes and not typer.confirm(f"break the lock held by {holder.describe()}?", err=json_out):
        raise typer.Exit(EXIT_REFUSED)
    service(topo, lambda r: r.unlock())
    _said(f"lock of {holder.describe()} broken", json_out)
