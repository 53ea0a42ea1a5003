"""The deployment kit (docs/deploy/) and the operations documents, checked for real.

Prometheus files go through promtool (config, rules, rule unit tests that must fail when an
alert is disabled); the systemd unit through ``systemd-analyze verify`` and its ExecStart
is run under a ``$NOTIFY_SOCKET`` as systemd would; the Kubernetes manifests are read with
PyYAML and their probes are called on a running PBX; nginx runs the shipped config in front
of a running PBX; the metric names used by alerts, the Grafana dashboard and the documents
must appear in a real scrape; the documents' commands marked ``sh test`` run against a
running PBX. With ``CI=true`` a missing tool fails instead of skipping.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import wave
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pbx.config import Settings
from pbx.ops.app import ROUTES
from pbx.service import EXIT_CONFIG
from tests.conftest import require_tool
from tests.integration.conftest import ROOT, PBXProcess, clean_env, start_pbx, write_config

pytestmark = pytest.mark.integration

DEPLOY = ROOT / "docs" / "deploy"
PROM = DEPLOY / "prometheus"
K8S = DEPLOY / "kubernetes"
UNIT = DEPLOY / "systemd" / "pbx.service"
NGINX = DEPLOY / "nginx" / "pbx.conf"
DASHBOARD = DEPLOY / "grafana" / "pbx-dashboard.json"
DOCS = [ROOT / "docs" / name for name in (
    "PRODUCTION_DEPLOYMENT_CHECKLIST.md", "PRODUCTION_OPERATIONS_RUNBOOK.md",
    "PRODUCTION_READINESS_SUMMARY.md", "ARCHITECTURE.md")]
TTS = ROOT / "scripts" / "generate_tts_prompts.py"
PBX_BIN = Path(sys.executable).with_name("pbx")
TOKEN = "Dk7vQ2mX9pL4wR8tZ3nB6cY1hF5jS0aGeUoKi"
API_RE = re.compile(r"listening: API HTTP on ([\d.]+):(\d+)")
# Series Prometheus makes itself, not the PBX.
PROMETHEUS_SERIES = {"up"}
REQUIRED_ALERTS = {
    "PBXDown": ("1m", "up"), "PBXNotReady": ("5m", "pbx_ready"),
    "PBXHighCPU": ("5m", "pbx_system_cpu_percent"),
    "PBXHighMemory": ("5m", "pbx_system_memory_percent"),
    "PBXDatabaseDown": (None, "pbx_database_up"),
    "PBXHighCallFailureRate": (None, "pbx_calls_total"),
    "PBXRegistrationFailures": (None, "pbx_registrar_requests_total"),
    "PBXBruteForceBlocked": (None, "pbx_source_blocks_total"),
}


# -- helpers --------------------------------------------------------------------------------------

def api_port(pbx: PBXProcess) -> int:
    match = API_RE.search(pbx.wait_for(API_RE.pattern))
    assert match
    return int(match.group(2))


def http_get(url: str, *, token: str | None = None, method: str = "GET",
             timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def stop(pbx: PBXProcess) -> None:
    if pbx.proc.poll() is None:
        pbx.proc.kill()
    pbx.proc.wait(10)


def poke_sip(port: int) -> None:
    """An OPTIONS and an unparseable datagram, so traffic-driven families have samples."""
    options = (f"OPTIONS sip:pbx@127.0.0.1:{port} SIP/2.0\r\n"
               "Via: SIP/2.0/UDP 127.0.0.1:9;rport;branch=z9hG4bK-deploykit\r\n"
               "Max-Forwards: 70\r\nFrom: <sip:probe@127.0.0.1>;tag=1\r\n"
               "To: <sip:pbx@127.0.0.1>\r\nCall-ID: deploykit@127.0.0.1\r\n"
               "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(3)
        sock.sendto(options, ("127.0.0.1", port))
        assert sock.recv(65535).startswith(b"SIP/2.0 200")
        sock.sendto(b"\x00\x01garbage", ("127.0.0.1", port))
    time.sleep(0.2)


def exported_names(text: str) -> set[str]:
    """Every series name a scrape can contain, also for families without samples yet."""
    suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                "histogram": ("_bucket", "_sum", "_count", "_created"),
                "summary": ("", "_sum", "_count", "_created"), "untyped": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


PROMQL_WORDS = {
    # functions and aggregations we may use
    "sum", "min", "max", "avg", "count", "rate", "irate", "increase", "delta", "deriv",
    "histogram_quantile", "topk", "bottomk", "abs", "clamp_min", "clamp_max", "vector",
    "label_values", "time", "absent", "changes", "resets", "sort", "round", "scalar",
    # keywords
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "bool", "offset", "le", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside label matchers, strings,
    grouping clauses and range selectors, minus functions and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    found = set(re.findall(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)", text))
    return {name for name in found if name.lower() not in PROMQL_WORDS}


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var.get("type") == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load((PROM / "alerts.yml").read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values (systemd allows repeated keys, configparser does not)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min|m)?", value.strip())
    assert match, value
    factor = {"ms": 0.001, "s": 1, "min": 60, "m": 60, None: 1}[match.group(2)]
    return float(match.group(1)) * factor


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                docs[doc["kind"]] = doc
    return docs


def configmap_settings() -> dict[str, Any]:
    return yaml.safe_load(k8s_docs()["ConfigMap"]["data"]["config.yml"])


def probe_paths(handler: str) -> set[str]:
    return {route.path for route in ROUTES if route.handler == handler}


@pytest.fixture(scope="module")
def running_pbx(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[PBXProcess, int]]:
    directory = tmp_path_factory.mktemp("deploy-pbx")
    pbx = start_pbx(directory, env={**clean_env(), "PBX_API__TOKEN": TOKEN})
    try:
        yield pbx, api_port(pbx)
    finally:
        stop(pbx)


@pytest.fixture(scope="module")
def scraped_names(running_pbx: tuple[PBXProcess, int]) -> set[str]:
    pbx, port = running_pbx
    poke_sip(pbx.sip_port)
    status, _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    names = exported_names(body.decode())
    assert "pbx_sip_requests_total" in names and "pbx_ready" in names
    return names


# -- Prometheus -----------------------------------------------------------------------------------

def test_prometheus_config_and_rules_pass_promtool() -> None:
    promtool = require_tool("promtool", "prometheus")
    for args in (["check", "config", str(PROM / "prometheus.yml")],
                 ["check", "rules", str(PROM / "alerts.yml")]):
        result = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((PROM / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["pbx"]["metrics_path"] == "/metrics"
    assert config["rule_files"] == ["alerts.yml"]


def test_alert_unit_tests_pass_and_every_alert_is_shown_firing() -> None:
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "test", "rules", str(PROM / "alerts_test.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text(encoding="utf-8"))
    fired = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]
             if case.get("exp_alerts")}
    quiet = {case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"]
             if not case.get("exp_alerts")}
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names, "every alert needs a test where it fires"
    assert quiet == names, "every alert needs a test where it stays quiet"


def test_alerts_required_by_the_product_have_their_thresholds() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for name, (duration, metric) in REQUIRED_ALERTS.items():
        assert name in rules, name
        assert metric in metric_names(rules[name]["expr"]), name
        if duration:
            assert rules[name]["for"] == duration, name
    health = Settings().health
    assert f"> {health.cpu_warn_percent:g}" in rules["PBXHighCPU"]["expr"]
    assert f"> {health.memory_warn_percent:g}" in rules["PBXHighMemory"]["expr"]
    assert "> 0.05" in rules["PBXHighCallFailureRate"]["expr"]
    assert "PBXAuthFailureFlood" in rules


@pytest.mark.parametrize("alert", sorted(rule["alert"] for rule in alert_rules()))
def test_alert_unit_tests_fail_when_the_alert_never_fires(alert: str, tmp_path: Path) -> None:
    """Mutation check: the unit tests really depend on each rule."""
    promtool = require_tool("promtool", "prometheus")
    data = yaml.safe_load((PROM / "alerts.yml").read_text(encoding="utf-8"))
    for group in data["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") == alert:
                rule["expr"] = "vector(1) > 2"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(data), encoding="utf-8")
    (tmp_path / "alerts_test.yml").write_text(
        (PROM / "alerts_test.yml").read_text(encoding="utf-8"), encoding="utf-8")
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr


def test_alert_metric_names_exist_in_a_real_scrape(scraped_names: set[str]) -> None:
    used = set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
    assert "pbx_calls_total" in used
    assert used - PROMETHEUS_SERIES <= scraped_names, sorted(used - scraped_names)


def test_metric_name_extraction_sees_a_misspelt_name() -> None:
    names = metric_names('sum by (instance) (rate(pbx_cals_total{a="b|c"}[5m])) / '
                         "histogram_quantile(0.9, sum by (le) (rate(x_bucket[$__rate_interval])))")
    assert names == {"pbx_cals_total", "x_bucket"}


# -- Grafana --------------------------------------------------------------------------------------

def test_dashboard_metric_names_exist_in_a_real_scrape(scraped_names: set[str]) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    used = set().union(*(metric_names(expr) for expr in exprs))
    assert used - PROMETHEUS_SERIES <= scraped_names, sorted(used - scraped_names)
    # the dashboard covers each area of the exporter
    for name in ("pbx_ready", "pbx_active_calls", "pbx_calls_total", "pbx_rtp_packets_total",
                 "pbx_sip_requests_total", "pbx_registrar_requests_total",
                 "pbx_auth_failures_total", "pbx_system_cpu_percent"):
        assert name in used, name


def test_dashboard_is_well_formed_and_its_queries_are_valid_promql(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "prometheus")
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {var["name"] for var in dashboard["templating"]["list"]}
    assert {"datasource", "instance"} <= variables
    for panel in dashboard["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    rules = [{"record": f"dashboard:expr_{i}",
              "expr": expr.replace("$__rate_interval", "5m").replace("$instance", ".*")}
             for i, expr in enumerate(dashboard_exprs())]
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [
        {"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = subprocess.run([promtool, "check", "rules", str(tmp_path / "rules.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# -- systemd --------------------------------------------------------------------------------------

def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze", "systemd")
    # verify checks that ExecStart exists: point it at this checkout's pbx command
    text = UNIT.read_text(encoding="utf-8").replace("/opt/pbx/.venv/bin/pbx", str(PBX_BIN))
    unit = tmp_path / "pbx.service"
    unit.write_text(text, encoding="utf-8")
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(unit) not in result.stdout + result.stderr, result.stdout + result.stderr
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace("Type=notify", "Type=notify\nNoSuchOption=1"),
                      encoding="utf-8")
    warned = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True,
                            timeout=60)
    assert "NoSuchOption" in warned.stdout + warned.stderr


def test_systemd_unit_matches_the_code() -> None:
    unit = parse_unit(UNIT)
    one = {key: values[-1] for key, values in unit.items()}
    assert one["Service.Type"] == "notify"
    assert one["Service.NotifyAccess"] == "main"
    assert one["Service.KillSignal"] == "SIGTERM"
    assert one["Service.Restart"] == "on-failure"
    assert one["Service.RestartPreventExitStatus"] == str(EXIT_CONFIG)
    assert one["Service.EnvironmentFile"] == "-/etc/pbx/.env"
    assert one["Service.ExecStart"].split()[1:] == ["run", "--config", "/etc/pbx/config.yml"]
    lifecycle = Settings().lifecycle
    assert seconds(one["Service.TimeoutStopSec"]) > lifecycle.drain_timeout + lifecycle.stop_timeout
    watchdog = seconds(one["Service.WatchdogSec"])
    assert watchdog / 2 > Settings().health.liveness_max_lag
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes"}.items():
        assert one[f"Service.{key}"] == value, key
    assert "/var/lib/pbx" in one["Service.ReadWritePaths"].split()
    # SIP 5060/5061 and the API 8080 are unprivileged ports (>= 1024): the unit grants no
    # capability at all (an empty bounding set)
    defaults = Settings()
    assert min(defaults.sip.port, defaults.sip.tls_port, defaults.api.port) >= 1024
    assert one["Service.CapabilityBoundingSet"] == ""
    assert "Service.AmbientCapabilities" not in one


def test_unit_exec_start_under_a_notify_socket_reports_ready_then_stopping(
        tmp_path: Path) -> None:
    """The unit's own command (``pbx run``, not twistd) as systemd runs it: READY=1 once
    ready, STOPPING=1 on the KillSignal, exit 0 well within TimeoutStopSec.
    (test_ops_api.py::test_sd_notify_ready_watchdog_and_stopping_from_the_real_pbx covers
    the watchdog.)"""
    unit = {key: values[-1] for key, values in parse_unit(UNIT).items()}
    config = write_config(tmp_path)
    argv = unit["Service.ExecStart"].replace("/opt/pbx/.venv/bin/pbx", str(PBX_BIN)) \
        .replace("/etc/pbx/config.yml", str(config)).split()
    kill = getattr(signal, unit["Service.KillSignal"])
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(path)
        listener.settimeout(20)
        proc = subprocess.Popen(argv, cwd=tmp_path, env={**clean_env(), "NOTIFY_SOCKET": path},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            seen = [listener.recv(4096).decode()]
            while not any("READY=1" in m for m in seen):
                seen.append(listener.recv(4096).decode())
            proc.send_signal(kill)
            while not any("STOPPING=1" in m for m in seen):
                seen.append(listener.recv(4096).decode())
            code = proc.wait(seconds(unit["Service.TimeoutStopSec"]))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert code == 0, proc.stdout.read() if proc.stdout else ""
    assert "STATUS=ready" in next(m for m in seen if "READY=1" in m)


# -- Kubernetes -----------------------------------------------------------------------------------

def test_kubernetes_manifests_are_consistent_with_the_code() -> None:
    docs = k8s_docs()
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Secret"} <= set(docs)
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]
    for selector in (deployment["spec"]["selector"]["matchLabels"], service["spec"]["selector"],
                     docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p for p in container["ports"]}
    config = configmap_settings()
    assert ports["api"]["containerPort"] == config["api"]["port"]
    assert (ports["sip-udp"]["containerPort"], ports["sip-udp"]["protocol"]) == (
        config["sip"]["port"], "UDP")
    assert (ports["sip-tcp"]["containerPort"], ports["sip-tcp"]["protocol"]) == (
        config["sip"]["port"], "TCP")
    # Service: SIP over UDP and TCP, and the API, each to a named container port
    by_protocol = {(p["protocol"], p["port"]) for p in service["spec"]["ports"]}
    assert {("UDP", 5060), ("TCP", 5060), ("TCP", 8080)} <= by_protocol
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in ports
        assert ports[port["targetPort"]]["protocol"] == port["protocol"]
    # probes on the API port, on the code's own liveness/readiness routes
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] in probe_paths("probe_live") and live["path"] == "/livez"
    assert ready["path"] in probe_paths("probe_ready") and ready["path"] == "/readyz"
    for probe in (live, ready):
        assert ports[probe["port"]]["containerPort"] == config["api"]["port"]
    # shutdown: preStop sleep + drain + stop fit in the grace period
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    lifecycle = config["lifecycle"]
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > sleep + lifecycle["drain_timeout"] + lifecycle["stop_timeout"]
    # secrets come from the Secret, by the environment names the PBX reads
    secret_keys = set(docs["Secret"]["stringData"])
    from_secret = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                   if "secretKeyRef" in e.get("valueFrom", {})}
    assert set(from_secret) == {"PBX_API__TOKEN", "PBX_DATABASE__URL", "PBX_AUTH__SECRET"}
    for name, ref in from_secret.items():
        assert ref["name"] == docs["Secret"]["metadata"]["name"]
        assert ref["key"] == name and name in secret_keys
    config_keys = {(section, key) for section, values in config.items()
                   if isinstance(values, dict) for key in values}
    assert not config_keys & {("api", "token"), ("database", "url"), ("auth", "secret")}
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert container["command"][-1] == f"{mount['mountPath']}/config.yml"


def test_configmap_config_validates_with_the_secret_in_the_environment(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(k8s_docs()["ConfigMap"]["data"]["config.yml"], encoding="utf-8")
    env = {**clean_env(), "PBX_API__TOKEN": TOKEN,
           "PBX_AUTH__SECRET": "Qw7Er4Ty1Ui8Op5As2Df9Gh6Jk3Lz0XcVb",
           "PBX_DATABASE__URL": "postgresql://pbx:Vx8Bn3Mq6Wt1Ry4Ue7Io@db.internal:5432/pbx",
           "PBX_SIP__EXTERNAL_IP": "192.0.2.10"}
    result = subprocess.run([str(PBX_BIN), "validate-config", "--config", str(config), "--json"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["valid"] and report["errors"] == []
    codes = {finding["code"] for finding in report["warnings"]}
    assert not codes & {"API_TOKEN_MISSING", "DB_SQLITE_IN_PRODUCTION", "AUTH_SECRET_MISSING",
                        "SERVER_EXTERNAL_IP_UNSET"}, codes
    # without the Secret, production mode refuses to start
    bare = subprocess.run([str(PBX_BIN), "validate-config", "--config", str(config)],
                          cwd=tmp_path, env=clean_env(), capture_output=True, text=True,
                          timeout=60)
    assert bare.returncode == EXIT_CONFIG


def test_manifest_probe_paths_answer_200_on_a_running_pbx(
        running_pbx: tuple[PBXProcess, int]) -> None:
    _, port = running_pbx
    (container,) = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"]
    for probe in ("livenessProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        status, headers, _ = http_get(f"http://127.0.0.1:{port}{path}")
        assert status == 200, (probe, path)
        assert headers.get("X-Frame-Options") == "DENY"
    assert http_get(f"http://127.0.0.1:{port}/no-such-probe")[0] == 404


# -- nginx ----------------------------------------------------------------------------------------

def _nginx_config(tmp_path: Path, upstream: int, http_port: int, https_port: int) -> Path:
    text = NGINX.read_text(encoding="utf-8")
    replacements = {
        "server 127.0.0.1:8080 ": f"server 127.0.0.1:{upstream} ",
        "    listen 80;\n": f"    listen 127.0.0.1:{http_port};\n",
        "    listen [::]:80;\n": "",
        "    listen 443 ssl http2;\n": f"    listen 127.0.0.1:{https_port} ssl http2;\n",
        "    listen [::]:443 ssl http2;\n": "",
        "/etc/nginx/tls/pbx.example.net.crt": str(tmp_path / "tls.crt"),
        "/etc/nginx/tls/pbx.example.net.key": str(tmp_path / "tls.key"),
        "/var/log/nginx/": f"{tmp_path}/",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    (tmp_path / "pbx.conf").write_text(text, encoding="utf-8")
    temp = tmp_path / "temp"
    temp.mkdir()
    main = tmp_path / "nginx.conf"
    main.write_text(
        "daemon off;\nworker_processes 1;\n"
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log warn;\n"
        "events { worker_connections 64; }\n"
        "http {\n"
        f"  access_log off;\n  client_body_temp_path {temp}/body;\n"
        f"  proxy_temp_path {temp}/proxy;\n  fastcgi_temp_path {temp}/fastcgi;\n"
        f"  uwsgi_temp_path {temp}/uwsgi;\n  scgi_temp_path {temp}/scgi;\n"
        f"  include {tmp_path}/pbx.conf;\n}}\n", encoding="utf-8")
    return main


def _free_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_nginx_config_passes_nginx_t_and_proxies_to_a_running_pbx(tmp_path: Path) -> None:
    nginx = require_tool("nginx", "nginx")
    openssl = require_tool("openssl", "openssl")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(tmp_path / "tls.key"), "-out", str(tmp_path / "tls.crt")],
                   check=True, capture_output=True, timeout=60)
    pbx = start_pbx(tmp_path, env={**clean_env(), "PBX_API__TOKEN": TOKEN})
    http_port, https_port = _free_tcp_port(), _free_tcp_port()
    main = _nginx_config(tmp_path, api_port(pbx), http_port, https_port)
    check = subprocess.run([nginx, "-t", "-c", str(main), "-p", str(tmp_path)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.Popen([nginx, "-c", str(main), "-p", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    context = ssl.create_default_context(cafile=str(tmp_path / "tls.crt"))

    def https(path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", https_port, context=context,
                                           timeout=5)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"}
                         if token else {})
            reply = conn.getresponse()
            return reply.status, dict(reply.getheaders()), reply.read()
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                status, headers, _ = https("/ready")
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    proc.stdout.read() if proc.stdout else ""
                time.sleep(0.1)
        assert status == 200
        assert headers["X-Content-Type-Options"] == "nosniff"   # the PBX's, passed on
        assert headers["Content-Security-Policy"].startswith("default-src 'none'")
        assert "max-age=" in headers["Strict-Transport-Security"]  # nginx's, TLS only
        assert https("/livez")[0] == 200
        status, _, body = https("/api/status", TOKEN)
        assert status == 200 and json.loads(body)
        assert https("/api/status")[0] == 401
        assert https("/metrics")[0] == 200                      # from loopback: allowed
        assert https("/elsewhere")[0] == 404
        plain = http_get(f"http://127.0.0.1:{http_port}/ready")
        assert plain[0] == 200
        moved = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        moved.request("GET", "/api/status")
        assert moved.getresponse().status == 301
        moved.close()
        # the PBX gone: the probe fails fast through nginx instead of hanging
        pbx.proc.send_signal(signal.SIGTERM)
        assert pbx.proc.wait(15) == 0
        started = time.monotonic()
        assert https("/ready")[0] == 502
        assert time.monotonic() - started < 3
    finally:
        proc.terminate()
        proc.wait(10)
        stop(pbx)


# -- voice prompts --------------------------------------------------------------------------------

def _run_tts(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(TTS), *args], cwd=cwd,
                          env=env or clean_env(), capture_output=True, text=True, timeout=120)


def _prompt_names() -> list[str]:
    import importlib.util

    spec = importlib.util.spec_from_file_location("generate_tts_prompts", TTS)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.PROMPTS)


def test_tts_prompts_are_8khz_mono_wavs_under_the_data_dir_and_idempotent(
        tmp_path: Path) -> None:
    require_tool("espeak-ng", "espeak-ng")
    config = write_config(tmp_path)
    first = _run_tts("--company", "Acme Widgets", "--config", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    directory = tmp_path / "var" / "prompts"
    names = _prompt_names()
    assert {"welcome", "not_available", "busy", "goodbye", "invalid_extension",
            "please_hold", "voicemail_greeting"} <= set(names)
    assert f"{len(names)} generated, 0 unchanged" in first.stdout
    before = {}
    for name in names:
        path = directory / f"{name}.wav"
        with wave.open(str(path), "rb") as wav:
            assert (wav.getframerate(), wav.getnchannels(), wav.getsampwidth()) == (8000, 1, 2)
            assert wav.getcomptype() == "NONE"
            frames = wav.getnframes()
            samples = array("h", wav.readframes(frames))
        assert 0.5 < frames / 8000 < 20, name
        assert max(abs(s) for s in samples) > 10_000, f"{name} is silent"
        before[name] = (path.read_bytes(), path.stat().st_mtime_ns)
    manifest = json.loads((directory / "prompts.json").read_text(encoding="utf-8"))
    assert "Acme Widgets" in manifest["prompts"]["welcome"]["text"]

    again = _run_tts("--company", "Acme Widgets", "--config", str(config))
    assert again.returncode == 0 and f"0 generated, {len(names)} unchanged" in again.stdout
    for name in names:
        path = directory / f"{name}.wav"
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before[name], name

    renamed = _run_tts("--company", "Globex", "--output-dir", str(directory))
    assert renamed.returncode == 0
    changed = {name for name in names
               if (directory / f"{name}.wav").read_bytes() != before[name][0]}
    assert changed == {"welcome", "goodbye"}
    (directory / "busy.wav").write_bytes(b"not a wav")
    repaired = _run_tts("--company", "Globex", "--output-dir", str(directory))
    assert "generated busy.wav" in repaired.stdout and "1 generated" in repaired.stdout


def test_tts_without_espeak_fails_with_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = _run_tts("--company", "Acme", "--output-dir", str(tmp_path / "out"),
                      env={**clean_env(), "PATH": str(empty)})
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "espeak-ng" in lines[0] and "Traceback" not in result.stderr
    assert not list((tmp_path / "out").glob("*.wav"))


# -- the documents --------------------------------------------------------------------------------

def _doc_text() -> str:
    return "\n".join(path.read_text(encoding="utf-8") for path in DOCS)


def test_architecture_links_every_diagram_and_describes_a_call() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for diagram in (ROOT / "docs" / "statecharts").glob("*.md"):
        assert f"(statecharts/{diagram.name})" in text, diagram.name
    assert "## Data flow of a call" in text


def test_docs_cite_tests_and_files_that_exist() -> None:
    text = _doc_text()
    cited = re.findall(r"(tests/[\w/]+\.py)(?:::(\w+))?", text)
    assert len({path for path, _ in cited}) >= 15
    for path, name in cited:
        source = ROOT / path
        assert source.is_file(), path
        if name:
            assert re.search(rf"def {name}\b", source.read_text(encoding="utf-8")), \
                f"{path}::{name}"
    for path in set(re.findall(r"\b((?:docs|scripts|statecharts)/[\w./-]+\.\w+)", text)):
        assert (ROOT / path).exists() or (ROOT / "docs" / path).exists(), path
    defined = set(re.findall(r"^(?:async )?def (test_\w+)", "\n".join(
        source.read_text(encoding="utf-8") for source in (ROOT / "tests").rglob("test_*.py")),
        re.M))
    named = set(re.findall(r"`(test_\w+)`", text))
    assert len(named) >= 10 and named - defined == set(), sorted(named - defined)


def _config_key_exists(dotted: str) -> bool:
    model: Any = Settings
    for part in dotted.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        model = annotation if isinstance(annotation, type) else None
    return True


def test_docs_name_only_existing_config_keys_env_vars_metrics_and_commands(
        scraped_names: set[str]) -> None:
    text = _doc_text()
    sections = "|".join(Settings.model_fields)
    keys = set(re.findall(rf"`((?:{sections})(?:\.[a-z_][a-z0-9_]*)+)`", text))
    assert len(keys) >= 10
    assert [key for key in sorted(keys) if not _config_key_exists(key)] == []
    env_names = set(re.findall(r"\bPBX_[A-Z0-9_]+\b", text)) - {"PBX_CONFIG",
                                                               "PBX_TEST_POSTGRES_DSN",
                                                               "PBX_BASE_URL",
                                                               "PBX_CHECK_TIMEOUT"}
    for name in env_names:
        dotted = name[len("PBX_"):].lower().replace("__", ".")
        assert _config_key_exists(dotted), name
    # family names (a histogram's base name) and `pbx_rtp_*`-style prefixes count too
    known = scraped_names | {re.sub(r"_(bucket|sum|count|total)$", "", n) for n in scraped_names}
    metrics = set(re.findall(r"\bpbx_[a-z0-9_]+\b(?!\.py)", text))
    unknown = {m for m in metrics if m not in known
               and not (m.endswith("_") and any(k.startswith(m) for k in known))}
    assert unknown == set()
    subcommands = {"run", "validate-config", "db", "extensions"}
    used = re.findall(r"(?:bin/|`)pbx ([a-z][a-z-]+)", text)
    assert len(used) >= 10 and set(used) <= subcommands, sorted(set(used) - subcommands)


TESTABLE = re.compile(r"^```sh test\n(.*?)^```", re.M | re.S)


def _testable_blocks() -> list[tuple[str, int, str]]:
    blocks = []
    for path in DOCS:
        if not path.exists():  # reported by the tests that read every document
            continue
        for i, match in enumerate(TESTABLE.finditer(path.read_text(encoding="utf-8"))):
            blocks.append((path.name, i, match.group(1)))
    return blocks


def test_docs_mark_commands_for_testing() -> None:
    counts = {name: 0 for name in ("PRODUCTION_DEPLOYMENT_CHECKLIST.md",
                                   "PRODUCTION_OPERATIONS_RUNBOOK.md")}
    for name, _, _ in _testable_blocks():
        counts[name] = counts.get(name, 0) + 1
    assert all(count >= 2 for count in counts.values()), counts


@pytest.mark.parametrize(("doc", "index", "script"), _testable_blocks(),
                         ids=[f"{d}#{i}" for d, i, _ in _testable_blocks()])
def test_doc_commands_run_against_a_real_pbx(doc: str, index: int, script: str,
                                            tmp_path: Path) -> None:
    """Blocks fenced as ``sh test`` run with bash -euo pipefail from the checkout, against
    a fresh PBX: the documented host layout is mapped onto the test's (the checkout for
    /opt/pbx, the test config for /etc/pbx/config.yml, its data dir for /var/lib/pbx, the
    PBX's ephemeral API and SIP ports for 8080 and 5060)."""
    config = write_config(tmp_path)
    pbx = start_pbx(tmp_path, env={**clean_env(), "PBX_API__TOKEN": TOKEN}, config=config)
    try:
        port = api_port(pbx)
        mapping = {"/opt/pbx/": f"{ROOT}/", "/opt/pbx": str(ROOT),
                   "/etc/pbx/config.yml": str(config), "/var/lib/pbx": str(tmp_path / "var"),
                   "127.0.0.1:8080": f"127.0.0.1:{port}", "localhost:8080": f"127.0.0.1:{port}",
                   "127.0.0.1:5060": f"127.0.0.1:{pbx.sip_port}"}
        for old, new in mapping.items():
            script = script.replace(old, new)
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                                env={**clean_env(), "PBX_API__TOKEN": TOKEN,
                                     "PATH": f"{Path(sys.executable).parent}:"
                                             f"{os.environ.get('PATH', '')}"},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{doc} block {index}:\n{script}\n" \
            f"{result.stdout}\n{result.stderr}"
    finally:
        stop(pbx)
