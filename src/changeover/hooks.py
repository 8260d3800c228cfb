"""The `[[hooks]]` of changeover.toml: a local command and/or a webhook POST run
on release events (docs/configuration.md).

What to run for which event, the environment and argv of a command, the JSON
body (or a Slack-compatible one) and its HMAC-SHA256 signature are pure
functions. `HookRunner` (the `Notifier` port, built in runtime.py) runs them:
`pre-release` hooks in turn before the first step, any failure stopping the
release; every other event is handed to one worker per hook, which delivers
them in order with a timeout and retries while the release goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from changeover import __version__
from changeover.checks import qa_entry
from changeover.config import Hook, Topology
from changeover.executors.base import render_argv
from changeover.executors.local import run_local
from changeover.httpclient import Client, HttpError, HttpTimeout
from changeover.ports import HookEvent

SIGNATURE_HEADER = "X-Changeover-Signature"  # "sha256=" + hex HMAC-SHA256 of the body
EVENT_HEADER = "X-Changeover-Event"
DELIVERY_HEADER = "X-Changeover-Delivery"  # the same on every attempt of one delivery
BACKOFF = 0.5  # seconds before the first retry, doubled for each one after
OUTPUT_SHOWN = 300  # characters of a failing command's output in its journal line

Report = Callable[[str], Awaitable[None]]


# --- what to run ------------------------------------------------------------------


def label(hooks: Sequence[Hook], hook: Hook) -> str:
    """How the journal names a hook: its name, else its place in the file."""
    return hook.name or f"hooks[{next(i for i, h in enumerate(hooks) if h is hook)}]"


def selected(hooks: Sequence[Hook], event: str) -> list[Hook]:
    """The hooks that run on `event`, in the file's order."""
    return [h for h in hooks if event in h.on]


def budget(hook: Hook) -> float:
    """The longest one delivery of `hook` can take: every attempt timing out,
    and the waits between them."""
    waits = sum(BACKOFF * 2.0**n for n in range(hook.retries))
    return (1 + hook.retries) * hook.timeout + waits


def values(event: HookEvent) -> dict[str, str]:
    """The placeholders of a hook command (config.HOOK_PLACEHOLDERS); a value
    the event does not have is empty."""
    return {
        "event": event.event,
        "site": event.site,
        "release": str(event.release),
        "kind": event.kind,
        "version": event.version,
        "previous_version": event.previous_version or "",
        "cluster": event.cluster or "",
        "qa_url": event.qa_url or "",
        "qa_host": event.qa_host or "",
        "message": event.message,
    }


def environment(event: HookEvent) -> dict[str, str]:
    """What a hook command finds in its environment: CHANGEOVER_EVENT,
    CHANGEOVER_VERSION, ... (every placeholder, upper case; empty when unset)."""
    return {f"CHANGEOVER_{k.upper()}": v for k, v in values(event).items()} | {
        "CHANGEOVER_AT": f"{event.at:.3f}"
    }


def argv(command: str | list[str], event: HookEvent) -> list[str]:
    """The command's argv: each placeholder replaced inside its word, each value
    one literal argument whatever it holds (no shell ever reads it)."""
    known = values(event)
    if isinstance(command, str):
        return render_argv(command, known)
    return [word.format_map(known) for word in command]


def with_qa_entry(topo: Topology, event: HookEvent) -> HookEvent:
    """`event` with the QA entry point of its cluster (when it has one)."""
    if event.cluster is None or event.qa_url is not None:
        return event
    try:
        url, host = qa_entry(topo, topo.cluster(event.cluster))
    except (KeyError, ValueError):  # no such cluster, or no QA entry point
        return event
    return replace(event, qa_url=url, qa_host=host)


# --- what a webhook receives ------------------------------------------------------


def summary(event: HookEvent) -> str:
    """The event in one line for people (the Slack text)."""
    rel = f"release #{event.release} of {event.version} on {event.site}"
    where = f" at {event.qa_url}" if event.qa_url else ""
    if event.qa_host:
        where += f" (Host: {event.qa_host})"
    said = f": {event.message}" if event.message else ""
    lines = {
        "pre-release": f"{rel} is about to start",
        "started": f"{rel} started"
        + (f" (from {event.previous_version})" if event.previous_version else ""),
        "qa-ready": f"{rel}: cluster {event.cluster} is ready for QA{where}",
        "awaiting-approval": f"{rel}: cluster {event.cluster} awaits approval"
        + (f"; QA{where}" if where else ""),
        "swapped": f"{rel}: cluster {event.cluster} is live{said}",
        "done": f"{rel} is done: {event.site} serves {event.version}",
    }
    return lines.get(event.event, f"{rel} {event.event}{said}")


