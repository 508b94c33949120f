"""The full-system emulated aarch64 device: a QEMU VM with Debian's arm64 kernel, reached over SSH.

What the image holds (built on this host; nothing runs under emulation while building):

- `vmlinuz`: Debian bookworm's arm64 kernel (`linux-image-arm64`, from bookworm-security when
  newer), downloaded by the same private apt configuration as the user-mode sysroot
  (orchestrator/qemu_build.py).
- `initrd.gz`: a small initramfs (newc cpio written here): busybox-static (arm64), the virtio,
  ext4 and 9p modules in load order (their dependencies read from each module's `.modinfo`:
  the kernel package ships no modules.dep, depmod makes it at install time), and an `/init` that
  loads them, mounts `/dev/vda` and switches root to it.
- `rootfs.ext4`: made with `mke2fs -d` from a folder holding the user-mode sysroot (python3,
  numpy, onnxruntime), openssh-server and its arm64 dependencies (`dpkg -x`), busybox's init
  with an inittab that mounts proc/sys/dev, brings eth0 up with QEMU user networking's address
  (10.0.2.15/24, gateway 10.0.2.2) and keeps sshd running (`UsePAM no`).
- `keys/`: the VM's ed25519 host key and a client key, both generated here with ssh-keygen;
  the host key's public half is what a registration pins (never trust on first use), the
  client's public half is the VM's root `authorized_keys`.

The image is cached next to the sysroot (`system-<hash of inputs>`), built in a temporary folder
and renamed into place under a lock; `manifest.json` marks it finished. Every VM boots it with
`snapshot=on`: the cached image is never written, so several VMs can share it, and what a VM
writes (the agent, models) is gone when it stops.

    python -m orchestrator.qemu_system build [DEST] [--force]
    python -m orchestrator.qemu_system start --dir RUN_DIR [--cpu cortex-a72 --cores 4 --memory 2048]
    python -m orchestrator.qemu_system status|stop --dir RUN_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.qemu_build import (
    MANIFEST,
    SysrootBuildError,
    SysrootDownloadError,
    SysrootRecipe,
    _locked,
    _merge_tree,
    _run,
    _usr_merge,
    apt_download,
    build_sysroot,
    default_sysroot_dir,
    read_manifest,
)

SYSTEM_RECIPE_VERSION = 2
QEMU_SYSTEM_BINARY = "qemu-system-aarch64"
KERNEL_PACKAGE = "linux-image-arm64"
ROOTFS_PACKAGES = ("openssh-server", "busybox-static")
# In load order of intent; each one's dependencies are loaded first. Built-in ones are skipped.
REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4")  # ext4 needs crc32c
OPTIONAL_MODULES = ("virtio_rng", "9pnet_virtio", "9p")
GUEST_ADDRESS, GUEST_GATEWAY, GUEST_DNS = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"
GUEST_USER = "root"
GUEST_PYTHON = "/usr/bin/python3"
ROOTFS_FREE_MB = 768  # room for the agent, models and /tmp (sparse: costs nothing until written)
BOOT_TIMEOUT_S = 600.0  # SSH answered 12 s after start on a quiet 2-core machine; much longer under load
KERNEL_FILE, INITRD_FILE, ROOTFS_FILE = "vmlinuz", "initrd.gz", "rootfs.ext4"
HOST_KEY, CLIENT_KEY = "keys/ssh_host_ed25519_key", "keys/client_ed25519"
VM_STATE = "vm.json"
CONSOLE_LOG = "console.log"


class VmError(SysrootBuildError):
    """The VM did not start, did not answer SSH in time, or could not be stopped."""


@dataclass(frozen=True)
class SystemImageRecipe:
    """What goes into a VM image; its `key()` names the cached folder."""

    sysroot: SysrootRecipe = field(default_factory=SysrootRecipe)
    kernel: str = KERNEL_PACKAGE
    packages: tuple[str, ...] = ROOTFS_PACKAGES
    modules: tuple[str, ...] = REQUIRED_MODULES + OPTIONAL_MODULES

    def key(self) -> str:
        """Twelve hex digits of the recipe's hash (the sysroot's recipe included)."""
        text = json.dumps({"v": SYSTEM_RECIPE_VERSION, **asdict(self), "sysroot": self.sysroot.key()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_system_dir(recipe: SystemImageRecipe | None = None) -> Path:
    """`system-<recipe hash>` next to the default sysroot (the same cache root)."""
    recipe = recipe or SystemImageRecipe()
    return default_sysroot_dir(recipe.sysroot).parent / f"system-{recipe.key()}"


def read_system_manifest(image: Path | str) -> dict | None:
    """The manifest of a finished VM image, or None."""
    image = Path(image)
    try:
        manifest = json.loads((image / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    needed = (KERNEL_FILE, INITRD_FILE, ROOTFS_FILE, HOST_KEY + ".pub", CLIENT_KEY)
    return manifest if all((image / n).exists() for n in needed) else None


def qemu_system_binary() -> str | None:
    """Path of qemu-system-aarch64 (Debian: qemu-system-arm), or None."""
    return shutil.which(QEMU_SYSTEM_BINARY)


# ----------------------------------------------------------------------------------- the pieces


def _modname(path: str) -> str:
    name = Path(path).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def module_depends(ko: Path) -> list[str]:
    """The `depends=` of a kernel module's .modinfo, then its `softdep=pre:` names (normalised with '_')."""
    data = ko.read_bytes()
    names = []
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if match and match.group(1):
        names += [d.replace("-", "_") for d in match.group(1).decode().split(",") if d]
    soft = re.search(rb"(?:^|\x00)softdep=pre:([^\x00]*?)(?: post:[^\x00]*)?\x00", data)
    if soft:
        names += ["?" + d.replace("-", "_") for d in soft.group(1).decode().split()]  # optional: may be an alias
    return names


