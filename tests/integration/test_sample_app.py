"""The sample app and appctl as a user runs them: separate processes on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from tests.helpers import free_port, wait_until

HOST = "127.0.0.1"


async def port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(HOST, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


@dataclass
class App:
    proc: asyncio.subprocess.Process
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@contextlib.asynccontextmanager
async def running_app(
    member: str = "a1",
    route: str = "r1",
    version: str = "v1",
    startup_delay: float = 0.0,
    wait: bool = True,
) -> AsyncIterator[App]:
    """The sample app in its own process; its log lines are on proc.stderr."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "changeover.demo.app",
        f"--port={port}",
        f"--member={member}",
        f"--route={route}",
        f"--version={version}",
        f"--startup-delay={startup_delay}",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        if wait:
            await wait_until(lambda: port_open(port), timeout=15, what=f"{member} listening")
        yield App(proc, port)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_session_cookie_and_counter() -> None:
    async with running_app(route="r1") as app, aiohttp.ClientSession() as http:
        async with http.get(app.url + "/") as resp:
            first = await resp.json()
            cookie = resp.cookies["JSESSIONID"]
        session = first["session"]
        assert session.endswith(".r1") and cookie.value == session
        assert cookie["httponly"] and cookie["path"] == "/"
        assert first == {
            "version": "v1",
            "member": "a1",
            "route": "r1",
            "session": session,
            "count": 1,
        }

        for expected in (2, 3):
            async with http.get(app.url + "/", headers={"Cookie": f"JSESSIONID={session}"}) as resp:
                body = await resp.json()
                assert "Set-Cookie" not in resp.headers
            assert (body["session"], body["count"]) == (session, expected)

        # A session this member does not know (e.g. from another member): a new one.
        unknown = {"Cookie": "JSESSIONID=0123456789abcdef.r2"}
        async with http.get(app.url + "/", headers=unknown) as resp:
            body = await resp.json()
            assert resp.cookies["JSESSIONID"].value == body["session"] != session
        assert body["count"] == 1


async def test_every_response_names_member_and_version() -> None:
    version = "1.0; rm -rf /"
    async with running_app(member="b7", version=version) as app, aiohttp.ClientSession() as http:
        for path, status in (("/", 200), ("/health", 200), ("/version", 200), ("/nope", 404)):
            async with http.get(app.url + path) as resp:
                assert resp.status == status, path
                assert resp.headers["X-Changeover-Member"] == "b7"
                assert resp.headers["X-Changeover-Version"] == version
                text = await resp.text()
            if path == "/version":
                assert text == version
            if path == "/health":
                assert text == "ok"


async def test_port_opens_only_after_the_startup_delay() -> None:
    async with running_app(startup_delay=1.5, wait=False) as app:
        assert app.proc.stderr is not None
        booting = await asyncio.wait_for(app.proc.stderr.readline(), timeout=15)
        booted_at = time.monotonic()
        assert b"booting" in booting
        assert not await port_open(app.port)  # the process runs, the port is still closed
        await wait_until(lambda: port_open(app.port), timeout=10, what="port open")
        assert time.monotonic() - booted_at > 1.0


async def test_sigterm_finishes_the_request_in_flight_and_exits_zero() -> None:
    async with running_app() as app, aiohttp.ClientSession() as http:
        async with http.get(app.url + "/slow?ms=1500") as resp:
            assert resp.status == 200  # the headers are here: the request is in flight
            app.proc.send_signal(signal.SIGTERM)
            await wait_until(
                lambda: _refused(app.port), timeout=5, what="listener closed after SIGTERM"
            )
            body = await resp.json(content_type=None)
        assert body == {"slept_ms": 1500, "member": "a1"}
        assert await asyncio.wait_for(app.proc.wait(), timeout=10) == 0


async def test_the_websocket_echoes_and_gets_1001_at_sigterm() -> None:
    """GET /ws echoes text and binary as they came, its 101 names the member and
    version; at SIGTERM the app closes it with 1001 (going away) and exits 0."""
    async with (
        running_app(member="a2", version="v3") as app,
        aiohttp.ClientSession() as http,
        http.ws_connect(app.url + "/ws") as ws,
    ):
        handshake = ws._response  # aiohttp keeps the 101's headers only here
        assert handshake.headers["X-Changeover-Member"] == "a2"
        assert handshake.headers["X-Changeover-Version"] == "v3"
        await ws.send_str("u1 m1")
        assert await ws.receive_str(timeout=5) == "u1 m1"
        await ws.send_bytes(b"\x00\xff" * 4000)
        assert await ws.receive_bytes(timeout=5) == b"\x00\xff" * 4000
        app.proc.send_signal(signal.SIGTERM)
        closing = await ws.receive(timeout=10)
        assert (closing.type, closing.data) == (aiohttp.WSMsgType.CLOSE, 1001)
        assert await asyncio.wait_for(app.proc.wait(), timeout=10) == 0


async def _refused(port: int) -> bool:
    return not await port_open(port)


# --- appctl -------------------------------------------------------------------------------


