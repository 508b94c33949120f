#!/usr/bin/env bash
# Try the cluster set-up on one machine: a Ray head and one worker node on 127.0.0.1, each with
# its own session folder, then `orchestrate --ray-address` with a tiny search (2 trials of
# graph-stage techniques), then both nodes stopped again.
#
#   deploy/ray/try-localhost.sh
#
# It stops only the two `ray start --block` processes it started (by pid; each takes its
# node's processes down with it), never `ray stop`, which would end every Ray on the machine.
# The cluster uses token authentication with a token of its own (in its temporary folder),
# so it neither reads nor makes ~/.ray/auth_token.
# Environment: EDGE_ORCHESTRATOR_HOME (default: a new temporary folder; the digits base model
# is then trained first, about 1.5 minutes on 2 cores), NUM_CPUS per node (default 1),
# RAY_PORT (default: a free port).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
RAY="$REPO/.venv/bin/ray"
WORK="$(mktemp -d /tmp/eo-ray-try-XXXXXX)"
export EDGE_ORCHESTRATOR_HOME="${EDGE_ORCHESTRATOR_HOME:-$WORK/state}"
export RAY_USAGE_STATS_ENABLED=0
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$WORK/auth_token"
(umask 077; "$REPO/.venv/bin/python" -c "import secrets; print(secrets.token_hex(32))" >"$RAY_AUTH_TOKEN_PATH")
NUM_CPUS="${NUM_CPUS:-1}"
RAY_PORT="${RAY_PORT:-$("$REPO/.venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
pids=()

stop_nodes() {
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    echo "stopped the head and the worker (logs in $WORK)"
}
trap stop_nodes EXIT
trap "exit 130" INT TERM

echo "head on 127.0.0.1:$RAY_PORT, session folders and logs in $WORK"
"$RAY" start --head --block --node-ip-address=127.0.0.1 --port="$RAY_PORT" --num-cpus="$NUM_CPUS" \
    --include-dashboard=false --disable-usage-stats --temp-dir="$WORK/head" >"$WORK/head.log" 2>&1 &
pids+=($!)
for _ in $(seq 30); do  # until the head answers
    timeout 30 "$RAY" status --address="127.0.0.1:$RAY_PORT" >/dev/null 2>&1 && break
    kill -0 "${pids[0]}" 2>/dev/null || { echo "the head did not start; see $WORK/head.log" >&2; exit 1; }
    sleep 2
done
"$RAY" start --block --address="127.0.0.1:$RAY_PORT" --node-ip-address=127.0.0.1 --num-cpus="$NUM_CPUS" \
    --disable-usage-stats --temp-dir="$WORK/worker" >"$WORK/worker.log" 2>&1 &
pids+=($!)
nodes=0
for _ in $(seq 30); do  # until both nodes are in
    kill -0 "${pids[1]}" 2>/dev/null || { echo "the worker did not start; see $WORK/worker.log" >&2; exit 1; }
    nodes=$(timeout 60 "$REPO/.venv/bin/python" - "127.0.0.1:$RAY_PORT" <<'PY' 2>/dev/null || echo 0
import logging, sys, ray
ray.init(address=sys.argv[1], logging_level=logging.ERROR, log_to_driver=False)
print(sum(1 for n in ray.nodes() if n["Alive"]))
PY
)
    [ "$nodes" = 2 ] && break
    sleep 2
done
echo "nodes alive: $nodes"
[ "$nodes" = 2 ] || { echo "the worker did not join; see $WORK/worker.log" >&2; exit 1; }

# A tiny profile: the x86-host profile with the graph-stage techniques and a short measurement.
"$REPO/.venv/bin/python" - "$REPO/device_profiles/x86-host.yaml" "$WORK/ray-try.yaml" <<'PY'
import sys, yaml
data = yaml.safe_load(open(sys.argv[1]))
data["name"] = "ray-try"
data["search"].update(techniques=["int8-dynamic", "fp16"], max_pipeline_length=1, trials=2, time_budget_s=600)
data["measurement"].update(warmup_runs=5, runs=40, time_budget_s=2)
yaml.safe_dump(data, open(sys.argv[2], "w"))
PY
"$REPO/.venv/bin/orchestrate" --profile "$WORK/ray-try.yaml" --trials 2 --out "$WORK/runs" \
    --ray-address "127.0.0.1:$RAY_PORT"
echo "orchestrate --ray-address: exit code 0; results in $WORK/runs"