def modules_in_load_order(moddir: Path, wanted: tuple[str, ...], required: tuple[str, ...] = REQUIRED_MODULES
                          ) -> list[Path]:
    """The module files to insmod, dependencies first, for the wanted modules of one kernel's module folder.

    Built-in modules (modules.builtin) are skipped; a wanted module that is neither a file nor
    built in is an error when required, else left out.
    """
    files = {_modname(str(p)): p for p in moddir.rglob("*.ko*")}
    builtin = set()
    if (moddir / "modules.builtin").exists():
        builtin = {_modname(line) for line in (moddir / "modules.builtin").read_text().split()}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> bool:
        if name in seen or name in builtin:
            return True
        if name not in files:
            return False
        seen.add(name)
        for dep in module_depends(files[name]):
            if dep.startswith("?"):  # a soft dependency (an alias such as crc32c -> crc32c_generic): when found
                dep = dep[1:]
                visit(dep, (*chain, name)) or visit(f"{dep}_generic", (*chain, name))
                continue
            if not visit(dep, (*chain, name)):
                raise SysrootBuildError(f"kernel module {dep} (needed by {' -> '.join((*chain, name))}) not found")
        order.append(files[name])
        return True

    for name in wanted:
        if not visit(name.replace("-", "_"), ()) and name in required:
            raise SysrootBuildError(f"kernel module {name} is neither built in nor in {moddir}")
    return order


def write_cpio(entries: list[tuple[str, int, bytes, int]], out: io.BufferedIOBase) -> None:
    """A newc cpio archive of (path, mode, data, rdev) entries (rdev: (major << 8) | minor, for devices)."""
    def pad(n: int) -> bytes:
        return b"\0" * ((4 - n % 4) % 4)

    def header(ino: int, name: bytes, mode: int, size: int, rdev: int) -> bytes:
        fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, rdev >> 8, rdev & 0xFF, len(name) + 1, 0)
        return b"070701" + b"".join(f"{f:08X}".encode() for f in fields)

    for ino, (path, mode, data, rdev) in enumerate([*entries, ("TRAILER!!!", 0, b"", 0)], start=1):
        name = path.encode()
        head = header(ino if path != "TRAILER!!!" else 0, name, mode, len(data), rdev) + name + b"\0"
        out.write(head + pad(len(head)) + data + pad(len(data)))


INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /newroot
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.load); do insmod /lib/modules/$m || echo "initramfs: insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 -o rw /dev/vda /newroot; then echo "initramfs: cannot mount /dev/vda"; poweroff -f; fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

INITTAB = """::sysinit:/etc/init.d/rcS
::respawn:/usr/sbin/sshd -D -e
::shutdown:/usr/bin/busybox umount -a -r
"""

