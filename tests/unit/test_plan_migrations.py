"""Where the migration steps go in a plan, and the [database] settings."""

from __future__ import annotations

from typing import Any

import pytest

from changeover.config import ConfigError, Topology, parse
from changeover.plan import make_plan
from changeover.steps import Migrate, Step, StepKind, step_from_dict

CLUSTERS = [
    {"name": "a", "members": [{"name": "a1", "port": 9001}]},
    {"name": "b", "members": [{"name": "b1", "port": 9002}]},
]
DIR = {"url": "postgresql://app@db/app", "migrations_dir": "migrations"}


def topo(database: dict[str, Any] | None, **policy: Any) -> Topology:
    data: dict[str, Any] = {"clusters": CLUSTERS, "policy": policy}
    if database is not None:
        data["database"] = database
    return parse(data, "t.toml")


def ids(steps: list[Step]) -> list[str]:
    return [s.id for s in steps]


def test_without_a_database_the_plan_has_no_migration_steps() -> None:
    steps = make_plan(topo(None), "2.0")
    assert not {s.kind for s in steps} & {StepKind.MIGRATE, StepKind.VERIFY_LIVE}


def test_expand_and_the_live_check_come_before_any_cluster_leaves_contract_last() -> None:
    steps = make_plan(topo(DIR), "2.0")
    assert ids(steps)[:4] == ["preflight", "migrate-expand", "verify-live", "drain-a"]
    assert ids(steps)[-2:] == ["live-b", "migrate-contract"]
    assert [s.phase for s in steps if isinstance(s, Migrate)] == ["expand", "contract"]


def test_contract_waits_for_the_bake() -> None:
    steps = make_plan(topo(DIR, bake="30s"), "2.0")
    assert ids(steps)[-1] == "migrate-contract"
    assert StepKind.BAKE in {s.kind for s in steps[:-1]}


def test_a_command_has_only_its_phase() -> None:
    commands = {"url": "mysql://db/app", "apply_command": "alembic upgrade head",
                "sql_command": "alembic upgrade head --sql"}  # fmt: skip
    expand = make_plan(topo(commands), "2.0")
    assert "migrate-expand" in ids(expand) and "migrate-contract" not in ids(expand)
    contract = make_plan(topo(commands | {"phase": "contract"}), "2.0")
    assert "migrate-contract" in ids(contract)
    assert not {"migrate-expand", "verify-live"} & set(ids(contract))


def test_bluegreen_keeps_the_old_release_so_it_never_contracts() -> None:
    steps = make_plan(topo(DIR, strategy="bluegreen"), "2.0")
    assert ids(steps)[1:3] == ["migrate-expand", "verify-live"]
    assert "migrate-contract" not in ids(steps)


def test_a_rollback_plan_migrates_nothing() -> None:
    steps = make_plan(topo(DIR), "1.0", migrate=False)
    assert StepKind.MIGRATE not in {s.kind for s in steps}


def test_the_phase_survives_the_journal() -> None:
    for step in make_plan(topo(DIR), "2.0"):
        assert step_from_dict(step.to_dict()) == step


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ({"url": "sqlite:///x.db"}, "either migrations_dir or apply_command"),
        (DIR | {"apply_command": "x"}, "either migrations_dir or apply_command"),
        ({"url": "sqlite:///x.db", "apply_command": "x"}, "apply_command needs sql_command"),
        ({"url": "mysql://db/app", "migrations_dir": "m"}, "for MySQL use apply_command"),
        ({"url": "oracle://u:secret@db/app", "migrations_dir": "m"}, "'db/app'"),
    ],
)
def test_database_settings_are_checked_at_load(database: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        topo(database)
    assert "secret" not in str(caught.value)


def dialect(database: dict[str, Any]) -> str:
    db = topo(database).database
    assert db is not None
    return db.sql_dialect()


def test_the_dialect_comes_from_the_url_unless_given() -> None:
    assert dialect(DIR | {"url": "postgresql+psycopg://db/app"}) == "postgres"
    assert dialect(DIR | {"url": "sqlite:///x.db"}) == "sqlite"
    assert dialect(DIR | {"dialect": "sqlite"}) == "sqlite"
