"""Reading a YAML file we were given (a profile, an inventory): size and alias bounds, duplicate keys, lines.

Errors come out as `FILE:LINE: field.path: message`, LINE being the line of the offending field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import yaml
from pydantic import ValidationError

from orchestrator.errors import OrchestratorError, ProfileError

#: A profile (or inventory) file larger than this is refused before it is read: real ones are a few KB,
#: and parsing 20 MB of YAML takes a minute.
MAX_YAML_BYTES = 1024 * 1024
#: Values a YAML file may hold once its aliases are expanded (`*a` repeated: a "billion laughs").
MAX_YAML_VALUES = 200_000

def dotted(loc: tuple[str | int, ...]) -> str:
    """A pydantic error location as `field.path[0].name` (`(top level)` when empty)."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _keys(node: yaml.MappingNode) -> dict[str, tuple[int, Any]]:
    """A mapping node's scalar keys -> (line, value node), made once per node and kept on it: looking up
    each of an inventory's 60,000 hosts by scanning its mapping was quadratic (minutes for 10 MB).

    A later key wins, as merged (`<<`) keys come first and the file's own win. The index is made anew
    when the node's entries change in number (the constructor flattens merge keys in place)."""
    cached = getattr(node, "_eo_keys", None)
    if cached is not None and cached[0] == len(node.value):
        return cached[1]
    index = {key.value: (key.start_mark.line + 1, value) for key, value in node.value
             if isinstance(key, yaml.ScalarNode)}
    node._eo_keys = (len(node.value), index)
    return index


def line_of(node: Any, loc: tuple[str | int, ...]) -> int:
    """The 1-based line of the field at `loc` in a YAML node tree (or of its nearest parent that exists)."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            found = _keys(node).get(str(part))
            if found is not None:
                line, child = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line


class YamlFile(NamedTuple):
    """A YAML file read once: its text, its node tree (for line numbers) and its data."""

    text: str
    node: Any
    data: Any


def read_yaml(path: Path, what: str = "profile", error: type[OrchestratorError] = ProfileError,
              max_bytes: int = MAX_YAML_BYTES) -> YamlFile:
    """Read one YAML document, parsing it once; every problem is `error("FILE[:LINE]: ...: message")`.

    Refused: a file over `max_bytes` (before it is read), one that is not UTF-8 text, bad YAML,
    a key given twice in one mapping, an alias inside its own anchor, and aliases that expand
    to more than MAX_YAML_VALUES values.
    """
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size} bytes: a {what} file is at most {max_bytes // 1024} KB")
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)  # not the size stat gave: a pipe or a device has none
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    if len(raw) > max_bytes:
        raise error(f"{path}: over {max_bytes} bytes: a {what} file is at most {max_bytes // 1024} KB")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise error(f"{path}:{line}: (YAML): not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}), "
                    f"({what} files are UTF-8 YAML)") from None
    return parse_yaml(text, path, error)


def parse_yaml(text: str, path: Path, error: type[OrchestratorError] = ProfileError) -> YamlFile:
    """Parse YAML text once (as `read_yaml` does after reading it); errors name `path`, the file it came from."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is not None:
            _check_nodes(node, path, error)
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        position = getattr(exc, "position", None)  # ReaderError (bad characters) has no mark
        line = mark.line + 1 if mark else (text.count("\n", 0, position) + 1 if position is not None else 1)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{path}:{line}: (YAML): {problem}") from None
    except RecursionError:
        raise error(f"{path}:1: (YAML): nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlFile(text, node, data)


def _check_nodes(root: Any, path: Path, error: type[OrchestratorError]) -> None:
    """Duplicate keys, recursive aliases and alias bombs, in one walk that visits each node once."""
    expanded: dict[int, int] = {}  # node id -> how many values it stands for, aliases expanded (nodes done)
    on_path: set[int] = set()  # the node being walked and its parents
    stack: list[tuple[Any, tuple[str | int, ...], bool]] = [(root, (), False)]
    while stack:
        node, loc, done = stack.pop()
        children = _children(node)
        if done:
            on_path.discard(id(node))
            expanded[id(node)] = 1 + sum(expanded[id(child)] for _, child in children)
            continue
        if id(node) in expanded:
            continue  # an alias of a node already checked
        if id(node) in on_path:  # the alias's own line: the node's start is its anchor's
            raise error(f"{path}:{line_of(root, loc)}: {dotted(loc)}: an alias inside its own anchor "
                        "(a recursive YAML structure)")
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, _ in node.value:
                if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                if (key.tag, key.value) in seen:
                    raise error(f"{path}:{key.start_mark.line + 1}: {dotted((*loc, key.value))}: duplicate key "
                                f"(first on line {seen[key.tag, key.value]})")
                seen[key.tag, key.value] = key.start_mark.line + 1
        on_path.add(id(node))
        stack.append((node, loc, True))
        stack.extend((child, (*loc, part), False) for part, child in reversed(children))
    if expanded[id(root)] > max(MAX_YAML_VALUES, 2 * len(expanded)):  # aliases, not the file size, made it big
        loc, count = (), expanded[id(root)]
        if _children(root):  # name the biggest top-level field
            part, child = max(_children(root), key=lambda pc: expanded[id(pc[1])])
            loc, count = (part,), expanded[id(child)]
        raise error(f"{path}:{line_of(root, loc)}: {dotted(loc)}: its aliases expand to {count} values "
                    f"(at most {MAX_YAML_VALUES})")


def _children(node: Any) -> list[tuple[str | int, Any]]:
    # keys are left out: a key that is not a scalar cannot be constructed anyway (unhashable)
    if isinstance(node, yaml.MappingNode):
        return [(key.value if isinstance(key, yaml.ScalarNode) else "?", value) for key, value in node.value]
    if isinstance(node, yaml.SequenceNode):
        return list(enumerate(node.value))
    return []


def validation_message(path: Path, node: Any, exc: ValidationError) -> str:
    """The first pydantic error as `FILE:LINE: field.path: message`, counting the others."""
    first = exc.errors()[0]
    loc = tuple(first["loc"])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    elif first["type"] == "missing":
        message = "field required"
    elif first["type"] == "value_error":
        message = message.removeprefix("Value error, ")
    elif first["type"] in ("model_type", "dict_type", "list_type"):
        wanted = "a list" if first["type"] == "list_type" else "a mapping"
        message = f"expected {wanted}, got {_yaml_kind(first.get('input'))}"
    more = len(exc.errors()) - 1
    suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
    return f"{path}:{line_of(node, loc)}: {dotted(loc)}: {message}{suffix}"


def _yaml_kind(value: Any) -> str:
    kinds = {dict: "a mapping", list: "a list", str: "a string", bool: "true/false", int: "a number",
             float: "a number", type(None): "nothing"}
    return kinds.get(type(value), type(value).__name__)