RCS = f"""#!/usr/bin/busybox sh
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin
bb=/usr/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mountpoint -q /dev || $bb mount -t devtmpfs devtmpfs /dev
$bb mkdir -p /dev/pts /dev/shm /run /tmp
$bb mount -t devpts devpts /dev/pts
$bb mount -t tmpfs -o mode=0755 tmpfs /run
$bb chmod 1777 /tmp
$bb mkdir -p /run/sshd
$bb chmod 0755 /run/sshd
$bb hostname -F /etc/hostname
$bb ip link set lo up
$bb ip addr add {GUEST_ADDRESS} dev eth0
$bb ip link set eth0 up
$bb ip route add default via {GUEST_GATEWAY}
echo "eo-vm: eth0 {GUEST_ADDRESS} up, starting sshd"
"""

SSHD_CONFIG = """Port 22
HostKey /etc/ssh/ssh_host_ed25519_key
AuthorizedKeysFile /etc/ssh/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
UseDNS no
PrintMotd no
PidFile /run/sshd.pid
Subsystem sftp internal-sftp
"""

# Applets linked under /usr/local/bin where the packages ship no such command (a shell for sshd, tools for a person).
BUSYBOX_APPLETS = ("sh", "ash", "ls", "cat", "cp", "mv", "rm", "mkdir", "rmdir", "ln", "chmod", "chown", "ps",
                   "kill", "sleep", "uname", "df", "du", "free", "top", "ip", "mount", "umount", "poweroff",
                   "reboot", "halt", "sync", "hostname", "dmesg", "grep", "sed", "head", "tail", "wc", "sha256sum",
                   "env", "id", "echo", "true", "false", "find", "tar", "gzip", "vi", "less", "touch", "date",
                   "uptime", "nproc", "which", "sort", "tr", "cut", "xargs", "stat", "tee", "mktemp", "dirname",
                   "basename", "readlink", "realpath", "test", "[", "printf", "awk", "seq", "expr", "pidof")


def _keygen(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"edge-orchestrator-vm-{path.name}", "-f", str(path)],
         f"ssh-keygen {path.name}")


def key_fingerprint_of(pub: Path) -> str:
    """`SHA256:...` of a public key file."""
    from orchestrator.registry import key_fingerprint

    return key_fingerprint(pub.read_text())