async def appctl(root: Path, action: str, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "changeover.demo.appctl",
        action,
        f"--root={root}",
        "--member=a1",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def http_text(url: str) -> str | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return await resp.text()
    except aiohttp.ClientError:
        return None


async def test_appctl_deploy_start_stop_are_idempotent(tmp_path: Path) -> None:
    port = free_port()
    where = (f"--port={port}", "--route=r1")
    version = "1.0; rm -rf /"
    try:
        assert (await appctl(tmp_path, "status"))[0] == 3
        assert (await appctl(tmp_path, "start", *where))[0] == 1  # nothing deployed
        assert (await appctl(tmp_path, "deploy", f"--version={version}"))[0] == 0
        assert (tmp_path / "a1" / "deployed-version").read_text() == version  # literally

        code, out = await appctl(tmp_path, "start", *where)
        assert code == 0, out
        pid = int((tmp_path / "a1" / "app.pid").read_text())
        await wait_until(
            lambda: serves(f"http://{HOST}:{port}/version", version),
            timeout=15,
            what="the app serving the deployed version",
        )
        code, out = await appctl(tmp_path, "start", *where)
        assert code == 0 and "already running" in out, out
        assert int((tmp_path / "a1" / "app.pid").read_text()) == pid

        code, out = await appctl(tmp_path, "status")
        assert code == 0 and repr(version) in out and str(pid) in out

        assert (await appctl(tmp_path, "stop"))[0] == 0
        assert not _alive(pid)
        assert not (tmp_path / "a1" / "app.pid").exists()
        code, out = await appctl(tmp_path, "stop")
        assert code == 0 and "not running" in out, out
        assert (await appctl(tmp_path, "status"))[0] == 3
    finally:
        await appctl(tmp_path, "stop")


async def test_appctl_start_replaces_an_older_version(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://{HOST}:{port}/version"
    try:
        await appctl(tmp_path, "deploy", "--version=v1")
        assert (await appctl(tmp_path, "start", f"--port={port}"))[0] == 0
        await wait_until(lambda: serves(url, "v1"), timeout=15, what="v1 serving")
        await appctl(tmp_path, "deploy", "--version=v2")
        code, out = await appctl(tmp_path, "start", f"--port={port}", "--version=v2")
        assert code == 0 and "stopping it first" in out, out
        await wait_until(lambda: serves(url, "v2"), timeout=15, what="v2 serving")
        code, out = await appctl(tmp_path, "start", f"--port={port}", "--version=v3")
        assert code == 1 and "'v2' is deployed" in out
    finally:
        await appctl(tmp_path, "stop")


async def test_appctl_fail_start_hook_and_bad_versions(tmp_path: Path) -> None:
    await appctl(tmp_path, "deploy", "--version=v1")
    (tmp_path / "a1" / "fail-start").touch()
    code, out = await appctl(tmp_path, "start", f"--port={free_port()}")
    assert code == 1 and "fail-start" in out
    assert not (tmp_path / "a1" / "app.pid").exists()
    assert (await appctl(tmp_path, "deploy", "--version=v2\nrm -rf /"))[0] == 2
    assert (await appctl(tmp_path, "deploy", "--version="))[0] == 2
    assert (tmp_path / "a1" / "deployed-version").read_text() == "v1"


async def http_status(url: str) -> tuple[int, str] | None:
    try:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError:
        return None


async def test_appctl_fault_hooks_unhealthy_report_version_and_errors(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://{HOST}:{port}"
    faults = tmp_path / "a1"
    try:
        await appctl(tmp_path, "deploy", "--version=v1")
        assert (await appctl(tmp_path, "start", f"--port={port}"))[0] == 0
        await wait_until(lambda: serves(base + "/version", "v1"), timeout=15, what="v1 serving")
        assert await http_status(base + "/health") == (200, "ok")

        (faults / "unhealthy").touch()  # empty: whatever version runs
        assert await http_status(base + "/health") == (503, "unhealthy (fault injection)")
        (faults / "unhealthy").write_text("v2\n")  # only v2 is sick: v1 is not
        assert await http_status(base + "/health") == (200, "ok")
        (faults / "unhealthy").write_text("v1")
        assert (await http_status(base + "/health") or (0, ""))[0] == 503
        (faults / "unhealthy").unlink()
        assert await http_status(base + "/health") == (200, "ok")

        (faults / "report-version").write_text("v0-wrong\n")
        assert await http_status(base + "/version") == (200, "v0-wrong")
        page = await http_status(base + "/")
        assert page is not None and '"version": "v1"' in page[1]  # only /version lies
        (faults / "report-version").unlink()
        assert await http_status(base + "/version") == (200, "v1")

        (faults / "errors").write_text("v2")  # only v2 answers 500: v1 does not
        assert (await http_status(base + "/") or (0, ""))[0] == 200
        (faults / "errors").write_text("v1\n")
        assert (await http_status(base + "/") or (0, ""))[0] == 500
        assert await http_status(base + "/health") == (200, "ok")  # healthy all the same
        (faults / "errors").unlink()
        assert (await http_status(base + "/") or (0, ""))[0] == 200
    finally:
        await appctl(tmp_path, "stop")


async def test_appctl_stop_leaves_a_process_that_reused_the_pid_alone(tmp_path: Path) -> None:
    other = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        (tmp_path / "a1").mkdir()
        (tmp_path / "a1" / "app.pid").write_text(f"{other.pid}\n")
        code, out = await appctl(tmp_path, "stop")
        assert code == 0 and "not running" in out
        assert other.returncode is None and _alive(other.pid)
        assert (await appctl(tmp_path, "status"))[0] == 3
    finally:
        other.kill()
        await other.wait()


async def serves(url: str, expected: str) -> bool:
    return await http_text(url) == expected


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
