"""The `[[hooks]]`: their validation, and the pure parts of running them
(which hooks for which event, argv and environment, the body, the signature)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from changeover.config import NOTIFY_EVENTS, Hook, parse
from changeover.hooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    HookRunner,
    argv,
    body,
    budget,
    environment,
    headers,
    label,
    payload,
    retryable,
    selected,
    signature,
    slack_payload,
    verify,
    with_qa_entry,
)
from changeover.ports import HookEvent
from tests.unit.test_config import error_of, two_clusters


def hooks(*entries: dict[str, Any]) -> list[Hook]:
    return parse(two_clusters(hooks=list(entries)), "site.toml").hooks


EVENT = HookEvent(
    "qa-ready",
    "shop",
    7,
    "release",
    "2.0",
    "1.0",
    1_700_000_000.5,
    cluster="a",
    qa_url="http://127.0.0.1:8081",
    message="1 check(s) passed",
)

# --- validation ---------------------------------------------------------------------


def test_a_hook_defaults_to_every_notification_event_with_a_timeout_and_retries() -> None:
    (hook,) = hooks({"url": "https://example.com/hook"})
    assert hook.on == list(NOTIFY_EVENTS)
    assert "pre-release" not in hook.on
    assert (hook.timeout, hook.retries, hook.format) == (5.0, 2, "json")
    assert budget(hook) == 3 * 5.0 + 0.5 + 1.0


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ({}, "site.toml: hooks[0]: a hook needs a command, a url (or url_env), or both"),
        (
            {"url": "https://x.example", "on": ["done", "deployed"]},
            "site.toml: hooks[0].on[1]: Input should be 'pre-release', 'started'",
        ),
        ({"url": "https://x.example", "on": []}, "site.toml: hooks[0].on: List should have"),
        (
            {"url": "https://x.example", "on": ["done", "done"]},
            "site.toml: hooks[0].on: names done more than once",
        ),
        (
            {"url": "https://x.example", "secret": "hunter2"},
            "site.toml: hooks[0].secret: is not a known key",
        ),
        (
            {"url": "https://x.example", "secret_env": "A", "secret_file": "s"},
            "site.toml: hooks[0]: give secret_env or secret_file, not both",
        ),
        (
            {"url": "https://x.example", "url_env": "HOOK_URL"},
            "site.toml: hooks[0]: give url or url_env, not both",
        ),
        ({"url": "ftp://x.example"}, "site.toml: hooks[0].url: expected an http:// or https://"),
        (
            {"command": "notify {version}", "format": "slack"},
            "site.toml: hooks[0]: format, secret_env and secret_file need a url",
        ),
        (
            {"command": "notify {member}"},
            "site.toml: hooks[0].command: unknown placeholder {member} in '{member}'",
        ),
        (
            {"command": ["notify", "{nope}"]},
            "site.toml: hooks[0].command: unknown placeholder {nope}",
        ),
        ({"command": []}, "site.toml: hooks[0].command: expected a non-empty argument list"),
        ({"command": "x", "timeout": 0}, "site.toml: hooks[0].timeout: Input should be greater"),
        ({"command": "x", "retries": -1}, "site.toml: hooks[0].retries: Input should be greater"),
        ({"url": "https://x", "secret_env": "1X"}, "site.toml: hooks[0].secret_env: String"),
    ],
)
def test_a_bad_hook_is_refused_naming_its_key(entry: dict[str, Any], expected: str) -> None:
    assert error_of(two_clusters(hooks=[{"name": "h"} | entry])).startswith(expected)


def test_two_hooks_of_one_name_are_refused() -> None:
    data = two_clusters(hooks=[{"name": "ops", "command": "a"}, {"name": "ops", "command": "b"}])
    assert error_of(data) == "site.toml: hooks: hook name 'ops' is given to more than one hook"


# --- what runs ----------------------------------------------------------------------


def test_the_hooks_of_an_event_are_those_that_name_it_in_file_order() -> None:
    found = hooks(
        {"name": "gate", "command": "check", "on": ["pre-release"]},
        {"command": "log"},
        {"name": "chat", "url": "https://x.example", "on": ["done", "failed"]},
    )
    assert [label(found, h) for h in selected(found, "pre-release")] == ["gate"]
    assert [label(found, h) for h in selected(found, "done")] == ["hooks[1]", "chat"]
    assert [label(found, h) for h in selected(found, "qa-ready")] == ["hooks[1]"]


def test_a_command_gets_each_value_as_one_literal_argument() -> None:
    hostile = HookEvent("failed", "s", 1, "release", "2.0", None, 0.0, message="x; rm -rf / $(id)")
    assert argv("notify --why {message} v{version}", hostile) == [
        "notify",
        "--why",
        "x; rm -rf / $(id)",
        "v2.0",
    ]
    assert argv(["notify", "{event}:{cluster}", "{message}"], hostile) == [
        "notify",
        "failed:",
        "x; rm -rf / $(id)",
    ]


def test_a_command_finds_the_event_in_its_environment() -> None:
    env = environment(EVENT)
    assert env == {
        "CHANGEOVER_EVENT": "qa-ready",
        "CHANGEOVER_SITE": "shop",
        "CHANGEOVER_RELEASE": "7",
        "CHANGEOVER_KIND": "release",
        "CHANGEOVER_VERSION": "2.0",
        "CHANGEOVER_PREVIOUS_VERSION": "1.0",
        "CHANGEOVER_CLUSTER": "a",
        "CHANGEOVER_QA_URL": "http://127.0.0.1:8081",
        "CHANGEOVER_QA_HOST": "",
        "CHANGEOVER_MESSAGE": "1 check(s) passed",
        "CHANGEOVER_AT": "1700000000.500",
    }


def test_the_qa_entry_point_is_filled_from_the_cluster() -> None:
    data = two_clusters()
    data["clusters"][0]["qa_port"] = 8081
    data["clusters"][1]["qa_host"] = "qa-b.example"
    topo = parse(data, "site.toml")
    bare = HookEvent("qa-ready", "s", 1, "release", "2.0", None, 0.0)
    a = with_qa_entry(topo, replace(bare, cluster="a"))
    assert (a.qa_url, a.qa_host) == ("http://127.0.0.1:8081", None)
    b = with_qa_entry(topo, replace(bare, cluster="b"))
    assert (b.qa_url, b.qa_host) == ("http://127.0.0.1:8080", "qa-b.example")
    assert with_qa_entry(topo, bare) == bare


# --- what a webhook receives ----------------------------------------------------------


def test_the_json_body_carries_every_field_and_the_delivery() -> None:
    (hook,) = hooks({"url": "https://x.example"})
    sent = json.loads(body(hook, EVENT, "d-1"))
    assert sent == payload(EVENT, "d-1")
    assert sent == {
        "event": "qa-ready",
        "site": "shop",
        "release": 7,
        "kind": "release",
        "version": "2.0",
        "previous_version": "1.0",
        "at": 1_700_000_000.5,
        "cluster": "a",
        "qa_url": "http://127.0.0.1:8081",
        "qa_host": None,
        "message": "1 check(s) passed",
        "summary": "release #7 of 2.0 on shop: cluster a is ready for QA at http://127.0.0.1:8081",
        "delivery": "d-1",
    }


def test_the_slack_body_is_one_escaped_text() -> None:
    (hook,) = hooks({"url": "https://x.example", "format": "slack"})
    bad = HookEvent("failed", "s", 3, "release", "<!channel>&", None, 0.0, message="<b>")
    assert json.loads(body(hook, bad, "d")) == slack_payload(bad)
    assert slack_payload(bad) == {
        "text": "changeover: release #3 of &lt;!channel&gt;&amp; on s failed: &lt;b&gt;"
    }


def test_the_signature_is_the_hmac_sha256_of_the_body_and_verifies() -> None:
    secret, data = b"s3cret", b'{"event":"done"}'
    expected = "sha256=" + hmac.new(secret, data, hashlib.sha256).hexdigest()
    assert signature(secret, data) == expected
    assert verify(secret, data, expected)
    assert not verify(secret, data + b" ", expected)
    assert not verify(b"other", data, expected)
    assert not verify(secret, data, None)


def test_headers_name_the_event_and_delivery_and_sign_only_with_a_secret() -> None:
    data = b"{}"
    signed = headers(EVENT, "d-9", data, b"k")
    assert signed[SIGNATURE_HEADER] == signature(b"k", data)
    assert (signed[EVENT_HEADER], signed[DELIVERY_HEADER]) == ("qa-ready", "d-9")
    assert signed["Content-Type"] == "application/json"
    assert SIGNATURE_HEADER not in headers(EVENT, "d-9", data, None)


@pytest.mark.parametrize(
    ("status", "again"),
    [(500, True), (503, True), (429, True), (408, True), (404, False), (302, False)],
)
def test_only_the_receivers_trouble_is_retried(status: int, again: bool) -> None:
    assert retryable(status) is again


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        (
            {"url": "http://127.0.0.1:9/", "secret_env": "NO_SECRET"},
            "secret_env: NO_SECRET is not set",
        ),
        ({"url_env": "NO_URL"}, "url_env: NO_URL is not set"),
        (
            {"url": "http://127.0.0.1:9/", "secret_file": "missing.secret"},
            "secret_file: cannot read",
        ),
    ],
)
async def test_a_webhook_missing_its_secret_or_url_fails_at_once_and_sends_nothing(
    tmp_path: Path, entry: dict[str, Any], problem: str
) -> None:
    """Not retried (no "after N attempts"), never sent unsigned."""
    data = two_clusters(hooks=[{"name": "gate", "on": ["pre-release"]} | entry])
    runner = HookRunner(parse(data, tmp_path / "site.toml"), env={})
    try:
        refusal = await runner.check(replace(EVENT, event="pre-release", cluster=None))
    finally:
        await runner.close()
    assert refusal is not None
    assert refusal.startswith(f"pre-release hook gate (webhook) failed: {problem}")


async def test_a_command_that_outlives_its_timeout_is_killed_and_refuses(tmp_path: Path) -> None:
    hook = {"name": "slow", "command": "sleep 30", "timeout": "0.3s", "on": ["pre-release"]}
    runner = HookRunner(parse(two_clusters(hooks=[hook]), tmp_path / "site.toml"))
    started = time.monotonic()
    try:
        refusal = await runner.check(replace(EVENT, event="pre-release", cluster=None))
    finally:
        await runner.close()
    assert refusal == "pre-release hook slow (command) failed: timed out after 0.3s"
    assert time.monotonic() - started < 5
