"""Unknown keys in a Serve config file, with their lines, before anything starts.

Ray's own schema ignores unknown top-level keys (a typo like `http_option:` starts the server
with defaults), and pydantic's errors for `args` end in a documentation URL. Here every mapping
of the file is checked against the model that reads it: Ray's schema models for the file,
`ServiceSettings` for an application's `args`. Each unknown key is one line:
`deploy/serve.yaml:31: applications[0].args.limits.max_upload: unknown key (did you mean
max_upload_bytes?)`.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel

from guardrail.errors import PolicyError, UsageError
from guardrail.yaml_lines import KeyPath, Walker, compose, format_path


def read_checked(text: str, source: str) -> tuple[dict[str, Any], dict[KeyPath, int]]:
    """Parse a Serve config and refuse unknown keys anywhere (UsageError, one line per key).
    Returns the values and the line of every key path."""
    from ray.serve.schema import ServeDeploySchema

    from guardrail.serve.settings import ServiceSettings

    try:
        root = compose(text, source)
    except PolicyError as err:
        raise UsageError(str(err)) from None
    walker = Walker()
    raw = walker.walk(root, ()) if root is not None else {}
    if walker.errors:
        raise UsageError("\n".join(f"{source}:{line}: {msg}" for line, msg in walker.errors))
    if not isinstance(raw, dict):
        raise UsageError(f"{source}:1: a Serve config is a mapping")
    problems: list[tuple[int, str]] = []
    _check(ServeDeploySchema, raw, (), walker.lines, problems)
    apps = raw.get("applications")
    for i, app in enumerate(apps if isinstance(apps, list) else []):
        if isinstance(app, dict) and isinstance(app.get("args"), dict):
            _check(ServiceSettings, app["args"], ("applications", i, "args"), walker.lines,
                   problems)
    if problems:
        raise UsageError("\n".join(f"{source}:{line}: {msg}" for line, msg in sorted(problems)))
    return raw, walker.lines


def explain(err: Any, source: str, lines: dict[KeyPath, int], prefix: KeyPath = ()) -> str:
    """A pydantic ValidationError as `source:line: path: message` lines (no URLs)."""
    out = []
    for e in err.errors():
        path = (*prefix, *e["loc"])
        line = next((lines[path[:k]] for k in range(len(path), 0, -1) if path[:k] in lines), 1)
        out.append(f"{source}:{line}: {format_path(path) or 'file'}: {e['msg']}")
    return "\n".join(out)


def _check(model: type[BaseModel], value: Any, path: KeyPath, lines: dict[KeyPath, int],
           problems: list[tuple[int, str]]) -> None:
    if not isinstance(value, dict):
        return
    fields = model.model_fields
    names = {f.alias or name: f for name, f in fields.items()} | dict(fields)
    for key, item in value.items():
        child = (*path, key)
        if key not in names:
            close = difflib.get_close_matches(str(key), list(names), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problems.append((lines.get(child, 1), f"{format_path(child)}: unknown key{hint}"))
            continue
        inner = _model_of(names[key].annotation)
        if inner is None:
            continue
        sub, many = inner
        if many and isinstance(item, list):
            for j, element in enumerate(item):
                _check(sub, element, (*child, j), lines, problems)
        elif not many:
            _check(sub, item, child, lines, problems)


def _model_of(annotation: Any) -> tuple[type[BaseModel], bool] | None:
    """(model, is_list) for `Model`, `Model | None`, `list[Model]`; None for anything else."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        found = [m for m in map(_model_of, typing.get_args(annotation)) if m is not None]
        return found[0] if len(found) == 1 else None
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        if args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            return args[0], True
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None
