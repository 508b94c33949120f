"""The full-system image's initramfs: kernel modules in load order, a busybox init, a newc cpio archive."""

from __future__ import annotations

import gzip
import io
import lzma
import re
import stat
from pathlib import Path

from orchestrator.emulation.sysroot import SysrootBuildError

REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4")  # ext4 needs crc32c
OPTIONAL_MODULES = ("virtio_rng", "9pnet_virtio", "9p")


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
# In load order of intent; each one's dependencies are loaded first. Built-in ones are skipped.


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


def write_initramfs(kernel_root: Path, busybox: Path, modules: tuple[str, ...], out: Path) -> tuple[str, list[str]]:
    """Write the initramfs; returns (the kernel's version, the modules in load order)."""
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
