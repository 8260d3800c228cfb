"""The rule table and the Finding record.

Rule ids follow squawk (https://squawkhq.com/docs/rules) where squawk has one,
so operators can look a finding up in familiar documentation.  Each rule says
in which phase it applies: rules about *compatibility* (the old release still
runs against the changed schema) apply only to the expand phase, because the
contract phase runs after every cluster serves the new release; rules about
*locking* apply to both phases, because a long lock hurts whichever release
is serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dialect = Literal["postgres", "mysql", "sqlite"]
Phase = Literal["expand", "contract"]
Severity = Literal["error", "warning"]
# How the files are applied: "per-file" as changeover's applier does (one
# transaction per file, see docs/migrations.md), "per-statement" autocommit.
Transactions = Literal["per-file", "per-statement"]

EXPAND_ONLY: frozenset[Phase] = frozenset({"expand"})
BOTH_PHASES: frozenset[Phase] = frozenset({"expand", "contract"})


@dataclass(frozen=True)
class Finding:
    """One problem in one statement of one migration file."""

    rule: str
    path: str
    line: int  # 1-based line of the statement's first token
    statement: str  # a short excerpt
    message: str  # what the statement does and why it breaks the old release or locks
    safe_alternative: str
    severity: Severity


@dataclass(frozen=True)
class Rule:
    id: str
    title: str  # what the statement does, for docs and SARIF short descriptions
    why: str  # why that breaks the old release or locks the table
    safe_alternative: str
    phases: frozenset[Phase]
    severity: Severity = "error"
    # Most rules do not matter for objects created earlier in the same file
    # (no old release reads them, nobody else holds locks on them); these do.
    applies_to_new_objects: bool = False
    # False: --allow cannot accept it, because what it hides (a DROP after a
    # missing semicolon, say) is unknown.
    allowable: bool = True


_RULES = (
    # --- compatibility: the old release still runs (expand only) ---------------
    Rule(
        "ban-drop-column",
        "drops a column",
        "the old release still reads or writes it, and its queries fail with "
        "'column does not exist'",
        "stop using the column in the new release, then drop it in a contract "
        "migration once every cluster runs the new release",
        EXPAND_ONLY,
    ),
    Rule(
        "ban-drop-table",
        "drops a table",
        "the old release still queries it, and its queries fail with 'relation does not exist'",
        "stop using the table in the new release, then drop it in a contract migration",
        EXPAND_ONLY,
    ),
    Rule(
        "ban-drop-object",
        "drops a view, type, schema, function, sequence or trigger",
        "the old release may still use it (a view it selects from, a type it casts to, "
        "a trigger that keeps two columns in sync)",
        "drop it in a contract migration once every cluster runs the new release",
        EXPAND_ONLY,
    ),
    Rule(
        "renaming-column",
        "renames a column",
        "the old release still uses the old name, and its queries fail",
        "add a column with the new name, write both (trigger or application), backfill, "
        "switch reads; drop the old column in a contract migration",
        EXPAND_ONLY,
    ),
    Rule(
        "renaming-table",
        "renames a table",
        "the old release still uses the old name, and its queries fail",
        "create the new name as a view over the old table (or the reverse) so both names "
        "work, and finish the rename in a contract migration",
        EXPAND_ONLY,
    ),
    Rule(
        "renaming-object",
        "renames a schema, view, type, function or sequence, or moves it to another schema",
        "the old release still uses the old name, and its queries fail",
        "create the object under the new name alongside the old one; remove the old name "
        "in a contract migration",
        EXPAND_ONLY,
    ),
    Rule(
        "renaming-enum-value",
        "renames an enum value",
        "the old release still writes and compares the old label; its writes fail with "
        "'invalid input value for enum'",
        "add the new value (ALTER TYPE ... ADD VALUE), move rows to it, and stop using the "
        "old label in the new release; enum values cannot be removed in place",
        EXPAND_ONLY,
    ),
    Rule(
        "adding-required-field",
        "adds a NOT NULL column without a default",
        "it fails on a populated table, and the old release's INSERTs do not set the column "
        "so they fail with a not-null violation",
        "add the column nullable or with a constant DEFAULT; backfill; enforce NOT NULL in a "
        "contract migration",
        EXPAND_ONLY,
    ),
    Rule(
        "ban-drop-not-null",
        "drops NOT NULL from a column",
        "the new release may now write NULL, which the old release does not expect when "
        "it reads the column",
        "keep the column NOT NULL while the old release runs; drop the constraint in a "
        "contract migration",
        EXPAND_ONLY,
    ),
    Rule(
        "dropping-required-field-default",
        "drops the default of a NOT NULL column (or one whose nullability is unknown)",
        "the old release's INSERTs that omit the column relied on the default and now fail "
        "with a not-null violation",
        "keep the default while the old release runs; drop it in a contract migration",
        EXPAND_ONLY,
    ),
    Rule(
        "adding-json-field",
        "adds a json (not jsonb) column to an existing table",
        "json has no equality operator, so the old release's SELECT DISTINCT, UNION or "
        "GROUP BY over the table's rows fail with 'could not identify an equality operator'",
        "use jsonb",
        EXPAND_ONLY,
    ),
    Rule(
        "adding-enum-value-out-of-order",
        "adds an enum value BEFORE or AFTER an existing one",
        "the old release's comparisons and ORDER BY on the enum now place an unknown label "
        "between the ones it knows",
        "append the value (ADD VALUE without BEFORE/AFTER)",
        EXPAND_ONLY,
    ),
    Rule(
        "adding-unique-index",
        "creates a UNIQUE index on an existing table, CONCURRENTLY or not",
        "from then on the old release's writes of duplicate values fail; a concurrent build "
        "that meets a duplicate fails and leaves an INVALID index behind",
        "make sure the old release never writes duplicates (or create the index in a "
        "contract migration), then allow it with a reason",
        EXPAND_ONLY,
        severity="warning",
    ),
    # --- locking: hurts whichever release serves (both phases) ----------------
    Rule(
        "changing-column-type",
        "changes a column's type",
        "the table and its indexes are rewritten under an ACCESS EXCLUSIVE lock (MySQL: a "
        "table copy), blocking reads and writes; the old release may also send values the "
        "new type rejects",
        "add a column of the new type, backfill in batches, write both, switch reads, and "
        "drop the old column in a contract migration; known-safe widenings (varchar(n) to "
        "varchar(m>n) or text, numeric precision increase) pass when the old type is "
        "declared earlier in the checked files",
        BOTH_PHASES,
    ),
    Rule(
        "adding-not-nullable-field",
        "makes an existing column NOT NULL",
        "the whole table is scanned under an ACCESS EXCLUSIVE lock; during expand the old "
        "release may still insert NULL and fail",
        "ADD CONSTRAINT c CHECK (col IS NOT NULL) NOT VALID and commit (end of the file); "
        "then VALIDATE CONSTRAINT c; then SET NOT NULL (PostgreSQL 12+ uses the validated "
        "check and skips the scan) and drop the check",
        BOTH_PHASES,
    ),
    Rule(
        "adding-foreign-key-constraint",
        "adds a foreign key without NOT VALID",
        "every existing row is checked while both tables are locked against writes",
        "ADD CONSTRAINT ... FOREIGN KEY ... NOT VALID; then VALIDATE CONSTRAINT in a separate "
        "transaction (it only takes a SHARE UPDATE EXCLUSIVE lock)",
        BOTH_PHASES,
    ),
    Rule(
        "constraint-missing-not-valid",
        "adds a CHECK constraint without NOT VALID",
        "every existing row is checked under an ACCESS EXCLUSIVE lock",
        "ADD CONSTRAINT ... CHECK (...) NOT VALID; then VALIDATE CONSTRAINT in a separate "
        "transaction",
        BOTH_PHASES,
    ),
    Rule(
        "disallowed-unique-constraint",
        "adds a UNIQUE (or EXCLUDE) constraint to an existing table",
        "the index behind it is built under an ACCESS EXCLUSIVE lock, blocking reads and writes",
        "CREATE UNIQUE INDEX CONCURRENTLY i ON t (...); then "
        "ALTER TABLE t ADD CONSTRAINT c UNIQUE USING INDEX i",
        BOTH_PHASES,
    ),
    Rule(
        "adding-serial-primary-key-field",
        "adds a PRIMARY KEY to an existing table",
        "the index behind it is built under an ACCESS EXCLUSIVE lock, blocking reads and writes",
        "CREATE UNIQUE INDEX CONCURRENTLY i ON t (...); then "
        "ALTER TABLE t ADD CONSTRAINT pk PRIMARY KEY USING INDEX i",
        BOTH_PHASES,
    ),
    Rule(
        "require-concurrent-index-creation",
        "creates an index without CONCURRENTLY",
        "CREATE INDEX blocks every write to the table until the index is built",
        "CREATE INDEX CONCURRENTLY, outside a transaction block",
        BOTH_PHASES,
    ),
    Rule(
        "require-concurrent-index-deletion",
        "drops an index without CONCURRENTLY",
        "DROP INDEX takes an ACCESS EXCLUSIVE lock on the table, queueing every query behind "
        "the longest running one",
        "DROP INDEX CONCURRENTLY, outside a transaction block",
        BOTH_PHASES,
    ),
    Rule(
        "ban-concurrent-index-creation-in-transaction",
        "uses CONCURRENTLY inside a transaction block",
        "PostgreSQL refuses CREATE/DROP INDEX CONCURRENTLY inside BEGIN ... COMMIT, so the "
        "migration fails half applied",
        "run the CONCURRENTLY statement on its own, outside BEGIN ... COMMIT",
        BOTH_PHASES,
        applies_to_new_objects=True,
    ),
    Rule(
        "adding-field-with-default",
        "adds a column whose value must be computed for every existing row",
        "a volatile default (random(), clock_timestamp(), gen_random_uuid(), nextval()), a "
        "serial or identity column, or a stored generated column rewrites the whole table "
        "under an ACCESS EXCLUSIVE lock (a constant default does not, since PostgreSQL 11)",
        "add the column nullable or with a constant default, set the volatile default with "
        "ALTER COLUMN ... SET DEFAULT (affects new rows only), and backfill existing rows in "
        "batches",
        BOTH_PHASES,
    ),
    Rule(
        "require-lock-timeout",
        "runs DDL on an existing object without a lock_timeout",
        "while the DDL waits for its lock behind a long query, every other query on the table "
        "queues behind it and the site stalls",
        "start the file with SET lock_timeout = '2s' (or SET LOCAL inside the transaction) and "
        "retry the migration when it times out",
        BOTH_PHASES,
    ),
    Rule(
        "transaction-holds-lock",
        "runs a slow statement (VALIDATE CONSTRAINT, a backfill UPDATE/DELETE/INSERT ... "
        "SELECT) while the transaction still holds a blocking lock taken earlier",
        "the ACCESS EXCLUSIVE lock of an earlier ALTER TABLE blocks the old release's reads "
        "(a SHARE or SHARE ROW EXCLUSIVE lock its writes) for as long as the slow statement "
        "runs, which undoes NOT VALID and the separate backfill",
        "split the file: the statement that takes the lock in one file, the slow statement "
        "in the next (each file commits on its own), or give the file its own BEGIN ... "
        "COMMIT around the short part",
        BOTH_PHASES,
        applies_to_new_objects=True,
    ),
    Rule(
        "require-concurrent-reindex",
        "reindexes without CONCURRENTLY",
        "REINDEX blocks writes to the table, and reads that use the index, until it is done",
        "REINDEX ... CONCURRENTLY, outside a transaction block",
        BOTH_PHASES,
    ),
    Rule(
        "require-concurrent-partition-detach",
        "detaches a partition without CONCURRENTLY",
        "DETACH PARTITION takes an ACCESS EXCLUSIVE lock on the parent table",
        "ALTER TABLE ... DETACH PARTITION ... CONCURRENTLY, outside a transaction block",
        BOTH_PHASES,
    ),
    Rule(
        "prefer-repack",
        "rewrites a table with VACUUM FULL, CLUSTER or REPACK without CONCURRENTLY",
        "the whole table is rewritten under an ACCESS EXCLUSIVE lock, blocking reads and "
        "writes for the duration",
        "REPACK (CONCURRENTLY) on PostgreSQL 19+, or pg_repack (outside the migration), which "
        "rewrite the table without the long lock; or a plain VACUUM",
        BOTH_PHASES,
    ),
    Rule(
        "ban-truncate-cascade",
        "truncates with CASCADE",
        "CASCADE also empties every table with a foreign key to it, and the ones referencing "
        "those, whatever the author had in mind",
        "truncate the tables you mean by name",
        BOTH_PHASES,
    ),
    Rule(
        "ban-alter-domain-with-add-constraint",
        "adds a constraint to a domain",
        "every column of every table using the domain is checked, under locks that block writes",
        "ADD CONSTRAINT ... NOT VALID on the domain, then VALIDATE CONSTRAINT in a later file",
        BOTH_PHASES,
    ),
    Rule(
        "ban-drop-database",
        "drops a database",
        "every release that uses it stops working; a migration never needs to",
        "drop databases by hand, outside migrations",
        BOTH_PHASES,
        applies_to_new_objects=True,
    ),
    Rule(
        "mysql-algorithm-copy",
        "asks MySQL for ALGORITHM=COPY",
        "the table is copied row by row while writes to it wait",
        "leave ALGORITHM out (or ask for INPLACE/INSTANT, which MySQL refuses rather than "
        "copying when it cannot), or use an online schema change tool (gh-ost, pt-osc)",
        BOTH_PHASES,
    ),
    Rule(
        "mysql-lock-exclusive",
        "asks MySQL for LOCK=SHARED or LOCK=EXCLUSIVE",
        "the ALTER holds a lock that blocks writes (EXCLUSIVE: reads too) until it is done",
        "leave LOCK out, or LOCK=NONE (MySQL refuses rather than locking when it cannot)",
        BOTH_PHASES,
    ),
    Rule(
        "require-statement-timeout",
        "runs DDL on an existing object without a statement_timeout",
        "a statement that runs long (a scan, a rewrite, a backfill) keeps its locks, and the "
        "queue behind them, for as long as it runs; nothing stops it",
        "start the file with SET statement_timeout = '5s' (as long as the file's slowest "
        "statement may take) next to the lock_timeout",
        BOTH_PHASES,
    ),
    Rule(
        "non-idempotent-ddl",
        "creates, adds or drops without IF [NOT] EXISTS (or OR REPLACE) in a file changeover "
        "runs as written (it has its own BEGIN/COMMIT, or CONCURRENTLY)",
        "such a file is not applied atomically: when a later statement fails, `resume` runs "
        "the file again from the top, and this statement then fails with 'already exists' "
        "(or 'does not exist')",
        "add IF NOT EXISTS / IF EXISTS / OR REPLACE (after a failed concurrent build, drop "
        "the INVALID index first: changeover's error names it), or move the statement to a "
        "file of its own that changeover applies in one transaction",
        BOTH_PHASES,
        severity="warning",
        applies_to_new_objects=True,
    ),
    Rule(
        "adding-enum-value-in-transaction",
        "uses an enum value that ADD VALUE added earlier in the same transaction",
        "PostgreSQL refuses to use the new value until the transaction that added it "
        "commits ('unsafe use of new value'), so the whole file fails; changeover applies a "
        "plain file in one transaction",
        "add the value in one file and use it in the next (each file commits on its own)",
        BOTH_PHASES,
        severity="warning",
        applies_to_new_objects=True,
    ),
    Rule(
        "unparseable-statement",
        "cannot be parsed",
        "the parser rejects the text (a missing semicolon, a psql meta-command such as \\i), "
        "so anything may hide in it, a DROP included; and changeover cannot apply it either",
        "fix the SQL so that it parses; this rule cannot be allowed",
        BOTH_PHASES,
        applies_to_new_objects=True,
        allowable=False,
    ),
    Rule(
        "needs-review",
        "parses but cannot be classified",
        "the analyser cannot tell whether it breaks the old release or locks a table, so a "
        "person must",
        "read the statement; if it is safe, allow it with --allow needs-review --reason '...'",
        BOTH_PHASES,
        severity="warning",
        applies_to_new_objects=True,
    ),
)

RULES: dict[str, Rule] = {rule.id: rule for rule in _RULES}
