"""Property tests over the TOML loader: whatever is wrong with a file, `load`
raises ConfigError (never another exception), with one line per problem that
starts with the file and names the key; `changeover check` prints it without a
traceback and exits 2.

Files are generated from a valid topology by mutations (a wrong type or value,
a missing or unknown key, a duplicate member, route or address), several at
once, plus garbage bytes, and written as real TOML text.
"""

from __future__ import annotations

import copy
import json
import math
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from changeover.cli import app
from changeover.config import ConfigError, load

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KeyPath = tuple[str | int, ...]


def valid() -> dict[str, Any]:
    """A topology that loads, touching every section."""
    return {
        "site": {"name": "shop", "state_dir": "state"},
        "clusters": [
            {
                "name": "a",
                "qa_host": "prod-a.example.com",
                "qa_port": 9100,
                "members": [
                    {"name": "a1", "host": "10.0.1.1", "port": 8080, "route": "ra1"},
                    {"name": "a2", "host": "10.0.1.2", "port": 8080},
                ],
            },
            {
                "name": "b",
                "qa_port": 9101,
                "members": [
                    {"name": "b1", "host": "10.0.2.1", "port": 8080},
                    {"name": "b2", "host": "10.0.2.2", "port": 8080},
                ],
            },
        ],
        "balancer": {
            "driver": "builtin",
            "listen": "127.0.0.1:8080",
            "admin_listen": "127.0.0.1:8089",
            "workers": 2,
            "algorithm": "least-conn",
            "health": {"path": "/health", "interval": "250ms", "timeout": "2s", "rise": 2},
        },
        "executor": {
            "kind": "ssh",
            "parallel": 2,
            "max_failed": 0,
            "timeout": "30s",
            "ssh": {"user": "deploy", "port": 22, "connect_timeout": 5},
        },
        "release": {
            "stop": "appctl stop {member}",
            "deploy": "appctl deploy {member} {version}",
            "start": "appctl start {member}",
            "upload": [{"src": "dist/app-{version}.war", "dest": "/srv/app.war"}],
        },
        "checks": {"smoke": [{"path": "/", "status": 200, "body_contains": "{version}"}]},
        "policy": {
            "drain_timeout": "30s",
            "session_idle": 2,
            "health_timeout": "2m",
            "min_healthy": 1,
            "order": ["a", "b"],
            "bake": "1m",
            "auto_rollback": True,
            "max_error_ratio": 0.05,
        },
    }


# Every scalar the mutations may break, with values that must be refused there.
CONTAINERS: list[Any] = [[1, "x"], {"k": 1}, []]
BAD: dict[str, list[Any]] = {
    "port": [0, -1, 65536, 10**20, "http", 80.5, "8 0"],
    "name": ["", "a b", "a;b", "$(id)", "-a", "x" * 64, "é", "a\nb", "a'b"],
    "duration": [-1, "soon", "10 minutes", "1e3", "", "-5s", "5 s s", 10**400, True],
    "bool": ["maybe", 2, "2"],
    "count": [-1, "many", 1.5],
    "status": ["ok", 1.5],
    "ratio": [-0.1, 1.5, "lots"],
    "hostport": ["nohost", ":80", "host:", "host:99999", "h:-1", 5],
    "host": ["a..b", "", "a b", "10.0.0.1:8080", "-app", "10.0.1.256", 5],
    "driver": ["nginxx", "", 1],
    "strategy": ["canary", 0],
    "str": [],  # any string is a valid str: only containers are refused
}
LEAVES: list[tuple[KeyPath, str]] = [
    (("site", "name"), "name"),
    (("site", "state_dir"), "str"),
    (("clusters", 0, "name"), "name"),
    (("clusters", 0, "qa_port"), "port"),
    (("clusters", 0, "qa_host"), "str"),
    (("clusters", 1, "members", 0, "name"), "name"),
    (("clusters", 1, "members", 0, "port"), "port"),
    (("clusters", 1, "members", 1, "host"), "host"),
    (("clusters", 0, "members", 0, "route"), "name"),
    (("balancer", "driver"), "driver"),
    (("balancer", "listen"), "hostport"),
    (("balancer", "admin_listen"), "hostport"),
    (("balancer", "workers"), "count"),
    (("balancer", "health", "interval"), "duration"),
    (("balancer", "health", "timeout"), "duration"),
    (("balancer", "health", "rise"), "count"),
    (("executor", "parallel"), "count"),
    (("executor", "timeout"), "duration"),
    (("executor", "ssh", "port"), "port"),
    (("executor", "ssh", "connect_timeout"), "duration"),
    (("release", "upload", 0, "src"), "str"),
    (("checks", "smoke", 0, "status"), "status"),
    (("policy", "strategy"), "strategy"),
    (("policy", "drain_timeout"), "duration"),
    (("policy", "session_idle"), "duration"),
    (("policy", "health_timeout"), "duration"),
    (("policy", "keep_previous"), "duration"),
    (("policy", "bake"), "duration"),
    (("policy", "min_healthy"), "count"),
    (("policy", "auto_rollback"), "bool"),
    (("policy", "max_error_ratio"), "ratio"),
]
REQUIRED: list[KeyPath] = [
    ("clusters",),
    ("clusters", 0, "name"),
    ("clusters", 1, "members"),
    ("clusters", 0, "members", 1, "name"),
    ("clusters", 1, "members", 0, "port"),
    ("release", "upload", 0, "dest"),
]
TABLES: list[KeyPath] = [
    (),
    ("site",),
    ("clusters", 0),
    ("clusters", 1, "members", 1),
    ("balancer",),
    ("balancer", "health"),
    ("executor",),
    ("executor", "ssh"),
    ("release",),
    ("release", "upload", 0),
    ("checks",),
    ("checks", "smoke", 0),
    ("policy",),
]


