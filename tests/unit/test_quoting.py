"""Command templates: substituted values reach the command as literal data."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from changeover.config import Cluster, ConfigError, Member, load, parse
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


# --- member names and hosts ------------------------------------------------------------

HOSTILE_NAMES = [*HOSTILE, "a1 --force", "-rf", "a1'; touch /tmp/pwned; '"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_config_refuses_a_hostile_member_name_naming_the_key(name: str) -> None:
    data = {
        "clusters": [
            {"name": "a", "members": [{"name": name, "port": 9001}]},
            {"name": "b", "members": [{"name": "b1", "port": 9002}]},
        ]
    }
    with pytest.raises(ConfigError) as info:
        parse(data, "site.toml")
    assert str(info.value).startswith("site.toml: clusters[0].members[0].name: ")


@pytest.mark.parametrize("name", HOSTILE_NAMES)
async def test_a_hostile_member_name_would_still_be_one_literal_argument(name: str) -> None:
    """Defence in depth: even a name that bypassed validation stays data."""
    cluster = Cluster.model_construct(name=name, members=[])
    member = Member.model_construct(name=name, host="127.0.0.1", port=9001, route=name)
    script = "import sys; sys.stdout.write(repr(sys.argv[1:]))"
    argv = render_argv(
        f"{sys.executable} -c {{script}} {{member}} --route={{route}} {{cluster}}",
        {"script": script} | member_values(cluster, member, "1.0"),
    )
    result = await LocalExecutor().run(cluster, member, argv, timeout=10)
    assert result.ok, result.output
    assert result.output == repr([name, f"--route={name}", name])


HOSTILE_HOSTS = ["app-1; touch /tmp/pwned", "$(id).example.com", "h\nx", "a b"]


def _hostile_host_config(tmp_path: Path, host: str) -> Path:
    config = tmp_path / "changeover.toml"
    config.write_text(
        "[[clusters]]\n"
        'name = "a"\n'
        f'members = [{{ name = "a1", host = {json.dumps(host)}, port = 9001 }}]\n'
        "[[clusters]]\n"
        'name = "b"\n'
        'members = [{ name = "b1", port = 9002 }]\n'
        "[release]\n"
        f"deploy = {json.dumps(f'{sys.executable} -c {{script}} {{host}} {{version}}')}\n"
    )
    return config


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
def test_a_host_that_is_no_host_name_is_refused_by_the_config(host: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(_hostile_host_config(tmp_path, host))
    assert "clusters[0].members[0].host: expected a host name or an IP address" in str(info.value)


@pytest.mark.parametrize("host", HOSTILE_HOSTS)
async def test_a_hostile_host_would_still_be_one_literal_argument(host: str) -> None:
    """Defence in depth: even a host that bypassed validation reaches commands as data."""
    cluster = Cluster.model_construct(name="a", members=[])
    member = Member.model_construct(name="a1", host=host, port=9001, route=None)
    script = "import sys; sys.stdout.write(repr(sys.argv[1:]))"
    argv = render_argv(
        f"{sys.executable} -c {{script}} {{host}} {{version}}",
        {"script": script} | member_values(cluster, member, "2.0 && reboot"),
    )
    result = await LocalExecutor().run(cluster, member, argv, timeout=10)
    assert result.ok, result.output
    assert result.output == repr([host, "2.0 && reboot"])
