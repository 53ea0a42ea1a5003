#!/bin/sh
# Daily health check of one PBX node: scripts/daily_health_check.sh [BASE_URL]
#
# Checks liveness, readiness, the detailed health report and a metrics sanity pass, and
# prints one line per check. Meant for cron or a systemd timer; mail/alert on non-zero.
# Exit codes: 0 healthy, 1 degraded (warnings only: resources over threshold),
#             2 unhealthy or unreachable.
# Needs curl; uses python3 (if present) to read the JSON report, grep otherwise.
set -eu

BASE_URL=${1:-${PBX_BASE_URL:-http://127.0.0.1:8080}}
BASE_URL=${BASE_URL%/}
TIMEOUT=${PBX_CHECK_TIMEOUT:-10}
status=0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT INT TERM

say() { printf '%s\n' "$*"; }
worse() { if [ "$1" -gt "$status" ]; then status=$1; fi; }

# http_get PATH OUTFILE -> prints the HTTP status code ("000" when unreachable)
http_get() {
    curl -s -o "$2" -w '%{http_code}' --max-time "$TIMEOUT" "$BASE_URL$1" 2>/dev/null || true
}

say "PBX daily health check: $BASE_URL ($(date -u +%Y-%m-%dT%H:%M:%SZ))"

code=$(http_get /live "$tmp/live")
if [ "$code" = "000" ] || [ -z "$code" ]; then
    say "live: FAIL (cannot reach $BASE_URL)"
    exit 2
fi
if [ "$code" = "200" ]; then say "live: ok"; else say "live: FAIL (HTTP $code)"; worse 2; fi

code=$(http_get "/ready?verbose" "$tmp/ready")
if [ "$code" = "200" ]; then
    say "ready: ok"
else
    say "ready: FAIL (HTTP $code): $(tr '\n' ' ' < "$tmp/ready")"
    worse 2
fi

code=$(http_get /api/health/detailed "$tmp/detailed.json")
if [ "$code" != "200" ] && [ "$code" != "503" ]; then
    say "detailed health: FAIL (HTTP $code)"
    worse 2
else
    if command -v python3 >/dev/null 2>&1; then
        overall=$(python3 - "$tmp/detailed.json" <<'EOF'
import json, sys
report = json.load(open(sys.argv[1], encoding="utf-8"))
checks = report["readiness"]["checks"]
res = checks["system_resources"]
db = checks["database"]
print(report["overall_status"])
print(f"  database: {db['status']} ({db['type']}, {db['latency_ms']} ms)", file=sys.stderr)
print(f"  sip: {checks['sip_server']['status']} "
      f"({len(checks['sip_server']['sockets'])} sockets)", file=sys.stderr)
print(f"  resources: cpu {res['cpu_percent']}% memory {res['memory_percent']}% "
      f"disk {res['disk_percent']}%", file=sys.stderr)
for warning in res.get("warnings", []):
    print(f"  warning: {warning}", file=sys.stderr)
EOF
        ) 2>"$tmp/details" || overall=unknown
    else
        overall=$(sed -n 's/.*"overall_status": *"\([a-z]*\)".*/\1/p' "$tmp/detailed.json")
    fi
    case "$overall" in
        healthy) say "detailed health: ok (healthy)" ;;
        degraded) say "detailed health: WARN (degraded)"; worse 1 ;;
        *) say "detailed health: FAIL (${overall:-unreadable})"; worse 2 ;;
    esac
    [ -s "$tmp/details" ] && cat "$tmp/details"
fi

code=$(http_get /metrics "$tmp/metrics")
missing=""
for name in pbx_health pbx_uptime_seconds pbx_active_calls pbx_registered_extensions \
            pbx_system_cpu_percent pbx_system_memory_percent pbx_system_disk_percent; do
    grep -q "^$name " "$tmp/metrics" 2>/dev/null || missing="$missing $name"
done
if [ "$code" != "200" ]; then
    say "metrics: FAIL (HTTP $code)"
    worse 2
elif [ -n "$missing" ]; then
    say "metrics: FAIL (missing:$missing)"
    worse 2
elif ! grep -q '^pbx_health 1' "$tmp/metrics"; then
    say "metrics: FAIL (pbx_health is not 1)"
    worse 2
else
    say "metrics: ok ($(grep -c '^pbx_' "$tmp/metrics") samples)"
fi

case $status in
    0) say "RESULT: healthy" ;;
    1) say "RESULT: degraded (warnings above)" ;;
    *) say "RESULT: UNHEALTHY" ;;
esac
exit $status
