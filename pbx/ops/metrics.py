"""Prometheus metrics: a private registry, read from live stats at scrape time.

Why a custom collector rather than counters bumped on the hot path: the SIP stack
already counts (``transport.stats``, ``transactions.stats``, ``registrar.stats``,
``guard.stats``); copying each increment into prometheus-client objects would double the
work per message. :class:`PBXCollector` turns those counters into metric families only
when Prometheus scrapes. The one push-side exception is :class:`CallMetrics` (call setup
time histogram, calls by disposition, RTP totals): a histogram needs every observation,
so the calls layer reports each call once, at its end, through ``ops.call_metrics``.
Until the calls layer lands those series are present and zero.

Names follow the Prometheus conventions (base units in the name, ``_total`` on
counters), so ``promtool check metrics`` accepts a scrape.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pbx.media import REJECT_REASONS
from pbx.ops.health import HealthMonitor
from pbx.ops.sources import ServiceView
from pbx.sip import method_label, status_label

__all__ = ["CONTENT_TYPE", "CallMetrics", "MetricsExporter", "PBXCollector"]

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LIFECYCLE_STATES = ("starting", "ready", "draining", "stopped", "failed")
DISPOSITIONS = ("answered", "no_answer", "busy", "failed", "cancelled", "congestion")
RTP_DIRECTIONS = ("a_to_b", "b_to_a")
SETUP_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0)
JITTER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25)
TRANSACTION_TYPES = ("ict", "nict", "ist", "nist")
REGISTRAR_OUTCOMES = ("registrations", "unregistrations", "queries", "challenges",
                      "auth_failures", "forbidden", "rate_limited", "dropped", "rejected",
                      "errors", "locked_out")


class CallMetrics:
    """Push side for the calls/media layers: one report per finished call.

    ``observe_call(call)`` is registered as a B2BUA ``call_ended_hooks`` entry by the ops
    plane; it reads the call's CDR record (``call.record``: disposition, start and
    answer times) and its media session's ``summary()`` (per direction: packets, lost,
    jitter_ms). The finer methods exist for layers that report piecemeal.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.setup_time = Histogram(
            "pbx_call_setup_seconds", "Time from INVITE received to answer, answered calls",
            buckets=SETUP_BUCKETS, registry=registry)
        self.calls = Counter("pbx_calls", "Finished calls by disposition", ["disposition"],
                             registry=registry)
        for disposition in DISPOSITIONS:
            self.calls.labels(disposition)
        self.rtp_packets = Counter("pbx_rtp_packets", "RTP packets relayed, by direction",
                                   ["direction"], registry=registry)
        self.rtp_lost = Counter("pbx_rtp_packets_lost", "RTP packets lost (sequence gaps), "
                                "by direction", ["direction"], registry=registry)
        for direction in RTP_DIRECTIONS:
            self.rtp_packets.labels(direction)
            self.rtp_lost.labels(direction)
        self.rtp_jitter = Histogram(
            "pbx_rtp_jitter_seconds", "Interarrival jitter per RTP stream at its end "
            "(RFC 3550 §6.4.1)", buckets=JITTER_BUCKETS, registry=registry)
        # Media address learning (pbx.media.relay): sources learnt other than the
        # signalled one, NAT rebindings followed, and packets not relayed by reason
        # (a fixed label set: pbx.media.REJECT_REASONS).
        self.rtp_latched = Counter("pbx_rtp_latched", "RTP/RTCP sockets latched onto a "
                                   "source other than the one signalled in SDP",
                                   registry=registry)
        self.rtp_rebinds = Counter("pbx_rtp_rebinds", "NAT rebindings followed (same "
                                   "SSRC, continuing sequence, new address)",
                                   registry=registry)
        self.rtp_rejected = Counter("pbx_rtp_rejected_packets", "RTP/RTCP packets not "
                                    "relayed, by reason", ["reason"], registry=registry)
        for reason in REJECT_REASONS:
            self.rtp_rejected.labels(reason)
        self.hook_errors = 0

    def call_setup(self, seconds: float) -> None:
        self.setup_time.observe(max(0.0, seconds))

    def call_ended(self, disposition: str) -> None:
        label = disposition.strip().lower().replace(" ", "_") or "unknown"
        self.calls.labels(label).inc()

    def rtp_stream(self, direction: str, *, packets: int = 0, lost: int = 0,
                   jitter_seconds: float | None = None) -> None:
        """Totals of one RTP direction when its session closes."""
        self.rtp_packets.labels(direction).inc(max(0, int(packets)))
        self.rtp_lost.labels(direction).inc(max(0, int(lost)))
        if jitter_seconds is not None and packets:
            self.rtp_jitter.observe(max(0.0, float(jitter_seconds)))

    def rtp_learning(self, *, latches: int = 0, rebinds: int = 0,
                     rejected: dict[str, int] | None = None) -> None:
        """Address-learning totals of one direction; unknown reasons are not exported."""
        self.rtp_latched.inc(max(0, int(latches)))
        self.rtp_rebinds.inc(max(0, int(rebinds)))
        for reason, count in (rejected or {}).items():
            if reason in REJECT_REASONS:
                self.rtp_rejected.labels(reason).inc(max(0, int(count)))

    def observe_call(self, call: Any) -> None:
        """A B2BUA ``call_ended_hooks`` entry; never raises into the calls layer."""
        try:
            record = getattr(call, "record", None)
            if record is not None:
                self.call_ended(str(getattr(record, "disposition", "unknown")))
                start, answer = (getattr(record, "start_time", None),
                                 getattr(record, "answer_time", None))
                if start is not None and answer is not None:
                    self.call_setup(float(answer) - float(start))
            media = getattr(call, "media", None)
            summary = media.summary() if media is not None and hasattr(media, "summary") \
                else getattr(record, "qos", None)
            for direction in RTP_DIRECTIONS:
                stats = (summary or {}).get(direction) if isinstance(summary, dict) else None
                if stats:
                    jitter = stats.get("jitter_ms")
                    self.rtp_stream(direction, packets=stats.get("packets", 0),
                                    lost=stats.get("lost", 0),
                                    jitter_seconds=None if jitter is None else jitter / 1000)
                    self.rtp_learning(latches=stats.get("latches", 0),
                                      rebinds=stats.get("rebinds", 0),
                                      rejected=stats.get("rejected") or {})
        except Exception:  # metrics must never break a call's teardown
            self.hook_errors += 1
            log.exception("call metrics: could not read a finished call")


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _split_sip(counter: Any) -> tuple[dict[str, int], dict[str, int]]:
    """``transport.stats.received``/``sent`` hold methods and status codes in one Counter.

    Both label sets are bounded whatever the counter holds: unknown methods count as
    ``other`` (:func:`pbx.sip.method_label`), codes outside 100-699 as ``other``.
    """
    requests: dict[str, int] = {}
    responses: dict[str, int] = {}
    for key, count in dict(counter or {}).items():
        text = str(key)
        if text.isdigit():
            label = status_label(text)
            responses[label] = responses.get(label, 0) + int(count)
        else:
            label = method_label(text)
            requests[label] = requests.get(label, 0) + int(count)
    return requests, responses


