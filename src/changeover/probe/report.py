"""The probe's report: plain data, JSON both ways, and a Rich rendering."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, RenderableType
from rich.table import Table
from rich.text import Text

LAG_WARNING_MS = 100.0  # schedule lag past which the report warns about the probe itself

# Failure kinds, in the order they are shown.
FAILURE_KINDS = (
    "connect",  # refused or unreachable: nothing listening
    "timeout",  # no complete response within the timeout
    "disconnect",  # the connection closed or reset before the response was complete
    "protocol",  # a malformed response
    "http_5xx",
    "http_other",  # an unexpected 4xx (or 1xx)
    "overload",  # not sent: too many requests already in flight
    "other",
)

# How a WebSocket user's connection can end abnormally (a 1001 close is normal).
WS_FAILURE_KINDS = (
    "handshake",  # refused, timed out, or answered with something else than a 101
    "no_close_frame",  # closed or reset without a close frame (1006)
    "close_code",  # a close frame with a code other than 1001
    "echo_timeout",  # the echo of a message did not come back within the timeout
    "echo_mismatch",  # something else than the message came back
)


@dataclass
class ProbeReport:
    """What one probe run saw.

    `sent` counts requests dispatched; slots skipped as `overload` are failures
    but were never sent. Latency runs from each request's scheduled time, so a
    probe that fell behind cannot hide it (no coordinated omission).

    The `ws_` figures are the WebSocket users' (`ws_users` 0: none ran): a
    connection closed with 1001 (going away) is a normal close, counted by the
    member it was on; the user reconnects at once, and its next connection is a
    reconnect; `ws_max_reconnects_per_second` is the most reconnects begun within
    any one second (when the 1001s sent users back); any other end is an
    abnormal close, counted by kind (WS_FAILURE_KINDS).
    """

    url: str
    target_rate: float
    sticky_users: int
    duration: float  # seconds from the first scheduled request to the last dispatch
    sent: int
    completed: int  # responses received, any status
    ok: int  # 2xx and 3xx
    failures: dict[str, int]
    latency_ms: dict[str, float]  # p50, p99, max
    session_moves: int
    session_breaks: int  # moved while the member was still admitted
    version_flaps: int  # users served an earlier version again after a newer one
    versions_seen: dict[str, int]
    members_seen: dict[str, int]
    max_schedule_lag_ms: float
    achieved_rate: float
    watched: bool = False  # breaks judged against a balancer's admissions
    admission_reads: int = 0
    admission_read_failures: int = 0
    sessions_cut: int = 0  # still active when the member left the pool: lost too
    users_arrived: int = 0  # users served, those who left and their successors included
    think_time: float = 0.0  # seconds between two requests of one user
    session_mean: float | None = None  # how long a user stays (None: for good)
    session_max: float | None = None
    failure_examples: list[str] = field(default_factory=list)
    # The first failed requests: when (seconds after the first scheduled one), what,
    # which user and the member its session was on ("None": no session yet).
    failure_log: list[str] = field(default_factory=list)
    ws_users: int = 0
    ws_interval: float | None = None  # seconds between two messages of a user
    ws_opened: int = 0  # connections opened, reconnects included
    ws_echoed: int = 0  # messages whose echo came back as sent
    ws_normal_closes: dict[str, int] = field(default_factory=dict)  # 1001, by member
    ws_abnormal_closes: dict[str, int] = field(default_factory=dict)  # by kind
    ws_reconnects: int = 0  # first connections opened after a 1001
    ws_max_reconnects_per_second: int = 0  # the most begun within any one second
    ws_waiting_to_reconnect: int = 0  # closed with 1001 as the run ended, not back yet

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def ws_normal(self) -> int:
        return sum(self.ws_normal_closes.values())

    @property
    def ws_abnormal(self) -> int:
        return sum(self.ws_abnormal_closes.values())

    @property
    def passed(self) -> bool:
        """Something was sent, and nothing failed, broke, was cut or flapped;
        WebSocket users echoed something and had no abnormal close."""
        return (
            self.sent > 0
            and self.failed == 0
            and self.session_breaks == 0
            and self.sessions_cut == 0
            and self.version_flaps == 0
            and (self.ws_users == 0 or self.ws_echoed > 0)
            and self.ws_abnormal == 0
        )

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["passed"] = self.passed
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeReport:
        """Read back `to_dict` output (such as `--json`); unknown keys are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise ValueError(f"not a probe report: {exc}") from None

    def __rich__(self) -> RenderableType:
        verdict = Text("PASSED", style="bold green") if self.passed else Text("FAILED", "bold red")
        table = Table(title=Text.assemble("Probe ", verdict), show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        lat = self.latency_ms
        rows: list[tuple[str, str | Text]] = [
            ("target", f"{self.url} at {self.target_rate:g} req/s, {self.sticky_users} users"),
            ("sent", f"{self.sent} in {self.duration:.1f} s ({self.achieved_rate:.0f} req/s)"),
            ("completed", f"{self.completed} ({self.ok} ok)"),
            ("failed", _counts(self.failures) if self.failed else "0"),
            (
                "latency",
                f"p50 {lat['p50']:.1f} ms  p99 {lat['p99']:.1f} ms  max {lat['max']:.1f} ms",
            ),
            ("schedule lag", self._lag()),
            ("users", self._users()),
            (
                "sessions",
                f"{self.session_moves} moved: {self.session_breaks} broken, "
                f"{self.sessions_cut} cut",
            ),
            ("version flaps", str(self.version_flaps)),
            ("versions", _counts(self.versions_seen) or "-"),
            ("members", _counts(self.members_seen) or "-"),
        ]
        if self.ws_users:
            rows.extend(self._websockets())
        if self.watched:
            rows.append(
                (
                    "admissions",
                    f"{self.admission_reads} reads, {self.admission_read_failures} failed",
                )
            )
        else:
            rows.append(("admissions", "not watched: every move counts as broken"))
        rows.extend(("example", example) for example in self.failure_examples)
        rows.extend(("failed request", line) for line in self.failure_log[:10])
        for label, value in rows:
            table.add_row(label, value)
        return table

    def _users(self) -> str:
        stay = (
            "stay for good"
            if self.session_mean is None
            else f"stay {self.session_mean:g} s on average"
            + ("" if self.session_max is None else f", {self.session_max:g} s at most")
        )
        return f"{self.users_arrived} arrived, {self.think_time:g} s between requests, {stay}"

    def _websockets(self) -> list[tuple[str, str | Text]]:
        every = f"a message every {self.ws_interval:g} s" if self.ws_interval else "messages"
        abnormal = (
            Text(f"{self.ws_abnormal} abnormal: {_counts(self.ws_abnormal_closes)}", "bold red")
            if self.ws_abnormal
            else "0 abnormal"
        )
        normal = f"{self.ws_normal} normal (1001)" + (
            f": {_counts(self.ws_normal_closes)}" if self.ws_normal else ""
        )
        waiting = (
            f", {self.ws_waiting_to_reconnect} not back at the end"
            if self.ws_waiting_to_reconnect
            else ""
        )
        return [
            (
                "websockets",
                f"{self.ws_users} users, {every}: {self.ws_echoed} echoed, "
                f"{self.ws_opened} connections opened",
            ),
            ("ws closes", Text.assemble(normal, ", ", abnormal)),
            (
                "ws reconnects",
                f"{self.ws_reconnects}, at most {self.ws_max_reconnects_per_second} "
                f"begun in one second{waiting}",
            ),
        ]

    def _lag(self) -> str | Text:
        lag = f"max {self.max_schedule_lag_ms:.1f} ms"
        if self.max_schedule_lag_ms <= LAG_WARNING_MS:
            return lag
        # The probe's own machine could not keep up: failures may be the probe's.
        return Text(f"{lag}: the probe fell behind its schedule", style="yellow")

    def render(self, console: Console) -> None:
        console.print(self)


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))
