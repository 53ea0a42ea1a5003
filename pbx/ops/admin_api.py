"""The admin API under ``/api/``: bearer-token auth, request validation, the handlers.

Auth: ``Authorization: Bearer <api.token>`` compared with ``hmac.compare_digest``; no
token configured means the admin API is *off* (503 saying to set ``PBX_API__TOKEN``),
never open. Bodies are validated against the same JSON schemas the OpenAPI document
publishes (:data:`EXTENSION_CREATE`, :data:`EXTENSION_UPDATE`), so the documentation and
the checks cannot drift: invalid JSON is a 400, a wrong type or an unknown field a 422,
each with a message naming the field.

Extensions go through :mod:`pbx.admin` (the CLI's code): passwords are hashed there and
never stored or returned, except a generated one, returned once at creation.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
import math
import re
from collections.abc import Callable, Generator, Mapping
from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.web.iweb import IRequest

from pbx import admin
from pbx.ops.health import HealthMonitor
from pbx.ops.sources import ServiceView
from pbx.store import CDR_COLUMNS, ExtensionExists

__all__ = [
    "EXTENSION_CREATE",
    "EXTENSION_UPDATE",
    "MAX_BODY",
    "AdminAPI",
    "ApiError",
    "check_schema",
]

MAX_BODY = 64 * 1024
NUMBER_PATTERN = r"^[0-9]{2,15}$"
EXTENSION_CREATE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["number"],
    "properties": {
        "number": {"type": "string", "pattern": NUMBER_PATTERN,
                   "description": "extension number, 2-15 digits"},
        "name": {"type": ["string", "null"], "maxLength": 128},
        "password": {"type": "string", "minLength": 1, "maxLength": 256, "writeOnly": True,
                     "description": "omit to have a strong one generated and returned once"},
        "enabled": {"type": "boolean"},
    },
}
EXTENSION_UPDATE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": ["string", "null"], "maxLength": 128},
        "password": {"type": "string", "minLength": 1, "maxLength": 256, "writeOnly": True},
        "generate_password": {"type": "boolean",
                              "description": "true: generate a new password, returned once"},
        "enabled": {"type": "boolean"},
    },
}
EXTENSION: dict[str, Any] = {
    "type": "object",
    "properties": {
        "number": {"type": "string"}, "name": {"type": ["string", "null"]},
        "enabled": {"type": "boolean"}, "realm": {"type": "string"},
        "registered": {"type": "boolean"}, "bindings": {"type": "integer"},
        "has_voicemail_pin": {"type": "boolean"},
        "created_at": {"type": ["number", "null"]}, "updated_at": {"type": ["number", "null"]},
        "password": {"type": "string", "description": "only when generated, shown once"},
    },
}
ERROR: dict[str, Any] = {
    "type": "object", "required": ["error", "status"],
    "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
}
CDR_FORMATS = ("json", "csv")
_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}


class ApiError(Exception):
    """An HTTP error answered as ``{"error": message, "status": code}``."""

    def __init__(self, code: int, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})


def _type_ok(value: Any, names: str | list[str]) -> bool:
    for name in [names] if isinstance(names, str) else names:
        if name in ("integer", "number") and isinstance(value, bool):
            continue
        if isinstance(value, _JSON_TYPES[name]):
            return True
    return False


def check_schema(value: Any, schema: Mapping[str, Any], where: str = "body") -> None:
    """Validate ``value`` against the JSON-schema subset our route table uses; 422 else."""
    expected = schema.get("type")
    if expected is not None and not _type_ok(value, expected):
        names = expected if isinstance(expected, str) else " or ".join(expected)
        raise ApiError(422, f"{where} must be {names}, not {_json_type(value)}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        if schema.get("additionalProperties") is False:
            unknown = sorted(set(value) - set(props))
            if unknown:
                raise ApiError(422, f"unknown field(s) in {where}: {', '.join(unknown)} "
                                    f"(allowed: {', '.join(sorted(props))})")
        for name in schema.get("required", ()):
            if name not in value:
                raise ApiError(422, f"{where}.{name} is required")
        for name, item in value.items():
            if name in props:
                check_schema(item, props[name], f"{where}.{name}")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            raise ApiError(422, f"{where} must not be empty")
        if len(value) > schema.get("maxLength", math.inf):
            raise ApiError(422, f"{where} is longer than {schema['maxLength']} characters")
        pattern = schema.get("pattern")
        # fullmatch: with re.search/match, "$" also matches before a trailing newline,
        # so "1001\n" would pass ^[0-9]{2,15}$ and reach the store as a number.
        if pattern and not re.fullmatch(pattern, value):
            raise ApiError(422, f"{where} must match {pattern}")
    if "enum" in schema and value not in schema["enum"]:
        raise ApiError(422, f"{where} must be one of {', '.join(map(str, schema['enum']))}")


def _json_type(value: Any) -> str:
    for name, types in _JSON_TYPES.items():
        if isinstance(value, types) and not (name == "integer" and isinstance(value, bool)):
            return name
    return type(value).__name__


def read_json_body(request: IRequest, schema: Mapping[str, Any] | None) -> Any:
    """The request body as JSON checked against ``schema`` (400 when it is not JSON)."""
    content = request.content
    raw = content.read(MAX_BODY + 1) if content is not None else b""
    if len(raw) > MAX_BODY:
        raise ApiError(413, f"body larger than {MAX_BODY} bytes")
    if not raw.strip():
        body: Any = {}
    else:
        try:
            body = json.loads(raw)
        except RecursionError:
            # 64 KiB of "[" nests deeper than the parser's stack: a client error, not a 500.
            raise ApiError(400, "body is not valid JSON: nested too deeply") from None
        except ValueError as exc:
            # JSONDecodeError, UnicodeDecodeError and int-too-long are all ValueErrors.
            raise ApiError(400, f"body is not valid JSON: {exc}") from None
    if schema is not None:
        check_schema(body, schema)
    return body


def _timestamp(name: str, value: str) -> float:
    """Unix seconds or ISO 8601 (naive means UTC)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ApiError(400, f"{name} must be unix seconds or an ISO 8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _integer(name: str, value: str | None, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer") from None
    if not low <= number <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}")
    return number


