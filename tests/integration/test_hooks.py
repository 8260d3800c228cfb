"""`[[hooks]]` on a real release: the demo site on the embedded balancer, a
real HTTP receiver (aiohttp, on a loopback ephemeral port) that checks each
signature, and command hooks that write down what they were given."""

from __future__ import annotations

import asyncio
import io
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from rich.console import Console

from changeover import journal as J
from changeover.config import HOOK_EVENTS, load
from changeover.demo.scenario import DemoOptions, DemoSite
from changeover.hooks import DELIVERY_HEADER, SIGNATURE_HEADER, HookRunner, budget, verify
from changeover.releases import Begin
from changeover.runtime import with_releases
from tests.e2e import support as S
from tests.helpers import toml_value

pytestmark = pytest.mark.slow

SECRET = secrets.token_hex(16)
# A command hook: its argument and every CHANGEOVER_* variable, one JSON line per event.
WRITE_ENV = (
    "import json, os, sys\n"
    "env = {k: v for k, v in os.environ.items() if k.startswith('CHANGEOVER_')}\n"
    "with open(sys.argv[1], 'a') as f:\n"
    "    f.write(json.dumps({'argv': sys.argv[2:], 'env': env}) + '\\n')\n"
)


@dataclass
class Delivery:
    path: str
    body: dict[str, Any]
    signed: bool  # the signature header verified with the shared secret
    delivery: str | None
    seen_at: float
    qa_says: str | None = None  # what the event's QA URL answered on /version


@dataclass
class Receiver:
    url: str
    got: list[Delivery] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # delivery id -> tries seen
    let_go: asyncio.Event = field(default_factory=asyncio.Event)

    def events(self, path: str) -> list[str]:
        return [d.body.get("event", "") for d in self.got if d.path == path]

    def of(self, path: str) -> list[Delivery]:
        return [d for d in self.got if d.path == path]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """/hook and /slack answer 200, /flaky 500 to the first attempt of each
    delivery, /stuck never in time, /gone 404, /moved a redirect to /hook;
    what was accepted is recorded."""
    box: list[Receiver] = []

    async def record(request: web.Request) -> web.Response:
        rec = box[0]
        raw = await request.read()
        delivery = request.headers.get(DELIVERY_HEADER)
        tries = rec.attempts[delivery or ""] = rec.attempts.get(delivery or "", 0) + 1
        path = request.path
        if path == "/stuck":
            await asyncio.wait_for(rec.let_go.wait(), 60)
            return web.Response(status=200)
        if path == "/flaky" and tries == 1:
            return web.Response(status=500, text="not now")
        if path == "/gone":
            return web.Response(status=404)
        if path == "/moved":
            raise web.HTTPFound("/hook")
        body = json.loads(raw)
        got = Delivery(
            path, body, verify(SECRET.encode(), raw, request.headers.get(SIGNATURE_HEADER)),
            delivery, time.time(),
        )  # fmt: skip
        if body.get("event") == "qa-ready" and body.get("qa_url"):
            async with aiohttp.ClientSession() as http, http.get(body["qa_url"] + "/") as resp:
                got.qa_says = await resp.text()
        rec.got.append(got)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/{name}", record)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    box.append(Receiver(f"http://127.0.0.1:{port}"))
    try:
        yield box[0]
    finally:
        box[0].let_go.set()
        await runner.cleanup()


def with_hooks(site: DemoSite, *hooks: dict[str, Any]) -> None:
    """Append `[[hooks]]` entries to the demo site's changeover.toml."""
    lines = []
    for hook in hooks:
        lines.append("\n[[hooks]]")
        lines += [f"{k} = {toml_value(v)}" for k, v in hook.items()]
    with site.config.open("a") as f:
        f.write("\n".join(lines) + "\n")


def demo(tmp_path: Path) -> DemoSite:
    opts = DemoOptions(members_per_cluster=1, startup_delay=0.1, session_idle=0.3, drain_timeout=5)
    return DemoSite(tmp_path, opts)


