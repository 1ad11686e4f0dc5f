#!/usr/bin/env bash
# Advisory-mode check of pals-daemon on a real (possibly shared) GPU, run from the repository root.
#
#   1. starts pals-daemon --backend nvml --mode advise, waits for its admin socket, saves `palsctl status`
#      (text and --json), the pals_* Prometheus metrics and `nvidia-smi -q -d POWER`;
#   2. runs bench/h100_batch_sweep.py for each entry of $SWEEP_RUNS while the daemon runs (and
#      `palsctl watch` records the node power it sees moving), then takes the status and metrics again;
#   3. SIGTERMs the daemon and checks: exit status 0 within 5 s, enforced (and requested) power limit the same
#      before and after, no NVML setter call in the daemon's log or the sweep's output. Prints PASS or FAIL.
#
# READ-ONLY. The daemon runs in advise mode only (it never writes limits there: Daemon.enforcing is False), and
# every python3 started here imports a guard (bench/nvml_guard/sitecustomize.py) that replaces pynvml's
# nvmlDeviceSet*/Reset*/Clear* functions by ones that refuse and print "PALS-GUARD", so a setter call could
# neither happen nor go unnoticed. Never nvidia-smi -pl/-lgc/-pm/-ac here.
#
# Everything goes to $OUT (at most 8 flat files): sweep_<label>.json (keep to two labels not starting with
# "_"), status.txt, status.json, metrics.txt, nvidia_smi_power.txt, daemon.log, check.txt.
#
# Environment (defaults for the device): PYTHON=python3, SWEEP_PYTHON=$PYTHON, SWEEP_MODELS="mixtral llama",
# SWEEP_RUNS (see below), SWEEP_TIMEOUT=210 (s per run), SWEEP_BATCHES=1,4,16,64,128,256,
# SWEEP_EXTRA="" (e.g. --dry-run for a local smoke test), METRICS_PORT=10400 (the daemon's default; 9400 is
# dcgm-exporter's), PALS_TMP=/tmp/pals.
set -u

OUT=${OUT:-/tmp/pals_out}
PYTHON=${PYTHON:-python3}
SWEEP_PYTHON=${SWEEP_PYTHON:-$PYTHON}
SWEEP_MODELS=${SWEEP_MODELS:-"mixtral llama"}
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-210}
SWEEP_EXTRA=${SWEEP_EXTRA:-}
SWEEP_BATCHES=${SWEEP_BATCHES:-1,4,16,64,128,256}
# ';'-separated "label|flags" runs of the sweep (default: one per model in SWEEP_MODELS), e.g.
# SWEEP_RUNS="mixtral_graph|--model mixtral --cuda-graph;llama_graph|--model llama --cuda-graph"
if [ -z "${SWEEP_RUNS:-}" ]; then
    SWEEP_RUNS=""
    for m in $SWEEP_MODELS; do SWEEP_RUNS="$SWEEP_RUNS$m|--model $m;"; done
fi
METRICS_PORT=${METRICS_PORT:-10400}
PALS_TMP=${PALS_TMP:-/tmp/pals}
RUN_DIR=$PALS_TMP/run
STATE_DIR=$PALS_TMP/state
GUARD_DIR=$PWD/bench/nvml_guard
SOCK=$RUN_DIR/admin/admin.sock
DLOG=$PALS_TMP/daemon.log
CHECK=$OUT/check.txt
STATUS_TXT=$OUT/status.txt
METRICS=$OUT/metrics.txt
SMI=$OUT/nvidia_smi_power.txt

mkdir -p "$OUT" "$RUN_DIR" "$STATE_DIR"
rm -f "$SOCK" "$DLOG"
export PYTHONUNBUFFERED=1
FAILURES=()

say() { echo "$*" | tee -a "$CHECK"; }
fail() { FAILURES+=("$*"); say "FAIL: $*"; }

# --- the setter guard --------------------------------------------------------------------------------------
export PYTHONPATH="$GUARD_DIR:${PYTHONPATH:+$PYTHONPATH:}$PWD"

