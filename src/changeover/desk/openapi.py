"""The OpenAPI description of the desk's API (`GET /api/openapi.json`)."""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], what: str) -> dict[str, Any]:
    return {"description": what, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "401": _json(_ref("Error"), "no token, or one this desk does not know"),
    "403": _json(_ref("Error"), "a viewer token on an action, or a missing CSRF header"),
}
REFUSED = _json(_ref("Error"), "refused: the release's state does not allow it")
ACTOR = {
    "required": True,
    "content": {"application/json": {"schema": _ref("Actor")}},
}


def _read(summary: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": _json(schema, "ok"), **ERRORS}}}


def _action(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": ACTOR,
            "responses": {
                "200": _json(_ref("Done"), "asked"),
                "400": _json(_ref("Error"), "no name given"),
                **ERRORS,
                "409": REFUSED,
            },
        }
    }


NULLABLE_STR = {"type": ["string", "null"]}
NULLABLE_NUM = {"type": ["number", "null"]}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "changeover desk", "version": "1"},
    "components": {
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer"},
            "session": {"type": "apiKey", "in": "cookie", "name": "changeover_desk"},
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {"error": {"type": "string"}},
            },
            "Done": {
                "type": "object",
                "required": ["ok", "message"],
                "properties": {"ok": {"type": "boolean"}, "message": {"type": "string"}},
            },
            "Actor": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {
                        "type": "string",
                        "pattern": "\\S",  # not blank
                        "description": "who acts, for the journal (with a session cookie, "
                        "the name given at login when left out)",
                    }
                },
            },
            "Step": {
                "type": "object",
                "required": ["id", "description", "state", "started", "finished", "detail"],
                "properties": {
                    "id": {"type": "string"},
                    "description": {"type": "string"},
                    "state": {"enum": ["pending", "running", "done", "failed"]},
                    "started": NULLABLE_NUM,
                    "finished": NULLABLE_NUM,
                    "detail": NULLABLE_STR,
                },
            },
            "Release": {
                "type": "object",
                "required": ["id", "version", "kind", "state", "steps", "started"],
                "properties": {
                    "id": {"type": "integer"},
                    "site": {"type": "string"},
                    "version": {"type": "string"},
                    "previous_version": NULLABLE_STR,
                    "strategy": {"type": "string"},
                    "kind": {"type": "string"},
                    "state": {"type": "string"},
                    "error": NULLABLE_STR,
                    "started": {"type": "number"},
                    "finished": NULLABLE_NUM,
                    "user": {"type": "string"},
                    "host": {"type": "string"},
                    "steps": {"type": "array", "items": _ref("Step")},
                    "approved": {"type": "array", "items": {"type": "string"}},
                    "actions": {"type": "array", "items": {"type": "object"}},
                    "cluster_under_test": NULLABLE_STR,
                    "outputs": {"type": "array", "items": {"type": "object"}},
                    "events": {"type": "array", "items": {"type": "object"}},
                },
            },
            "Status": {
                "type": "object",
                "required": ["site", "clusters", "release", "lock", "balancer_error"],
                "properties": {
                    "site": {"type": "string"},
                    "clusters": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "name": {"type": "string"},
                                "qa_url": NULLABLE_STR,
                                "members": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "properties": {
                                            "name": {"type": "string"},
                                            "admission": {"enum": ["live", "draining", "out"]},
                                            "healthy": {"type": "boolean"},
                                            "in_flight": {"type": "integer"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                    "balancer_error": NULLABLE_STR,
                    "release": {"oneOf": [_ref("Release"), {"type": "null"}]},
                    "lock": NULLABLE_STR,
                    "kept_out": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    "security": [{"bearer": []}, {"session": []}],
    "paths": {
        "/api/status": _read("The site at a glance and the release in progress", _ref("Status")),
        "/api/release": _read(
            "The release in progress with its plan (null when none)",
            {"oneOf": [_ref("Release"), {"type": "null"}]},
        ),
        "/api/history": {
            "get": {
                "summary": "Past releases, newest first",
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1}}
                ],
                "responses": {
                    "200": _json({"type": "array", "items": _ref("Release")}, "ok"),
                    "400": _json(_ref("Error"), "limit is not a whole number of 1 or more"),
                    **ERRORS,
                },
            }
        },
        "/api/releases/{id}": {
            "get": {
                "summary": "One release with its outputs and events",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
                ],
                "responses": {
                    "200": _json(_ref("Release"), "ok"),
                    "404": _json(_ref("Error"), "no such release"),
                    **ERRORS,
                },
            }
        },
        "/api/events": {
            "get": {
                "summary": "Server-sent events: `status` (a Status) each time it changes",
                "responses": {"200": {"description": "text/event-stream"}, **ERRORS},
            }
        },
        "/api/approve": _action("Approve the cluster the release waits for"),
        "/api/abort": _action("Stop the release in progress at its next safe point"),
        "/api/rollback": _action("Back to the previous version (run by the desk)"),
    },
}