def env_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_a_release_tells_a_signed_webhook_a_slack_one_and_a_command_each_event(
    tmp_path: Path, receiver: Receiver
) -> None:
    site = demo(tmp_path)
    (tmp_path / "hook.secret").write_text(SECRET + "\n")
    written = tmp_path / "env.jsonl"
    script = tmp_path / "hooks" / "write-env.py"
    script.parent.mkdir()
    script.write_text(WRITE_ENV)
    with_hooks(
        site,
        {"name": "web", "url": f"{receiver.url}/hook", "secret_env": "HOOK_SECRET",
         "on": ["pre-release", "started", "qa-ready", "swapped", "done", "failed"]},
        {"name": "chat", "url": f"{receiver.url}/slack", "format": "slack",
         "secret_file": "hook.secret", "on": ["done"]},
        {"name": "log", "command": [sys.executable, "hooks/write-env.py", str(written), "{event}"],
         "on": list(HOOK_EVENTS)},
    )  # fmt: skip
    async with site.running():
        run = await S.cli(site, "release", "2.0", env={"HOOK_SECRET": SECRET})
        assert run.code == 0, run.output
        row = S.newest(site)

    order = ["pre-release", "started", "qa-ready", "swapped", "qa-ready", "swapped", "done"]
    assert receiver.events("/hook") == order
    sent = receiver.of("/hook")
    assert all(d.signed for d in sent), "every body verifies with the shared secret"
    assert {d.body["release"] for d in sent} == {row.id}
    assert {(d.body["site"], d.body["version"], d.body["previous_version"]) for d in sent} == {
        ("demo", "2.0", "1.0")
    }
    assert [d.body["cluster"] for d in sent] == [None, None, "a", "a", "b", "b", None]
    qa_a, qa_b = (f"http://127.0.0.1:{c.qa_port}" for c in site.topo.clusters)
    ready = [d for d in sent if d.body["event"] == "qa-ready"]
    assert [d.body["qa_url"] for d in ready] == [qa_a, qa_b]
    # When told, each cluster's QA entry point already serves the new release.
    assert all(d.qa_says is not None and "2.0" in d.qa_says for d in ready)
    assert len({d.delivery for d in sent}) == len(sent)

    (slack,) = receiver.of("/slack")
    assert slack.signed
    assert slack.body == {"text": f"changeover: release #{row.id} of 2.0 on demo is done: "
                                  "demo serves 2.0"}  # fmt: skip

    lines = env_lines(written)
    assert [line["env"]["CHANGEOVER_EVENT"] for line in lines] == order
    assert [line["argv"] for line in lines] == [[e] for e in order]
    first_ready = next(line["env"] for line in lines if line["argv"] == ["qa-ready"])
    assert first_ready["CHANGEOVER_QA_URL"] == qa_a
    assert first_ready["CHANGEOVER_CLUSTER"] == "a"
    assert first_ready["CHANGEOVER_VERSION"] == "2.0"
    assert first_ready["CHANGEOVER_PREVIOUS_VERSION"] == "1.0"
    assert first_ready["CHANGEOVER_SITE"] == "demo"
    assert first_ready["CHANGEOVER_RELEASE"] == str(row.id)
    assert first_ready["CHANGEOVER_KIND"] == "release"


