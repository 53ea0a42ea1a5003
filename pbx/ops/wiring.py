"""``install_ops(service)``: attach the ops plane to a PBX service.

The ops plane reads everything through the service object (:class:`ServiceView`), so
``PBXService`` needs three lines::

    self.ops = install_ops(self)          # end of __init__ (subscribes to the lifecycle)
    self.ops.start()                      # startService, before the SIP sockets bind
    yield self.ops.stop()                 # stopService, after SIP/RTP stop, before the
                                          # location flush and store close

``start()`` binds the Klein site on ``api.host:api.port`` (port 0 picks one) and logs
``listening: API HTTP on HOST:PORT``; it raises ``CannotListenError`` when the port is
taken, like the SIP listener. The heartbeat (liveness) and the systemd watchdog start
with it; the lifecycle subscription sends ``READY=1`` on ``ready`` and ``STOPPING=1`` on
``draining``/``stopped`` to ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort

from pbx.ops.admin_api import AdminAPI
from pbx.ops.app import OpsApp
from pbx.ops.health import DatabaseProbe, HealthMonitor, Heartbeat, SystemResources
from pbx.ops.metrics import CallMetrics, MetricsExporter
from pbx.ops.sdnotify import SystemdNotifier
from pbx.ops.security import AuthFailureLimiter, OpsSite, TokenBucketLimiter
from pbx.ops.sources import ServiceView

__all__ = ["OpsOptions", "OpsPlane", "install_ops"]

log = logging.getLogger("pbx")


@dataclass(frozen=True, slots=True)
class OpsOptions:
    """The ops plane's knobs: ``api.enabled``/``rate_limit``/``rate_burst`` and ``health.*``.

    A plain dataclass so pbx.ops can be driven without pbx.config (tests use fast values).
    """

    enabled: bool = True                 # api.enabled
    rate_limit: float = 20.0             # api.rate_limit (requests/s per client on /api/)
    rate_burst: int = 60                 # api.rate_burst
    heartbeat_interval: float = 0.25     # health.heartbeat_interval
    liveness_max_lag: float = 2.0        # health.liveness_max_lag (seconds)
    database_timeout: float = 2.0        # health.database_timeout
    cache_seconds: float = 1.0           # health.cache_seconds (ping and psutil)
    cpu_warn_percent: float = 80.0       # health.cpu_warn_percent
    memory_warn_percent: float = 85.0    # health.memory_warn_percent
    disk_warn_percent: float = 90.0      # health.disk_warn_percent

    @classmethod
    def from_settings(cls, settings: Any) -> OpsOptions:
        """Build from the configuration's ``api`` and ``health`` sections."""
        api, health = settings.api, settings.health
        return cls(
            enabled=api.enabled, rate_limit=api.rate_limit, rate_burst=api.rate_burst,
            heartbeat_interval=health.heartbeat_interval,
            liveness_max_lag=health.liveness_max_lag,
            database_timeout=health.database_timeout, cache_seconds=health.cache_seconds,
            cpu_warn_percent=health.cpu_warn_percent,
            memory_warn_percent=health.memory_warn_percent,
            disk_warn_percent=health.disk_warn_percent)


def _version() -> str:
    try:
        return metadata.version("pbx")
    except metadata.PackageNotFoundError:
        return "0"