def _csv_cell(value: Any) -> Any:
    """Neutralise spreadsheet formulas in text that came from SIP peers (CSV injection)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return value


class AdminAPI:
    """Handlers of the authenticated ``/api/`` routes (see the route table in app.py)."""

    def __init__(self, view: ServiceView, health: HealthMonitor, *, token: str | None,
                 clock: Any, version: str = "") -> None:
        self.view = view
        self.health = health
        self.clock = clock
        self.version = version
        self._token = token.encode() if token else None
        # Called with the client address on each failed bearer attempt (metrics, lockout).
        self.on_auth_failure: Callable[[str], None] | None = None

    # -- auth ----------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._token is not None

    def authorize(self, request: IRequest) -> None:
        if self._token is None:
            raise ApiError(503, "admin API disabled: no token is configured; set "
                                "PBX_API__TOKEN (a long random secret) and restart")
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
            if self.on_auth_failure is not None:
                self.on_auth_failure(request.getClientAddress().host or "")
            raise ApiError(401, "missing or invalid bearer token",
                           {"WWW-Authenticate": 'Bearer realm="pbx-admin"'})

    # -- status and statistics -------------------------------------------------------------
    def status(self, request: IRequest) -> dict[str, Any]:
        view, health = self.view, self.health
        live, ready = health.liveness(), health.readiness()
        lifecycle = view.lifecycle
        return {
            "status": health.overall(live, ready),
            "node": view.node,
            "version": self.version,
            "lifecycle": {"state": lifecycle.state, "since": lifecycle.entered_at},
            "ready": ready.ok,
            "live": live.ok,
            "uptime_seconds": round(health.uptime(), 3),
            "active_calls": view.active_calls(),
            "registered_extensions": view.registered_extensions(),
            "bindings": view.binding_count(),
            "calls_layer": view.b2bua is not None,
            "sip": view.sip_sockets(),
            "database": {"type": view.store.kind, "state": view.store.state},
        }

    def statistics(self, request: IRequest) -> dict[str, Any]:
        view = self.view
        transport = getattr(view.transport, "stats", None)
        txns = view.transactions
        b2bua = view.b2bua
        call_stats = getattr(b2bua, "stats", None) if b2bua is not None else None
        return {
            "sip": {
                "received": dict(getattr(transport, "received", {}) or {}),
                "sent": dict(getattr(transport, "sent", {}) or {}),
                "dropped": dict(getattr(transport, "dropped", {}) or {}),
                "bad_requests_answered": getattr(transport, "bad_requests_answered", 0),
            },
            "transactions": {**txns.stats.as_dict(), "active": txns.counts},
            "registrar": view.registrar.stats.as_dict(),
            "security": view.guard.stats.as_dict(),
            "location": {"registered_extensions": view.registered_extensions(),
                         "bindings": view.binding_count()},
            "calls": {"active": view.active_calls(),
                      **(dict(call_stats.as_dict()) if hasattr(call_stats, "as_dict") else {})},
        }

    def config(self, request: IRequest) -> dict[str, Any]:
        return dict(self.view.settings.redacted())

    # -- extensions -------------------------------------------------------------------------
    def _describe(self, record: Any, registered: Mapping[str, int]) -> dict[str, Any]:
        bindings = registered.get(record.number, 0)
        return {
            "number": record.number, "name": record.display_name,
            "enabled": bool(record.enabled), "realm": record.realm,
            "registered": bindings > 0, "bindings": bindings,
            "has_voicemail_pin": bool(getattr(record, "voicemail_pin", None)),
            "created_at": record.created_at, "updated_at": record.updated_at,
        }

    @inlineCallbacks
    def list_extensions(self, request: IRequest) -> Generator[Deferred[Any], Any, Any]:
        records = yield self.view.store.list_extensions()
        registered = self.view.registered_numbers()
        items = [self._describe(r, registered) for r in records]
        return {"count": len(items), "extensions": items}

    @inlineCallbacks
    def get_extension(self, request: IRequest,
                      number: str) -> Generator[Deferred[Any], Any, Any]:
        record = yield self.view.store.get_extension(number)
        if record is None:
            raise ApiError(404, f"extension {number} does not exist")
        return self._describe(record, self.view.registered_numbers())

    @inlineCallbacks
    def create_extension(self, request: IRequest,
                         body: dict[str, Any]) -> Generator[Deferred[Any], Any, Any]:
        number = body["number"]
        try:
            generated = yield admin.add_extension(
                self.view.store, self.view.settings, number, name=body.get("name"),
                password=body.get("password"), enabled=body.get("enabled", True))
        except ExtensionExists:
            raise ApiError(409, f"extension {number} already exists") from None
        except admin.ExtensionError as exc:
            raise ApiError(422, str(exc).replace("--password", "password")) from None
        record = yield self.view.store.get_extension(number)
        out = self._describe(record, self.view.registered_numbers())
        if generated is not None:
            out["password"] = generated
        request.setResponseCode(201)
        request.setHeader(b"Location", f"/api/extensions/{number}".encode())
        return out

    @inlineCallbacks
    def update_extension(self, request: IRequest, number: str,
                         body: dict[str, Any]) -> Generator[Deferred[Any], Any, Any]:
        if "password" in body and body.get("generate_password"):
            raise ApiError(422, "give either password or generate_password, not both")
        record = yield self.view.store.get_extension(number)
        if record is None:
            raise ApiError(404, f"extension {number} does not exist")
        fields = {}
        if "name" in body:
            fields["display_name"] = body["name"]
        if "enabled" in body:
            fields["enabled"] = body["enabled"]
        generated = None
        if "password" in body or body.get("generate_password"):
            try:
                generated = yield admin.change_password(self.view.store, self.view.settings,
                                                        number, body.get("password"))
            except admin.ExtensionError as exc:
                raise ApiError(422, str(exc).replace("--password", "password")) from None
        if fields:
            updated = yield self.view.store.update_extension(number, **fields)
            if not updated:
                raise ApiError(404, f"extension {number} does not exist")
        if body.get("enabled") is False:
            self.view.forget_bindings(number)
        record = yield self.view.store.get_extension(number)
        out = self._describe(record, self.view.registered_numbers())
        if generated is not None:
            out["password"] = generated
        return out

    @inlineCallbacks
    def delete_extension(self, request: IRequest,
                         number: str) -> Generator[Deferred[Any], Any, Any]:
        removed = yield self.view.store.remove_extension(number)
        if not removed:
            raise ApiError(404, f"extension {number} does not exist")
        self.view.forget_bindings(number)
        request.setResponseCode(204)
        return None

    # -- calls, QoS, CDR ----------------------------------------------------------------
    def list_calls(self, request: IRequest) -> dict[str, Any]:
        calls = self.view.calls()
        return {"active_calls": self.view.active_calls(), "calls": calls,
                "calls_layer": self.view.b2bua is not None}

    def hangup_call(self, request: IRequest, call_id: str) -> dict[str, Any]:
        result = self.view.hangup(call_id, "admin hangup")
        if result is None:
            raise ApiError(404, f"call {call_id} does not exist (no calls layer loaded)")
        if result is False:
            raise ApiError(404, f"call {call_id} does not exist")
        request.setResponseCode(202)
        return {"call_id": call_id, "hangup": "requested"}

    def qos(self, request: IRequest) -> dict[str, Any]:
        calls = self.view.qos()
        return {"active_calls": self.view.active_calls(), "calls": calls}

    @inlineCallbacks
    def cdr(self, request: IRequest) -> Generator[Deferred[Any], Any, Any]:
        args = {k.decode(errors="replace"): v[-1].decode(errors="replace")
                for k, v in (request.args or {}).items() if v}
        fmt = args.get("format", "json").lower()
        if fmt not in CDR_FORMATS:
            raise ApiError(400, "format must be json or csv")
        since = _timestamp("since", args["since"]) if "since" in args else None
        until = _timestamp("until", args["until"]) if "until" in args else None
        extension = args.get("extension") or None
        if extension is not None and not re.fullmatch(NUMBER_PATTERN, extension):
            raise ApiError(400, "extension must be 2-15 digits")
        limit = _integer("limit", args.get("limit"), 100 if fmt == "json" else 10_000,
                         1, 10_000)
        offset = _integer("offset", args.get("offset"), 0, 0, 10**9)
        rows = yield self.view.store.list_cdr(since=since, until=until, extension=extension,
                                              limit=limit + 1, offset=offset)
        more = len(rows) > limit
        rows = rows[:limit]
        if fmt == "csv":
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\r\n")
            writer.writerow(CDR_COLUMNS)
            for row in rows:
                writer.writerow([_csv_cell(row.get(col)) for col in CDR_COLUMNS])
            request.setHeader(b"Content-Type", b"text/csv; charset=utf-8")
            request.setHeader(b"Content-Disposition", b'attachment; filename="cdr.csv"')
            return out.getvalue().encode()
        return {"count": len(rows), "limit": limit, "offset": offset,
                "next_offset": offset + limit if more else None, "records": rows}

    # -- drain ---------------------------------------------------------------------------
    def drain(self, request: IRequest) -> dict[str, Any]:
        """Start a graceful drain: ``/ready`` and OPTIONS answer 503 from now on; the
        process exits when the calls have ended or at ``drain_timeout``."""
        lifecycle = self.view.lifecycle
        if not lifecycle.may_fire("drain"):
            raise ApiError(409, f"cannot drain: lifecycle is {lifecycle.state}")
        lifecycle.fire("drain")
        # Complete an empty drain only after this response has gone out.
        self.clock.callLater(0.05, lifecycle.work_finished)
        request.setResponseCode(202)
        return {"state": lifecycle.state, "active_calls": self.view.active_calls(),
                "drain_timeout": lifecycle.drain_timeout,
                "message": "draining: no new calls; the process stops when the active "
                           "calls have ended or at the drain timeout"}

    def cancel_drain(self, request: IRequest) -> dict[str, Any]:
        lifecycle = self.view.lifecycle
        if not lifecycle.may_fire("cancel_drain"):
            raise ApiError(409, f"no drain to cancel: lifecycle is {lifecycle.state}")
        lifecycle.fire("cancel_drain")
        return {"state": lifecycle.state}
