"""Findings as text for people, JSON for scripts, SARIF 2.1.0 for code-scanning UIs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import PurePath
from typing import Any, Literal
from urllib.parse import quote

from changeover.migrations.rules import RULES, Finding

Format = Literal["text", "json", "sarif"]

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
_TOOL_URI = "https://github.com/changeover/changeover/blob/main/docs/migrations.md"


def _text(findings: Sequence[Finding]) -> str:
    if not findings:
        return "no findings"
    blocks = [
        f"{f.path}:{f.line}: {f.severity} [{f.rule}] {f.message}\n"
        f"    statement: {f.statement}\n"
        f"    instead:   {f.safe_alternative}"
        for f in findings
    ]
    blocks.append(f"{len(findings)} finding(s)")
    return "\n".join(blocks)


def _uri(path: str) -> str:
    """A SARIF artifact URI: an absolute path as a file: URI, a relative one
    percent-encoded (spaces, '#', '%' and the like would break the reference)."""
    pure = PurePath(path)
    return pure.as_uri() if pure.is_absolute() else quote(pure.as_posix())


def _sarif(findings: Sequence[Finding]) -> dict[str, Any]:
    rule_ids = sorted({f.rule for f in findings})
    index = {rule_id: i for i, rule_id in enumerate(rule_ids)}
    rules = [
        {
            "id": rule_id,
            "shortDescription": {"text": RULES[rule_id].title},
            "fullDescription": {"text": RULES[rule_id].why},
            "help": {"text": RULES[rule_id].safe_alternative},
            "defaultConfiguration": {"level": RULES[rule_id].severity},
        }
        for rule_id in rule_ids
    ]
    results = [
        {
            "ruleId": f.rule,
            "ruleIndex": index[f.rule],
            "level": f.severity,
            "message": {"text": f"{f.message}. Instead: {f.safe_alternative}"},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": _uri(f.path)},
                        "region": {"startLine": f.line, "snippet": {"text": f.statement}},
                    }
                }
            ],
        }
        for f in findings
    ]
    driver = {"name": "changeover-migrations", "informationUri": _TOOL_URI, "rules": rules}
    return {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{"tool": {"driver": driver}, "results": results}],
    }


def format_findings(findings: Sequence[Finding], fmt: Format) -> str:
    if fmt == "json":
        return json.dumps([asdict(f) for f in findings], indent=2)
    if fmt == "sarif":
        return json.dumps(_sarif(findings), indent=2)
    return _text(findings)
