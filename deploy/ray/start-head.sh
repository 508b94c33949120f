#!/usr/bin/env bash
# Start the Ray head on the machine that runs `orchestrate` (it holds the device registry,
# the run store, the measurement cache and the network path to the devices).
#
#   deploy/ray/start-head.sh [extra `ray start` flags, e.g. --block]
#
# Environment: NUM_CPUS (default: all cores; trials use 1 CPU each), RAY_PORT (6379),
# RAY_TMPDIR (Ray's session folder, default /tmp/ray), EDGE_ORCHESTRATOR_HOME, REPO.
# The dashboard listens on 127.0.0.1 only (reach it with `ssh -L 8265:127.0.0.1:8265 head`).
# The Ray port must be reachable from the workers and nowhere else: Ray has no authentication.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
RAY_PORT="${RAY_PORT:-6379}"

"$RAY" start --head --port="$RAY_PORT" --num-cpus="$NUM_CPUS" --dashboard-host=127.0.0.1 \
    --disable-usage-stats "${temp_dir_args[@]}" "$@"

echo "head started; workers join with: deploy/ray/start-worker.sh $(hostname -I 2>/dev/null | awk '{print $1}'):$RAY_PORT"
echo "search on the cluster with:       orchestrate --profile P --ray-address 127.0.0.1:$RAY_PORT   (on this machine)"
