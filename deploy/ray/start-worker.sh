#!/usr/bin/env bash
# Join a worker node to the Ray head: it runs compression trials (1 CPU each), never device leases.
#
#   deploy/ray/start-worker.sh HEAD_IP:6379 [extra `ray start` flags, e.g. --block]
#
# Environment: NUM_CPUS (default: all cores), RAY_TMPDIR, EDGE_ORCHESTRATOR_HOME (this node's
# stage and accuracy caches), REPO, RAY_AUTH_MODE (token), RAY_AUTH_TOKEN_PATH (default
# ~/.ray/auth_token: the head's token, copied here). Stop with `ray stop` (on a machine that
# runs no other Ray: it stops every Ray of this user).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 HEAD_IP:PORT [ray start flags]" >&2
    exit 2
fi
HEAD="$1"; shift
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
if [ "$RAY_AUTH_MODE" = token ] && [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token_file" ]; then
    echo "no Ray auth token at $token_file: copy the head's there (or set RAY_AUTH_MODE=disabled on every node)" >&2
    exit 1
fi

# exec: with --block this process is Ray's own, and a SIGTERM to it stops this node's Ray (only).
exec "$RAY" start --address="$HEAD" --num-cpus="$NUM_CPUS" --disable-usage-stats "${temp_dir_args[@]}" "$@"