palsctl() { "$PYTHON" -m pals_daemon.cli.palsctl --socket "$SOCK" "$@"; }
scrape() {
    if command -v curl >/dev/null; then
        curl -s "127.0.0.1:$METRICS_PORT/metrics"
    else
        "$PYTHON" -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:$METRICS_PORT/metrics', timeout=5).read().decode())"
    fi
}
smi_power() {
    echo "===== nvidia-smi -q -d POWER ($1, $(date -u +%FT%TZ))" >>"$SMI"
    if command -v nvidia-smi >/dev/null; then nvidia-smi -q -d POWER >>"$SMI" 2>&1; else echo "(no nvidia-smi)" >>"$SMI"; fi
}
# Enforced and requested limit of every GPU, through pals_daemon's read path (read-only).
read_limits() {
    "$PYTHON" - <<'EOF'
from pals_daemon.gpu.nvml import NvmlBackend

b = NvmlBackend()
try:
    print(" ".join(f"gpu{d.identity.index}:enforced={r.enforced_limit_mw}mW,requested={r.requested_limit_mw}mW"
                   for d in b.open() for r in [d.read()]))
finally:
    b.close()
EOF
}
snapshot() {
    echo "===== palsctl status ($1, $(date -u +%FT%TZ))" >>"$STATUS_TXT"
    palsctl status >>"$STATUS_TXT" 2>&1 || fail "palsctl status ($1) exited $?"
    palsctl status --json >"$PALS_TMP/status_$1.json" 2>>"$STATUS_TXT" || fail "palsctl status --json ($1) exited $?"
    echo "===== curl 127.0.0.1:$METRICS_PORT/metrics | grep ^pals_ ($1, $(date -u +%FT%TZ))" >>"$METRICS"
    scrape | grep '^pals_' >>"$METRICS" || fail "no pals_ metrics ($1)"
}

# --- 0. environment -------------------------------------------------------------------------------------------
{
    echo "===== environment ($(date -u +%FT%TZ))"
    uname -a
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PYTHON" -c "import sys, grpc, google.protobuf as pb, pynvml; print(sys.version.split()[0], 'grpcio', grpc.__version__, 'protobuf', pb.__version__, 'pynvml', getattr(pynvml, '__version__', '?'))"
} >>"$CHECK" 2>&1
smi_power before
LIMITS_BEFORE=$(read_limits 2>>"$CHECK") || fail "could not read the limits before"
say "limits before: $LIMITS_BEFORE"

# --- 1. the advisory daemon ----------------------------------------------------------------------------------
"$PYTHON" -m pals_daemon.cli.daemon_main --config /dev/null --backend nvml --mode advise \
    --runtime-dir "$RUN_DIR" --state-dir "$STATE_DIR" --engine-socket-group "" \
    --metrics-port "$METRICS_PORT" --log-level info >"$DLOG" 2>&1 &
DPID=$!
for _ in $(seq 1 300); do
    [ -S "$SOCK" ] && break
    kill -0 "$DPID" 2>/dev/null || break
    sleep 0.1
done
if [ ! -S "$SOCK" ]; then
    fail "daemon did not create $SOCK"
    cat "$DLOG" >>"$CHECK"
fi
sleep 1.5 # a few control ticks
snapshot before_sweep

# --- 2. the sweep while the daemon advises --------------------------------------------------------------------
( palsctl watch --interval 1 2>&1 | while IFS= read -r line; do echo "$(date -u +%T) $line"; done ) >"$PALS_TMP/watch.txt" &
WATCH_PID=$!
SWEEP_RC=0
IFS=';' read -r -a RUNS <<<"$SWEEP_RUNS"
for entry in "${RUNS[@]}"; do
    label=${entry%%|*}
    flags=${entry#*|}
    [ -n "$label" ] || continue
    say "===== sweep $label: $flags ($(date -u +%FT%TZ))"
    # shellcheck disable=SC2086 # flags and SWEEP_EXTRA are lists of flags
    timeout "$SWEEP_TIMEOUT" "$SWEEP_PYTHON" bench/h100_batch_sweep.py \
        --batches "$SWEEP_BATCHES" --out "$PALS_TMP/sweep_$label.json" $flags $SWEEP_EXTRA >>"$CHECK" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || { SWEEP_RC=$rc; fail "sweep $label exited $rc"; }
    # Labels starting with "_" are diagnostics: their table is in check.txt, their JSON stays behind.
    case $label in _*) ;; *) [ -f "$PALS_TMP/sweep_$label.json" ] && cp "$PALS_TMP/sweep_$label.json" "$OUT/" ;; esac
