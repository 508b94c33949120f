#!/usr/bin/env bash
# Install the project on a Ray node: a .venv in the checkout with the CPU build of torch, the
# project and its plugins (the same `make setup` as on a developer machine).
#
#   deploy/ray/install-node.sh            # in the checkout (the same commit on every node)
#
# Every node of the cluster needs the same Python minor version, the same Ray version and the
# same plugins installed: trials import the technique plugins through their entry points on
# whichever node runs them.
set -euo pipefail
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}"
command -v make >/dev/null || { echo "install-node.sh: needs make (and python3 with venv)" >&2; exit 1; }
make -C "$REPO" setup
"$REPO/.venv/bin/python" -c "import ray; print('ray', ray.__version__)"
"$REPO/.venv/bin/orchestrate" plugins   # the techniques trials on this node can use