def _download(work: Path, recipe: SystemImageRecipe, log: Callable[[str], None]) -> tuple[list[Path], Path]:
    """(the rootfs packages' .debs with dependencies, the kernel's .deb), by a private arm64 apt configuration."""
    debs, env = apt_download(work, recipe.sysroot.suite, recipe.packages, log)
    depends = _run(["apt-cache", "depends", recipe.kernel], f"apt-cache depends {recipe.kernel}", env, download=True)
    names = [ln.split(":", 1)[1].strip() for ln in depends.splitlines()
             if ln.strip().startswith("Depends:") and "linux-image-" in ln]
    if not names:
        raise SysrootDownloadError(f"{recipe.kernel} names no kernel package for arm64")
    kdir = work / "kernel"
    kdir.mkdir()
    log(f"apt-get download {names[0]} (from {recipe.kernel})")
    try:
        proc = subprocess.run(["apt-get", "-q", "download", names[0]], cwd=kdir, env=env, capture_output=True,
                              text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired:
        raise SysrootDownloadError(f"apt-get download {names[0]}: timed out") from None
    kernel_debs = sorted(kdir.glob("*.deb"))
    if proc.returncode != 0 or not kernel_debs:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise SysrootDownloadError(f"apt-get download {names[0]} failed: {tail}")
    return debs, kernel_debs[0]


def _initramfs(kernel_root: Path, busybox: Path, modules: tuple[str, ...], out: Path) -> tuple[str, list[str]]:
    """Write the initramfs; returns (the kernel's version, the modules in load order)."""
    import gzip

    moddirs = sorted((kernel_root / "lib" / "modules").iterdir())
    if len(moddirs) != 1:
        raise SysrootBuildError(f"expected one kernel under lib/modules, found {[d.name for d in moddirs]}")
    moddir = moddirs[0]
    order = modules_in_load_order(moddir, modules)
    entries: list[tuple[str, int, bytes, int]] = [
        ("bin", stat.S_IFDIR | 0o755, b"", 0), ("dev", stat.S_IFDIR | 0o755, b"", 0),
        ("dev/console", stat.S_IFCHR | 0o600, b"", (5 << 8) | 1),
        ("proc", stat.S_IFDIR | 0o755, b"", 0), ("sys", stat.S_IFDIR | 0o755, b"", 0),
        ("newroot", stat.S_IFDIR | 0o755, b"", 0), ("lib", stat.S_IFDIR | 0o755, b"", 0),
        ("lib/modules", stat.S_IFDIR | 0o755, b"", 0),
        ("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes(), 0),
        ("init", stat.S_IFREG | 0o755, INITRAMFS_INIT.encode(), 0),
    ]
    names = []
    for ko in order:
        if ko.name.endswith(".xz"):
            import lzma

            data, name = lzma.decompress(ko.read_bytes()), ko.name[:-3]
        else:
            data, name = ko.read_bytes(), ko.name
        entries.append((f"lib/modules/{name}", stat.S_IFREG | 0o644, data, 0))
        names.append(name)
    entries.append(("modules.load", stat.S_IFREG | 0o644, ("\n".join(names) + "\n").encode(), 0))
    buf = io.BytesIO()
    write_cpio(entries, buf)
    out.write_bytes(gzip.compress(buf.getvalue(), compresslevel=6))
    return moddir.name, names


def _populate_rootfs(root: Path, image: Path) -> None:
    """The files that make the sysroot + packages a bootable system reached over SSH."""
    bb = root / "usr" / "bin" / "busybox"
    if not bb.exists():
        raise SysrootBuildError("busybox-static gave no /usr/bin/busybox")
    (root / "usr" / "sbin" / "init").unlink(missing_ok=True)
    (root / "usr" / "sbin" / "init").symlink_to("/usr/bin/busybox")
    local = root / "usr" / "local" / "bin"
    local.mkdir(parents=True, exist_ok=True)
    for applet in BUSYBOX_APPLETS:
        if not any((root / d / applet).exists() or (root / d / applet).is_symlink() for d in ("usr/bin", "usr/sbin")):
            (local / applet).symlink_to("/usr/bin/busybox")
    if not (root / "usr/bin/sh").exists():
        (root / "usr/bin/sh").symlink_to("/usr/bin/busybox")
    etc = root / "etc"
    (etc / "init.d").mkdir(parents=True, exist_ok=True)
    (etc / "inittab").write_text(INITTAB)
    (etc / "init.d" / "rcS").write_text(RCS)
    (etc / "init.d" / "rcS").chmod(0o755)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nsshd:x:100:65534::/run/sshd:/usr/sbin/nologin\n"
                                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n")
    (etc / "shadow").chmod(0o600)
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n")
    (etc / "hostname").write_text("eo-arm64-vm\n")
    (etc / "hosts").write_text("127.0.0.1 localhost\n127.0.1.1 eo-arm64-vm\n")
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {GUEST_DNS}\n")
    ssh = etc / "ssh"
    ssh.mkdir(parents=True, exist_ok=True)
    for old in ssh.glob("ssh_host_*"):
        old.unlink()
    (ssh / "sshd_config").write_text(SSHD_CONFIG)
    for suffix in ("", ".pub"):
        shutil.copyfile(image / (HOST_KEY + suffix), ssh / f"ssh_host_ed25519_key{suffix}")
    (ssh / "ssh_host_ed25519_key").chmod(0o600)
    shutil.copyfile(image / (CLIENT_KEY + ".pub"), ssh / "authorized_keys")
    for folder in ("root", "proc", "sys", "dev", "run", "tmp", "var/empty", "var/log", "mnt"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "root").chmod(0o700)
    (root / "proc" / "cpuinfo").unlink(missing_ok=True)  # the user-mode sysroot's stand-in: the VM has a real one


def _mkfs(root: Path, out: Path) -> int:
    used = sum(p.lstat().st_size for p in root.rglob("*"))
    size_mb = int(used / 2**20 * 1.15) + ROOTFS_FREE_MB
    _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "eo-root", "-m", "0", "-d", str(root), str(out), f"{size_mb}M"],
         "mke2fs -d (rootfs.ext4)")
    return size_mb


