"""The CLI's surface: what `changeover --help` imports (start-up), `--json` of
check/abort/unlock, shell completion and `changeover schema`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from changeover import journal as J
from changeover.cli import DEFAULT_CONFIG, app
from changeover.config import DEFAULT_CONFIG as CONFIG_DEFAULT
from changeover.config import load
from changeover.demo.scenario import DemoOptions, write_topology
from changeover.journal import Journal, journal_path
from changeover.starter import STARTER

TOKEN_ENV = {"CHANGEOVER_ADMIN_TOKEN": "t0ken"}
HEAVY = ("aiohttp", "yarl", "rich", "jinja2", "asyncio", "psutil", "cryptography", "sqlglot")


def loaded_by(argv: list[str], env: dict[str, str] | None = None) -> set[str]:
    """The modules a fresh interpreter has imported after running the CLI with
    `argv` (the console script's entry point, in-process)."""
    code = (
        "import sys\n"
        "from changeover.cli import main\n"
        f"sys.argv = ['changeover', *{argv!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write('\\nLOADED ' + ' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, check=True, env=os.environ | (env or {}),
    )  # fmt: skip
    return set(done.stderr.rpartition("LOADED ")[2].split())


def tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules}


def test_help_and_the_cli_module_import_nothing_heavy() -> None:
    for argv in ([], ["--help"]):
        loaded = loaded_by(argv)
        assert not tops(loaded) & {*HEAVY, "pydantic"}, (argv, tops(loaded) & {*HEAVY, "pydantic"})
        assert not {"changeover.config", "changeover.releases"} & loaded


def test_a_commands_help_imports_none_of_its_body() -> None:
    # Typer itself coerces a command's parameters with pydantic: that much is paid.
    for argv in (["status", "--help"], ["plan", "--help"], ["release", "--help"]):
        loaded = loaded_by(argv)
        assert not tops(loaded) & set(HEAVY), (argv, tops(loaded) & set(HEAVY))
        assert not {m for m in loaded if m.startswith(("changeover.", "pydantic.v1"))} - {
            "changeover.cli",
            "changeover.commands",
            "changeover.migrations",
            "changeover.migrations.cli",
            "changeover.migrations.report",
            "changeover.migrations.rules",
        }


# What reading the site must not pay for (docs/benchmarks.md, "CLI start-up"):
# asyncssh for a site without SSH, cryptography without certificates to read, Jinja2 for
# the embedded balancer, the migration analyser without a [database], psutil
# while no lock is looked at, and the engine, which only runs releases.
NOT_FOR_READING = {"asyncssh", "cryptography", "jinja2", "sqlglot", "pglast", "psutil"}


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["plan", "2.0"]])
def test_status_and_plan_import_no_client_library_nor_the_engine(
    tmp_path: Path, argv: list[str]
) -> None:
    config = starter_site(tmp_path)  # its balancer's admin API: nobody listens there
    loaded = loaded_by([*argv, "-c", str(config)], env=TOKEN_ENV)
    assert "changeover.releases" in loaded  # the command did run
    assert not tops(loaded) & NOT_FOR_READING, tops(loaded) & NOT_FOR_READING
    assert not {"changeover.engine", "changeover.migrations.analysis"} & loaded