class OpsPlane:
    """Probes, health, metrics, admin API and sd_notify for one PBX service."""

    def __init__(self, service: Any, *, options: OpsOptions | None = None,
                 reactor: Any | None = None, token: str | None = None,
                 host: str | None = None, port: int | None = None,
                 notifier: SystemdNotifier | None = None) -> None:
        self.options = options = options or OpsOptions()
        self.reactor = reactor or service.reactor
        self.view = ServiceView(service)
        settings = service.settings
        if token is None and settings.api.token is not None:
            token = settings.api.token.get_secret_value()
        self.host = host if host is not None else settings.api.host
        self.requested_port = port if port is not None else settings.api.port
        version = _version()
        self.heartbeat = Heartbeat(self.reactor, interval=options.heartbeat_interval,
                                   max_lag=options.liveness_max_lag)
        self.database = DatabaseProbe(self.view.store, self.reactor,
                                      timeout=options.database_timeout,
                                      cache_for=options.cache_seconds)
        self.resources = SystemResources(Path(settings.data_dir),
                                         cpu_warn=options.cpu_warn_percent,
                                         memory_warn=options.memory_warn_percent,
                                         disk_warn=options.disk_warn_percent,
                                         cache_for=options.cache_seconds)
        self.health = HealthMonitor(self.view, self.reactor, heartbeat=self.heartbeat,
                                    database=self.database, resources=self.resources)
        self.exporter = MetricsExporter(self.view, self.health)
        self.admin = AdminAPI(self.view, self.health, token=token, clock=self.reactor,
                              version=version)
        self.app = OpsApp(self.health, self.exporter, self.admin, version=version)
        self.limiter = TokenBucketLimiter(options.rate_limit, options.rate_burst)
        self.site = OpsSite(self.app.resource(), limiter=self.limiter,
                            on_rate_limited=self.exporter.api_rate_limited.inc,
                            auth_limiter=AuthFailureLimiter())
        self.admin.on_auth_failure = self._auth_failed
        self.notifier = notifier if notifier is not None else SystemdNotifier()
        self.listening: IListeningPort | None = None
        self.view.lifecycle.subscribe(self._lifecycle_changed)

    def _auth_failed(self, client: str) -> None:
        """Count a failed bearer attempt and charge it to the client's lockout (the site's
        limiter is looked up now so a replaced one, e.g. in a test, is the one charged)."""
        self.exporter.api_auth_failures.inc()
        limiter = self.site.auth_limiter
        if limiter is not None:
            limiter.failed(client)

    @property
    def call_metrics(self) -> CallMetrics:
        """Where the calls/media layers report each finished call (histograms)."""
        return self.exporter.call_metrics

    @property
    def port(self) -> int | None:
        """The bound API port (None before start or when disabled)."""
        return self.listening.getHost().port if self.listening is not None else None

    # -- lifecycle of the plane ------------------------------------------------------------
    def attach_calls(self) -> bool:
        """Hook call metrics into the B2BUA's ``call_ended_hooks`` (once; when present)."""
        b2bua = self.view.b2bua
        hooks = getattr(b2bua, "call_ended_hooks", None) if b2bua is not None else None
        if not isinstance(hooks, list):
            return False
        if self.call_metrics.observe_call not in hooks:
            hooks.append(self.call_metrics.observe_call)
        return True

    def start(self) -> int | None:
        """Bind the HTTP site, start the heartbeat and watchdog; returns the bound port."""
        self.attach_calls()
        self.heartbeat.start()
        self.notifier.start_watchdog(self.reactor)
        if self.listening is None and self.options.enabled:
            self.listening = self.reactor.listenTCP(self.requested_port, self.site,
                                                    interface=self.host)
            log.info("listening: API HTTP on %s:%d", self.host, self.port)
            if not self.admin.enabled:
                log.warning("admin API disabled: set PBX_API__TOKEN to enable /api/ "
                            "(probes and /metrics are served)")
        if self.view.lifecycle.state == "ready":
            self._lifecycle_changed("starting", "ready")
        return self.port

    def stop(self) -> Deferred[None]:
        """Stop the heartbeat and watchdog and close the HTTP port (call it last-but-DB)."""
        self.heartbeat.stop()
        self.notifier.stop_watchdog()
        listening, self.listening = self.listening, None
        if listening is None:
            return succeed(None)
        return maybeDeferred(listening.stopListening).addCallback(lambda _: None)

    def _lifecycle_changed(self, old: str, new: str) -> None:
        if new == "ready":
            self.attach_calls()  # the calls layer may be installed after the ops plane
            self.notifier.ready(f"ready; SIP on {self._sip_summary()}")
        elif new == "draining":
            self.notifier.stopping("draining: no new calls")
        elif new in ("stopped", "failed") and old != "draining":
            self.notifier.stopping(f"lifecycle {new}")

    def _sip_summary(self) -> str:
        return ", ".join(f"{s['transport']} {s['host']}:{s['port']}"
                         for s in self.view.sip_sockets()) or "no sockets"


def install_ops(service: Any, **kwargs: Any) -> OpsPlane:
    """Create the ops plane for ``service`` (see :class:`OpsPlane` for keyword args)."""
    return OpsPlane(service, **kwargs)
