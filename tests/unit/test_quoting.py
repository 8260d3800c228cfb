"""Command templates: substituted values reach the command as literal data."""

from __future__ import annotations

import asyncio
import sys

import pytest

from changeover.config import Cluster, Member
from changeover.executors.base import TemplateError, member_values, render_argv
from changeover.executors.local import LocalExecutor

HOSTILE = ["1.0; rm -rf /", "$(touch /tmp/pwned)", "a b", "it's", 'say "hi"', "x\ny", "`id`", "*"]


@pytest.mark.parametrize("version", HOSTILE)
def test_value_is_one_literal_argument(version: str) -> None:
    argv = render_argv(
        "deploy --version {version} --member {member}", {"version": version, "member": "a1"}
    )
    assert argv == ["deploy", "--version", version, "--member", "a1"]


def test_value_inside_a_word_stays_in_that_word() -> None:
    argv = render_argv("fetch https://repo/app-{version}.war", {"version": "1.0 && reboot"})
    assert argv == ["fetch", "https://repo/app-1.0 && reboot.war"]


def test_unknown_placeholder_is_an_error() -> None:
    with pytest.raises(TemplateError, match=r"unknown placeholder \{verison\}"):
        render_argv("deploy {verison}", {"version": "1"})


def test_unbalanced_quotes_are_an_error() -> None:
    with pytest.raises(TemplateError, match="cannot split"):
        render_argv("deploy 'oops", {})


@pytest.mark.parametrize("version", HOSTILE)
async def test_local_executor_passes_the_value_unchanged(version: str, tmp_path: object) -> None:
    cluster = Cluster(name="a", members=[Member(name="a1", port=9001)])
    member = cluster.members[0]
    script = "import sys; sys.stdout.write(repr(sys.argv[1:]))"
    argv = render_argv(
        f"{sys.executable} -c {{script}} {{version}}",
        {"script": script} | member_values(cluster, member, version),
    )
    result = await LocalExecutor().run(cluster, member, argv, timeout=10)
    assert result.ok, result.output
    assert result.output == repr([version])


async def test_local_executor_timeout_kills_and_reports() -> None:
    cluster = Cluster(name="a", members=[Member(name="a1", port=9001)])
    argv = [sys.executable, "-c", "import time; time.sleep(30)"]
    started = asyncio.get_running_loop().time()
    result = await LocalExecutor().run(cluster, cluster.members[0], argv, timeout=0.5)
    assert result.exit_status is None
    assert "timed out" in result.output
    assert asyncio.get_running_loop().time() - started < 10
