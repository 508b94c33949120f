"""Build the arm64 sysroot that a QEMU user-mode emulated device runs in, without running anything emulated.

What it holds: Debian bookworm's arm64 `python3`, `libstdc++6` and `libgomp1` with their
dependencies (fetched by a private apt configuration kept inside the build folder, then
unpacked with `dpkg -x`; no maintainer script runs), the usr-merge links, the aarch64
wheels of numpy and onnxruntime (same versions as this host's, so an output-parity check
compares ARM kernels with x86 kernels and nothing else), byte code compiled by this host's
Python (same 3.11 magic number: imports under emulation skip compiling), and an ARM-format
`proc/cpuinfo` (onnxruntime segfaults at import under QEMU 7.2 when it reads the host's x86
one; qemu-user looks absolute paths up under `-L` first).

The sysroot is built into a temporary folder next to its destination and renamed into
place at the end, under a lock: a crash never leaves a half sysroot that looks finished,
and two builds of the same recipe never race. `manifest.json` is written last, inside
the temporary folder, and is what marks a sysroot finished.

    python -m orchestrator.emulation.sysroot [DEST] [--force]      # or deploy/qemu/build-user-sysroot.sh
"""

from __future__ import annotations

import argparse
import compileall
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from orchestrator.errors import OrchestratorError
from orchestrator.state.paths import state_dir

RECIPE_VERSION = 2
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
MIRROR_ENV = "EDGE_ORCHESTRATOR_DEBIAN_MIRROR"
CACHE_ENV = "EDGE_ORCHESTRATOR_QEMU_CACHE"  # a folder for sysroots shared by every state folder
WHEEL_PLATFORMS = ("manylinux_2_17_aarch64", "manylinux2014_aarch64", "manylinux_2_28_aarch64")
MANIFEST = "manifest.json"
SYSROOT_PYTHON = "usr/bin/python3"
DIST_PACKAGES = "usr/lib/python3/dist-packages"
USR_MERGE = ("bin", "sbin", "lib")
UNUSED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")
STEP_TIMEOUT_S = 900

# ARM `CPU part` (implementer 0x41 unless given) and the hwcaps the kernel prints for the CPU
# models qemu-aarch64 7.2 has (`qemu-aarch64-static -cpu help`), as a real board's /proc/cpuinfo shows them.
_V8_0 = "fp asimd evtstrm crc32 cpuid"
_V8_2 = "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
CPU_MODELS: dict[str, dict[str, str]] = {
    "cortex-a35": {"part": "0xd04", "variant": "0x0", "revision": "2", "features": _V8_0},
    "cortex-a53": {"part": "0xd03", "variant": "0x0", "revision": "4", "features": _V8_0},
    "cortex-a57": {"part": "0xd07", "variant": "0x1", "revision": "1", "features": _V8_0},
    "cortex-a72": {"part": "0xd08", "variant": "0x0", "revision": "3", "features": _V8_0},
    "cortex-a76": {"part": "0xd0b", "variant": "0x4", "revision": "1", "features": _V8_2},
    "neoverse-n1": {"part": "0xd0c", "variant": "0x3", "revision": "1", "features": _V8_2},
    "a64fx": {"implementer": "0x46", "part": "0x001", "variant": "0x1", "revision": "0",
              "features": _V8_2 + " sve"},
}
DEFAULT_CPU = "cortex-a72"
DEFAULT_CORES = 4


class SysrootBuildError(OrchestratorError):
    """The arm64 sysroot could not be built (a tool is missing, a step failed)."""


class SysrootDownloadError(SysrootBuildError):
    """A package registry (the Debian archive or PyPI) could not be reached or had nothing that fits."""


