"""The plugin manager: hookspecs, entry-point plugins (built-ins included), and the registries they fill."""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy

from orchestrator.api import PROJECT_NAME, STAGE_ORDER, Task, Technique
from orchestrator.devices.transport import BUILTIN_KINDS, TransportKind
from orchestrator.errors import PluginError
from orchestrator.hooks import specs as hookspecs
from orchestrator.state.paths import cache_dir

log = logging.getLogger(__name__)

#: Comma-separated plugin (entry-point) names that are not loaded.
DISABLE_ENV = "EDGE_ORCHESTRATOR_DISABLE_PLUGINS"


@dataclass
class PluginInfo:
    """One loaded (or broken) plugin, as `orchestrate plugins` shows it."""

    name: str
    package: str
    version: str
    techniques: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    transports: list[str] = field(default_factory=list)
    hooks: list[str] = field(default_factory=list)
    error: str | None = None
    origin: str = ""  # the file (or folder) its code was loaded from: Ray workers must load the same


class PluginRegistry:
    """The plugin manager plus the techniques, tasks and transport kinds the plugins registered."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.techniques: dict[str, Technique] = {}
        self.tasks: dict[str, Task] = {}
        self.transports: dict[str, tuple[TransportKind, str]] = {}  # name -> (kind, the plugin that registered it)
        self.plugins: dict[str, PluginInfo] = {}
        self._owner: dict[str, str] = {}

    # -- loading -----------------------------------------------------------
    def load_entry_points(self) -> None:
        """Load every plugin of the entry-point group; a broken one is recorded, the rest still load.

        The built-ins (entry points into this project's `plugins` package) load first, so an
        outside plugin can never take one of their names; the others follow by name.
        """
        disabled = {n.strip() for n in os.environ.get(DISABLE_ENV, "").split(",") if n.strip()}
        for ep in sorted(importlib.metadata.entry_points(group=PROJECT_NAME),
                         key=lambda e: (not is_builtin(e), e.name)):
            if ep.name in disabled or ep.name in self.plugins:
                continue
            dist = ep.dist
            info = PluginInfo(ep.name, dist.name if dist else "?", dist.version if dist else "?")
            self.plugins[ep.name] = info
            if not is_builtin(ep):  # a third party's import that hangs or ends the process is found in a child
                problem = probe_import(ep)
                if problem:
                    info.error = f"failed to import {ep.value}: {problem}"
                    log.warning("plugin %s: %s", ep.name, info.error)
                    continue
            try:
                module = ep.load()
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - a third party's import must not stop the others
                info.error = f"failed to import {ep.value}: {_describe(exc)}"
                log.warning("plugin %s: %s", ep.name, info.error)
                continue
            self.add_plugin(module, ep.name, info)

    def add_plugin(self, plugin: Any, name: str, info: PluginInfo | None = None) -> None:
        """Register one plugin object (module or instance) and collect what it registers.

        A registration the registry refuses (a name another plugin has, not a Technique or
        Task) is refused alone: the plugin's other registrations count, and the refusal is
        its error. A hook that raises (anything, `sys.exit()` included) marks the plugin
        broken: what it registered is withdrawn and it is unregistered, the others go on.
        """
        info = info or self.plugins.setdefault(name, PluginInfo(name, "(in-process)", "-"))
        self.plugins[name] = info
        try:
            self.pm.register(plugin, name=name)
            self.pm.check_pending()
            info.hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - pluggy's, or the plugin's own
            info.error = _describe(exc)
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            log.warning("plugin %s: %s", name, info.error)
            return
        refused: list[str] = []

        def registrar(register: Any) -> Any:
            def call(item: Any) -> None:
                try:
                    register(item, name, info)
                except PluginError as exc:
                    refused.append(str(exc))
                    log.warning("plugin %s: %s", name, exc)
            return call

        others = [p for p in self.pm.get_plugins() if p is not plugin]
        hook = ""
        try:
            hook = "register_techniques"
            self.pm.subset_hook_caller(hook, remove_plugins=others)(register=registrar(self._register_technique))
            hook = "register_tasks"
            self.pm.subset_hook_caller(hook, remove_plugins=others)(register=registrar(self._register_task))
            hook = "register_transports"
            self.pm.subset_hook_caller(hook, remove_plugins=others)(register=registrar(self._register_transport))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - whatever a plugin's hook raises
            self._withdraw(name, info)
            self.pm.unregister(plugin)
            info.error = f"{hook} failed: {_describe(exc)}"
            log.warning("plugin %s: %s", name, info.error)
            return
        info.origin = info.origin or _origin(plugin)
        if refused:
            info.error = "; ".join(refused)
        elif info.package != "(in-process)" and not (
                info.techniques or info.tasks or info.transports
                or set(info.hooks) - {"register_techniques", "register_tasks", "register_transports"}):
            where = f" (loaded from {info.origin})" if info.origin else ""
            info.error = (f"registers nothing: no technique, task, transport or hook{where}; a folder of the same name "
                          "in the working directory may shadow the installed package")
            log.warning("plugin %s: %s", name, info.error)

    def origins(self) -> dict[str, str]:
        """{plugin name: "version, sha256 of its module file, path"} of every working installed plugin.

        Each Ray worker compares its own with the driver's: the same code, wherever it is installed.
        """
        return {name: f"{info.version} {_code_id(info.origin)} at {info.origin}" for name, info in
                sorted(self.plugins.items()) if info.error is None and info.package != "(in-process)"}

    def check_same_plugins(self, driver: dict[str, str], where: str) -> None:
        """PluginError unless this process loaded the same plugins from the same files as the driver."""
        mine = self.origins()

        def code(text: str | None) -> str | None:  # "version sha" without the path: nodes may install elsewhere
            return text.split(" at ", 1)[0] if text else None

        for name in sorted(set(mine) | set(driver)):
            if code(mine.get(name)) != code(driver.get(name)):
                raise PluginError(f"{where} loaded plugin {name!r} from {mine.get(name) or 'nowhere'}, the driver "
                                  f"from {driver.get(name) or 'nowhere'}: install the same plugins on every node "
                                  "(and mind folders in the working directory that shadow a package)")

    def _withdraw(self, plugin: str, info: PluginInfo) -> None:
        """Take back every technique, task and transport kind a (now broken) plugin registered."""
        for key, owner in list(self._owner.items()):
            if owner != plugin:
                continue
            del self._owner[key]
            kind, _, item = key.partition(":")
            tables: dict[str, dict[str, Any]] = {"technique": self.techniques, "task": self.tasks,
                                                 "transport": self.transports}
            tables[kind].pop(item, None)
        info.techniques, info.tasks, info.transports = [], [], []

    def _register_technique(self, technique: Technique, plugin: str, info: PluginInfo) -> None:
        if not isinstance(technique, Technique) or not technique.name:
            raise PluginError(f"plugin {plugin!r} registered {technique!r}, which is not a named Technique")
        if technique.stage not in STAGE_ORDER:
            raise PluginError(f"technique {technique.name!r} (plugin {plugin!r}): unknown stage {technique.stage!r}")
        key = f"technique:{technique.name}"
        if key in self._owner:
            raise PluginError(
                f"technique {technique.name!r} from plugin {plugin!r} is already registered by plugin {self._owner[key]!r}"
            )
        self._owner[key] = plugin
        self.techniques[technique.name] = technique
        info.techniques.append(technique.name)

    def _register_task(self, task: Task, plugin: str, info: PluginInfo) -> None:
        if not isinstance(task, Task) or not task.name:
            raise PluginError(f"plugin {plugin!r} registered {task!r}, which is not a named Task")
        key = f"task:{task.name}"
        if key in self._owner:
            raise PluginError(f"task {task.name!r} from plugin {plugin!r} is already registered by plugin {self._owner[key]!r}")
        self._owner[key] = plugin
        self.tasks[task.name] = task
        info.tasks.append(task.name)

    def _register_transport(self, kind: TransportKind, plugin: str, info: PluginInfo) -> None:
        if not isinstance(kind, TransportKind) or not kind.name or not callable(kind.transport):
            raise PluginError(f"plugin {plugin!r} registered {kind!r}, which is not a named TransportKind")
        if kind.name in BUILTIN_KINDS:
            raise PluginError(f"transport {kind.name!r} from plugin {plugin!r} is a built-in transport's name")
        key = f"transport:{kind.name}"
        if key in self._owner:
            raise PluginError(
                f"transport {kind.name!r} from plugin {plugin!r} is already registered by plugin {self._owner[key]!r}")
        self._owner[key] = plugin
        self.transports[kind.name] = (kind, plugin)
        info.transports.append(kind.name)

    # -- lookups -----------------------------------------------------------
    def technique(self, name: str) -> Technique:
        """The technique called `name`, or a PluginError listing the installed ones."""
        try:
            return self.techniques[name]
        except KeyError:
            raise PluginError(
                f"unknown technique {name!r}; installed: {', '.join(sorted(self.techniques)) or 'none'}"
            ) from None

    def task(self, name: str) -> Task:
        """The task called `name`, or a PluginError listing the installed ones."""
        try:
            return self.tasks[name]
        except KeyError:
            raise PluginError(f"unknown task {name!r}; installed: {', '.join(sorted(self.tasks)) or 'none'}") from None

    def notify(self, hook: str, **kwargs: Any) -> None:
        """Call an event hook; a plugin's exception is logged, never fatal."""
        try:
            getattr(self.pm.hook, hook)(**kwargs)
        except Exception as exc:
            log.warning("event hook %s failed: %s: %s", hook, type(exc).__name__, exc)


def _origin(plugin: Any) -> str:
    """Where a plugin's code lives: its module file, a namespace package's folder, or its class's module file."""
    module = plugin if isinstance(plugin, types.ModuleType) else sys.modules.get(type(plugin).__module__)
    if module is None:
        return ""
    path = getattr(module, "__file__", None)
    if path:
        return str(path)
    locations = list(getattr(module, "__path__", []) or [])
    return f"{locations[0]} (a namespace package: no code)" if locations else ""


def _code_id(path: str) -> str:
    """sha256 (12 hex digits) of a plugin's module file; "no-code" for a namespace package or none."""
    try:
        with open(path.split(" (", 1)[0], "rb") as f:
            return "sha256:" + hashlib.sha256(f.read()).hexdigest()[:12]
    except OSError:
        return "no-code"


PROJECT_DIST = "edge-orchestrator"  # the distribution whose entry points are the built-ins


def is_builtin(ep: importlib.metadata.EntryPoint) -> bool:
    """An entry point this project's own distribution declares (a fact of its metadata, not of the module's name).

    A third party's package cannot declare entry points in edge-orchestrator's metadata, whatever its
    modules are called; the built-ins live in the top-level `plugins` package (the project's fixed layout).
    """
    dist = ep.dist
    return dist is not None and dist.name.replace("_", "-").lower() == PROJECT_DIST


#: Seconds an outside plugin's import may take in the probe (a child process) before it is called hanging.
IMPORT_TIMEOUT_ENV = "EDGE_ORCHESTRATOR_PLUGIN_IMPORT_TIMEOUT_S"
IMPORT_TIMEOUT_S = 60.0
_PROBE_DONE = "edge-orchestrator-probe-done"
_PROBE = f"""
import importlib.metadata, os, sys
name, value = sys.argv[1], sys.argv[2]
ep = [e for e in importlib.metadata.entry_points(group={PROJECT_NAME!r}) if (e.name, e.value) == (name, value)][0]
try:
    ep.load()
except BaseException:  # an exception is the in-process import's to report, with its own words
    pass
sys.stdout.write({_PROBE_DONE!r}); sys.stdout.flush()
os._exit(0)  # threads the plugin started must not keep the probe alive
"""


def _import_timeout() -> float:
    try:
        value = float(os.environ.get(IMPORT_TIMEOUT_ENV, IMPORT_TIMEOUT_S))
    except ValueError:
        return IMPORT_TIMEOUT_S
    return value if value > 0 else IMPORT_TIMEOUT_S


def _probe_key(ep: importlib.metadata.EntryPoint) -> str | None:
    """What the probe's verdict depends on: the entry point and the size and mtime of every file of its module
    (a package: every .py under it) and of its distribution's entry_points.txt; None when its code is not found."""
    top = ep.value.split(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    files: list[Path] = []
    if spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            files += sorted(Path(folder).rglob("*.py"))[:2000]
    elif spec.origin and spec.origin not in ("built-in", "frozen"):
        files.append(Path(spec.origin))
    dist = ep.dist
    if dist is not None and hasattr(dist, "_path"):
        files.append(Path(dist._path) / "entry_points.txt")  # noqa: SLF001 - its metadata folder
    h = hashlib.sha256(f"{sys.executable}\0{ep.name}\0{ep.value}\0{dist.version if dist else ''}".encode())
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def probe_import(ep: importlib.metadata.EntryPoint) -> str | None:
    """Import an outside plugin in a child process first, within a bounded time: why it is broken (it hangs, or its
    import ends the process, as os._exit does), or None. The verdict is cached until the plugin's files change."""
    key = _probe_key(ep)
    cache = None
    if key is not None:
        try:
            cache = cache_dir("plugins") / "import-probes.json"
            known = json.loads(cache.read_text()) if cache.exists() else {}
        except Exception:  # noqa: BLE001 - a cache only: probe again
            cache, known = None, {}
        if isinstance(known, dict) and key in known:
            return known[key] or None
    timeout = _import_timeout()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, ep.name, ep.value], capture_output=True, text=True,
                              timeout=timeout, env=env, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        problem = (f"its import did not finish within {timeout:g} s (it hangs?; "
                   f"${IMPORT_TIMEOUT_ENV} gives it longer)")
    except OSError:
        return None  # no child process here: import it in-process as before
    else:
        if _PROBE_DONE in done.stdout:
            problem = ""
        else:
            how = (f"killed by signal {-done.returncode}" if done.returncode < 0
                   else f"exit code {done.returncode}")
            problem = f"its import ended the process ({how}; os._exit or a crash)"
    if cache is not None:
        try:
            known = json.loads(cache.read_text()) if cache.exists() else {}
            known = known if isinstance(known, dict) else {}
            known[key] = problem
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except (OSError, ValueError):
            pass
    return problem or None


def _describe(exc: BaseException) -> str:
    """An exception as one line; `sys.exit()` called by a plugin said as such."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})" if exc.code is not None else "called sys.exit()"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def get_plugin_manager() -> PluginRegistry:
    """Build the registry: hookspecs, then every entry-point plugin (the built-ins are entry points too)."""
    registry = PluginRegistry()
    registry.load_entry_points()
    return registry