done
snapshot after_sweep
kill "$WATCH_PID" 2>/dev/null
pkill -P "$WATCH_PID" 2>/dev/null
wait "$WATCH_PID" 2>/dev/null
{
    echo "===== palsctl watch --interval 1 during the sweep (UTC time, node power as the daemon saw it)"
    cat "$PALS_TMP/watch.txt"
} >>"$STATUS_TXT"

# --- 3. SIGTERM, exit status, limits unchanged, no setter ----------------------------------------------------
kill -TERM "$DPID"
WAITED=0
for _ in $(seq 1 50); do
    kill -0 "$DPID" 2>/dev/null || break
    sleep 0.1
    WAITED=$((WAITED + 1))
done
if kill -0 "$DPID" 2>/dev/null; then
    fail "daemon still running 5 s after SIGTERM"
    kill -KILL "$DPID"
fi
wait "$DPID"
DRC=$?
say "daemon exit status $DRC, gone within $((WAITED / 10)).$((WAITED % 10)) s of SIGTERM"
[ "$DRC" -eq 0 ] || fail "daemon exit status $DRC, expected 0"
[ -S "$SOCK" ] && fail "admin socket left behind"

smi_power after
LIMITS_AFTER=$(read_limits 2>>"$CHECK") || fail "could not read the limits after"
say "limits after:  $LIMITS_AFTER"
if [ -n "$LIMITS_BEFORE" ] && [ "$LIMITS_BEFORE" = "$LIMITS_AFTER" ]; then
    say "PASS: enforced/requested limits unchanged"
else
    fail "limits changed or unreadable: before [$LIMITS_BEFORE] after [$LIMITS_AFTER]"
fi
SMI_BEFORE=$(sed -n '/(before/,/(after/p' "$SMI" | grep -E '^\s+(Current Power Limit|Requested Power Limit|Default Power Limit)' | sed 's/ \+/ /g')
SMI_AFTER=$(sed -n '/(after/,$p' "$SMI" | grep -E '^\s+(Current Power Limit|Requested Power Limit|Default Power Limit)' | sed 's/ \+/ /g')
if [ "$SMI_BEFORE" = "$SMI_AFTER" ]; then
    say "PASS: nvidia-smi power limits unchanged: $(echo "$SMI_AFTER" | tr '\n' ';')"
else
    fail "nvidia-smi power limits differ: before [$SMI_BEFORE] after [$SMI_AFTER]"
fi
SETTERS=$(grep -E -c 'PALS-GUARD|SetPowerManagementLimit|set_power_limit|restored to|[Ss]et(ting)? (the )?(power )?limit' "$DLOG")
say "daemon log lines: $(wc -l <"$DLOG"), setter-like lines: $SETTERS"
[ "$SETTERS" -eq 0 ] || fail "the daemon log mentions a setter"
GUARD_HITS=$(grep -c 'PALS-GUARD' "$CHECK")
[ "$GUARD_HITS" -eq 0 ] || fail "the guard blocked $GUARD_HITS setter call(s) in the sweep"
grep -q "mode advise" "$DLOG" && say "PASS: daemon logged 'mode advise'" || fail "daemon log lacks 'mode advise'"

# --- files --------------------------------------------------------------------------------------------------
"$PYTHON" - "$PALS_TMP" "$OUT/status.json" <<'EOF'
import json, pathlib, sys

tmp, out = pathlib.Path(sys.argv[1]), sys.argv[2]
doc = {}
for name in ("before_sweep", "after_sweep"):
    p = tmp / f"status_{name}.json"
    try:
        doc[name] = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        doc[name] = {"error": repr(exc)}
json.dump(doc, open(out, "w"), indent=2)
EOF
head -c 4000000 "$DLOG" >"$OUT/daemon.log"

if [ ${#FAILURES[@]} -eq 0 ]; then
    say "RESULT: PASS (advise mode, exit 0 within 5 s, limits unchanged, no setter call; sweep rc $SWEEP_RC)"
    exit 0
fi
say "RESULT: FAIL (${#FAILURES[@]}): ${FAILURES[*]}"
exit 1