def loc(path: KeyPath) -> str:
    """A path as the error message writes it: clusters[0].members[1].port, with
    a key that TOML must quote in quotes (`"a b"`)."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        key = (
            part if re.fullmatch(r"[A-Za-z0-9_-]+", part) else json.dumps(part, ensure_ascii=False)
        )
        out += f".{key}" if out else key
    return out


def _parent(data: dict[str, Any], path: KeyPath) -> Any:
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    return node


def _set(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    _parent(data, path)[path[-1]] = value


# --- TOML text ------------------------------------------------------------------


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, but for DEL, which TOML wants escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(data: dict[str, Any]) -> str:
    return "\n".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in data.items()) + "\n"


# --- mutations -----------------------------------------------------------------------


@st.composite
def wrong_value(draw: st.DrawFn) -> tuple[KeyPath, Any, str]:
    path, kind = draw(st.sampled_from(LEAVES))
    value = draw(st.sampled_from(BAD[kind] + CONTAINERS))
    return path, value, loc(path)


@st.composite
def unknown_key(draw: st.DrawFn) -> tuple[KeyPath, Any, str]:
    table = draw(st.sampled_from(TABLES))
    node: Any = valid()
    for part in table:
        node = node[part]
    key = draw(
        st.text(min_size=1, max_size=12).filter(
            lambda k: k not in node and k.strip() == k and k.isprintable()
        )
    )
    value = draw(st.one_of(st.integers(), st.text(max_size=5), st.booleans()))
    return (*table, key), value, loc((*table, key))


@st.composite
def problems(draw: st.DrawFn) -> list[tuple[KeyPath, Any, str]]:
    """One to three independent problems at distinct places."""
    found = draw(
        st.lists(
            st.one_of(wrong_value(), unknown_key()),
            min_size=1,
            max_size=3,
            unique_by=lambda p: p[0][:3],  # distinct tables: no problem hides another
        )
    )
    return found


# Hypothesis runs thousands of examples and cannot take function-scoped
# fixtures, so each example gets a folder under one module-wide directory that
# is removed when the module ends (mkdtemp alone left 5,000 folders in /tmp).
_ROOT = tempfile.TemporaryDirectory(prefix="config-fuzz-")


@pytest.fixture(scope="module", autouse=True)
def _remove_examples() -> Iterator[None]:
    yield
    _ROOT.cleanup()


def write(text: str | bytes) -> Path:
    folder = Path(tempfile.mkdtemp(dir=_ROOT.name))
    path = folder / "changeover.toml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def error_lines(path: Path) -> list[str]:
    """load() must raise ConfigError (and nothing else); its lines, checked."""
    try:
        load(path)
    except ConfigError as exc:
        message = str(exc)
    else:
        pytest.fail(f"loaded a bad file:\n{path.read_text(errors='replace')}")
    lines = message.splitlines()
    assert lines, "empty error"
    for line in lines:
        assert line.startswith(f"{path}: "), line  # names the file ...
        where = line.removeprefix(f"{path}: ")
        assert where.split(":", 1)[0].strip(), line  # ... then a key (or what is wrong)
    return lines


def names_key(lines: list[str], path: Path, key: str) -> bool:
    """A line about `key` itself or about a key inside it (listen -> listen.host)."""
    return any(
        line.startswith(f"{path}: {key}") and line[len(f"{path}: {key}") :][:1] in (":", ".", "[")
        for line in lines
    )


# --- the properties ----------------------------------------------------------------


def test_the_base_topology_is_valid() -> None:
    topo = load(write(toml_document(valid())))
    assert [c.name for c in topo.clusters] == ["a", "b"]
    assert topo.policy.bake == 60


@FUZZ
@given(problems())
def test_every_problem_gets_a_line_naming_its_key(found: list[tuple[KeyPath, Any, str]]) -> None:
    data = valid()
    for where, value, _ in found:
        _set(data, where, value)
    path = write(toml_document(data))
    lines = error_lines(path)
    for _, value, key in found:
        assert names_key(lines, path, key), (key, value, lines)


@FUZZ
@given(st.sampled_from(REQUIRED))
def test_a_missing_required_key_is_named(missing: KeyPath) -> None:
    data = valid()
    del _parent(data, missing)[missing[-1]]
    path = write(toml_document(data))
    lines = error_lines(path)
    assert names_key(lines, path, loc(missing)), lines
    assert any("is required but missing" in line for line in lines), lines


DUPLICATES = [
    # (what to change, the value, what the message names)
    (("clusters", 1, "members", 0, "name"), "a1", "member name 'a1'"),
    (("clusters", 0, "members", 1, "name"), "a1", "member name 'a1'"),
    (("clusters", 1, "members", 0, "route"), "ra1", "route 'ra1'"),
    (("clusters", 1, "members", 0, "host"), "10.0.1.1", "member address 10.0.1.1:8080"),
    (("clusters", 1, "name"), "a", "cluster name 'a'"),
]


@pytest.mark.parametrize(("where", "value", "named"), DUPLICATES)
def test_duplicates_are_named(where: KeyPath, value: str, named: str) -> None:
    data = valid()
    _set(data, where, value)
    if where == ("clusters", 1, "name"):
        data["policy"]["order"] = ["a", "a"]
    lines = error_lines(write(toml_document(data)))
    assert any(named in line and "appears" in line for line in lines), lines


@pytest.mark.parametrize(
    "clusters",
    [[], [{"name": "a", "members": [{"name": "a1", "port": 1}]}], "a,b", [{"name": "a"}, 1]],
    ids=["none", "one", "a-string", "not-tables"],
)
def test_structural_problems(clusters: Any) -> None:
    data = valid() | {"clusters": clusters}
    path = write(toml_document(data))
    assert any(line.startswith(f"{path}: clusters") for line in error_lines(path))


@FUZZ
@given(st.binary(max_size=300))
def test_garbage_bytes_are_a_config_error(raw: bytes) -> None:
    error_lines(write(raw))


@FUZZ
@given(st.text(max_size=300))
def test_garbage_text_is_a_config_error(text: str) -> None:
    error_lines(write(text))


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * 5000 + "]" * 5000,  # deeper than the parser's recursion
        "a = " + "{b = " * 3000 + "1" + "}" * 3000,
        "clusters = " + "[" * 900 + "]" * 900,  # parsed, but deeper than validation goes
    ],
    ids=["deep-arrays", "deep-tables", "deep-clusters"],
)
def test_pathological_nesting(text: str) -> None:
    lines = error_lines(write(text))
    assert any("nested too deep" in line for line in lines), lines


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("drain_timeout", 10**400),  # TOML parses it; no float holds it
        ("drain_timeout", "9" * 400 + "s"),
        ("drain_timeout", math.nan),
        ("health_timeout", math.inf),
        ("bake", -math.inf),
    ],
    ids=["huge-int", "huge-string", "nan", "inf", "-inf"],
)
def test_values_no_number_holds(key: str, value: Any) -> None:
    data = valid()
    data["policy"][key] = value
    path = write(toml_document(data))
    assert names_key(error_lines(path), path, f"policy.{key}")


def mutated_files() -> Iterator[tuple[str, str]]:
    for path, kind in LEAVES:
        data = valid()
        value = (BAD[kind] + CONTAINERS)[0]
        _set(data, path, value)
        yield loc(path), toml_document(data)


@pytest.mark.parametrize(("key", "text"), list(mutated_files()))
def test_cli_check_prints_the_lines_without_a_traceback(key: str, text: str) -> None:
    path = write(text)
    result = CliRunner().invoke(app, ["check", "-c", str(path)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert f"{key}:" in result.output.replace("\n", " ")


@FUZZ
@given(st.binary(max_size=200))
def test_cli_check_on_garbage_exits_2(raw: bytes) -> None:
    result = CliRunner().invoke(app, ["check", "-c", str(write(raw))])
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception


def test_data_is_not_shared_between_examples() -> None:
    one, two = valid(), valid()
    one["clusters"][0]["name"] = "changed"
    assert two["clusters"][0]["name"] == "a"
    assert copy.deepcopy(two) == valid()


@pytest.mark.parametrize("key", ["function-x", "tagged-union", "function-after"])
def test_unknown_keys_that_look_like_pydantic_internals_are_named(key: str) -> None:
    data = valid()
    data["policy"][key] = 1  # found by hypothesis: such keys were dropped from the message
    path = write(toml_document(data))
    assert names_key(error_lines(path), path, f"policy.{key}")