def host_version(distribution: str) -> str | None:
    """The version of a distribution installed on this host, or None."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _default_wheels() -> tuple[str, ...]:
    specs = []
    for name in ("numpy", "onnxruntime"):
        v = host_version(name)
        specs.append(f"{name}=={v}" if v else name)
    return tuple(specs)


@dataclass(frozen=True)
class SysrootRecipe:
    """What goes into a sysroot; its `key()` names the cached folder."""

    suite: str = "bookworm"
    packages: tuple[str, ...] = ("python3", "libstdc++6", "libgomp1")
    wheels: tuple[str, ...] = field(default_factory=_default_wheels)  # pip requirement specs
    python_version: str = "3.11"  # bookworm's python3

    def key(self) -> str:
        """Twelve hex digits of the recipe's hash (the mirror is not part of it: it changes no content)."""
        text = json.dumps({"v": RECIPE_VERSION, **asdict(self), "platforms": WHEEL_PLATFORMS}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_sysroot_dir(recipe: SysrootRecipe | None = None) -> Path:
    """`$EDGE_ORCHESTRATOR_QEMU_CACHE/sysroot-<recipe hash>` when set, else `<state dir>/emulated/sysroot-<hash>`.

    The cache variable lets several state folders (test sessions, CI jobs, users) share one
    sysroot: it depends only on its recipe, never on a state folder's contents.
    """
    name = f"sysroot-{(recipe or SysrootRecipe()).key()}"
    cache = os.environ.get(CACHE_ENV)
    if cache:
        return Path(cache).expanduser().resolve() / name
    return state_dir() / "emulated" / name


def read_manifest(sysroot: Path) -> dict | None:
    """The manifest of a finished sysroot, or None when the folder is not one."""
    try:
        manifest = json.loads((Path(sysroot) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if (Path(sysroot) / SYSROOT_PYTHON).exists() else None


def cpuinfo_text(qemu_cpu: str, cores: int) -> str:
    """An aarch64 kernel's /proc/cpuinfo for `cores` cores of a QEMU CPU model."""
    model = CPU_MODELS.get(qemu_cpu)
    if model is None:
        raise SysrootBuildError(f"no /proc/cpuinfo template for CPU {qemu_cpu!r} (known: {', '.join(CPU_MODELS)})")
    entries = []
    for n in range(cores):
        entries.append(
            f"processor\t: {n}\nBogoMIPS\t: 108.00\nFeatures\t: {model['features']}\n"
            f"CPU implementer\t: {model.get('implementer', '0x41')}\nCPU architecture: 8\n"
            f"CPU variant\t: {model['variant']}\nCPU part\t: {model['part']}\nCPU revision\t: {model['revision']}\n"
        )
    return "\n".join(entries) + "\n"


# ------------------------------------------------------------------------------------------ build


def run_step(cmd: list[str], what: str, env: dict[str, str] | None = None, download: bool = False) -> str:
    """Run one build step; returns its stdout. A missing tool, a timeout or a failure raises SysrootBuildError
    (SysrootDownloadError when `download`) naming `what` and the step's last line of output."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=STEP_TIMEOUT_S, check=False)
    except FileNotFoundError:
        raise SysrootBuildError(f"{what}: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise (SysrootDownloadError if download else SysrootBuildError)(
            f"{what}: timed out after {STEP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()
                 and not ln.startswith("WARNING: Location")]  # pip's note on a missing local index
        tail = lines[-1].strip() if lines else f"exit status {proc.returncode}"
        raise (SysrootDownloadError if download else SysrootBuildError)(f"{what} failed: {tail}")
    return proc.stdout


def _host_acquire_config() -> str:
    """This host's apt `Acquire::*` settings (proxy, validity checks of a frozen mirror), to reuse them."""
    try:
        out = subprocess.run(["apt-config", "dump", "Acquire"], capture_output=True, text=True, timeout=30,
                             check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return "".join(line + "\n" for line in out.splitlines() if line.startswith("Acquire::") and line.endswith(";"))


def write_apt_config(work: Path, suite: str, mirror: str | None = None) -> Path:
    """A private apt configuration for arm64 under `work`: own lists, cache, empty dpkg status, sources.

    Read through APT_CONFIG, which apt reads before anything else, so it can point the
    parts folder and main file away from /etc/apt: the host's apt is neither read nor touched.
    """
    mirror = (mirror or os.environ.get(MIRROR_ENV) or DEBIAN_MIRROR).rstrip("/")
    apt = work / "apt"
    for sub in ("etc/apt.conf.d", "etc/sources.list.d", "etc/preferences.d", "etc/trusted.gpg.d",
                "state/lists/partial", "cache/archives/partial", "log"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").write_text("")
    signed = f"[arch=arm64 signed-by={DEBIAN_KEYRING}]"
    (apt / "etc" / "sources.list").write_text(
        f"deb {signed} {mirror} {suite} main\n"
        f"deb {signed} {mirror} {suite}-updates main\n"
        f"deb {signed} {DEBIAN_SECURITY_MIRROR} {suite}-security main\n"
    )
    conf = apt / "apt.conf"
    conf.write_text(
        f'Dir "{apt}/";\n'
        f'Dir::Etc "{apt}/etc/";\n'
        'Dir::Etc::main "apt.conf.main-unused";\n'
        'Dir::Etc::parts "apt.conf.d/";\n'
        'Dir::Etc::sourcelist "sources.list";\n'
        'Dir::Etc::sourceparts "sources.list.d/";\n'
        'Dir::Etc::preferences "preferences";\n'
        'Dir::Etc::preferencesparts "preferences.d/";\n'
        'Dir::Etc::trusted "trusted.gpg";\n'
        'Dir::Etc::trustedparts "trusted.gpg.d/";\n'
        f'Dir::State "{apt}/state/";\n'
        'Dir::State::status "status";\n'
        f'Dir::Cache "{apt}/cache/";\n'
        f'Dir::Log "{apt}/log/";\n'
        'APT::Architecture "arm64";\n'
        'APT::Architectures { "arm64"; };\n'
        'APT::Install-Recommends "false";\n'
        'APT::Install-Suggests "false";\n'
        'Acquire::Languages "none";\n'
        + _host_acquire_config()
    )
    return conf


def apt_download(work: Path, suite: str, packages: list[str] | tuple[str, ...],
                 log: Callable[[str], None]) -> tuple[list[Path], dict[str, str]]:
    """Download arm64 .debs of `packages` and their dependencies with a private apt configuration in `work`.

    Returns the .deb files and the environment that points apt at that configuration (for more
    apt commands in the same folder).
    """
    if not Path(DEBIAN_KEYRING).exists():
        raise SysrootBuildError(f"{DEBIAN_KEYRING} is missing: apt-get install debian-archive-keyring")
    conf = write_apt_config(work, suite)
    env = {**os.environ, "APT_CONFIG": str(conf), "DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    log(f"apt-get update (bookworm arm64, private configuration in {conf.parent})")
    run_step(["apt-get", "-q", "update", "-o", "APT::Update::Error-Mode=any"], "apt-get update (arm64)", env, download=True)
    log(f"apt-get install --download-only {' '.join(packages)}")
    run_step(["apt-get", "-q", "-y", "install", "--download-only", "--no-install-recommends", *packages],
         "apt-get install --download-only (arm64)", env, download=True)
    debs = sorted((work / "apt" / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise SysrootDownloadError("apt-get downloaded no .deb for arm64")
    return debs, env


def _download_wheels(work: Path, recipe: SysrootRecipe, log: Callable[[str], None]) -> list[Path]:
    dest = work / "wheels"
    dest.mkdir()
    log(f"pip download (aarch64, cp{recipe.python_version.replace('.', '')}) {' '.join(recipe.wheels)}")
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--python-version", recipe.python_version, "--implementation", "cp",
           "--abi", "cp" + recipe.python_version.replace(".", ""), "--dest", str(dest)]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    run_step([*cmd, *recipe.wheels], "pip download (aarch64 wheels)", download=True)
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise SysrootDownloadError("pip downloaded no aarch64 wheel")
    return wheels


def _unpack_wheel(wheel: Path, site: Path) -> None:
    """Install a wheel by unpacking it (the `.data/purelib|platlib` parts into site-packages; scripts dropped)."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            target = site.joinpath(*parts)
            if not target.resolve().is_relative_to(site.resolve()):
                raise SysrootBuildError(f"{wheel.name}: unsafe path {info.filename!r}")
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode | 0o644)


def usr_merge(root: Path) -> None:
    """bin, sbin, lib -> usr/... as on a merged-/usr Debian (the loader is /lib/ld-linux-aarch64.so.1)."""
    for name in USR_MERGE:
        link, target = root / name, root / "usr" / name
        target.mkdir(parents=True, exist_ok=True)
        if link.is_symlink():
            continue
        if link.is_dir():  # packages ship files under /lib (bookworm's libc6 does): move them into usr/lib
            merge_tree(link, target)
        link.symlink_to(f"usr/{name}")


def merge_tree(src: Path, dst: Path) -> None:
    """Move everything under `src` into `dst` (folders merged), then remove `src`."""
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        into = dst / item.name
        if item.is_dir() and not item.is_symlink() and into.is_dir() and not into.is_symlink():
            merge_tree(item, into)
        else:
            if into.is_symlink() or into.exists():
                into.unlink() if not into.is_dir() or into.is_symlink() else shutil.rmtree(into)
            item.rename(into)
    src.rmdir()


def _trim(root: Path) -> None:
    """Drop what an agent never reads: documentation, translations, the wheels' own test suites (~30 MB)."""
    for rel in UNUSED:
        shutil.rmtree(root / rel, ignore_errors=True)
    site = root / DIST_PACKAGES
    for tests in sorted(site.glob("*/**/tests"), reverse=True):
        if tests.is_dir() and not tests.is_symlink():
            shutil.rmtree(tests)


def _compile_bytecode(root: Path) -> None:
    """Compile the stdlib and dist-packages with this host's Python (dpkg -x runs no py3compile).

    Only when this host's Python is the sysroot's minor version (the .pyc magic number is
    per minor version); otherwise the emulated Python compiles what it imports, each run.
    """
    ok = True
    for folder in sorted((root / "usr" / "lib").glob("python3*")):
        ok &= compileall.compile_dir(str(folder), quiet=2, workers=0, stripdir=str(root), prependdir="/")
    if not ok:
        raise SysrootBuildError("byte-compiling the sysroot's Python files failed")


def _build_into(root: Path, work: Path, recipe: SysrootRecipe, log: Callable[[str], None]) -> dict:
    debs, _ = apt_download(work, recipe.suite, recipe.packages, log)
    wheels = _download_wheels(work, recipe, log)
    log(f"dpkg -x {len(debs)} packages")
    root.mkdir()
    for deb in debs:
        run_step(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg -x {deb.name}")
    usr_merge(root)
    python = root / SYSROOT_PYTHON
    if not python.exists():
        raise SysrootBuildError(f"the packages gave no {SYSROOT_PYTHON}")
    site = root / DIST_PACKAGES
    site.mkdir(parents=True, exist_ok=True)
    log(f"unpack {len(wheels)} wheels into /{DIST_PACKAGES}")
    for wheel in wheels:
        _unpack_wheel(wheel, site)
    _trim(root)
    if f"{sys.version_info.major}.{sys.version_info.minor}" == recipe.python_version:
        log("compile byte code with this host's Python")
        _compile_bytecode(root)
    (root / "proc").mkdir()
    (root / "proc" / "cpuinfo").write_text(cpuinfo_text(DEFAULT_CPU, DEFAULT_CORES))
    return {
        "recipe": asdict(recipe), "key": recipe.key(),
        "debs": [d.name for d in debs], "wheels": [w.name for w in wheels],
    }


@contextmanager
def locked(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `lock_path` (made if missing) while inside: one build of a folder at a time."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _folder_size(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_symlink() and p.is_file())


def build_sysroot(dest: Path | str | None = None, recipe: SysrootRecipe | None = None, force: bool = False,
                  log: Callable[[str], None] | None = None) -> Path:
    """Build the arm64 sysroot at `dest` (default `default_sysroot_dir()`), or reuse the finished one there.

    Returns the sysroot's path. Raises `SysrootDownloadError` when a registry cannot be
    reached or has nothing that fits, `SysrootBuildError` for anything else.
    """
    recipe = recipe or SysrootRecipe()
    dest = Path(dest).expanduser().resolve() if dest is not None else default_sysroot_dir(recipe)
    log = log or (lambda message: None)
    with locked(dest.parent / f".{dest.name}.lock"):
        if read_manifest(dest) is not None and not force:
            return dest
        for stale in dest.parent.glob(f".{dest.name}.tmp-*"):  # a crashed build's (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            root = tmp / "root"
            manifest = _build_into(root, tmp / "work", recipe, log)
            manifest.update(built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            build_seconds=round(time.monotonic() - start, 1), size_bytes=_folder_size(root))
            (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            if dest.exists() or dest.is_symlink():  # unfinished, or --force: replace it
                old = tmp / "old"
                dest.rename(old)
            root.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log(f"built {dest} in {manifest['build_seconds']} s, {manifest['size_bytes'] / 1e6:.0f} MB")
    return dest


def main(argv: list[str] | None = None) -> int:
    """`python -m orchestrator.emulation.sysroot [DEST] [--force]`: build (or reuse) the sysroot, print its path."""
    parser = argparse.ArgumentParser(prog="build-user-sysroot", description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", help="sysroot folder (default: $EDGE_ORCHESTRATOR_QEMU_CACHE/"
                                                "sysroot-<recipe hash>, else $EDGE_ORCHESTRATOR_HOME/emulated/"
                                                "sysroot-<recipe hash>)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a finished sysroot is there")
    parser.add_argument("--quiet", action="store_true", help="print only the sysroot's path")
    args = parser.parse_args(argv)
    say = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    try:
        path = build_sysroot(args.dest, force=args.force, log=say)
    except SysrootBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
