#!/bin/sh
# Install the system tools the test suite talks to (real peers, not fakes).
# As root, missing tools are installed with apt-get; otherwise we say what to run.
# With CI=true a tool that is still missing is a failure, never a silent skip.
set -u
# command -> Debian package
TOOLS="sipp:sip-tester openssl:openssl promtool:prometheus kamailio:kamailio baresip:baresip-core systemd-analyze:systemd espeak-ng:espeak-ng nginx:nginx-light"
missing=""
for entry in $TOOLS; do
    cmd=${entry%%:*}; pkg=${entry#*:}
    command -v "$cmd" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian packages:$missing"
    apt-get update -qq || echo "warning: apt-get update failed" >&2
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing || echo "warning: apt-get install failed" >&2
fi
status=0
for entry in $TOOLS; do
    cmd=${entry%%:*}; pkg=${entry#*:}
    if ! command -v "$cmd" >/dev/null 2>&1; then
        if [ "${CI:-}" = "true" ]; then
            echo "error: '$cmd' is missing (Debian package '$pkg'); CI needs it" >&2
            status=1
        else
            echo "warning: '$cmd' is missing; install it with: sudo apt-get install $pkg" >&2
        fi
    fi
done
exit $status
