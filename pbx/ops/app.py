"""The Klein app of the ops plane, built from one route table.

:data:`ROUTES` is the only list of endpoints: the Klein URL map and the OpenAPI document
(``/api/openapi.json``) are both generated from it, so they cannot disagree (a test
compares the served URL map with the document). Each route names its handler, whether it
needs the bearer token, its JSON body schema (the same dict validates the body) and its
query parameters.

Probes (``/health``, ``/live``, ``/ready`` and their aliases) read state only and
answer with the status code; ``?verbose`` adds the reasons as text for humans.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from klein import Klein
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound

from pbx.ops.admin_api import (
    ERROR,
    EXTENSION,
    EXTENSION_CREATE,
    EXTENSION_UPDATE,
    AdminAPI,
    ApiError,
    read_json_body,
)
from pbx.ops.health import Check, HealthMonitor
from pbx.ops.metrics import CONTENT_TYPE, MetricsExporter

__all__ = ["ROUTES", "OpsApp", "Route", "openapi_document"]

log = logging.getLogger("pbx.ops")


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    description: str
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: ``path`` uses OpenAPI ``{name}`` placeholders."""

    method: str
    path: str
    handler: str
    summary: str
    tag: str
    auth: bool = True
    body: dict[str, Any] | None = None
    query: tuple[Param, ...] = ()
    responses: dict[int, str] = field(default_factory=dict)
    content_type: str = "application/json"

    @property
    def klein_path(self) -> str:
        return self.path.replace("{", "<").replace("}", ">")

    @property
    def path_params(self) -> list[str]:
        return [part[1:-1] for part in self.path.split("/") if part.startswith("{")]


VERBOSE = Param("verbose", "give the reasons as text (humans); probes read the code only",
                {"type": "string", "allowEmptyValue": True})
PROBE = {200: "up", 503: "down (reasons with ?verbose)"}
_AUTH_ERRORS = {401: "missing or invalid bearer token",
                503: "admin API disabled (set PBX_API__TOKEN)", 429: "rate limited"}
_TIME = {"type": "string", "description": "unix seconds or ISO 8601"}


def _probe(path: str, handler: str, summary: str) -> Route:
    return Route("GET", path, handler, summary, "probes", auth=False, query=(VERBOSE,),
                 responses=PROBE, content_type="text/plain")


ROUTES: tuple[Route, ...] = (
    *(_probe(p, "probe_health", "liveness and readiness together")
      for p in ("/health", "/healthz")),
    *(_probe(p, "probe_live", "liveness: the reactor turns")
      for p in ("/live", "/liveness", "/livez")),
    *(_probe(p, "probe_ready", "readiness: lifecycle ready and components up")
      for p in ("/ready", "/readiness", "/readyz")),
    Route("GET", "/metrics", "metrics", "Prometheus metrics", "monitoring", auth=False,
          responses={200: "exposition format 0.0.4"}, content_type=CONTENT_TYPE),
    Route("GET", "/api/health/detailed", "health_detailed", "component health report",
          "monitoring", auth=False,
          responses={200: "healthy or degraded", 503: "unhealthy", 429: "rate limited"}),
    Route("GET", "/api/openapi.json", "openapi", "this document", "meta", auth=False,
          responses={200: "OpenAPI 3.1 document", 429: "rate limited"}),
    Route("GET", "/api/status", "status", "node status summary", "status",
          responses={200: "status"}),
    Route("GET", "/api/statistics", "statistics", "SIP, transaction, registrar, security "
          "and call counters", "status", responses={200: "counters"}),
    Route("GET", "/api/config", "config", "effective configuration, secrets redacted",
          "status", responses={200: "configuration"}),
    Route("GET", "/api/extensions", "list_extensions", "list extensions", "extensions",
          responses={200: "extensions (no passwords)"}),
    Route("POST", "/api/extensions", "create_extension", "create an extension",
          "extensions", body=EXTENSION_CREATE,
          responses={201: "created; a generated password is returned once",
                     400: "invalid JSON", 409: "exists", 422: "invalid field"}),
    Route("GET", "/api/extensions/{number}", "get_extension", "one extension", "extensions",
          responses={200: "extension", 404: "no such extension"}),
    *(Route(method, "/api/extensions/{number}", "update_extension",
            "change name, enabled or password (partial update)", "extensions",
            body=EXTENSION_UPDATE,
            responses={200: "updated", 400: "invalid JSON", 404: "no such extension",
                       422: "invalid field"})
      for method in ("PUT", "PATCH")),
    Route("DELETE", "/api/extensions/{number}", "delete_extension",
          "delete an extension and its bindings", "extensions",
          responses={204: "deleted", 404: "no such extension"}),
    Route("GET", "/api/calls", "list_calls", "calls up now", "calls",
          responses={200: "calls"}),
    Route("DELETE", "/api/calls/{call_id}", "hangup_call", "hang a call up (BYE/CANCEL)",
          "calls", responses={202: "hangup requested", 404: "no such call"}),
    Route("GET", "/api/qos", "qos", "per-call RTP quality of the calls up now", "calls",
          responses={200: "QoS"}),
    Route("GET", "/api/cdr", "cdr", "call detail records, newest first", "calls",
          query=(Param("since", "start_time >= since", _TIME),
                 Param("until", "start_time < until", _TIME),
                 Param("extension", "caller or callee", {"type": "string",
                                                         "pattern": "^[0-9]{2,15}$"}),
                 Param("limit", "page size (json default 100, csv 10000)",
                       {"type": "integer", "minimum": 1, "maximum": 10000}),
                 Param("offset", "rows to skip", {"type": "integer", "minimum": 0}),
                 Param("format", "json or csv", {"type": "string", "enum": ["json", "csv"]})),
          responses={200: "records (JSON page or CSV)", 400: "bad filter"}),
    Route("POST", "/api/admin/drain", "drain", "start a graceful drain", "admin",
          responses={202: "draining", 409: "not drainable in this state"}),
    Route("POST", "/api/admin/drain/cancel", "cancel_drain", "cancel a drain (back to "
          "ready)", "admin", responses={200: "ready again", 409: "not draining"}),
)


