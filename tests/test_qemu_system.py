"""The full-system emulated device: an arm64 VM (Debian's kernel, busybox init, sshd) reached over SSH.

The image is built once (about 25 s to 45 s on 2 cores when the sysroot is cached, kept under
$EDGE_ORCHESTRATOR_QEMU_CACHE when set); a boot to SSH takes about 10 s on a quiet 2-core
machine, much longer under load. The slow tests skip with the reason when qemu-system-aarch64
is missing or the Debian archive / PyPI cannot be reached; the pieces' tests run everywhere.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import psutil
import pytest

from orchestrator.cli.main import main
from orchestrator.config.profile import load_profile
from orchestrator.devices.base import Device, SshTarget
from orchestrator.devices.registry import DeviceRegistry
from orchestrator.emulation.initramfs import modules_in_load_order, write_cpio
from orchestrator.emulation.sysroot import SysrootDownloadError, SysrootRecipe
from orchestrator.emulation.system_image import (
    GUEST_PYTHON,
    GUEST_USER,
    SystemImageRecipe,
    VmError,
    build_system_image,
    default_system_dir,
    qemu_system_binary,
    read_system_manifest,
)
from orchestrator.emulation.system_vm import QemuSystemVM
from tests.helpers import ROOT
from tests.helpers.qemu import unreachable_registry

RPI4 = ROOT / "device_profiles" / "rpi4.yaml"
TIMINGS: dict[str, float] = {}


# ------------------------------------------------------------------------ the pieces (fast)


def test_modules_load_dependencies_first_and_skip_built_in_ones(tmp_path):
    moddir = tmp_path / "6.1.0-test-arm64"
    (moddir / "kernel").mkdir(parents=True)

    def ko(name: str, depends: str = "", softdep: str = "") -> None:
        info = b"\x00license=GPL\x00depends=" + depends.encode() + b"\x00"
        if softdep:
            info += b"softdep=pre: " + softdep.encode() + b"\x00"
        (moddir / "kernel" / f"{name}.ko").write_bytes(b"\x7fELF" + info + b"name=" + name.encode() + b"\x00")

    ko("ext4", "jbd2,mbcache", softdep="crc32c")
    ko("jbd2")
    ko("mbcache")
    ko("crc32c_generic")
    ko("virtio_blk", "virtio,virtio_ring")
    ko("virtio-rng", "rng-core")
    (moddir / "modules.builtin").write_text("kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n"
                                            "kernel/drivers/char/hw_random/rng-core.ko\n")
    order = [p.name for p in modules_in_load_order(moddir, ("virtio_blk", "ext4", "virtio_rng", "9p"),
                                                    required=("virtio_blk", "ext4"))]
    assert order == ["virtio_blk.ko", "jbd2.ko", "mbcache.ko", "crc32c_generic.ko", "ext4.ko", "virtio-rng.ko"]
    with pytest.raises(Exception, match="virtio_net is neither built in"):
        modules_in_load_order(moddir, ("virtio_net",), required=("virtio_net",))


def test_cpio_is_newc_with_a_trailer(tmp_path):
    buf = io.BytesIO()
    write_cpio([("init", 0o100755, b"#!/bin/sh\n", 0), ("dev/console", 0o20600, b"", (5 << 8) | 1)], buf)
    data = buf.getvalue()
    assert data.startswith(b"070701") and data.count(b"070701") == 3 and b"TRAILER!!!\x00" in data
    assert len(data) % 4 == 0 and b"#!/bin/sh\n" in data


def test_image_key_follows_the_sysroot_and_what_goes_in():
    base = SystemImageRecipe()
    assert base.key() == SystemImageRecipe().key()
    assert SystemImageRecipe(packages=("openssh-server",)).key() != base.key()
    assert SystemImageRecipe(sysroot=SysrootRecipe(packages=("python3",))).key() != base.key()
    assert default_system_dir(base).name == f"system-{base.key()}"


def test_a_vm_without_a_finished_image_is_refused_in_one_line(tmp_path):
    if qemu_system_binary() is None:
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    with pytest.raises(VmError, match="is not a finished VM image"):
        QemuSystemVM(tmp_path, tmp_path / "run").start(timeout_s=1)


# ------------------------------------------------------------------------ the VM (slow)


@pytest.fixture(scope="session")
def system_image(state_home) -> Path:
    """The VM image, built once (cached under $EDGE_ORCHESTRATOR_QEMU_CACHE when set)."""
    if qemu_system_binary() is None:
        pytest.skip("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
    dest = default_system_dir()
    if read_system_manifest(dest) is None:
        reason = unreachable_registry()
        if reason:
            pytest.skip(f"cannot build the VM image: {reason}")
    start = time.monotonic()
    try:
        image = build_system_image(dest)
    except SysrootDownloadError as exc:
        reason = unreachable_registry()
        if reason:
            pytest.skip(f"cannot build the VM image: {reason}")
        raise AssertionError(f"VM image build failed with the registries reachable: {exc}") from exc
    TIMINGS["image_s"] = round(time.monotonic() - start, 1)
    return image


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
def test_vm_boots_answers_ssh_with_the_pinned_key_and_runs_the_agent(system_image, tmp_path, eo_tiny_onnx):
    from orchestrator.devices.ssh import SshTransport

    manifest = json.loads((system_image / "manifest.json").read_text())
    assert manifest["kernel_version"].endswith("-arm64") and "ext4.ko" in manifest["initramfs_modules"]
    vm = QemuSystemVM(system_image, tmp_path / "vm", "cortex-a72", cores=4, memory_mb=2048)
    start = time.monotonic()
    vm.start()
    TIMINGS["boot_to_ssh_s"] = round(time.monotonic() - start, 1)
    pid = vm.pid
    try:
        assert _alive(pid) and QemuSystemVM.attach(tmp_path / "vm").status()["running"]
        assert vm.host_key_fingerprint == manifest["host_key_fingerprint"]
        target = SshTarget(host="127.0.0.1", port=vm.port, user=GUEST_USER, host_key=vm.host_key,
                           key_path=str(vm.client_key), python=GUEST_PYTHON, connect_timeout_s=60)
        transport = SshTransport(Device(name="vm", transport="ssh", arch="aarch64", ssh=target))
        try:
            t0 = time.monotonic()
            info = transport.info()  # ships the agent first (its sha256 checked inside the VM)
            TIMINGS["agent_install_and_info_s"] = round(time.monotonic() - t0, 1)
            assert info["arch"] == "aarch64" and info["cpu_model"] == "ARM Cortex-A72" and info["cores"] == 4
            assert info["onnxruntime"] and "CPUExecutionProvider" in info["providers"]
            assert info["os"].startswith("Linux-6.1.0-") and info["hostname"] == "eo-arm64-vm"
            profile = load_profile(RPI4).profile.model_copy(deep=True)
            profile.measurement.warmup_runs, profile.measurement.runs = 2, 10
            profile.measurement.time_budget_s = 5.0
            t0 = time.monotonic()
            result = transport.bench(eo_tiny_onnx().SerializeToString(), profile)
            TIMINGS["bench_s"] = round(time.monotonic() - t0, 1)
            lat = result["latency_ms"]
            assert 0 < lat["p50"] <= lat["p99"] and result["runs"] >= 1
            TIMINGS["bench_p50_ms"] = lat["p50"]
        finally:
            transport.close()
        # a wrong host key is refused: the pin is the only key a connection accepts
        other = (tmp_path / "other.pub")
        os.system(f"ssh-keygen -q -t ed25519 -N '' -f {tmp_path / 'other'}")
        target.host_key = " ".join(other.read_text().split()[:2])
        from orchestrator.errors import HostKeyMismatch

        with pytest.raises(HostKeyMismatch):
            SshTransport(Device(name="vm", transport="ssh", arch="aarch64", ssh=target)).connect(retry=False)
    finally:
        assert vm.stop()
    assert not _alive(pid), "qemu-system-aarch64 still running after stop()"
    print(f"\nVM timings (load {os.getloadavg()[0]:.1f}): {json.dumps(TIMINGS)}")


@pytest.mark.slow
def test_devices_emulate_system_registers_an_ssh_device_and_remove_stops_it(system_image, capsys):
    assert main(["devices", "emulate", str(RPI4), "--mode", "system", "--name", "vm-rpi4"]) == 0
    out = capsys.readouterr().out
    assert "registered vm-rpi4" in out and "QEMU full-system VM" in out and "keeps running" in out
    device = DeviceRegistry().get("vm-rpi4")
    pid = device.extra["vm_pid"]
    try:
        assert device.transport == "ssh" and device.emulated_vm and not device.emulated
        assert device.host == "127.0.0.1" and device.user == "root" and device.host_key_fingerprint
        assert device.info["arch"] == "aarch64" and device.info["memory_mb"] >= 0.85 * 4096
        assert _alive(pid)
        assert main(["devices", "list", "--json"]) == 0
        listed = json.loads(capsys.readouterr().out)
        assert [d["emulated"] for d in listed if d["name"] == "vm-rpi4"] == [True]
        assert main(["devices", "probe", "vm-rpi4"]) == 0  # over SSH, pinned key
        assert "vm-rpi4: online, aarch64" in capsys.readouterr().out
    finally:
        assert main(["devices", "remove", "vm-rpi4"]) == 0
    assert "stopped" in capsys.readouterr().out
    assert not _alive(pid), "the VM is still running after devices remove"
    assert DeviceRegistry().list() == [] or "vm-rpi4" not in {d.name for d in DeviceRegistry().list()}
