"""The probe as a command: `main_cli` for the changeover CLI, `main` for
`python -m changeover.probe`.

    python -m changeover.probe URL [--rate R] [--duration S] [--sticky-users U] [--json]
        [--session-mean S] [--session-max S] [--host-header H] [--timeout T]
        [--insecure | --ca-file PEM]
        [--watch-admin URL [--token-env NAME] | --watch-config FILE]
        [--ws-users N [--ws-path PATH] [--ws-interval S]]

--watch-admin reads the embedded balancer's admin API; --watch-config reads
whatever balancer a changeover.toml names (HAProxy, Apache httpd, nginx or the
embedded one) through its driver, as `changeover status` would.

SIGINT or SIGTERM ends the run early; the report is printed all the same.

Each user thinks sticky_users/rate seconds between requests and stays for a
length drawn from an exponential distribution with --session-mean seconds, cut
at --session-max; then it leaves and a new user takes its place.

--ws-users N adds N WebSocket users: each holds a WebSocket to --ws-path (the
sample app's echo, /ws) on the same host and sends a message every
--ws-interval seconds, whose echo must come back within --timeout. A close
with 1001 (going away: the balancer ending its tunnels at a drain) is normal
and the user reconnects at once; any other end is an abnormal close.

Exit codes: 0 passed; 1 failed (a request failed, a session broke or was cut,
a user saw a version flap, a WebSocket closed abnormally, or nothing was
sent); 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop
from rich.console import Console

from changeover.balancers.base import Balancer, BalancerError
from changeover.balancers.builtin import BuiltinBalancer
from changeover.config import ConfigError, load
from changeover.probe.accounting import SessionLengths
from changeover.probe.report import ProbeReport
from changeover.probe.runner import run_probe
from changeover.probe.watcher import AdmissionWatcher

DEFAULT_TOKEN_ENV = "CHANGEOVER_ADMIN_TOKEN"
DEFAULT_SESSIONS = SessionLengths(mean=3.0, maximum=10.0)  # seconds a user stays


@dataclass(frozen=True)
class WebSocketOptions:
    """The probe's WebSocket users: how many, the echo's path, seconds between messages."""

    users: int = 0
    path: str = "/ws"
    interval: float = 1.0


NO_WEBSOCKETS = WebSocketOptions()


def main_cli(
    url: str,
    rate: float,
    duration: float,
    sticky_users: int,
    json_out: bool = False,
    host_header: str | None = None,
    timeout: float = 2.0,
    insecure: bool = False,
    watch_admin: str | None = None,
    admin_token: str | None = None,
    console: Console | None = None,
    watch_config: Path | None = None,
    ca_file: Path | None = None,
    sessions: SessionLengths = DEFAULT_SESSIONS,
    websockets: WebSocketOptions = NO_WEBSOCKETS,
) -> int:
    """Run the probe in a fresh (uvloop) event loop, print the report, return the exit code.

    `watch_admin` is the embedded balancer's admin URL, `watch_config` a
    changeover.toml whose balancer (any driver) is read instead: with either,
    moves caused by a member leaving the pool are counted as cut sessions
    rather than broken ones. Exit 2 when the config cannot be loaded or names no
    usable balancer.
    """
    if watch_admin and watch_config:
        raise ValueError("watch_admin and watch_config exclude each other")
    reader: Balancer | None = None
    if watch_config is not None:
        try:
            reader = watching_config(watch_config)
        except (ConfigError, BalancerError) as exc:
            # One line, never broken inside the config's path.
            Console(stderr=True).print(
                f"error: {exc}", markup=False, highlight=False, soft_wrap=True
            )
            return 2
    elif watch_admin:
        reader = BuiltinBalancer(watch_admin, admin_token, "admin", 2.0)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        report = runner.run(
            _run(
                url,
                rate=rate,
                duration=duration,
                sticky_users=sticky_users,
                host_header=host_header,
                timeout=timeout,
                verify_tls=(
                    ssl.create_default_context(cafile=ca_file) if ca_file else not insecure
                ),
                reader=reader,
                sessions=sessions,
                websockets=websockets,
            )
        )
    if json_out:
        sys.stdout.write(json.dumps(report.to_dict()) + "\n")
        sys.stdout.flush()
    else:
        report.render(console or Console())
    return 0 if report.passed else 1


async def _run(
    url: str,
    *,
    rate: float,
    duration: float,
    sticky_users: int,
    host_header: str | None,
    timeout: float,
    verify_tls: bool | ssl.SSLContext,
    reader: Balancer | None,
    sessions: SessionLengths,
    websockets: WebSocketOptions,
) -> ProbeReport:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    try:
        watching = AdmissionWatcher(reader) if reader else contextlib.nullcontext()
        async with watching as watcher:
            return await run_probe(
                url,
                rate=rate,
                duration=duration,
                sticky_users=sticky_users,
                timeout=timeout,
                host_header=host_header,
                stop=stop,
                watcher=watcher,
                verify_tls=verify_tls,
                sessions=sessions,
                ws_users=websockets.users,
                ws_path=websockets.path,
                ws_interval=websockets.interval,
            )
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        if reader is not None:
            await reader.close()


def watching_config(path: Path) -> Balancer:
    """The balancer (driver or group) that the changeover.toml at `path` names.

    Only `read()` is ever called on it: the probe watches, it never applies.
    """
    from changeover.balancers.factory import make_balancer

    return make_balancer(load(path))


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected zero or more, got {text}")
    return value


def _at_least(minimum: int) -> Callable[[str], int]:
    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected at least {minimum}, got {text}")
        return value

    return count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m changeover.probe",
        description="Open-loop HTTP probe with sticky virtual users.",
    )
    parser.add_argument("url")
    parser.add_argument("--rate", type=_positive, default=200.0, help="requests per second")
    parser.add_argument("--duration", type=_non_negative, default=10.0, help="seconds")
    parser.add_argument("--sticky-users", type=_at_least(1), default=100)
    parser.add_argument("--timeout", type=_positive, default=2.0, help="per request, seconds")
    parser.add_argument(
        "--session-mean",
        type=_positive,
        default=DEFAULT_SESSIONS.mean,
        help="seconds a user stays on average (exponential)",
    )
    parser.add_argument(
        "--session-max",
        type=_positive,
        default=DEFAULT_SESSIONS.maximum,
        help="seconds a user stays at most",
    )
    parser.add_argument("--host-header", help="Host header to send (e.g. a QA host name)")
    parser.add_argument(
        "--ws-users",
        type=_at_least(0),
        default=0,
        help="WebSocket users, each echoing a message every --ws-interval (default 0)",
    )
    parser.add_argument(
        "--ws-path", default=NO_WEBSOCKETS.path, help="their echo endpoint (default /ws)"
    )
    parser.add_argument(
        "--ws-interval",
        type=_positive,
        default=NO_WEBSOCKETS.interval,
        help="seconds between two messages of a WebSocket user (default 1)",
    )
    trust = parser.add_mutually_exclusive_group()
    trust.add_argument("--insecure", action="store_true", help="do not verify TLS certificates")
    trust.add_argument(
        "--ca-file", metavar="PEM", type=Path, help="verify TLS certificates against this CA"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    watch = parser.add_mutually_exclusive_group()
    watch.add_argument("--watch-admin", metavar="URL", help="embedded balancer's admin API")
    watch.add_argument(
        "--watch-config",
        metavar="FILE",
        type=Path,
        help="changeover.toml: watch its balancer (any driver) through the driver",
    )
    parser.add_argument(
        "--token-env",
        metavar="NAME",
        default=DEFAULT_TOKEN_ENV,
        help=f"environment variable holding the admin token (default {DEFAULT_TOKEN_ENV})",
    )
    args = parser.parse_args(argv)
    token = os.environ.get(args.token_env) if args.watch_admin else None
    if args.watch_admin and not token:
        parser.error(f"--watch-admin needs the admin token in ${args.token_env}")
    try:
        sessions = SessionLengths(args.session_mean, args.session_max)
    except ValueError as exc:
        parser.error(str(exc))
    return main_cli(
        args.url,
        args.rate,
        args.duration,
        args.sticky_users,
        json_out=args.json,
        host_header=args.host_header,
        timeout=args.timeout,
        insecure=args.insecure,
        watch_admin=args.watch_admin,
        admin_token=token,
        watch_config=args.watch_config,
        ca_file=args.ca_file,
        sessions=sessions,
        websockets=WebSocketOptions(args.ws_users, args.ws_path, args.ws_interval),
    )