class PBXCollector(Collector):
    """Reads the PBX's own counters at scrape time."""

    def __init__(self, view: ServiceView, health: HealthMonitor) -> None:
        self.view = view
        self.health = health

    def collect(self) -> Iterator[Metric]:
        yield from self._health()
        yield from self._sip()
        yield from self._transactions()
        yield from self._registrar()
        yield from self._gc()

    def _health(self) -> Iterator[Metric]:
        view, health = self.view, self.health
        live, ready = health.liveness(), health.readiness()
        overall = health.overall(live, ready)
        yield _gauge("pbx_health", "1 when live and ready (healthy or degraded), else 0",
                     1.0 if live.ok and ready.ok else 0.0)
        status = GaugeMetricFamily("pbx_health_status", "Overall health, one-hot",
                                   labels=["status"])
        for name in ("healthy", "degraded", "unhealthy"):
            status.add_metric([name], 1.0 if overall == name else 0.0)
        yield status
        yield _gauge("pbx_live", "1 when the reactor turns in time", float(live.ok))
        yield _gauge("pbx_ready", "1 when the node takes new calls", float(ready.ok))
        state = GaugeMetricFamily("pbx_lifecycle_state", "Lifecycle state, one-hot",
                                  labels=["state"])
        current = view.lifecycle.state
        for name in LIFECYCLE_STATES:
            state.add_metric([name], 1.0 if current == name else 0.0)
        yield state
        yield _gauge("pbx_uptime_seconds", "Seconds since the process started",
                     health.uptime())
        yield _gauge("pbx_reactor_lag_seconds", "How late the reactor heartbeat ran",
                     health.heartbeat.lag())
        yield _gauge("pbx_active_calls", "Calls up now", view.active_calls())
        yield _gauge("pbx_registered_extensions", "Extensions (AORs) with bindings",
                     view.registered_extensions())
        yield _gauge("pbx_registration_bindings", "Contact bindings held",
                     view.binding_count())
        resources = health.resources.sample()
        yield _gauge("pbx_system_cpu_percent", "Host CPU use in percent",
                     resources["cpu_percent"])
        yield _gauge("pbx_system_memory_percent", "Host memory use in percent",
                     resources["memory_percent"])
        yield _gauge("pbx_system_disk_percent", "Disk use of the data directory in percent",
                     resources["disk_percent"])
        db = health.database.last
        yield _gauge("pbx_database_up", "1 when the database is connected and answers",
                     float(health.database.up().ok))
        yield _gauge("pbx_database_ping_seconds", "Latency of the last database ping",
                     db.latency if db is not None and db.latency is not None else 0.0)

    def _sip(self) -> Iterator[Metric]:
        stats = getattr(self.view.transport, "stats", None)
        in_req, in_resp = _split_sip(getattr(stats, "received", None))
        out_req, out_resp = _split_sip(getattr(stats, "sent", None))
        requests = CounterMetricFamily("pbx_sip_requests", "SIP requests by direction and "
                                       "method", labels=["direction", "method"])
        responses = CounterMetricFamily("pbx_sip_responses", "SIP responses by direction "
                                        "and status code", labels=["direction", "code"])
        for direction, reqs, resps in (("in", in_req, in_resp), ("out", out_req, out_resp)):
            for method, count in sorted(reqs.items()):
                requests.add_metric([direction, method], count)
            for code, count in sorted(resps.items()):
                responses.add_metric([direction, code], count)
        yield requests
        yield responses
        dropped = CounterMetricFamily("pbx_sip_messages_dropped", "SIP messages dropped by "
                                      "the transport, by reason", labels=["reason"])
        for reason, count in sorted(dict(getattr(stats, "dropped", None) or {}).items()):
            dropped.add_metric([str(reason)], int(count))
        yield dropped
        yield CounterMetricFamily("pbx_sip_bad_requests_answered", "Unparseable requests "
                                  "answered with 4xx/5xx",
                                  value=int(getattr(stats, "bad_requests_answered", 0)))
        refused = CounterMetricFamily("pbx_sip_connections_refused", "TCP/TLS connections "
                                      "refused (caps, blocked sources), by reason",
                                      labels=["reason"])
        for reason, count in sorted(dict(getattr(stats, "connections_refused", None)
                                         or {}).items()):
            refused.add_metric([str(reason)], int(count))
        yield refused
        connections = GaugeMetricFamily("pbx_sip_open_connections", "Open SIP stream "
                                        "connections, by transport", labels=["transport"])
        counts = getattr(self.view.transport, "connection_counts", None)
        for kind, count in sorted((counts() if counts is not None else {}).items()):
            connections.add_metric([str(kind)], float(count))
        yield connections
        sockets = GaugeMetricFamily("pbx_sip_listening_sockets", "SIP sockets bound",
                                    labels=["transport"])
        for sock in self.view.sip_sockets():
            sockets.add_metric([str(sock["transport"])], 1.0)
        yield sockets

    def _transactions(self) -> Iterator[Metric]:
        txns = self.view.transactions
        stats = getattr(txns, "stats", None)
        created = CounterMetricFamily("pbx_sip_transactions_created", "SIP transactions "
                                      "created, by type", labels=["type"])
        ended = CounterMetricFamily("pbx_sip_transactions_terminated", "SIP transactions "
                                    "ended, by type and outcome", labels=["type", "outcome"])
        retrans = CounterMetricFamily("pbx_sip_retransmissions", "SIP retransmissions by "
                                      "transaction type and direction",
                                      labels=["type", "direction"])
        made = dict(getattr(stats, "created", None) or {})
        terminated = dict(getattr(stats, "terminated", None) or {})
        sent = dict(getattr(stats, "retransmissions_sent", None) or {})
        received = dict(getattr(stats, "retransmissions_received", None) or {})
        for kind in TRANSACTION_TYPES:
            created.add_metric([kind], int(made.get(kind, 0)))
            outcomes = dict(terminated.get(kind) or {})
            for outcome in sorted({"completed", "timeout", "transport_error", *outcomes}):
                ended.add_metric([kind, outcome], int(outcomes.get(outcome, 0)))
            retrans.add_metric([kind, "out"], int(sent.get(kind, 0)))
            retrans.add_metric([kind, "in"], int(received.get(kind, 0)))
        yield created
        yield ended
        yield retrans
        active = GaugeMetricFamily("pbx_sip_transactions_active", "Live SIP transactions by "
                                   "type and state", labels=["type", "state"])
        counts = getattr(txns, "counts", None)
        for kind, states in sorted((counts or {}).items()):
            for state, count in sorted(states.items()):
                active.add_metric([kind, state], count)
        yield active
        for name, doc in (("stray_responses", "Responses matching no client transaction"),
                          ("stray_acks", "ACKs passed to the transaction user"),
                          ("dropped", "Messages the transaction layer dropped"),
                          ("merged_requests", "Merged requests answered 482 "
                           "(RFC 3261 §8.2.2.2)")):
            yield CounterMetricFamily(f"pbx_sip_transactions_{name}", doc,
                                      value=int(getattr(stats, name, 0)))
        overloaded = CounterMetricFamily("pbx_sip_transactions_overloaded", "Requests "
                                         "refused because the transaction table was full",
                                         labels=["type"])
        refused = dict(getattr(stats, "overloaded", None) or {})
        for kind in TRANSACTION_TYPES:
            overloaded.add_metric([kind], int(refused.get(kind, 0)))
        yield overloaded

    def _registrar(self) -> Iterator[Metric]:
        reg = getattr(self.view.registrar, "stats", None)
        values = dict(reg.as_dict()) if reg is not None else {}
        registrations = CounterMetricFamily("pbx_registrar_requests", "REGISTER requests "
                                            "by outcome", labels=["outcome"])
        for outcome in sorted({*REGISTRAR_OUTCOMES, *values}):
            registrations.add_metric([outcome], int(values.get(outcome, 0)))
        yield registrations
        guard_stats = getattr(self.view.guard, "stats", None)
        guard = dict(guard_stats.as_dict()) if guard_stats is not None else {}
        yield CounterMetricFamily("pbx_auth_failures", "Failed digest authentications "
                                  "(wrong password or unknown user)",
                                  value=int(guard.get("auth_failures", 0)))
        yield CounterMetricFamily("pbx_blocked_requests", "Requests refused from blocked "
                                  "sources", value=int(guard.get("blocked_requests", 0)))
        yield CounterMetricFamily("pbx_source_blocks", "Times a source was blocked after "
                                  "repeated failures", value=int(guard.get("blocks_started", 0)))
        yield CounterMetricFamily("pbx_sip_rate_limited_requests", "Requests dropped by "
                                  "the per-source rate limit",
                                  value=int(guard.get("rate_limited", 0)))
        yield _gauge("pbx_blocked_sources", "Sources blocked now",
                     int(guard.get("currently_blocked", 0)))
        yield CounterMetricFamily("pbx_account_lockouts", "Times an account was locked "
                                  "after repeated failures from any sources",
                                  value=int(guard.get("account_lockouts", 0)))
        yield CounterMetricFamily("pbx_account_locked_attempts", "Authentications "
                                  "refused unchecked because the account was locked for "
                                  "the source", value=int(guard.get("locked_attempts", 0)))
        yield _gauge("pbx_locked_accounts", "Accounts locked now",
                     int(guard.get("currently_locked_accounts", 0)))


    def _gc(self) -> Iterator[Metric]:
        """Garbage collection: every collection stops the reactor (and the RTP relay of
        every call), so its pauses are exported, the largest one per generation included.
        Collections and unreachable objects come from the interpreter; pauses from the
        service's :class:`~pbx.service.GCPauses` (zero when it does not manage the GC)."""
        gen_labels = [str(g) for g in range(3)]
        collections = CounterMetricFamily("pbx_gc_collections", "Garbage collections, by "
                                          "generation (2: full)", labels=["generation"])
        collected = CounterMetricFamily("pbx_gc_collected_objects", "Unreachable objects "
                                        "(reference cycles) the collector freed, by "
                                        "generation", labels=["generation"])
        for label, stats in zip(gen_labels, gc.get_stats(), strict=False):
            collections.add_metric([label], int(stats.get("collections", 0)))
            collected.add_metric([label], int(stats.get("collected", 0)))
        yield collections
        yield collected
        pauses = getattr(getattr(getattr(self.view, "service", None), "gc", None),
                         "pauses", None)
        total = CounterMetricFamily("pbx_gc_pause_seconds", "Time the process stood still "
                                    "in garbage collections, by generation",
                                    labels=["generation"])
        largest = GaugeMetricFamily("pbx_gc_max_pause_seconds", "Longest garbage "
                                    "collection pause since start, by generation",
                                    labels=["generation"])
        for g, label in enumerate(gen_labels):
            total.add_metric([label], float(pauses.pause_total[g]) if pauses else 0.0)
            largest.add_metric([label], float(pauses.max_pause[g]) if pauses else 0.0)
        yield total
        yield largest


class MetricsExporter:
    """The private registry: the live collector plus the push-side call metrics."""

    def __init__(self, view: ServiceView, health: HealthMonitor) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = PBXCollector(view, health)
        self.registry.register(self.collector)
        self.call_metrics = CallMetrics(self.registry)
        self.api_rate_limited = Counter("pbx_api_rate_limited_requests",
                                        "Admin API requests refused with 429",
                                        registry=self.registry)
        # Failed bearer-token attempts (a guesser shows here before the lockout bites).
        self.api_auth_failures = Counter("pbx_api_auth_failures",
                                         "Admin API requests with a missing or wrong "
                                         "bearer token", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
