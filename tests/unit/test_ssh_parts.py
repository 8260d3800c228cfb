"""The SSH executor's pure parts: jump host syntax, the remote command line,
output bounding, the pid marker, sha256sum parsing and path resolution."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from changeover.config import parse
from changeover.executors.ssh import (
    OutputTail,
    SshExecutor,
    _PidFilter,
    parse_jump_host,
    parse_sha256sum,
    remote_command,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bastion", (None, "bastion", 22)),
        ("ops@bastion", ("ops", "bastion", 22)),
        ("ops@bastion:2222", ("ops", "bastion", 2222)),
        ("10.0.0.1:22", (None, "10.0.0.1", 22)),
        ("ops@[2001:db8::1]:2200", ("ops", "2001:db8::1", 2200)),
        ("[::1]", (None, "::1", 22)),
        ("::1", (None, "::1", 22)),
        ("a@b@bastion", ("a@b", "bastion", 22)),
    ],
)
def test_parse_jump_host(value: str, expected: tuple[str | None, str, int]) -> None:
    assert parse_jump_host(value) == expected


@pytest.mark.parametrize("value", ["", "@bastion", "ops@", "bastion:0", "bastion:x", "[::1"])
def test_parse_jump_host_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="jump host"):
        parse_jump_host(value)


def test_remote_command_keeps_each_argument_one_word() -> None:
    argv = ["deploy.sh", "1.0; rm -rf / $(id) `id` 'x\" \n", "", "*", "~", "$HOME"]
    command = remote_command(argv)
    prefix = "echo changeover-pid:$$; exec "
    assert command.startswith(prefix)
    assert shlex.split(command.removeprefix(prefix)) == argv
    with pytest.raises(ValueError):
        remote_command([])


def test_remote_command_exports_the_environment_quoted() -> None:
    command = remote_command(["true"], {"CHANGEOVER_MEMBER": "a 1;x"})
    assert "export CHANGEOVER_MEMBER='a 1;x'; exec true" in command
    with pytest.raises(ValueError, match="environment variable"):
        remote_command(["true"], {"BAD NAME": "x"})


def test_output_tail_keeps_the_last_bytes() -> None:
    tail = OutputTail(limit=10)
    tail.add(b"0123456789")
    assert tail.text() == "0123456789"
    tail.add(b"abcde")
    assert tail.dropped == 5
    assert tail.text() == "[changeover: 5 earlier bytes of output omitted]\n56789abcde"


def test_pid_filter_finds_the_marker_across_chunks_and_keeps_login_noise() -> None:
    tail = OutputTail()
    filt = _PidFilter(tail)
    for chunk in (b"motd line\nchangeover-p", b"id:4242", b"\nhello\n", b"more\n"):
        filt.feed(chunk)
    filt.flush()
    assert filt.pid == 4242
    assert tail.text() == "motd line\nhello\nmore\n"


def test_pid_filter_gives_up_without_a_marker() -> None:
    tail = OutputTail()
    filt = _PidFilter(tail, limit=8)
    filt.feed(b"no marker here\n")
    filt.feed(b"changeover-pid:1\n")  # too late: it is ordinary output now
    assert filt.pid is None
    assert tail.text() == "no marker here\nchangeover-pid:1\n"


def test_parse_sha256sum() -> None:
    digest = "a" * 64
    assert parse_sha256sum(f"{digest}  /srv/app.war\n") == digest
    assert parse_sha256sum(f"\\{digest}  /srv/new\\nline\n") == digest  # escaped name
    assert parse_sha256sum("sha256sum: /srv/app.war: No such file or directory\n") is None
    assert parse_sha256sum("") is None


def test_from_topology_resolves_paths_against_the_config_file(tmp_path: Path) -> None:
    data = {
        "clusters": [
            {"name": "A", "members": [{"name": "a1", "host": "10.0.1.1", "port": 8080}]},
            {"name": "B", "members": [{"name": "b1", "host": "10.0.2.1", "port": 8080}]},
        ],
        "executor": {
            "kind": "ssh",
            "ssh": {"known_hosts": "keys/known_hosts", "key_file": "/abs/id_ed25519"},
        },
    }
    topology = parse(data, tmp_path / "site" / "changeover.toml")
    executor = SshExecutor.from_topology(topology)
    assert executor._known_hosts_path == tmp_path / "site" / "keys" / "known_hosts"
    assert executor._key_path == Path("/abs/id_ed25519")
