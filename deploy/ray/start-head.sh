#!/usr/bin/env bash
# Start the Ray head on the machine that runs `orchestrate` (it holds the device registry,
# the run store, the measurement cache and the network path to the devices).
#
#   deploy/ray/start-head.sh [extra `ray start` flags, e.g. --block]
#
# Environment: NUM_CPUS (default: all cores; trials use 1 CPU each), RAY_PORT (6379),
# RAY_TMPDIR (Ray's session folder, default /tmp/ray), EDGE_ORCHESTRATOR_HOME, REPO,
# RAY_AUTH_MODE (token; `disabled` turns authentication off), RAY_AUTH_TOKEN_PATH.
# With token authentication and no token yet, one is made (~/.ray/auth_token); copy it to
# every worker. The dashboard listens on 127.0.0.1 only (`ssh -L 8265:127.0.0.1:8265 head`).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RAY_PORT="${RAY_PORT:-6379}"

if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
    if [ -n "${RAY_AUTH_TOKEN_PATH:-}" ]; then
        mkdir -p "$(dirname "$token_file")"
        (umask 077; "$REPO/.venv/bin/python" -c "import secrets; print(secrets.token_hex(32))" >"$token_file")
    else
        "$RAY" get-auth-token --generate >/dev/null
    fi
    echo "made a Ray auth token in $token_file: copy it to every worker (same path, mode 600)"
fi

echo "starting the head; workers join with: deploy/ray/start-worker.sh $(hostname -I 2>/dev/null | awk '{print $1}'):$RAY_PORT"
echo "search on the cluster with: RAY_AUTH_MODE=$RAY_AUTH_MODE orchestrate --profile P --ray-address 127.0.0.1:$RAY_PORT"
# exec: with --block this process is Ray's own, and a SIGTERM to it stops this node's Ray (only).
exec "$RAY" start --head --port="$RAY_PORT" --num-cpus="$NUM_CPUS" --dashboard-host=127.0.0.1 \
    --disable-usage-stats "${temp_dir_args[@]}" "$@"