def _build_into(image: Path, work: Path, recipe: SystemImageRecipe, sysroot: Path,
                log: Callable[[str], None]) -> dict:
    debs, kernel_deb = _download(work, recipe, log)
    image.mkdir()
    log("ssh-keygen: the VM's host key and a client key")
    _keygen(image / HOST_KEY)
    _keygen(image / CLIENT_KEY)
    log(f"dpkg -x {kernel_deb.name}")
    kroot = work / "kernel-root"
    _run(["dpkg-deb", "-x", str(kernel_deb), str(kroot)], f"dpkg -x {kernel_deb.name}")
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise SysrootBuildError(f"{kernel_deb.name} holds no boot/vmlinuz-*")
    shutil.copyfile(vmlinuz[0], image / KERNEL_FILE)
    extras = work / "extras"
    log(f"dpkg -x {len(debs)} packages ({', '.join(recipe.packages)} and dependencies)")
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(extras)], f"dpkg -x {deb.name}")
    _usr_merge(extras)
    busybox = extras / "usr" / "bin" / "busybox"
    log("initramfs: busybox + " + ", ".join(recipe.modules) + " (with dependencies)")
    kernel_version, loaded = _initramfs(kroot, busybox, recipe.modules, image / INITRD_FILE)
    shutil.rmtree(kroot)
    log(f"rootfs: the sysroot {sysroot.name} + {len(debs)} packages")
    root = work / "rootfs"
    shutil.copytree(sysroot, root, symlinks=True)
    (root / MANIFEST).unlink(missing_ok=True)
    _merge_tree(extras, root)
    _populate_rootfs(root, image)
    log("mke2fs -d rootfs.ext4")
    size_mb = _mkfs(root, image / ROOTFS_FILE)
    shutil.rmtree(root)
    return {
        "recipe": {**asdict(recipe), "sysroot": recipe.sysroot.key()}, "key": recipe.key(),
        "sysroot": str(sysroot), "kernel_package": kernel_deb.name, "kernel_version": kernel_version,
        "initramfs_modules": loaded, "debs": [d.name for d in debs], "rootfs_size_mb": size_mb,
        "host_key_fingerprint": key_fingerprint_of(image / (HOST_KEY + ".pub")),
        "guest": {"user": GUEST_USER, "python": GUEST_PYTHON, "address": GUEST_ADDRESS},
    }


def build_system_image(dest: Path | str | None = None, recipe: SystemImageRecipe | None = None,
                       sysroot: Path | str | None = None, force: bool = False,
                       log: Callable[[str], None] | None = None) -> Path:
    """Build the VM image at `dest` (default `default_system_dir()`), or reuse the finished one there.

    The user-mode sysroot is built (or reused) first: it is the root file system's content.
    Raises SysrootDownloadError when the Debian archive or PyPI cannot be reached,
    SysrootBuildError for anything else.
    """
    recipe = recipe or SystemImageRecipe()
    dest = Path(dest).expanduser().resolve() if dest is not None else default_system_dir(recipe)
    log = log or (lambda message: None)
    for tool in ("mke2fs", "ssh-keygen", "dpkg-deb", "apt-get"):
        if shutil.which(tool) is None:
            raise SysrootBuildError(f"{tool} is not installed (Debian: e2fsprogs, openssh-client, dpkg, apt)")
    with _locked(dest.parent / f".{dest.name}.lock"):
        if read_system_manifest(dest) is not None and not force:
            return dest
        root = build_sysroot(sysroot, recipe.sysroot, log=log)
        if read_manifest(root) is None:
            raise SysrootBuildError(f"{root} is not a finished arm64 sysroot")
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            image = tmp / "image"
            manifest = _build_into(image, tmp / "work", recipe, root, log)
            manifest.update(built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            build_seconds=round(time.monotonic() - start, 1),
                            size_bytes=sum(p.stat().st_blocks * 512 for p in image.rglob("*") if p.is_file()))
            (image / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if dest.exists() or dest.is_symlink():
                dest.rename(tmp / "old")
            image.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {dest} in {manifest['build_seconds']} s (kernel {manifest['kernel_version']}, "
        f"{manifest['size_bytes'] / 1e6:.0f} MB on disk)")
    return dest


# ------------------------------------------------------------------------------------------- the VM


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no console output)"
    rows = [r for r in text.replace("\r", "").splitlines() if r.strip()]
    return "\n".join(rows[-lines:]) or "(no console output)"


