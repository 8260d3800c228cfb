"""`init`, `check`, `render` and `schema`: the topology file and what it describes."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from changeover.commands import EXIT_BAD_INPUT, EXIT_FAILED
from changeover.commands.common import load_config, run
from changeover.commands.output import err, fail, out, print_json
from changeover.config import Topology


def init(path: Path, force: bool, json_out: bool) -> None:
    from changeover.starter import STARTER

    if path.exists() and not force:
        fail(EXIT_BAD_INPUT, f"{path} exists (use --force to overwrite)")
    try:
        path.write_text(STARTER)
    except OSError as exc:
        fail(EXIT_BAD_INPUT, f"{path}: cannot write: {exc.strerror}")
    if json_out:
        print_json({"message": f"wrote {path}", "path": str(path)})
    else:
        # The path is the user's text: data, not markup, and never broken inside.
        out.print(
            f"wrote {path}; edit it, then run `changeover check -c {path}`",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _qa(cluster: Any) -> str:
    return ", ".join(
        x
        for x in (
            f"port {cluster.qa_port}" if cluster.qa_port else "",
            f"Host {cluster.qa_host}" if cluster.qa_host else "",
        )
        if x
    )


def check(config: Path, reach: bool, json_out: bool) -> None:
    from changeover.balancers.factory import COUNTS
    from changeover.policy import error_ratio_refusal
    from changeover.tls import expiry_warnings

    topo = load_config(config)
    refusal = error_ratio_refusal(topo, COUNTS[topo.balancer.driver])
    if refusal is not None:
        fail(EXIT_BAD_INPUT, f"{config}: {refusal}")
    warnings = list(expiry_warnings(topo, datetime.datetime.now(datetime.UTC)))
    if json_out:
        results = _reach(topo) if reach else None
        print_json(_check_data(topo, config, warnings, results))
    else:
        _print_check(topo, config, warnings)
        results = _reach(topo) if reach else None
        if results is not None:
            _print_reach(results)
    if results is not None and not all(r.ok for r in results):
        raise typer.Exit(EXIT_FAILED)


def _check_data(
    topo: Topology, config: Path, warnings: list[str], results: list[Any] | None
) -> dict[str, Any]:
    bal, pol = topo.balancer, topo.policy
    return {
        "site": topo.site.name,
        "config": str(config),
        "members": [
            {
                "cluster": cluster.name,
                "member": member.name,
                "host": member.host,
                "port": member.port,
                "route": member.route_id,
                "qa_port": cluster.qa_port,
                "qa_host": cluster.qa_host,
                "ssh_login": _ssh_login(topo, member),
            }
            for cluster, member in topo.members()
        ],
        "balancer": {
            "driver": bal.driver,
            "listen": str(bal.listen),
            "sticky_cookie": bal.sticky_cookie,
            "algorithm": bal.algorithm,
        },
        "executor": topo.executor.kind,
        "policy": {
            "strategy": pol.strategy,
            "order": topo.cluster_order(),
            "approval": pol.approval,
            "min_healthy": pol.min_healthy,
        },
        "warnings": warnings,
        "reach": None
        if results is None
        else [
            {
                "member": r.member,
                "host": r.host,
                "node": r.node,
                "ok": r.ok,
                "seconds": r.seconds,
                "error": r.error,
            }
            for r in results
        ],
    }


def _ssh_login(topo: Topology, member: Any) -> str | None:
    """user@host:port the SSH executor logs in as (None: not over SSH)."""
    if topo.executor.kind != "ssh":
        return None
    ssh = topo.executor.ssh
    user = member.ssh_user or ssh.user or "(local user)"
    return f"{user}@{member.host}:{member.ssh_port or ssh.port}"


def _print_check(topo: Topology, config: Path, warnings: list[str]) -> None:
    table = Table(title=escape(f"site {topo.site.name} ({config})"))
    over_ssh = topo.executor.kind == "ssh"
    for col in ("cluster", "member", "address", "route", "QA entry point"):
        table.add_column(col)
    if over_ssh:
        table.add_column("SSH login")
    for cluster, member in topo.members():
        row = [cluster.name, member.name, f"{member.host}:{member.port}", member.route_id]
        row.append(_qa(cluster) or "-")
        login = _ssh_login(topo, member)
        table.add_row(*(escape(x) for x in [*row, *([login] if login else [])]))
    out.print(table)
    if topo.site.inventory:
        groups = ", ".join(
            f"{c.name} <- {c.group} ({len(c.members)})" for c in topo.clusters if c.group
        )
        out.print(f"members from inventory {topo.site.inventory}: {groups}", markup=False)
    bal, pol = topo.balancer, topo.policy
    out.print(
        f"balancer: {bal.driver}, public {bal.listen}, sticky cookie {bal.sticky_cookie}, "
        f"{bal.algorithm}; executor: {topo.executor.kind}; strategy {pol.strategy}, "
        f"order {' -> '.join(topo.cluster_order())}, approval {pol.approval}, "
        f"min_healthy {pol.min_healthy}"
    )
    for warning in warnings:
        # One line each, never broken inside a path: a log keeps it greppable.
        out.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)


def _print_reach(results: list[Any]) -> None:
    table = Table(title="reachability")
    for col in ("member", "host", "node", "reachable", "seconds", "detail"):
        table.add_column(col)
    for r in results:
        table.add_row(
            r.member,
            r.host,
            r.node or "-",  # what the host calls itself: catches an address that reaches another
            "[green]yes[/]" if r.ok else "[red]no[/]",
            f"{r.seconds:.2f}",
            r.error or "",
        )
    out.print(table)


def _reach(topo: Topology) -> list[Any]:
    from changeover.executors.reach import reach as reach_all
    from changeover.runtime import make_executor

    async def go() -> list[Any]:
        executor = make_executor(topo)
        try:
            return await reach_all(topo, executor)
        finally:
            await executor.close()

    return run(go())


def render(
    driver: str, config: Path, output: Path | None, instance: str | None, current: bool
) -> None:
    from changeover.balancers.factory import make_balancer
    from changeover.balancers.render import RenderError, RenderOptions
    from changeover.balancers.render import render as render_config

    topo = load_config(config)
    chosen = next((i for i in topo.balancer.instances if i.name == instance), None)
    if instance and chosen is None:
        fail(EXIT_BAD_INPUT, f"no balancer instance named {instance!r} in {config}")
    chosen = chosen or (topo.balancer.instances[0] if topo.balancer.instances else None)
    admissions = None
    if current:

        async def read() -> dict[str, Any]:
            balancer = make_balancer(topo)
            try:
                return dict((await balancer.read()).admissions())
            finally:
                await balancer.close()

        admissions = run(read())
    run_dir = chosen.run_dir if chosen and chosen.run_dir else None
    options = RenderOptions(
        instance=chosen,
        run_dir=topo.resolve_path(run_dir) if run_dir else None,
        template_dir=topo.resolve_path(topo.balancer.template_dir)
        if topo.balancer.template_dir
        else None,
    )
    try:
        text = render_config(topo, driver, admissions, options=options)
    except RenderError as exc:
        fail(EXIT_BAD_INPUT, str(exc))
    if output is None:
        sys.stdout.write(text)
    else:
        output.write_text(text)
        err.print(f"wrote {output}")


def schema() -> None:
    from changeover.config import json_schema

    print_json(json_schema())