def openapi_document(routes: tuple[Route, ...] = ROUTES, *, version: str = "") -> dict[str, Any]:
    """OpenAPI 3.1 generated from the route table."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {
            "operationId": f"{route.handler}_{route.method.lower()}"
                           f"{route.path.replace('/', '_').replace('{', '').replace('}', '')}",
            "summary": route.summary, "tags": [route.tag],
            "responses": {},
        }
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in route.path_params]
        params += [{"name": p.name, "in": "query", "required": False,
                    "description": p.description, "schema": p.schema} for p in route.query]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": {
                "application/json": {"schema": route.body}}}
        responses = dict(route.responses)
        if route.auth:
            op["security"] = [{"bearer": []}]
            responses = {**_AUTH_ERRORS, **responses}
        else:
            op["security"] = []
        for code, text in sorted(responses.items()):
            if 200 <= code < 300 and code != 204:
                schema = EXTENSION if route.tag == "extensions" else {"type": "object"}
                content = ({route.content_type: {"schema": {"type": "string"}}}
                           if not route.content_type.startswith("application/json")
                           else {"application/json": {"schema": schema}})
                op["responses"][str(code)] = {"description": text, "content": content}
            elif code >= 400 and route.content_type.startswith("application/json"):
                op["responses"][str(code)] = {"description": text, "content": {
                    "application/json": {"schema": ERROR}}}
            else:
                op["responses"][str(code)] = {"description": text}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "PBX ops API", "version": version or "0",
                 "description": "Probes, metrics and the admin API of one PBX node."},
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                                      "description": "PBX_API__TOKEN"}}},
    }


def _json(request: IRequest, data: Any, code: int | None = None) -> bytes:
    if code is not None:
        request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(data, default=str).encode()


def _verbose(request: IRequest) -> bool:
    """``?verbose`` or ``?verbose=…`` (Twisted's ``request.args`` drops a bare key)."""
    _, _, query = (request.uri or b"").partition(b"?")
    return any(item.split(b"=", 1)[0] == b"verbose" for item in query.split(b"&"))


class OpsApp:
    """Binds the route table to handlers: probes and metrics here, the rest AdminAPI."""

    def __init__(self, health: HealthMonitor, metrics: MetricsExporter, admin: AdminAPI,
                 *, version: str = "") -> None:
        self.health = health
        self.exporter = metrics
        self.admin = admin
        self.version = version
        self.app = Klein()
        self._openapi = json.dumps(openapi_document(ROUTES, version=version)).encode()
        for route in ROUTES:
            self.app.route(route.klein_path, methods=[route.method],
                           endpoint=f"{route.method} {route.path}")(self._endpoint(route))
        self._install_error_handlers()

    def resource(self) -> Any:
        return self.app.resource()

    # -- dispatch ----------------------------------------------------------------------
    def _handler(self, route: Route) -> Callable[..., Any]:
        if callable(getattr(type(self), route.handler, None)):
            return getattr(self, route.handler)  # type: ignore[no-any-return]
        return getattr(self.admin, route.handler)  # type: ignore[no-any-return]

    def _endpoint(self, route: Route) -> Callable[..., Any]:
        handler = self._handler(route)

        def endpoint(request: IRequest, **params: str) -> Deferred[Any]:
            def run() -> Any:
                if route.auth:
                    self.admin.authorize(request)
                kwargs: dict[str, Any] = dict(params)
                if route.body is not None:
                    kwargs["body"] = read_json_body(request, route.body)
                return handler(request, **kwargs)

            return maybeDeferred(run).addCallback(self._render, request)

        endpoint.__name__ = f"{route.method}_{route.handler}"
        return endpoint

    @staticmethod
    def _render(result: Any, request: IRequest) -> bytes:
        if result is None:
            return b""
        if isinstance(result, bytes):
            return result
        return _json(request, result)

    def _install_error_handlers(self) -> None:
        app = self.app

        @app.handle_errors(ApiError)
        def api_error(request: IRequest, failure: Failure) -> bytes:
            err: ApiError = failure.value
            for name, value in err.headers.items():
                request.setHeader(name.encode(), value.encode())
            return _json(request, {"error": err.message, "status": err.code}, err.code)

        @app.handle_errors(NotFound)
        def not_found(request: IRequest, failure: Failure) -> bytes:
            return _json(request, {"error": f"no such endpoint: {request.path.decode()}",
                                   "status": 404}, 404)

        @app.handle_errors(MethodNotAllowed)
        def not_allowed(request: IRequest, failure: Failure) -> bytes:
            allowed = sorted(failure.value.valid_methods or ())
            request.setHeader(b"Allow", ", ".join(allowed).encode())
            return _json(request, {"error": f"method {request.method.decode()} not allowed "
                                            f"here (allowed: {', '.join(allowed)})",
                                   "status": 405}, 405)

        @app.handle_errors(HTTPException)
        def http_error(request: IRequest, failure: Failure) -> bytes:
            code = int(failure.value.code or 500)
            return _json(request, {"error": failure.value.description or "error",
                                   "status": code}, code)

        @app.handle_errors(Exception)
        def unexpected(request: IRequest, failure: Failure) -> bytes:
            log.error("ops API %s %s failed: %s", request.method.decode(),
                      request.path.decode(errors="replace"), failure.getErrorMessage())
            log.debug("%s", failure.getTraceback())
            return _json(request, {"error": "internal error (logged)", "status": 500}, 500)

    # -- probes and monitoring ------------------------------------------------------------
    def _probe_answer(self, request: IRequest, check: Check, name: str) -> bytes:
        request.setResponseCode(200 if check.ok else 503)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if not _verbose(request):
            return b"ok\n" if check.ok else b"unavailable\n"
        lines = [f"{name}: {'ok' if check.ok else 'FAIL'}", *(f"  {r}" for r in check.reasons)]
        return ("\n".join(lines) + "\n").encode()

    def probe_live(self, request: IRequest) -> bytes:
        return self._probe_answer(request, self.health.liveness(), "live")

    def probe_ready(self, request: IRequest) -> bytes:
        return self._probe_answer(request, self.health.readiness(), "ready")

    def probe_health(self, request: IRequest) -> bytes:
        live, ready = self.health.liveness(), self.health.readiness()
        both = Check(live.ok and ready.ok, live.reasons + ready.reasons)
        return self._probe_answer(request, both, "health")

    def metrics(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode())
        return self.exporter.render()

    def health_detailed(self, request: IRequest) -> Deferred[bytes]:
        """Open to probes, but host names and driver error text only for a caller with
        the token; a wrong token is a failed attempt like anywhere else (401, counted),
        or the full-versus-redacted answer would be a free token oracle."""
        full = request.getHeader(b"authorization") is not None
        if full:
            self.admin.authorize(request)  # ApiError: answered by the error handler

        def answer(report: dict[str, Any]) -> bytes:
            code = 503 if report["overall_status"] == "unhealthy" else 200
            return _json(request, report, code)

        return self.health.detailed(full=full).addCallback(answer)

    def openapi(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return self._openapi
