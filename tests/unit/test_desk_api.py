"""The desk's API against a real desk on a loopback port, its service built on
the engine's in-memory fakes; the release it watches runs beside it, as
another shell's `changeover release` would."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from changeover import journal as J
from changeover.desk.app import Desk, serve
from changeover.desk.auth import Role, Tokens
from changeover.journal import Journal
from changeover.model import COUNTERS
from changeover.ports import JournalStore, Ports
from changeover.releases import ASKED, Begin, Outcome, Releases
from tests.helpers import wait_until
from tests.unit.engine_fakes import FakeClock, Site

VIEWER, OPERATOR = "view-token-1", "op-token-2"


class HeldClock(FakeClock):
    """Jumps like FakeClock, except that a release awaiting approval looks for
    its approval only each time `let_go` is set: the test acts in between."""

    def __init__(self, journal: Journal) -> None:
        super().__init__()
        self.journal = journal
        self.let_go = asyncio.Event()

    async def sleep(self, seconds: float, wake: asyncio.Event) -> None:
        row = self.journal.unfinished("t")
        if row is not None and row.state == J.AWAITING_APPROVAL:
            await self.let_go.wait()
            self.let_go.clear()
        await super().sleep(seconds, wake)


@dataclass
class Running:
    site: Site
    url: str
    http: aiohttp.ClientSession
    journal: Journal  # the test's own connection: each process has its own

    def service(self) -> Releases:
        s = self.site
        return Releases(s.topo, s.journal_opener, s.migrator, s.connect)

    async def call(
        self, method: str, path: str, token: str | None = OPERATOR, **kw: Any
    ) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.http.request(method, self.url + path, headers=headers, **kw) as r:
            text = await r.text()
            is_json = r.content_type == "application/json"
            return r.status, json.loads(text) if is_json else text


@contextlib.asynccontextmanager
async def desk(tmp_path: Path, **sections: dict[str, Any]) -> AsyncIterator[Running]:
    site = Site.build(tmp_path, frozenset(COUNTERS), **sections)
    path = tmp_path / "journal.sqlite"
    site.clock = HeldClock(Journal(path))

    def own_ports(journal: JournalStore) -> Ports:
        return dataclasses.replace(site.ports(), journal=journal)

    service = Releases(site.topo, lambda: Journal(path), site.migrator, own_ports)
    tokens = Tokens(((VIEWER, Role.VIEWER), (OPERATOR, Role.OPERATOR)))
    the_desk = Desk(site.topo, service, tokens)
    bound: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(the_desk, "127.0.0.1", 0, bound.set_result))
    try:
        # unsafe: keep the cookies of an IP address, as a browser does
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
            yield Running(site, await asyncio.wait_for(bound, 10), http, Journal(path))
    finally:
        the_desk.stop.set()
        await task


async def awaiting(run: Running, step: str = "approve-a") -> None:
    async def waits() -> bool:
        status, body = await run.call("GET", "/api/release", VIEWER)
        return (
            status == 200
            and body is not None
            and body["state"] == J.AWAITING_APPROVAL
            and {s["id"]: s["state"] for s in body["steps"]}[step] == J.STEP_RUNNING
        )

    await wait_until(waits, what=f"the release to await {step}")


def let_go(run: Running) -> None:
    run.site.clock.let_go.set()  # type: ignore[attr-defined]


async def approve_b(run: Running) -> None:
    let_go(run)
    await awaiting(run, "approve-b")
    assert (await run.call("POST", "/api/approve", json={"name": "qa"}))[0] == 200
    let_go(run)


async def test_every_read_needs_a_known_token(tmp_path: Path) -> None:
    async with desk(tmp_path) as run:
        for path in ("/api/status", "/api/release", "/api/history", "/api/releases/1",
                     "/api/events", "/metrics"):  # fmt: skip
            assert (await run.call("GET", path, None))[0] == 401, path
            assert (await run.call("GET", path, "wrong"))[0] == 401, path
        status, spec = await run.call("GET", "/api/openapi.json", None)
        assert status == 200 and spec["openapi"].startswith("3.")
        assert {"/api/approve", "/api/abort", "/api/rollback", "/api/status"} <= set(spec["paths"])


async def test_actions_refuse_without_an_operator_token(tmp_path: Path) -> None:
    async with desk(tmp_path) as run:
        for path in ("/api/approve", "/api/abort", "/api/rollback"):
            status, body = await run.call("POST", path, None, json={"name": "eve"})
            assert status == 401, path
            status, body = await run.call("POST", path, VIEWER, json={"name": "eve"})
            assert (status, body) == (403, {"error": "this needs an operator token"}), path
        assert run.journal.newest("t") is None  # nothing was started


async def test_approve_from_the_desk_releases_the_waiting_cluster(tmp_path: Path) -> None:
    async with desk(tmp_path, policy={"approval": "manual"}) as run:
        status, body = await run.call("POST", "/api/approve", json={"name": "qa-anna"})
        assert (status, body) == (409, {"error": "no release is awaiting approval"})
        assert (await run.call("POST", "/api/abort", json={"name": "ops"}))[0] == 409

        cli: asyncio.Task[Outcome] = asyncio.create_task(run.service().release(Begin("2.0")))
        await awaiting(run)
        status, now = await run.call("GET", "/api/status", VIEWER)
        assert status == 200
        assert now["release"]["cluster_under_test"] == "a"
        states = {s["id"]: s["state"] for s in now["release"]["steps"]}
        assert states["approve-a"] == J.STEP_RUNNING and states["healthy-a"] == J.STEP_DONE
        assert [c["name"] for c in now["clusters"]] == ["a", "b"]
        admissions = {m["name"]: m["admission"] for c in now["clusters"] for m in c["members"]}
        assert admissions == {"a1": "out", "a2": "out", "b1": "live", "b2": "live"}
        # An action needs a name for the journal, in a JSON object.
        assert (await run.call("POST", "/api/approve", json={}))[0] == 400
        for bad in (b"{not json", b"[1]"):
            status, body = await run.call("POST", "/api/approve", data=bad)
            assert (status, body) == (400, {"error": "the body must be a JSON object"})

        status, body = await run.call("POST", "/api/approve", json={"name": "qa-anna"})
        assert status == 200 and body["message"].startswith("approved approve-a of release #1")
        status, body = await run.call("POST", "/api/approve", json={"name": "qa-bob"})
        assert status == 409
        assert body == {"error": "approve-a of release #1 is already approved by qa-anna (desk)"}
        asked = [e for e in run.journal.events(1) if e.kind == ASKED]
        assert [e.message for e in asked] == ["approve approve-a by qa-anna (desk)"]
        assert asked[0].at > 0

        await approve_b(run)
        assert (await cli).state == J.DONE
        status, shown = await run.call("GET", "/api/releases/1", VIEWER)
        assert status == 200 and shown["state"] == J.DONE
        details = {s["id"]: s["detail"] for s in shown["steps"]}
        assert details["approve-a"] == "approved by qa-anna (desk)"
        assert any(e["kind"] == ASKED for e in shown["events"])
        assert (await run.call("GET", "/api/releases/99", VIEWER))[0] == 404
        status, history = await run.call("GET", "/api/history?limit=5", VIEWER)
        assert status == 200 and [(r["id"], r["version"]) for r in history] == [(1, "2.0")]
        assert (await run.call("GET", "/api/history?limit=x", VIEWER))[0] == 400
        assert (await run.call("GET", "/api/release", VIEWER)) == (200, None)


async def test_abort_from_the_desk_stops_the_release(tmp_path: Path) -> None:
    async with desk(tmp_path, policy={"approval": "manual"}) as run:
        cli = asyncio.create_task(run.service().release(Begin("2.0")))
        await awaiting(run)
        status, body = await run.call("POST", "/api/abort", json={"name": "ops-olga"})
        assert status == 200 and "next safe point" in body["message"]
        let_go(run)
        assert (await cli).state == J.ABORTED
        asked = [e.message for e in run.journal.events(1) if e.kind == ASKED]
        assert asked == ["abort by ops-olga (desk)"]


async def test_rollback_from_the_desk_runs_in_the_desk(tmp_path: Path) -> None:
    async with desk(tmp_path) as run:
        assert (await run.service().release(Begin("2.0"))).state == J.DONE
        status, body = await run.call("POST", "/api/rollback", json={"name": "ops-olga"})
        assert (status, body) == (200, {"ok": True, "message": "rollback #2 started"})
        status, body = await run.call("POST", "/api/rollback", json={"name": "ops-otto"})
        assert (status, body) == (409, {"error": "this desk is already running a rollback"})

        async def rolled_back() -> bool:
            row = run.journal.release(2)
            return row.state == J.DONE

        await wait_until(rolled_back, what="the rollback to finish")
        row = run.journal.release(2)
        assert (row.kind, row.version) == ("rollback", "1.0")
        assert set(run.site.fleet.version.values()) == {"1.0"}
        asked = [e.message for e in run.journal.events(2) if e.kind == ASKED]
        assert asked == ["rollback by ops-olga (desk)"]


async def test_the_live_stream_sends_the_status(tmp_path: Path) -> None:
    async with desk(tmp_path) as run:
        headers = {"Authorization": f"Bearer {VIEWER}"}
        async with run.http.get(run.url + "/api/events", headers=headers) as r:
            assert r.status == 200 and r.content_type == "text/event-stream"
            assert await r.content.readline() == b"event: status\n"
            data = await r.content.readline()
        status = json.loads(data.removeprefix(b"data: "))
        assert status["site"] == "t" and status["release"] is None


async def test_metrics_show_the_state_and_the_waiting_approval(tmp_path: Path) -> None:
    async with desk(tmp_path, policy={"approval": "manual"}) as run:
        cli = asyncio.create_task(run.service().release(Begin("2.0")))
        await awaiting(run)
        status, text = await run.call("GET", "/metrics", VIEWER)
        assert status == 200
        assert 'changeover_release_state{state="awaiting-approval"} 1.0' in text
        assert 'changeover_release_state{state="done"} 0.0' in text
        assert "changeover_approvals_waiting 1.0" in text
        assert 'changeover_step_duration_seconds{step="preflight"}' in text
        await run.call("POST", "/api/approve", json={"name": "qa"})
        await approve_b(run)
        await cli
        status, text = await run.call("GET", "/metrics", VIEWER)
        assert "changeover_approvals_waiting 0.0" in text
        assert 'changeover_release_state{state="done"} 1.0' in text


async def test_the_page_logs_in_into_a_cookie_and_actions_need_the_csrf_header(
    tmp_path: Path,
) -> None:
    async with desk(tmp_path, policy={"approval": "manual"}) as run:
        status, page = await run.call("GET", "/", None)
        assert status == 200 and "<html" in page
        login = run.url + "/api/login"
        async with run.http.post(login, json={"token": "nope", "name": "x"}) as r:
            assert r.status == 401
        async with run.http.post(login, json={"token": VIEWER, "name": "vera"}) as r:
            assert r.status == 200
            cookie = r.headers["Set-Cookie"]
            assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
            session = await r.json()
        assert session["role"] == "viewer" and session["name"] == "vera"
        # The cookie reads; a viewer's cookie does not act.
        async with run.http.get(run.url + "/api/status") as r:
            assert r.status == 200
        async with run.http.post(run.url + "/api/approve", json={}) as r:
            assert r.status == 403
        async with run.http.post(login, json={"token": OPERATOR, "name": "otto"}) as r:
            csrf = (await r.json())["csrf"]
        cli = asyncio.create_task(run.service().release(Begin("2.0")))
        await awaiting(run)
        async with run.http.post(run.url + "/api/approve") as r:  # no body at all
            assert r.status == 403 and "X-CSRF-Token" in (await r.json())["error"]
        async with run.http.post(run.url + "/api/approve", headers={"X-CSRF-Token": csrf}) as r:
            assert r.status == 200  # under the name given at the login
        await approve_b(run)
        done = await cli
        details = {s.step_id: s.detail for s in run.journal.steps(done.release_id)}
        assert details["approve-a"] == "approved by otto (desk)"
        async with run.http.post(run.url + "/api/logout") as r:
            assert r.status == 200
        async with run.http.get(run.url + "/api/status") as r:
            assert r.status == 401


@pytest.mark.parametrize("flag", ["viewer", "operator"])
def test_tokens_come_from_the_environment_or_the_file(tmp_path: Path, flag: str) -> None:
    from changeover.config import ConfigError
    from changeover.desk.auth import OPERATOR_ENV, VIEWER_ENV, load_tokens

    site = Site.build(tmp_path)
    with pytest.raises(ConfigError, match="needs a token"):
        load_tokens(site.topo, {})
    env = {VIEWER_ENV if flag == "viewer" else OPERATOR_ENV: "from-env"}
    assert load_tokens(site.topo, env).role_of("from-env") is Role[flag.upper()]
    (tmp_path / "tokens.toml").write_text(f'{flag} = ["from-file"]\n')
    topo = Site.build(tmp_path, desk={"tokens_file": "tokens.toml"}).topo
    tokens = load_tokens(topo, {})
    assert tokens.role_of("from-file") is Role[flag.upper()]
    assert tokens.role_of("from-env") is None


async def test_a_token_in_the_url_is_not_a_token(tmp_path: Path) -> None:
    async with desk(tmp_path) as run:
        for query in (f"?token={VIEWER}", f"?access_token={VIEWER}"):
            assert (await run.call("GET", "/api/status" + query, None))[0] == 401


async def test_the_page_ships_everything_it_needs_and_shows_text_as_text(
    tmp_path: Path,
) -> None:
    async with desk(tmp_path) as run:
        for path in ("/", "/desk.js", "/desk.css"):
            async with run.http.get(run.url + path) as r:
                assert r.status == 200, path
                body = await r.text()
                # Nothing from the internet, and nothing but this server's own files runs.
                assert "http://" not in body and "https://" not in body, path
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
            if path == "/desk.js":
                # Every value goes in as textContent: no HTML sink in the script.
                for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
                    assert sink not in body


def test_the_desk_does_not_start_without_a_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from changeover.cli import app
    from changeover.desk.auth import OPERATOR_ENV, VIEWER_ENV

    for name in (VIEWER_ENV, OPERATOR_ENV):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "changeover.toml"
    config.write_text(
        '[[clusters]]\nname = "a"\nmembers = [{ name = "a1", port = 9101 }]\n'
        '[[clusters]]\nname = "b"\nmembers = [{ name = "b1", port = 9102 }]\n'
    )
    result = CliRunner().invoke(app, ["desk", "-c", str(config), "--listen", "127.0.0.1:0"])
    assert result.exit_code == 2, result.output
    assert "the desk needs a token" in " ".join(result.output.split())


async def test_the_streams_share_one_look_at_the_site(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from changeover.desk import app

    monkeypatch.setattr(app, "STREAM_EVERY", 600.0)  # no second look during the test
    looks = 0
    snapshot = app.Desk.snapshot

    async def counted(self: app.Desk) -> dict[str, Any]:
        nonlocal looks
        looks += 1
        return await snapshot(self)

    monkeypatch.setattr(app.Desk, "snapshot", counted)
    async with desk(tmp_path) as run:
        headers = {"Authorization": f"Bearer {VIEWER}"}
        async with contextlib.AsyncExitStack() as streams:
            firsts = []
            for _ in range(3):
                r = await streams.enter_async_context(
                    run.http.get(run.url + "/api/events", headers=headers)
                )
                assert await r.content.readline() == b"event: status\n"
                firsts.append(await r.content.readline())
        assert len(set(firsts)) == 1 and looks == 1


def test_a_session_lasts_its_hours_from_the_login() -> None:
    from changeover.desk.auth import Sessions

    now = [0.0]
    sessions = Sessions(hours=12, clock=lambda: now[0])
    sid, session = sessions.open(Role.OPERATOR, "otto")
    now[0] = 12 * 3600 - 1
    assert sessions.get(sid) == session
    now[0] = 12 * 3600
    assert sessions.get(sid) is None


@pytest.mark.parametrize(
    ("cluster", "url"),
    [
        ({"qa_port": 8081}, "http://127.0.0.1:8081"),  # its own listener
        ({"qa_host": "qa-a.example.com"}, "http://qa-a.example.com:8080"),  # by Host name
        ({}, None),
    ],
)
def test_the_qa_link_of_a_cluster(tmp_path: Path, cluster: dict[str, Any], url: str) -> None:
    from changeover.config import parse
    from changeover.desk.views import qa_url

    topo = parse(
        {
            "balancer": {"listen": "127.0.0.1:8080"},
            "clusters": [
                {"name": "a", "members": [{"name": "a1", "port": 9001}], **cluster},
                {"name": "b", "members": [{"name": "b1", "port": 9002}]},
            ],
        },
        tmp_path / "changeover.toml",
    )
    assert qa_url(topo, "a") == url


@pytest.mark.parametrize(
    ("states", "cluster"),
    [
        ({"preflight": "running"}, None),
        ({"preflight": "done", "drain-a": "running"}, "a"),
        ({"preflight": "done", "drain-a": "done", "drained-a": "pending"}, "a"),
        ({"approve-a": "done", "drain-b": "running"}, "b"),
    ],
)
def test_the_cluster_under_test(
    tmp_path: Path, states: dict[str, str], cluster: str | None
) -> None:
    from changeover.desk.views import under_test

    topo = Site.build(tmp_path).topo
    release = {"steps": [{"id": step, "state": state} for step, state in states.items()]}
    assert under_test(topo, release) == cluster