def payload(event: HookEvent, delivery: str) -> dict[str, Any]:
    """The JSON body (`format = "json"`): every field of the event, its
    one-line summary, and the delivery id (the same on every retry)."""
    return asdict(event) | {"summary": summary(event), "delivery": delivery}


def slack_escape(text: str) -> str:
    """Slack reads &, < and > as markup: escaped, user text stays text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_payload(event: HookEvent) -> dict[str, Any]:
    """A body a Slack incoming webhook (or Mattermost, Rocket.Chat) accepts."""
    return {"text": slack_escape(f"changeover: {summary(event)}")}


def body(hook: Hook, event: HookEvent, delivery: str) -> bytes:
    data = slack_payload(event) if hook.format == "slack" else payload(event, delivery)
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def signature(secret: bytes, data: bytes) -> str:
    """The signature header's value: "sha256=" + the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, data, hashlib.sha256).hexdigest()


def verify(secret: bytes, data: bytes, header: str | None) -> bool:
    """What a receiver does: recompute over the raw body, compare in constant time."""
    return header is not None and hmac.compare_digest(signature(secret, data), header)


def headers(event: HookEvent, delivery: str, data: bytes, secret: bytes | None) -> dict[str, str]:
    out = {
        "Content-Type": "application/json",
        "User-Agent": f"changeover/{__version__}",
        EVENT_HEADER: event.event,
        DELIVERY_HEADER: delivery,
    }
    if secret is not None:
        out[SIGNATURE_HEADER] = signature(secret, data)
    return out


def retryable(status: int) -> bool:
    """A webhook answer worth another attempt: the receiver's trouble, not ours."""
    return status >= 500 or status in (408, 429)


# --- running them -------------------------------------------------------------------


