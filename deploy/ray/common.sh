# Shared by start-head.sh and start-worker.sh (sourced, not run).
# The project's checkout on this node, and its virtual environment (made by `make setup`).
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
RAY="${RAY:-$REPO/.venv/bin/ray}"
NUM_CPUS="${NUM_CPUS:-$(nproc)}"

if [ ! -x "$RAY" ]; then
    echo "no Ray at $RAY: install the project on this node first (make -C $REPO setup, or deploy/ray/install-node.sh)" >&2
    exit 1
fi

# Trials write their stage and accuracy caches under $EDGE_ORCHESTRATOR_HOME of the Ray
# worker processes, which inherit it from `ray start`, not from the driver: say it here.
export EDGE_ORCHESTRATOR_HOME="${EDGE_ORCHESTRATOR_HOME:-$HOME/.local/share/edge-orchestrator}"
export RAY_USAGE_STATS_ENABLED=0

temp_dir_args=()
if [ -n "${RAY_TMPDIR:-}" ]; then  # Ray's session folders (logs, sockets); default /tmp/ray
    mkdir -p "$RAY_TMPDIR"
    temp_dir_args=(--temp-dir="$RAY_TMPDIR")
fi
