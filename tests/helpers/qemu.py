"""The arm64 sysroot of the QEMU user-mode device, built once per session (or skipped with the reason)."""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import pytest

CACHE_ENV = "EDGE_ORCHESTRATOR_QEMU_CACHE"
REGISTRIES = ("http://deb.debian.org/debian/dists/bookworm/InRelease", "https://pypi.org/simple/onnxruntime/")


def unreachable_registry() -> str | None:
    """Why the Debian archive or PyPI cannot be reached from here (so nothing can be built), or None."""
    for url in REGISTRIES:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10).close()
        except Exception as exc:  # noqa: BLE001 - any failure means: cannot build here
            return f"{url} cannot be reached ({type(exc).__name__}: {exc})"
    return None


def sysroot_or_skip() -> Path:
    """The finished arm64 sysroot (cached under $EDGE_ORCHESTRATOR_QEMU_CACHE when set), or a skip with the reason."""
    from orchestrator.emulation.sysroot import (
        SysrootDownloadError,
        SysrootRecipe,
        build_sysroot,
        default_sysroot_dir,
        read_manifest,
    )
    from orchestrator.emulation.user import qemu_binary

    if qemu_binary() is None:
        pytest.skip("qemu-aarch64-static is not installed (apt-get install qemu-user-static)")
    recipe = SysrootRecipe()
    cache = os.environ.get(CACHE_ENV)
    dest = Path(cache) / f"sysroot-{recipe.key()}" if cache else default_sysroot_dir(recipe)
    if read_manifest(dest) is None:
        reason = unreachable_registry()
        if reason:
            pytest.skip(f"cannot build the arm64 sysroot: {reason}")
    try:
        return build_sysroot(dest, recipe)
    except SysrootDownloadError as exc:
        reason = unreachable_registry()
        if reason:
            pytest.skip(f"cannot build the arm64 sysroot: {reason}")
        raise AssertionError(f"sysroot build failed with the registries reachable: {exc}") from exc
