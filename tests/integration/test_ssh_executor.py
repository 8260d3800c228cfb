"""SshExecutor against a real OpenSSH server on distinct loopback addresses."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import psutil
import pytest

from changeover.config import Cluster, Member
from changeover.executors import ssh as ssh_module
from changeover.executors.base import member_values, render_argv
from changeover.executors.ssh import SshExecutor
from tests.helpers import wait_until
from tests.integration.sshd import SshdServer, cluster_hosts, running_sshd

pytestmark = pytest.mark.real

A_HOSTS = cluster_hosts(1, 3)
B_HOSTS = cluster_hosts(2, 3)
MEMBERS = [Member(name=f"a{i}", host=h, port=8000 + i) for i, h in enumerate(A_HOSTS, 1)]
CLUSTER = Cluster(name="A", members=MEMBERS)
A1 = MEMBERS[0]
UNREACHABLE = Member(name="a9", host="127.0.9.9", port=8009)  # sshd does not listen there


@pytest.fixture
async def sshd() -> AsyncIterator[SshdServer]:
    async with running_sshd(A_HOSTS + B_HOSTS) as server:
        yield server


@pytest.fixture
async def executor(sshd: SshdServer) -> AsyncIterator[SshExecutor]:
    ex = SshExecutor(sshd.settings())
    yield ex
    await ex.close()


def test_sshd_log_counts_one_client_port_connected_to_two_hosts_once_each(
    tmp_path: Path,
) -> None:
    """The harness's own count: a client port may reach two member addresses at
    once, and each acceptance still goes to the host it was for."""
    log = tmp_path / "sshd.log"
    log.write_text(
        'Connection from 127.0.0.1 port 5000 on 127.0.1.1 port 22 rdomain ""\n'
        'Connection from 127.0.0.1 port 5000 on 127.0.2.7 port 22 rdomain ""\n'
        "Accepted publickey for root from 127.0.0.1 port 5000 ssh2: ED25519 SHA256:k\n"
        'Connection from 127.0.0.1 port 5001 on 127.0.2.7 port 22 rdomain ""\n'
        "Accepted publickey for root from 127.0.0.1 port 5000 ssh2: ED25519 SHA256:k\n"
    )
    hosts = ("127.0.1.1", "127.0.2.7")
    server = SshdServer(hosts, 22, "root", tmp_path, tmp_path, "", log, tmp_path)
    assert [server.accepted(h) for h in hosts] == [1, 1]  # port 5001 never authenticated
    assert server.accepted() == 2


def _processes_with(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(token in arg for arg in proc.info["cmdline"] or []):
            found.append(proc)
    return found


async def test_substituted_values_stay_one_literal_argument(
    executor: SshExecutor, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("still here")
    marks = [tmp_path / f"pwned{i}" for i in range(4)]
    version = (
        f"1.0; rm -rf {victim} $(touch {marks[0]}) `touch {marks[1]}` "
        f"&& touch {marks[2]} | touch {marks[3]} 'x\" \n* ~ $HOME \\ %s"
    )
    argv = render_argv(
        "printf '<%s>\\n' {version} {member}", {"version": version, "member": A1.name}
    )

    result = await executor.run(CLUSTER, A1, argv, timeout=10)

    assert result.ok, result.output
    assert result.output == f"<{version}>\n<{A1.name}>\n"
    assert not [m for m in marks if m.exists()]
    assert (victim / "keep").read_text() == "still here"


async def test_hostile_member_cluster_and_route_names_stay_literal_over_ssh(
    executor: SshExecutor, tmp_path: Path
) -> None:
    """The config refuses such names; if one ever got through (or a template used a
    free-form value), it would still reach the remote command as one argument."""
    marks = [tmp_path / f"pwned{i}" for i in range(3)]
    name = f"a1; touch {marks[0]} $(touch {marks[1]}) `touch {marks[2]}` 'q\" \n* ~ %s"
    cluster = Cluster.model_construct(name=f"{name}-cluster", members=[])
    member = Member.model_construct(name=name, host=A1.host, port=A1.port, route=f"r {name}")
    argv = render_argv(
        "printf '<%s>\\n' {member} {cluster} --route={route}",
        member_values(cluster, member, "1.0"),
    )

    result = await executor.run(cluster, member, argv, timeout=10)

    assert result.ok, result.output
    assert result.output == f"<{name}>\n<{name}-cluster>\n<--route=r {name}>\n"
    assert not [m for m in marks if m.exists()]


async def test_exit_status_output_and_environment(executor: SshExecutor) -> None:
    result = await executor.run(
        CLUSTER, A1, ["sh", "-c", "echo to-stdout; echo to-stderr >&2; exit 3"], timeout=10
    )
    assert result.exit_status == 3
    assert "to-stdout\n" in result.output and "to-stderr\n" in result.output
    assert "changeover-pid" not in result.output  # the kill marker never reaches the user

    env = await executor.run(
        CLUSTER, A1, ["sh", "-c", 'echo "$CHANGEOVER_CLUSTER/$CHANGEOVER_MEMBER"'], timeout=10
    )
    assert env.output == f"{CLUSTER.name}/{A1.name}\n"

    missing = await executor.run(CLUSTER, A1, ["no-such-program-here"], timeout=10)
    assert missing.exit_status == 127
    assert "no-such-program-here" in missing.output


async def test_output_keeps_only_the_last_bytes(sshd: SshdServer) -> None:
    executor = SshExecutor(sshd.settings(), output_limit=1000)
    try:
        result = await executor.run(
            CLUSTER, A1, ["sh", "-c", "head -c 50000 /dev/zero | tr '\\0' x; echo; echo END"], 10
        )
    finally:
        await executor.close()
    assert result.ok
    assert result.output.endswith("x\nEND\n")
    assert "49" in result.output.splitlines()[0] and "omitted" in result.output.splitlines()[0]
    assert len(result.output) < 1100


async def test_unknown_host_is_refused_with_a_clear_error(sshd: SshdServer, tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"  # lists every host but the one we reach
    known_hosts.write_text(
        "".join(f"[{h}]:{sshd.port} {sshd.host_key_line}\n" for h in sshd.hosts if h != A1.host)
    )
    executor = SshExecutor(sshd.settings(known_hosts=str(known_hosts)))
    try:
        result = await executor.run(CLUSTER, A1, ["true"], timeout=10)
    finally:
        await executor.close()
    assert result.exit_status is None
    assert f"unknown host key for {sshd.user}@{A1.host}:{sshd.port}" in result.output
    assert str(known_hosts) in result.output
    assert sshd.accepted() == 0  # refused before authenticating


async def test_changed_host_key_is_refused(sshd: SshdServer, tmp_path: Path) -> None:
    other = asyncssh.generate_private_key("ssh-ed25519").export_public_key().decode().split()
    known_hosts = tmp_path / "known_hosts"
    entry = f"[{A1.host}]:{sshd.port}"
    known_hosts.write_text(
        sshd.known_hosts.read_text().replace(
            f"{entry} {sshd.host_key_line}", f"{entry} {other[0]} {other[1]}"
        )
    )
    executor = SshExecutor(sshd.settings(known_hosts=str(known_hosts)))
    try:
        changed = await executor.run(CLUSTER, A1, ["true"], timeout=10)
        unchanged = await executor.run(CLUSTER, MEMBERS[1], ["true"], timeout=10)
    finally:
        await executor.close()
    assert changed.exit_status is None
    assert f"HOST KEY MISMATCH for {sshd.user}@{A1.host}:{sshd.port}" in changed.output
    assert unchanged.ok, unchanged.output
    assert sshd.accepted(A1.host) == 0


async def test_missing_known_hosts_file_is_an_error_not_a_free_pass(
    sshd: SshdServer, tmp_path: Path
) -> None:
    executor = SshExecutor(sshd.settings(known_hosts=str(tmp_path / "absent")))
    try:
        result = await executor.run(CLUSTER, A1, ["true"], timeout=10)
    finally:
        await executor.close()
    assert result.exit_status is None
    assert f"cannot read known_hosts file {tmp_path / 'absent'}" in result.output


async def test_insecure_opt_out_accepts_any_host_key(sshd: SshdServer, tmp_path: Path) -> None:
    settings = sshd.settings(known_hosts=str(tmp_path / "absent"), insecure_ignore_host_keys=True)
    executor = SshExecutor(settings)
    try:
        result = await executor.run(CLUSTER, A1, ["true"], timeout=10)
    finally:
        await executor.close()
    assert result.ok, result.output


async def test_wrong_client_key_fails_authentication(sshd: SshdServer, tmp_path: Path) -> None:
    stranger = tmp_path / "id_stranger"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(stranger))
    executor = SshExecutor(sshd.settings(key_file=str(stranger)))
    try:
        result = await executor.run(CLUSTER, A1, ["true"], timeout=10)
    finally:
        await executor.close()
    assert result.exit_status is None
    assert f"SSH authentication failed for {sshd.user}@{A1.host}:{sshd.port}" in result.output


async def test_unreachable_member_is_a_result_not_an_exception(executor: SshExecutor) -> None:
    result = await executor.run(CLUSTER, UNREACHABLE, ["true"], timeout=10)
    assert result.exit_status is None
    assert UNREACHABLE.host in result.output and "Connection refused" in result.output


async def test_timeout_kills_the_remote_process_group(
    sshd: SshdServer, executor: SshExecutor
) -> None:
    token = f"{random.randint(100000, 999999)}.5"  # a unique sleep length to find its processes
    argv = ["sh", "-c", f"echo started; sleep {token} & sleep {token}; echo never"]

    result = await executor.run(CLUSTER, A1, argv, timeout=1)

    assert result.exit_status is None
    assert result.output.startswith("started\n")
    assert f"timed out after 1s on {A1.host}; killed its process group" in result.output
    assert "never" not in result.output
    assert 1 <= result.seconds < 5
    await wait_until(lambda: not _processes_with(token), timeout=5, what="remote sleeps gone")
    after = await executor.run(CLUSTER, A1, ["true"], timeout=10)
    assert after.ok, after.output
    assert sshd.accepted(A1.host) == 1  # the pooled connection survived the timeout


async def test_one_connection_per_host_across_steps_and_concurrent_callers(
    sshd: SshdServer, executor: SshExecutor
) -> None:
    probe = ["sh", "-c", 'echo "$SSH_CONNECTION"']
    seen: dict[str, set[str]] = {m.host: set() for m in MEMBERS}
    for _step in range(3):  # e.g. stop, deploy, start; each step all members at once
        results = await asyncio.gather(
            *(executor.run(CLUSTER, m, probe, 10) for m in MEMBERS for _ in range(4))
        )
        for member_result, member in zip(
            results, [m for m in MEMBERS for _ in range(4)], strict=True
        ):
            assert member_result.ok, member_result.output
            client_ip, client_port, server_ip, _ = member_result.output.split()
            assert server_ip == member.host
            seen[member.host].add(f"{client_ip}:{client_port}")
    assert all(len(sources) == 1 for sources in seen.values()), seen
    assert [sshd.accepted(m.host) for m in MEMBERS] == [1, 1, 1]


async def test_warm_opens_each_hosts_connection_that_commands_then_reuse(
    sshd: SshdServer, executor: SshExecutor
) -> None:
    cluster = Cluster(name="A", members=[*MEMBERS, UNREACHABLE])
    await executor.warm(cluster)  # the unreachable member is left for its command
    await wait_until(lambda: [sshd.accepted(m.host) for m in MEMBERS] == [1, 1, 1], timeout=10)
    results = await asyncio.gather(*(executor.run(CLUSTER, m, ["true"], 10) for m in MEMBERS))
    assert all(r.ok for r in results), results
    assert [sshd.accepted(m.host) for m in MEMBERS] == [1, 1, 1]  # no second handshake
    late = await executor.run(cluster, UNREACHABLE, ["true"], 10)
    assert late.exit_status is None and "cannot connect" in late.output


async def test_upload_verifies_the_checksum_and_replaces_atomically(
    executor: SshExecutor, tmp_path: Path
) -> None:
    payload = random.randbytes(3 * 1024 * 1024 + 17)
    src = tmp_path / "app-2.0.war"
    src.write_bytes(payload)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    dest = remote_dir / "app.war"
    dest.write_bytes(b"the previous release")

    result = await executor.upload(CLUSTER, A1, src, str(dest), timeout=30)

    assert result.ok, result.output
    digest = hashlib.sha256(payload).hexdigest()
    assert f"sha256 {digest} verified" in result.output
    assert dest.read_bytes() == payload
    assert sorted(p.name for p in remote_dir.iterdir()) == ["app.war"]  # no temp file left


async def test_upload_detects_a_corrupted_copy_and_keeps_dest(
    executor: SshExecutor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "app.war"
    src.write_bytes(b"release 2.0 bytes")
    corrupted = tmp_path / "corrupted"
    corrupted.write_bytes(b"release 2.0 bytez")

    async def corrupting_put(
        self: SshExecutor, sftp: asyncssh.SFTPClient, src: Path, remote: str
    ) -> None:  # a transfer that damages the bytes on the way
        await sftp.put(str(corrupted), remote)

    monkeypatch.setattr(SshExecutor, "_put", corrupting_put)
    remote_dir = tmp_path / "remote"
    remote_dir.mkdir()
    dest = remote_dir / "app.war"
    dest.write_bytes(b"release 1.0")

    result = await executor.upload(CLUSTER, A1, src, str(dest), timeout=30)

    assert result.exit_status == 1
    assert f"checksum mismatch for {A1.host}:{dest}" in result.output
    assert hashlib.sha256(corrupted.read_bytes()).hexdigest() in result.output
    assert dest.read_bytes() == b"release 1.0"
    assert sorted(p.name for p in remote_dir.iterdir()) == ["app.war"]


async def test_upload_into_a_missing_directory_fails_clearly(
    executor: SshExecutor, tmp_path: Path
) -> None:
    src = tmp_path / "app.war"
    src.write_bytes(b"x")
    dest = tmp_path / "no-such-dir" / "app.war"
    result = await executor.upload(CLUSTER, A1, src, str(dest), timeout=30)
    assert result.exit_status == 1
    assert f"upload to {A1.host}:{dest} failed" in result.output


async def test_jump_host_carries_the_connection(sshd: SshdServer, tmp_path: Path) -> None:
    async with running_sshd(["127.0.0.1"], client_key=sshd.key_file) as jump:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(sshd.known_hosts.read_text() + jump.known_hosts.read_text())
        settings = sshd.settings(
            known_hosts=str(known_hosts), jump_host=f"{jump.user}@127.0.0.1:{jump.port}"
        )
        executor = SshExecutor(settings)
        try:
            results = [await executor.run(CLUSTER, m, ["true"], 10) for m in MEMBERS]
        finally:
            await executor.close()
        assert all(r.ok for r in results), [r.output for r in results]
        assert jump.accepted("127.0.0.1") == 1  # one jump connection carries all three
        assert [sshd.accepted(m.host) for m in MEMBERS] == [1, 1, 1]


async def test_jump_host_that_refuses_forwarding_is_a_clear_error(
    sshd: SshdServer, tmp_path: Path
) -> None:
    async with running_sshd(
        ["127.0.0.1"], client_key=sshd.key_file, extra_config={"AllowTcpForwarding": "no"}
    ) as jump:
        known_hosts = tmp_path / "known_hosts"
        known_hosts.write_text(sshd.known_hosts.read_text() + jump.known_hosts.read_text())
        jump_host = f"{jump.user}@127.0.0.1:{jump.port}"
        executor = SshExecutor(sshd.settings(known_hosts=str(known_hosts), jump_host=jump_host))
        try:
            result = await executor.run(CLUSTER, A1, ["true"], 10)
        finally:
            await executor.close()
        assert result.exit_status is None
        assert f"cannot connect to {sshd.user}@{A1.host}:{sshd.port} via jump host {jump_host}" in (
            result.output
        )
        assert sshd.accepted() == 0  # never reached directly


async def test_a_dropped_connection_is_replaced_on_the_next_command(
    sshd: SshdServer, executor: SshExecutor
) -> None:
    first = await executor.run(CLUSTER, A1, ["true"], timeout=10)
    assert first.ok, first.output
    # The command's parent is sshd's process for this connection: killing it drops the link.
    dropped = await executor.run(CLUSTER, A1, ["sh", "-c", "kill -KILL $PPID"], timeout=10)
    assert dropped.exit_status is None
    assert f"lost the command on {A1.host}" in dropped.output
    after = await executor.run(CLUSTER, A1, ["true"], timeout=10)
    assert after.ok, after.output
    assert sshd.accepted(A1.host) == 2


def connected(host: str) -> int:
    """This process's TCP connections open to `host`."""
    return sum(
        1
        for c in psutil.Process().net_connections("tcp")
        if c.raddr and c.raddr.ip == host and c.status == psutil.CONN_ESTABLISHED
    )


