"""The full-system emulated aarch64 device: a QEMU VM with Debian's arm64 kernel, reached over SSH.

What the image holds (built on this host; nothing runs under emulation while building):

- `vmlinuz`: Debian bookworm's arm64 kernel (`linux-image-arm64`, from bookworm-security when
  newer), downloaded by the same private apt configuration as the user-mode sysroot
  (orchestrator/emulation/sysroot.py).
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

    python -m orchestrator.emulation.system_vm build [DEST] [--force]
    python -m orchestrator.emulation.system_vm start --dir RUN_DIR [--cpu cortex-a72 --cores 4 --memory 2048]
    python -m orchestrator.emulation.system_vm status|stop --dir RUN_DIR
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.devices.registry import key_fingerprint
from orchestrator.emulation.initramfs import OPTIONAL_MODULES, REQUIRED_MODULES, write_initramfs
from orchestrator.emulation.sysroot import (
    MANIFEST,
    SysrootBuildError,
    SysrootDownloadError,
    SysrootRecipe,
    apt_download,
    build_sysroot,
    default_sysroot_dir,
    locked,
    merge_tree,
    read_manifest,
    run_step,
    usr_merge,
)

SYSTEM_RECIPE_VERSION = 2
QEMU_SYSTEM_BINARY = "qemu-system-aarch64"
KERNEL_PACKAGE = "linux-image-arm64"
ROOTFS_PACKAGES = ("openssh-server", "busybox-static")
GUEST_ADDRESS, GUEST_GATEWAY, GUEST_DNS = "10.0.2.15/24", "10.0.2.2", "10.0.2.3"
GUEST_USER = "root"
GUEST_PYTHON = "/usr/bin/python3"
ROOTFS_FREE_MB = 768  # room for the agent, models and /tmp (sparse: costs nothing until written)


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
    run_step(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"edge-orchestrator-vm-{path.name}", "-f", str(path)],
         f"ssh-keygen {path.name}")


def key_fingerprint_of(pub: Path) -> str:
    """`SHA256:...` of a public key file."""
    return key_fingerprint(pub.read_text())


def _download(work: Path, recipe: SystemImageRecipe, log: Callable[[str], None]) -> tuple[list[Path], Path]:
    """(the rootfs packages' .debs with dependencies, the kernel's .deb), by a private arm64 apt configuration."""
    debs, env = apt_download(work, recipe.sysroot.suite, recipe.packages, log)
    depends = run_step(["apt-cache", "depends", recipe.kernel], f"apt-cache depends {recipe.kernel}", env, download=True)
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
    run_step(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "eo-root", "-m", "0", "-d", str(root), str(out), f"{size_mb}M"],
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
    run_step(["dpkg-deb", "-x", str(kernel_deb), str(kroot)], f"dpkg -x {kernel_deb.name}")
    vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
    if not vmlinuz:
        raise SysrootBuildError(f"{kernel_deb.name} holds no boot/vmlinuz-*")
    shutil.copyfile(vmlinuz[0], image / KERNEL_FILE)
    extras = work / "extras"
    log(f"dpkg -x {len(debs)} packages ({', '.join(recipe.packages)} and dependencies)")
    for deb in debs:
        run_step(["dpkg-deb", "-x", str(deb), str(extras)], f"dpkg -x {deb.name}")
    usr_merge(extras)
    busybox = extras / "usr" / "bin" / "busybox"
    log("initramfs: busybox + " + ", ".join(recipe.modules) + " (with dependencies)")
    kernel_version, loaded = write_initramfs(kroot, busybox, recipe.modules, image / INITRD_FILE)
    shutil.rmtree(kroot)
    log(f"rootfs: the sysroot {sysroot.name} + {len(debs)} packages")
    root = work / "rootfs"
    shutil.copytree(sysroot, root, symlinks=True)
    (root / MANIFEST).unlink(missing_ok=True)
    merge_tree(extras, root)
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
    with locked(dest.parent / f".{dest.name}.lock"):
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
KERNEL_FILE, INITRD_FILE, ROOTFS_FILE = "vmlinuz", "initrd.gz", "rootfs.ext4"
HOST_KEY, CLIENT_KEY = "keys/ssh_host_ed25519_key", "keys/client_ed25519"
