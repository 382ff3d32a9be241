"""Labelled video sets: SafeWatch-Bench's folder layout and a generic JSONL manifest.

SafeWatch-Bench: `<root>/{real,genai}/C<n>/<subcategory>_benchmark.json`, each a JSON list of
`{"video_path": "real/videos/C1/evident_benchmark/x.mp4", "labels": [1, 3], ...}`; integer label n
is category `"Cn"`, `[]` is benign; the subcategory is the file stem before `_benchmark`,
lower-cased. `<root>` may also be one split folder (`<root>/C<n>/...`). A `video_path` is looked
up under the root, then its parent, then beside the JSON file.

Manifest: a `.jsonl` file of `{"video": path, "labels": ["C3"], "subcategory": "..."}` lines
(optional `category`, `split`); paths are relative to the manifest's folder.

Missing videos are kept as items (`exists` is False): the runner reports them, never crashes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from guardrail.errors import UsageError

SUFFIX = "_benchmark"
_CATEGORY_DIR = re.compile(r"^C\d+$")


@dataclass(frozen=True)
class Item:
    """One dataset entry. `video_path` is the video's name as the dataset writes it (the key of
    its prediction); `path` is where it was looked for on disk."""

    video_path: str
    path: Path
    labels: tuple[str, ...]          # category ids, e.g. ("C3",); () = benign
    subcategory: str
    category: str | None             # SafeWatch: the C<n> folder; manifest: `category` field
    split: str                       # SafeWatch: real | genai; manifest: `split` field or ""
    benign: bool                     # SafeWatch: the benign subcategory; manifest: no labels

    @property
    def exists(self) -> bool:
        return self.path.is_file()


@dataclass(frozen=True)
class Dataset:
    root: Path
    kind: str                        # "safewatch" | "manifest"
    items: tuple[Item, ...]

    def videos(self) -> list[Item]:
        """One item per distinct video (first occurrence), in dataset order."""
        seen: dict[str, Item] = {}
        for item in self.items:
            seen.setdefault(item.video_path, item)
        return list(seen.values())

    def limit(self, n: int | None) -> Dataset:
        """Only the entries of the first `n` distinct videos."""
        if n is None:
            return self
        keep = {item.video_path for item in self.videos()[:n]}
        return Dataset(self.root, self.kind, tuple(i for i in self.items if i.video_path in keep))


def load_dataset(path: str | os.PathLike) -> Dataset:
    """A SafeWatch-Bench folder or a JSONL manifest (a `.jsonl` file, or a folder holding
    `manifest.jsonl`)."""
    path = Path(path)
    if path.is_file():
        return load_manifest(path)
    if not path.is_dir():
        raise UsageError(f"{path}: no such dataset (a SafeWatch-Bench folder or a .jsonl manifest)")
    if (path / "manifest.jsonl").is_file():
        return load_manifest(path / "manifest.jsonl")
    return load_safewatch(path)


def category_id(label: object, where: str) -> str:
    """SafeWatch's integer label n (or "n", or "Cn") -> "Cn"."""
    if isinstance(label, bool):
        raise UsageError(f"{where}: label {label!r} is not a category")
    if isinstance(label, int) and label >= 1:
        return f"C{label}"
    if isinstance(label, str) and label.strip():
        text = label.strip()
        return f"C{int(text)}" if text.isdigit() and int(text) >= 1 else text
    raise UsageError(f"{where}: label {label!r} is not a category (an integer >= 1 or an id)")


# ----------------------------------------------------------------------------- SafeWatch-Bench

def _benchmark_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(split, file) for every `<split>/C<n>/*_benchmark.json`, or `C<n>/...` when root is a
    split folder; sorted, so the item order is stable."""
    direct = sorted(p for p in root.glob(f"C*/*{SUFFIX}.json")
                    if _CATEGORY_DIR.match(p.parent.name))
    if direct:
        yield from ((root.name, p) for p in direct)
        return
    for p in sorted(root.glob(f"*/C*/*{SUFFIX}.json")):
        if _CATEGORY_DIR.match(p.parent.name):
            yield p.parent.parent.name, p


def load_safewatch(root: str | os.PathLike) -> Dataset:
    root = Path(root)
    items: list[Item] = []
    files = list(_benchmark_files(root))
    if not files:
        raise UsageError(f"{root}: no `{{real,genai}}/C<n>/<subcategory>{SUFFIX}.json` files "
                         "and no manifest.jsonl; not a dataset")
    for split, file in files:
        try:
            entries = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            raise UsageError(f"{file}: cannot read: {error}") from None
        if not isinstance(entries, list):
            raise UsageError(f"{file}: expected a JSON list of items")
        sub = file.stem[: -len(SUFFIX)].lower()
        for i, entry in enumerate(entries):
            where = f"{file}: item {i}"
            if not isinstance(entry, dict) or not isinstance(entry.get("video_path"), str):
                raise UsageError(f"{where}: needs a string `video_path`")
            labels = entry.get("labels") or []
            if not isinstance(labels, list):
                raise UsageError(f"{where}: `labels` must be a list")
            name = entry["video_path"]
            items.append(Item(name, _resolve(name, (root, root.parent, file.parent)),
                              tuple(dict.fromkeys(category_id(x, where) for x in labels)),
                              sub, file.parent.name, split, sub == "benign"))
    return Dataset(root, "safewatch", tuple(items))


def _resolve(name: str, bases: tuple[Path, ...]) -> Path:
    p = Path(name)
    if p.is_absolute():
        return p
    for base in bases:
        if (base / p).is_file():
            return base / p
    return bases[0] / p


# ----------------------------------------------------------------------------- manifest

def load_manifest(file: str | os.PathLike) -> Dataset:
    file = Path(file)
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{file}: cannot read: {error}") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{file}:{n}"
        try:
            entry = json.loads(line)
        except ValueError as error:
            raise UsageError(f"{where}: not JSON: {error}") from None
        name = entry.get("video", entry.get("video_path")) if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise UsageError(f"{where}: needs a string `video`")
        labels = entry.get("labels") or []
        if not isinstance(labels, list):
            raise UsageError(f"{where}: `labels` must be a list")
        labels = tuple(dict.fromkeys(category_id(x, where) for x in labels))
        sub = str(entry.get("subcategory") or ("benign" if not labels else labels[0])).lower()
        category = entry.get("category")
        items.append(Item(name, _resolve(name, (file.parent,)), labels, sub,
                          category_id(category, where) if category is not None else None,
                          str(entry.get("split", "")), not labels))
    if not items:
        raise UsageError(f"{file}: no items")
    return Dataset(file.parent, "manifest", tuple(items))