class HookError(Exception):
    """One attempt failed; `final`: another would fail the same way."""

    def __init__(self, message: str, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclass
class _Worker:
    queue: asyncio.Queue[tuple[HookEvent, Report]]
    task: asyncio.Task[None] | None = None
    current: tuple[HookEvent, Report] | None = None  # being delivered

    def busy(self) -> bool:
        return self.current is not None or not self.queue.empty()


class HookRunner:
    """The `Notifier` port over the topology's `[[hooks]]`."""

    def __init__(self, topo: Topology, env: Mapping[str, str] | None = None) -> None:
        self.topo = topo
        self.hooks = list(topo.hooks)
        self._env = env  # default: this process's environment, read when a hook runs
        # Each POST within its hook's own timeout; https verified against the system's CAs.
        self._client = Client(timeout=30.0)
        self._workers: dict[int, _Worker] = {}

    def _environ(self) -> Mapping[str, str]:
        return os.environ if self._env is None else self._env

    # --- the Notifier port ----------------------------------------------------------

    async def check(self, event: HookEvent) -> str | None:
        event = with_qa_entry(self.topo, event)
        for hook in selected(self.hooks, event.event):
            problem = await self._deliver(hook, event, gate=True)
            if problem is not None:
                return f"{event.event} hook {label(self.hooks, hook)} {problem}"
        return None

    def notify(self, event: HookEvent, report: Report) -> None:
        event = with_qa_entry(self.topo, event)
        for i, hook in enumerate(self.hooks):
            if event.event in hook.on:
                self._worker(i).queue.put_nowait((event, report))

    async def settle(self) -> None:
        busy = [(i, w) for i, w in self._workers.items() if w.busy()]
        if not busy:
            return
        longest = max(budget(self.hooks[i]) for i, _ in busy)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(w.queue.join() for _, w in busy)), longest + 1.0
            )
        for i, worker in busy:
            if not worker.busy():
                continue
            left = [worker.current] if worker.current else []
            await _stop(worker)
            while not worker.queue.empty():
                left.append(worker.queue.get_nowait())
            del self._workers[i]
            if left:
                names = ", ".join(e.event for e, _ in left)
                await left[0][1](
                    f"hook {label(self.hooks, self.hooks[i])}: gave up on {names} "
                    f"({longest:g}s after the release ended): not delivered"
                )

    async def close(self) -> None:
        for worker in self._workers.values():
            await _stop(worker)
        self._workers.clear()
        await self._client.close()

    # --- delivering ------------------------------------------------------------------

    def _worker(self, i: int) -> _Worker:
        if i not in self._workers:
            worker = _Worker(asyncio.Queue())
            worker.task = asyncio.create_task(self._serve(self.hooks[i], worker))
            self._workers[i] = worker
        return self._workers[i]

    async def _serve(self, hook: Hook, worker: _Worker) -> None:
        """One hook's events, one at a time, in the order they happened."""
        while True:
            worker.current = event, report = await worker.queue.get()
            try:
                problem = await self._deliver(hook, event, gate=False)
                if problem is not None:
                    await report(f"{event.event} hook {label(self.hooks, hook)} {problem}")
            except Exception as exc:  # a report that cannot be journaled stops nothing
                with contextlib.suppress(Exception):
                    await report(f"hook {label(self.hooks, hook)}: {exc}")
            finally:
                worker.current = None
                worker.queue.task_done()

    async def _deliver(self, hook: Hook, event: HookEvent, gate: bool) -> str | None:
        """Run the hook's command, then POST its webhook; why it failed, or None."""
        if hook.command is not None:
            # A pre-release command's exit status is its answer: it runs once.
            once = 1 if gate else None
            problem = await self._retrying(hook, lambda: self._run(hook, event), once)
            if problem is not None:
                return f"(command) {problem}"
        if hook.url is not None or hook.url_env is not None:
            delivery = str(uuid.uuid4())
            problem = await self._retrying(hook, lambda: self._post(hook, event, delivery))
            if problem is not None:
                return f"(webhook) {problem}"
        return None

    async def _retrying(
        self, hook: Hook, attempt: Callable[[], Awaitable[None]], tries: int | None = None
    ) -> str | None:
        """`attempt` until it works, `1 + retries` times at most, waiting 0.5 s,
        1 s, 2 s... in between; a final failure is not tried again."""
        tries = tries or 1 + hook.retries
        for n in range(tries):
            try:
                await attempt()
                return None
            except HookError as exc:
                if exc.final or n + 1 == tries:
                    after = f" after {n + 1} attempts" if n else ""
                    return f"failed{after}: {exc}"
            await asyncio.sleep(BACKOFF * 2.0**n)
        raise AssertionError("unreachable: the last attempt returns")

    async def _run(self, hook: Hook, event: HookEvent) -> None:
        assert hook.command is not None
        env = dict(self._environ()) | environment(event)
        cwd = self.topo.source.parent if self.topo.source else None
        done = await run_local(argv(hook.command, event), hook.timeout, env=env, cwd=cwd)
        if done.problem:
            raise HookError(done.problem)
        if done.status != 0:
            said = done.out.decode("utf-8", "replace").strip()[-OUTPUT_SHOWN:]
            raise HookError(f"exit {done.status}" + (f": {said}" if said else ""))

    async def _post(self, hook: Hook, event: HookEvent, delivery: str) -> None:
        url = hook.url or self._environ().get(hook.url_env or "")
        if not url:
            raise HookError(f"url_env: {hook.url_env} is not set", final=True)
        secret = await self._secret(hook)
        data = body(hook, event, delivery)
        try:
            resp = await self._client.request(
                "POST",
                url,
                body=data,
                headers=headers(event, delivery, data, secret),
                timeout=hook.timeout,
            )
        except HttpTimeout:
            raise HookError(f"no answer within {hook.timeout:g}s") from None
        except HttpError as exc:
            raise HookError(str(exc) or type(exc).__name__) from None
        if not 200 <= resp.status < 300:
            raise HookError(f"HTTP {resp.status}", final=not retryable(resp.status))

    async def _secret(self, hook: Hook) -> bytes | None:
        if hook.secret_env is not None:
            value = self._environ().get(hook.secret_env)
            if not value:
                raise HookError(f"secret_env: {hook.secret_env} is not set", final=True)
            return value.encode()
        if hook.secret_file is not None:
            path = self.topo.resolve_path(hook.secret_file)
            try:
                text = await asyncio.to_thread(Path(path).read_text, encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise HookError(f"secret_file: cannot read {path}: {exc}", final=True) from None
            if not text.strip():
                raise HookError(f"secret_file: {path} is empty", final=True)
            return text.strip().encode()
        return None


async def _stop(worker: _Worker) -> None:
    if worker.task is not None:
        worker.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker.task
