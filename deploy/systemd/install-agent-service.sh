#!/bin/sh
# Install the agent's systemd user unit for this login, on the device:
#   sh install-agent-service.sh [PYTHON] [REMOTE_DIR]
# PYTHON: the device's Python with numpy and onnxruntime (default: python3 on PATH);
# REMOTE_DIR: the agent's folder, as registered with --remote-dir (default: ~/.edge-orchestrator).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=$(command -v "${1:-python3}")
remote_dir=${2:-$HOME/.edge-orchestrator}
case "$remote_dir" in /*) ;; *) remote_dir=$HOME/$remote_dir ;; esac
if [ ! -e "$remote_dir/agent.pyz" ]; then
    echo "no $remote_dir/agent.pyz yet: run 'orchestrate deploy' to this device first" >&2
    exit 1
fi
units=${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user
mkdir -p "$units"
sed -e "s|^ExecStart=.*|ExecStart=$python $remote_dir/agent.pyz watch --root $remote_dir --interval 3600|" \
    "$here/edge-agent.service" > "$units/edge-agent.service"
systemctl --user daemon-reload
systemctl --user enable --now edge-agent.service
if ! loginctl enable-linger "$(id -un)" 2>/dev/null; then
    echo "note: 'sudo loginctl enable-linger $(id -un)' lets the service run without anyone logged in"
fi
systemctl --user --no-pager status edge-agent.service | head -n 5
