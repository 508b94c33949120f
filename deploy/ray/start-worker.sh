#!/usr/bin/env bash
# Join a worker node to the Ray head: it runs compression trials (1 CPU each), never device leases.
#
#   deploy/ray/start-worker.sh HEAD_IP:6379 [extra `ray start` flags, e.g. --block]
#
# Environment: NUM_CPUS (default: all cores), RAY_TMPDIR, EDGE_ORCHESTRATOR_HOME (this node's
# stage and accuracy caches), REPO. Stop with `ray stop` (on a machine that runs no other Ray).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 HEAD_IP:PORT [ray start flags]" >&2
    exit 2
fi
HEAD="$1"; shift
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

"$RAY" start --address="$HEAD" --num-cpus="$NUM_CPUS" --disable-usage-stats "${temp_dir_args[@]}" "$@"
