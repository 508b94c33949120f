# Shared by start-head.sh and start-worker.sh (sourced, not run).
# The project's checkout on this node, and its virtual environment (made by `make setup`).
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
RAY="${RAY:-$REPO/.venv/bin/ray}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"

if [ ! -x "$RAY" ]; then
    echo "no Ray at $RAY: install the project on this node first (deploy/ray/install-node.sh)" >&2
    exit 1
fi

# Trials write their stage and accuracy caches under $EDGE_ORCHESTRATOR_HOME of the Ray
# worker processes, which inherit it from `ray start`, not from the driver: say it here.
export EDGE_ORCHESTRATOR_HOME="${EDGE_ORCHESTRATOR_HOME:-$HOME/.local/share/edge-orchestrator}"
export RAY_USAGE_STATS_ENABLED=0
# Ray starts workers at nice 15 by default; a local device's agent (started by its lease
# actor on the head) would inherit it and be preempted during its timed runs.
export RAY_worker_niceness="${RAY_worker_niceness:-0}"

# Token authentication (Ray >= 2.52): every node and every driver (`orchestrate --ray-address`)
# needs RAY_AUTH_MODE=token and the same token, in ~/.ray/auth_token or the file named by
# $RAY_AUTH_TOKEN_PATH. The token is a shared secret; the traffic is not encrypted.
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
token_file="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"

temp_dir_args=()
if [ -n "${RAY_TMPDIR:-}" ]; then  # Ray's session folders (logs, sockets); default /tmp/ray
    mkdir -p "$RAY_TMPDIR"
    temp_dir_args=(--temp-dir="$RAY_TMPDIR")
fi
