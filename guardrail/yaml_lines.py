"""YAML text to plain Python values, with the 1-based line of every key path.

Composes the node tree with a SafeLoader (no object construction, no python tags) and walks it,
building dicts, lists and scalars while recording `("categories", 3, "threshold") -> 12`, so
every later validation error can point at its line. Structural problems (forbidden tags, invalid
scalars, duplicate keys, recursive or exploding aliases, excessive nesting) are collected as
`(line, "path: message")` rather than raised. YAML syntax errors raise `PolicyError`.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from guardrail.errors import PolicyError

MAX_NODES = 100_000  # bounds alias expansion ("billion laughs")
MAX_DEPTH = 64

KeyPath = tuple[str | int, ...]  # e.g. ("categories", 3, "threshold")
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


MAP_TAG = "tag:yaml.org,2002:map"
_SEQ = "tag:yaml.org,2002:seq"
_SCALAR_TAGS = {
    f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "timestamp", "binary")
}


# NOTE: SafeConstructor's scalar constructors raise plain Python errors on explicit-tag garbage.
_SCALAR_ERRORS = (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError)


def _tag(tag: str) -> str:
    return "!!" + tag.removeprefix("tag:yaml.org,2002:") if tag.startswith("tag:yaml.org") else tag


class _Loader(yaml.SafeLoader):
    """SafeLoader used only to compose nodes; values are built by `_Walker`."""


def compose(text: str, source: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 1
        problem = ", ".join(p for p in (err.context, err.problem) if p) or "invalid YAML"
        raise PolicyError(f"{source}:{line}: yaml: {problem}") from None
    except yaml.reader.ReaderError as err:
        line = text.count("\n", 0, max(err.position, 0)) + 1
        raise PolicyError(f"{source}:{line}: yaml: {err.reason}") from None
    except yaml.YAMLError as err:
        raise PolicyError(f"{source}:1: yaml: {str(err).splitlines()[0]}") from None
    except RecursionError:
        raise PolicyError(f"{source}:1: yaml: nested too deeply") from None


class Walker:
    """Builds plain values from a node tree, recording line numbers and structural errors."""

    def __init__(self) -> None:
        self.lines: dict[KeyPath, int] = {}
        self.errors: list[tuple[int, str]] = []  # (line, "path: message")
        self.bad: set[KeyPath] = set()  # paths whose value could not be built
        self.nodes = 0
        self._constructor = yaml.constructor.SafeConstructor()
        self._active: set[int] = set()

    def error(self, node: yaml.Node, path: KeyPath, message: str, bad: bool = True) -> None:
        if bad:
            self.bad.add(path)
        where = format_path(path)
        self.errors.append((node.start_mark.line + 1, f"{where}: {message}" if where else message))

    def walk(self, node: yaml.Node, path: KeyPath) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        self.nodes += 1
        if id(node) in self._active:
            self.error(node, path, "recursive alias")
            return None
        if len(path) > MAX_DEPTH:
            self.error(node, path, f"nested deeper than {MAX_DEPTH} levels")
            return None
        if self.nodes > MAX_NODES:  # aliases can expand a small file into a huge tree
            if self.nodes == MAX_NODES + 1:
                self.error(node, path, f"more than {MAX_NODES} values (expanded aliases?)")
            return None
        self._active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode) and node.tag == MAP_TAG:
                return self._mapping(node, path)
            if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ:
                return [self.walk(item, (*path, i)) for i, item in enumerate(node.value)]
            if isinstance(node, yaml.ScalarNode) and node.tag in _SCALAR_TAGS:
                try:
                    return self._constructor.construct_object(node, deep=True)
                except _SCALAR_ERRORS:  # e.g. `!!bool maybe`, `!!int x`, `!!timestamp 2024-13-45`
                    self.error(node, path, f"invalid value for {_tag(node.tag)}")
                    return None
            self.error(node, path, f"tag {_tag(node.tag)} is not allowed")
            return None
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.error(key_node, path, "keys must be plain strings", bad=False)
                continue
            key = key_node.value  # the key as written: `on:` stays "on", not True
            child = (*path, key)
            if key in out:
                first = self.lines[child]
                msg = f"duplicate key '{key}' (first at line {first})"
                self.error(key_node, child, msg, bad=False)
                continue
            self.lines[child] = key_node.start_mark.line + 1
            out[key] = self.walk(value_node, child)
        return out


def format_path(path: KeyPath) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        name = part if _PLAIN_KEY.fullmatch(part) else repr(part)  # odd keys stay on one line
        out += f".{name}" if out else name
    return out