class QemuSystemVM:
    """One VM of an image, a child process on a free loopback port; its state in `run_dir/vm.json`.

    `start()` returns once sshd answers on the forwarded port (or raises VmError with the
    console's tail); `stop()` ends it by its pid (checked to be this VM's qemu first).
    A VM started by one process can be stopped by another: `QemuSystemVM.attach(run_dir)`.
    """

    def __init__(self, image: Path | str, run_dir: Path | str, qemu_cpu: str = "cortex-a72", cores: int = 4,
                 memory_mb: int = 2048, port: int | None = None) -> None:
        self.image = Path(image).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.qemu_cpu, self.cores, self.memory_mb = qemu_cpu, cores, memory_mb
        self.port = port
        self.pid: int | None = None
        self.proc: subprocess.Popen | None = None
        self.started_at: float | None = None
        self.ssh_seconds: float | None = None

    # what a registration needs -------------------------------------------------------------------

    @property
    def host_key(self) -> str:
        """The VM's public host key, `TYPE BASE64` (generated on this host when the image was built)."""
        return " ".join((self.image / (HOST_KEY + ".pub")).read_text().split()[:2])

    @property
    def host_key_fingerprint(self) -> str:
        return key_fingerprint_of(self.image / (HOST_KEY + ".pub"))

    @property
    def client_key(self) -> Path:
        return self.image / CLIENT_KEY

    @property
    def console_log(self) -> Path:
        return self.run_dir / CONSOLE_LOG

    def command(self) -> list[str]:
        """The qemu-system-aarch64 command line (no KVM: TCG on any host)."""
        binary = qemu_system_binary() or QEMU_SYSTEM_BINARY
        return [
            binary, "-M", "virt", "-cpu", self.qemu_cpu, "-smp", str(self.cores), "-m", str(self.memory_mb),
            "-nographic", "-no-reboot", "-name", f"edge-orchestrator-vm,process=eo-vm-{self.port}",
            "-kernel", str(self.image / KERNEL_FILE), "-initrd", str(self.image / INITRD_FILE),
            "-append", "console=ttyAMA0 panic=-1 loglevel=4",
            "-drive", f"file={self.image / ROOTFS_FILE},format=raw,if=none,id=hd0,snapshot=on",
            "-device", "virtio-blk-pci,drive=hd0",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0,romfile=",
            "-device", "virtio-rng-pci",
        ]

    # lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout_s: float = BOOT_TIMEOUT_S) -> QemuSystemVM:
        """Start the VM in the background (its own session: it outlives this process) and wait for SSH."""
        if qemu_system_binary() is None:
            raise VmError("qemu-system-aarch64 is not installed (apt-get install qemu-system-arm)")
        if read_system_manifest(self.image) is None:
            raise VmError(f"{self.image} is not a finished VM image (deploy/qemu/build-system-image.sh)")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for attempt in range(3):  # the free port can be taken between choosing it and qemu binding it
            self.port = self.port if attempt == 0 and self.port else free_port()
            self.started_at = time.time()
            with open(self.console_log, "wb") as log:
                self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                             start_new_session=True, cwd=self.run_dir)
            self.pid = self.proc.pid
            self._save()
            time.sleep(1.0)
            if self.proc.poll() is None or "hostfwd" not in _tail(self.console_log):
                break
        try:
            self.wait_for_ssh(timeout_s)
        except BaseException:
            self.stop()
            raise
        self.ssh_seconds = round(time.time() - self.started_at, 1)
        self._save()
        return self

    def _alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and _is_our_qemu(self.pid, self.port)

    def wait_for_ssh(self, timeout_s: float) -> None:
        """Until sshd in the VM sends its banner through the forwarded port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._alive():
                code = self.proc.returncode if self.proc is not None else "?"
                raise VmError(f"the VM exited (status {code}) before SSH answered; console:\n{_tail(self.console_log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=3) as sock:
                    sock.settimeout(5)
                    if sock.recv(64).startswith(b"SSH-"):
                        return
            except OSError:
                pass
            time.sleep(1.0)
        raise VmError(f"the VM's sshd did not answer on 127.0.0.1:{self.port} within {timeout_s:.0f} s; "
                      f"console:\n{_tail(self.console_log)}")

    def stop(self, timeout_s: float = 20.0) -> bool:
        """Stop the VM by its pid (SIGTERM, then SIGKILL); True if it was running. Nothing is left running."""
        import psutil

        if self.pid is None:
            return False
        if self.proc is None and not _is_our_qemu(self.pid, self.port):
            self.pid = None
            self._save()
            return False
        try:
            proc = psutil.Process(self.pid)
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except psutil.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        except psutil.NoSuchProcess:
            pass
        if self.proc is not None:
            self.proc.wait(timeout_s)  # reap our child
        self.pid = None
        self._save()
        return True

    def status(self) -> dict[str, Any]:
        """What vm.json says, and whether its qemu is running now."""
        return {**self._state(), "running": self.pid is not None and self._alive()}

    def _state(self) -> dict[str, Any]:
        return {"image": str(self.image), "pid": self.pid, "port": self.port, "qemu_cpu": self.qemu_cpu,
                "cores": self.cores, "memory_mb": self.memory_mb, "started_at": self.started_at,
                "ssh_seconds": self.ssh_seconds, "console_log": str(self.console_log),
                "host_key_fingerprint": self.host_key_fingerprint, "user": GUEST_USER,
                "client_key": str(self.client_key), "command": self.command()}

    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.run_dir / f".{VM_STATE}.tmp"
        tmp.write_text(json.dumps(self._state(), indent=2) + "\n")
        tmp.rename(self.run_dir / VM_STATE)

    @classmethod
    def attach(cls, run_dir: Path | str) -> QemuSystemVM:
        """The VM recorded in `run_dir/vm.json` (started by this or another process)."""
        run_dir = Path(run_dir)
        try:
            state = json.loads((run_dir / VM_STATE).read_text())
        except (OSError, ValueError):
            raise VmError(f"no VM recorded in {run_dir}") from None
        vm = cls(state["image"], run_dir, state["qemu_cpu"], state["cores"], state["memory_mb"], state["port"])
        vm.pid, vm.started_at, vm.ssh_seconds = state.get("pid"), state.get("started_at"), state.get("ssh_seconds")
        return vm


def _is_our_qemu(pid: int, port: int | None) -> bool:
    """Whether `pid` is a qemu-system-aarch64 forwarding `port` (a recorded pid may have been reused)."""
    import psutil

    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return bool(cmdline) and Path(cmdline[0]).name == QEMU_SYSTEM_BINARY and \
        any(f"hostfwd=tcp:127.0.0.1:{port}-:22" in arg for arg in cmdline)


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.qemu_system build|start|status|stop`: the VM by hand."""
    parser = argparse.ArgumentParser(prog="python -m orchestrator.qemu_system", description=main.__doc__)
    sub = parser.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="build (or reuse) the VM image; prints its path")
    b.add_argument("dest", nargs="?")
    b.add_argument("--force", action="store_true")
    b.add_argument("--quiet", action="store_true")
    s = sub.add_parser("start", help="start a VM in the background, wait for SSH, print how to reach it")
    s.add_argument("--dir", required=True, help="the VM's run folder (vm.json, console.log)")
    s.add_argument("--image", help="a built image (default: built or reused)")
    s.add_argument("--cpu", default="cortex-a72")
    s.add_argument("--cores", type=int, default=4)
    s.add_argument("--memory", type=int, default=2048, help="MB")
    s.add_argument("--port", type=int, help="host port forwarded to the VM's 22 (default: a free one)")
    s.add_argument("--timeout", type=float, default=BOOT_TIMEOUT_S)
    for name in ("status", "stop"):
        p = sub.add_parser(name)
        p.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    say = (lambda m: None) if getattr(args, "quiet", False) else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        if args.what == "build":
            print(build_system_image(args.dest, force=args.force, log=say))
        elif args.what == "start":
            image = args.image or build_system_image(log=say)
            vm = QemuSystemVM(image, args.dir, args.cpu, args.cores, args.memory, args.port).start(args.timeout)
            print(json.dumps(vm.status(), indent=2))
            say(f"SSH answered {vm.ssh_seconds} s after start; it keeps running until "
                f"`python -m orchestrator.qemu_system stop --dir {args.dir}`:\n"
                f"  ssh -i {vm.client_key} -p {vm.port} -o StrictHostKeyChecking=yes "
                f"-o UserKnownHostsFile=<(echo '[127.0.0.1]:{vm.port} {vm.host_key}') {GUEST_USER}@127.0.0.1")
        elif args.what == "status":
            print(json.dumps(QemuSystemVM.attach(args.dir).status(), indent=2))
        else:
            vm = QemuSystemVM.attach(args.dir)
            print("stopped" if vm.stop() else "not running")
    except SysrootBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