async def test_failing_receivers_are_retried_and_the_release_finishes_within_the_bound(
    tmp_path: Path, receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = demo(tmp_path)
    monkeypatch.setenv("FLAKY_HOOK_URL", f"{receiver.url}/flaky")
    flaky = {"name": "flaky", "url_env": "FLAKY_HOOK_URL", "on": ["started", "done"]}
    stuck = {"name": "stuck", "url": f"{receiver.url}/stuck", "timeout": "0.5s", "retries": 1,
             "on": ["started", "swapped", "done"]}  # fmt: skip
    gone = {"name": "gone", "url": f"{receiver.url}/gone", "on": ["done"]}
    moved = {"name": "moved", "url": f"{receiver.url}/moved", "on": ["done"]}
    with_hooks(site, flaky, stuck, gone, moved)
    # How long the release waited for its hooks' last deliveries, apart from
    # the rest of its teardown (balancer, executor, checks, journal).
    settled: list[float] = []
    settle = HookRunner.settle

    async def timed_settle(runner: HookRunner) -> None:
        started = time.monotonic()
        await settle(runner)
        settled.append(time.monotonic() - started)

    monkeypatch.setattr(HookRunner, "settle", timed_settle)
    async with site.running():
        topo = load(site.config)
        begun = time.time()
        outcome = await with_releases(
            topo, lambda r: r.release(Begin("2.0")), Console(file=io.StringIO())
        )
        returned = time.time()
        row = S.newest(site)
        events = S.show(site, row.id)["events"]
        assert outcome.state == J.DONE, (row.error, events)

    # Each event reached the flaky receiver on its second attempt, same delivery id.
    assert receiver.events("/flaky") == ["started", "done"]
    assert all(receiver.attempts[d.delivery or ""] == 2 for d in receiver.of("/flaky"))
    # The stuck one made the release wait at the end no longer than one delivery
    # can take (two attempts of 0.5 s and the wait between them), plus the margin.
    assert row.finished is not None
    bound = budget(topo.hooks[1])
    assert bound == 1.5
    # Given up one delivery's time plus 1 s after the release ended; then the
    # stuck delivery is cancelled and the give-up journaled (seen taking 1.06 s
    # in a clean-clone run, so 2 s are allowed for that part).
    assert len(settled) == 1 and bound <= settled[0] < bound + 1.0 + 2.0, settled
    assert returned - row.finished < bound + 1.0 + 3.0  # the whole teardown besides
    assert row.finished - begun > 0  # sanity: the clocks agree
    warned = [e["message"] for e in events if e["kind"] == "warn"]
    for event in ("started", "swapped", "done"):
        assert (
            f"{event} hook stuck (webhook) failed after 2 attempts: no answer within 0.5s" in warned
        ), warned
    assert not any("flaky" in w for w in warned)
    # A 4xx or a redirect is an answer: not retried, not followed.
    assert "done hook gone (webhook) failed: HTTP 404" in warned
    assert "done hook moved (webhook) failed: HTTP 302" in warned
    assert receiver.events("/hook") == []
    assert sorted(receiver.attempts.values()).count(1) == 2  # gone and moved: once each


async def test_a_failing_pre_release_command_stops_the_release_before_any_change(
    tmp_path: Path, receiver: Receiver
) -> None:
    site = demo(tmp_path)
    runs, later = tmp_path / "freeze-runs", tmp_path / "later-ran"
    refuse = (
        f"import sys; open({str(runs)!r}, 'a').write('ran\\n'); "
        "print('change freeze until friday'); sys.exit(3)"
    )
    touch = f"open({str(later)!r}, 'w')"
    with_hooks(
        site,
        {"name": "freeze", "command": [sys.executable, "-c", refuse], "on": ["pre-release"]},
        {"name": "later", "command": [sys.executable, "-c", touch], "on": ["pre-release"]},
        {"name": "web", "url": f"{receiver.url}/hook", "on": ["started", "failed"]},
    )
    async with site.running():
        before = await S.pool(site)
        pids = {
            m.name: S.app_member(site, m.name).process().pid  # type: ignore[union-attr]
            for _, m in site.topo.members()
        }
        run = await S.cli(site, "release", "2.0")
        after = await S.pool(site)
        pids_after = {
            m.name: S.app_member(site, m.name).process().pid  # type: ignore[union-attr]
            for _, m in site.topo.members()
        }
        row = S.newest(site)
        steps = S.step_states(site, row.id)
        holder = S.lock_holder(site)
        deployed = {c.name: S.deployed_versions(site, c.name) for c in site.topo.clusters}

    assert run.code == 1, run.output
    assert "change freeze until friday" in run.text
    assert [(m.name, m.admission) for m in after.members] == [
        (m.name, m.admission) for m in before.members
    ]
    assert pids_after == pids  # no member was stopped or restarted
    assert deployed == {"a": {"a1": "1.0"}, "b": {"b1": "1.0"}}
    assert row.state == J.FAILED
    assert row.error is not None
    assert row.error.startswith("refused before any change: pre-release hook freeze (command)")
    assert "exit 3: change freeze until friday" in row.error
    assert set(steps.values()) == {J.STEP_PENDING}
    assert holder is None
    assert runs.read_text() == "ran\n"  # once: its exit status is its answer
    assert not later.exists()  # the hooks after the one that refused do not run
    assert receiver.events("/hook") == ["failed"]
    assert "change freeze" in receiver.of("/hook")[0].body["message"]
