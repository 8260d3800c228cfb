"""The executor interface and the one way commands are built from templates.

A template is split into words the way a POSIX shell would (shlex), then each
placeholder is substituted inside its word. A substituted value therefore stays
one literal argument whatever it contains (`1.0; rm -rf /` included): locally
the argv is executed without a shell; over SSH it is joined with `shlex.join`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from changeover.config import Cluster, Member, template_words
from changeover.config import TemplateError as TemplateError  # raised by render_argv


def render_argv(template: str, values: Mapping[str, str]) -> list[str]:
    """argv for `template` with `{name}` placeholders replaced by literal values."""
    return [word.format_map(values) for word in template_words(template, values.keys())]


def member_values(cluster: Cluster, member: Member, version: str) -> dict[str, str]:
    return {
        "version": version,
        "member": member.name,
        "host": member.host,
        "port": str(member.port),
        "cluster": cluster.name,
        "route": member.route_id,
    }


@dataclass(frozen=True, slots=True)
class CommandResult:
    member: str
    argv: tuple[str, ...]
    exit_status: int | None  # None: timed out or could not start
    output: str  # stdout and stderr, interleaved, truncated to a bounded size
    seconds: float

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


class Executor(Protocol):
    """Runs one argv on one member."""

    async def run(
        self, cluster: Cluster, member: Member, argv: list[str], timeout: float
    ) -> CommandResult: ...

    async def upload(
        self, cluster: Cluster, member: Member, src: Path, dest: str, timeout: float
    ) -> CommandResult:
        """Copy a local file to `dest` on the member and verify its checksum there."""
        ...

    async def warm(self, cluster: Cluster) -> None:
        """Open ahead what commands on the cluster's members need (SSH
        connections), while its drain waits; a failure is left for the
        commands to report."""
        ...

    async def close_cluster(self, cluster: Cluster) -> None:
        """Close what commands on the cluster's members used (SSH connections):
        the release runs nothing more there. A later command opens it again."""
        ...

    async def close(self) -> None: ...
