"""The ops plane: probes, detailed health, Prometheus metrics, the admin API, sd_notify.

This is the package's public face; ``PBXService`` needs only :func:`install_ops`
(see :mod:`pbx.ops.wiring` for the three lines that attach it).
"""

from pbx.ops.app import ROUTES, OpsApp, Route, openapi_document
from pbx.ops.health import HealthMonitor, Heartbeat
from pbx.ops.metrics import CallMetrics
from pbx.ops.sdnotify import SystemdNotifier
from pbx.ops.security import SECURITY_HEADERS, TokenBucketLimiter
from pbx.ops.wiring import OpsOptions, OpsPlane, install_ops

__all__ = [
    "ROUTES",
    "SECURITY_HEADERS",
    "CallMetrics",
    "HealthMonitor",
    "Heartbeat",
    "OpsApp",
    "OpsOptions",
    "OpsPlane",
    "Route",
    "SystemdNotifier",
    "TokenBucketLimiter",
    "install_ops",
    "openapi_document",
]
