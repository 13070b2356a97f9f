#!/usr/bin/env bash
# Screenshots with headless Chromium (Debian's `chromium` package; installed with apt-get when
# missing and running as root).
#
#   scripts/screenshot_report.sh REPORT.html OUT.png [HEIGHT]
#       Renders an `hpo-gpu report` HTML file (1280 px wide, HEIGHT px tall, default 2400).
#
#   scripts/screenshot_report.sh --dashboard STUDY.db OUT.png [PYTHON]
#       Starts optuna-dashboard (from PyPI, in PYTHON's environment, default .venv/bin/python) on
#       127.0.0.1 for the SQLite file, screenshots the study page, then stops the server.
#
# Chromium runs with networking features off and a throw-away profile; the report itself needs
# no network (everything is inline).
set -euo pipefail

die() { echo "screenshot_report.sh: $*" >&2; exit 1; }

ensure_chromium() {
    if command -v chromium >/dev/null 2>&1; then return; fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y chromium >/dev/null || { apt-get update >/dev/null && apt-get install -y chromium >/dev/null; }
    fi
    command -v chromium >/dev/null 2>&1 || die "chromium is not installed (apt-get install -y chromium)"
}

# shot URL OUT WIDTH HEIGHT [extra chromium flags...]
shot() {
    local url=$1 out=$2 width=$3 height=$4
    shift 4
    local profile
    profile=$(mktemp -d)
    timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
        --user-data-dir="$profile" --screenshot="$out" --window-size="$width,$height" "$@" "$url" \
        >/dev/null 2>&1 || true
    rm -rf "$profile"
    [ -s "$out" ] || die "chromium wrote no screenshot for $url"
    echo "wrote $out"
}

abspath() { (cd "$(dirname "$1")" && echo "$PWD/$(basename "$1")"); }

if [ "${1:-}" = "--dashboard" ]; then
    [ $# -ge 3 ] || die "usage: $0 --dashboard STUDY.db OUT.png [PYTHON]"
    db=$(abspath "$2"); out=$(abspath "$3"); python=${4:-.venv/bin/python}
    [ -f "$db" ] || die "$db: no such file"
    dashboard="$(dirname "$python")/optuna-dashboard"
    [ -x "$dashboard" ] || die "$dashboard not found (pip install optuna-dashboard into that environment)"
    ensure_chromium
    port=$((8300 + RANDOM % 500))
    log=$(mktemp)
    "$dashboard" "sqlite:///$db" --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
    server=$!
    trap 'kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; rm -f "$log"' EXIT
    for _ in $(seq 1 60); do
        if "$python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/api/studies', timeout=1)" 2>/dev/null; then
            break
        fi
        kill -0 "$server" 2>/dev/null || { cat "$log" >&2; die "optuna-dashboard exited"; }
        sleep 0.5
    done
    # The dashboard is a JavaScript app: give it virtual time to fetch the study and draw.
    shot "http://127.0.0.1:$port/dashboard/studies/1" "$out" 1400 1100 --virtual-time-budget=15000
    exit 0
fi

[ $# -ge 2 ] || die "usage: $0 REPORT.html OUT.png [HEIGHT]  |  $0 --dashboard STUDY.db OUT.png [PYTHON]"
report=$(abspath "$1"); out=$(abspath "$2"); height=${3:-2400}
[ -f "$report" ] || die "$report: no such file"
ensure_chromium
shot "file://$report" "$out" 1280 "$height"