def test_a_local_haproxy_driver_imports_neither_ssh_nor_certificates_code() -> None:
    code = (
        "import sys\n"
        "from changeover.balancers.factory import make_balancer\n"
        "from changeover.config import parse\n"
        "topo = parse({'balancer': {'driver': 'haproxy'}, 'clusters': [\n"
        "    {'name': n, 'members': [{'name': n + '1', 'port': p}]}\n"
        "    for n, p in (('a', 9001), ('b', 9002))\n"
        "]})\n"
        "make_balancer(topo).render({})\n"
        "sys.stderr.write('LOADED ' + ' '.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(done.stderr.rpartition("LOADED ")[2].split())
    assert "changeover.balancers.haproxy" in loaded and "jinja2" in tops(loaded)
    assert not tops(loaded) & {"aiohttp", "asyncssh", "cryptography"}


def test_migrations_check_still_loads_its_analyser(tmp_path: Path) -> None:
    sql = tmp_path / "001_expand.sql"
    sql.write_text("CREATE TABLE t (id integer);\n")
    result = CliRunner().invoke(app, ["migrations", "check", str(sql)])
    assert result.exit_code == 0, result.output


def test_the_cli_default_config_is_the_loaders() -> None:
    assert DEFAULT_CONFIG == CONFIG_DEFAULT


# --- --json -----------------------------------------------------------------------


def starter_site(tmp_path: Path) -> Path:
    config = tmp_path / "changeover.toml"
    config.write_text(STARTER)
    return config


def test_init_json_names_the_file_it_wrote(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    result = CliRunner().invoke(app, ["init", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"message": f"wrote {path}", "path": str(path)}
    assert path.read_text() == STARTER


def test_init_prints_its_path_as_written_on_one_line(tmp_path: Path) -> None:
    # A path that looks like Rich markup, longer than any terminal is wide.
    folder = tmp_path / "[bold]release-configs" / ("x" * 120)
    folder.mkdir(parents=True)
    path = folder / "site.toml"
    result = CliRunner().invoke(app, ["init", str(path)])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {path}; edit it, then run `changeover check -c {path}`\n"


def test_check_json_lists_the_members_and_the_policy(tmp_path: Path) -> None:
    config = starter_site(tmp_path)
    result = CliRunner().invoke(app, ["check", "--json", "-c", str(config)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    topo = load(config)
    assert data["site"] == topo.site.name
    assert [(m["cluster"], m["member"], m["host"], m["port"]) for m in data["members"]] == [
        (c.name, m.name, m.host, m.port) for c, m in topo.members()
    ]
    assert data["balancer"]["driver"] == topo.balancer.driver
    assert data["policy"]["order"] == topo.cluster_order()
    assert data["warnings"] == [] and data["reach"] is None


def journal_of(config: Path) -> tuple[Journal, str]:
    topo = load(config)
    return Journal(journal_path(topo.state_dir(), topo.site.name)), topo.site.name


def test_abort_json_of_a_release_nobody_runs(tmp_path: Path) -> None:
    config = starter_site(tmp_path)
    journal, site = journal_of(config)
    rid = journal.create_release(site, "2.0", "1.0", "rolling-clusters", [{"id": "preflight"}])
    result = CliRunner().invoke(app, ["abort", "--json", "-c", str(config)], env=TOKEN_ENV)
    assert result.exit_code == 0, result.output
    message = json.loads(result.stdout)["message"]
    assert message.startswith(f"release #{rid} aborted")
    assert journal.release(rid).state == J.ABORTED
    journal.close()


def test_unlock_json_says_what_it_did(tmp_path: Path) -> None:
    config = starter_site(tmp_path)
    journal, site = journal_of(config)
    argv = ["unlock", "--force", "--yes", "--json", "-c", str(config)]
    idle = CliRunner().invoke(app, argv, env=TOKEN_ENV)
    assert idle.exit_code == 0, idle.output
    assert json.loads(idle.stdout) == {"message": "the site is not locked"}
    journal.acquire(site, None)
    held = journal.lock_holder(site)
    assert held is not None
    broken = CliRunner().invoke(app, argv, env=TOKEN_ENV)
    assert broken.exit_code == 0, broken.output
    assert json.loads(broken.stdout) == {"message": f"lock of {held.describe()} broken"}
    assert journal.lock_holder(site) is None
    journal.close()


# --- shell completion -------------------------------------------------------------


CHANGEOVER = str(Path(sys.executable).parent / "changeover")  # the console script


def completion_env(**extra: str) -> dict[str, str]:
    # Typer's switch for tests: take the shell named, not the one detected.
    return os.environ | {"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"} | extra


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_show_completion_prints_the_script_for_a_shell(shell: str) -> None:
    done = subprocess.run(
        [CHANGEOVER, "--show-completion", shell],
        capture_output=True, text=True, timeout=60, env=completion_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"_CHANGEOVER_COMPLETE=complete_{shell}" in done.stdout


def completions(words: str) -> list[str]:
    """What the bash script gets back for the command line `words` (the last one
    being completed)."""
    env = completion_env(
        _CHANGEOVER_COMPLETE="complete_bash",
        COMP_WORDS=words,
        COMP_CWORD=str(len(words.split()) - 1),
    )
    done = subprocess.run([CHANGEOVER], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_completion_script_completes_commands_and_options() -> None:
    assert completions("changeover sta") == ["status"]
    assert completions("changeover status --wa") == ["--watch"]


# --- changeover schema ------------------------------------------------------------


def check(instance: Any, schema: dict[str, Any], root: dict[str, Any], at: str = "") -> list[str]:
    """The errors of `instance` against the subset of JSON Schema the models produce
    (type, properties, required, additionalProperties, items, enum, const, anyOf,
    $ref, minimum/maximum, pattern, minItems). A keyword outside it fails loudly,
    so the schema cannot outgrow this check unnoticed."""
    known = {
        "type", "properties", "required", "additionalProperties", "items", "enum", "const",
        "anyOf", "$ref", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
        "pattern", "minItems", "maxItems", "minLength", "maxLength", "default", "title",
        "description", "$defs", "$schema", "uniqueItems", "format",
    }  # fmt: skip
    unknown = set(schema) - known
    assert not unknown, f"{at}: keywords this check does not know: {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return check(instance, root["$defs"][name], root, at)
    if "anyOf" in schema:
        tries = [check(instance, s, root, at) for s in schema["anyOf"]]
        return [] if any(not t for t in tries) else [f"{at}: matches no choice: {tries}"]
    errors: list[str] = []
    kinds: dict[str, type | tuple[type, ...]] = {
        "object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
        "integer": int, "number": (int, float),
    }  # fmt: skip
    if "type" in schema:
        want = kinds[schema["type"]]
        bad_bool = isinstance(instance, bool) and schema["type"] in ("integer", "number")
        if not isinstance(instance, want) or bad_bool:
            return [f"{at}: expected {schema['type']}, got {instance!r}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{at}: {instance!r} not in {schema['enum']}")
    if "const" in schema and instance != schema["const"]:
        errors.append(f"{at}: {instance!r} is not {schema['const']!r}")
    if isinstance(instance, str) and not re.search(schema.get("pattern", ""), instance):
        errors.append(f"{at}: {instance!r} does not match {schema['pattern']}")
    if isinstance(instance, int | float) and not isinstance(instance, bool):
        if "minimum" in schema and instance < schema["minimum"]:
            errors.append(f"{at}: {instance} below {schema['minimum']}")
        if "maximum" in schema and instance > schema["maximum"]:
            errors.append(f"{at}: {instance} above {schema['maximum']}")
        if "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
            errors.append(f"{at}: {instance} not above {schema['exclusiveMinimum']}")
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{at}: missing {key}")
        for key, value in instance.items():
            if key in props:
                errors += check(value, props[key], root, f"{at}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{at}: unknown key {key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += check(value, schema["additionalProperties"], root, f"{at}.{key}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append(f"{at}: fewer than {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(instance):
                errors += check(item, schema["items"], root, f"{at}[{i}]")
    return errors


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_schema_is_a_json_schema_whose_references_resolve(schema: dict[str, Any]) -> None:
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object" and "site" in schema["properties"]
    refs = re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(schema))
    assert refs and all(name in schema["$defs"] for name in refs)


def test_schema_accepts_the_starter_and_the_demo_configs(
    schema: dict[str, Any], tmp_path: Path
) -> None:
    demo = write_topology(tmp_path, DemoOptions(members_per_cluster=2, approval="manual"))
    for text in (STARTER, demo.read_text()):
        assert check(tomllib.loads(text), schema, schema) == []


def test_schema_refuses_what_the_loader_refuses(schema: dict[str, Any]) -> None:
    config = tomllib.loads(STARTER)
    assert check(config | {"sites": {}}, schema, schema)  # a misspelt table
    policy = config["policy"] | {"approval": "sometimes"}
    assert check(config | {"policy": policy}, schema, schema)
    balancer = config["balancer"] | {"workers": "two"}
    assert check(config | {"balancer": balancer}, schema, schema)
    # and takes the spellings it accepts: a duration as a string, an address as a table
    policy = config["policy"] | {"drain_timeout": "5m"}
    listen = config["balancer"] | {"listen": {"host": "0.0.0.0", "port": 80}}
    assert check(config | {"policy": policy, "balancer": listen}, schema, schema) == []