async def test_close_cluster_closes_its_hosts_connections_and_no_other(
    sshd: SshdServer, executor: SshExecutor
) -> None:
    other = Member(name="b1", host=B_HOSTS[0], port=8101)
    b = Cluster(name="B", members=[other])
    assert (await executor.run(b, other, ["true"], 10)).ok
    await executor.warm(CLUSTER)
    assert [connected(m.host) for m in [*MEMBERS, other]] == [1, 1, 1, 1]
    await executor.close_cluster(CLUSTER)  # the release runs nothing more on A
    assert [connected(m.host) for m in [*MEMBERS, other]] == [0, 0, 0, 1]
    assert (await executor.run(b, other, ["true"], 10)).ok
    assert sshd.accepted(other.host) == 1  # B's connection stayed open, and in use
    again = await executor.run(CLUSTER, A1, ["true"], 10)  # a later command reconnects
    assert again.ok, again.output
    assert [sshd.accepted(m.host) for m in MEMBERS] == [2, 1, 1]


async def test_a_cancelled_close_cluster_still_closes_every_connection(
    sshd: SshdServer, executor: SshExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ssh_module, "CLOSE_AT_ONCE", 1)  # one batch per host
    await executor.warm(CLUSTER)
    closing = asyncio.create_task(executor.close_cluster(CLUSTER))
    await asyncio.sleep(0)  # the first batch begins
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    await wait_until(
        lambda: [connected(m.host) for m in MEMBERS] == [0, 0, 0],
        timeout=5,
        what="every connection of A closed, the batches not reached included",
    )
