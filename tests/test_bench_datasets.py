"""SafeWatch-Bench folder layout and JSONL manifest parsing (SPEC §7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import videos

from guardrail.bench.datasets import load_dataset
from guardrail.errors import UsageError


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def clip() -> bytes:
    return videos.encode_video("mp4_h264", num_frames=8, fps=4)


@pytest.fixture
def safewatch_root(tmp_path, clip) -> Path:
    """real/C1 with two subcategories, genai/C3 with one; one video missing on disk."""
    for name in ("real/videos/C1/evident_benchmark/a.mp4", "real/videos/C1/evident_benchmark/b.mp4",
                 "real/videos/C1/benign_benchmark/c.mp4", "genai/videos/C3/d.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        videos.write((tmp_path / name).parent, Path(name).name, clip)
    write_json(tmp_path / "real/C1/evident_benchmark.json", [
        {"video_path": "real/videos/C1/evident_benchmark/a.mp4", "labels": [1],
         "subcategories": ["evident"], "video_content": "...", "violate_reason": "..."},
        {"video_path": "real/videos/C1/evident_benchmark/b.mp4", "labels": [1, 3]},
        {"video_path": "real/videos/C1/evident_benchmark/gone.mp4", "labels": [1]},
    ])
    write_json(tmp_path / "real/C1/Benign_benchmark.json", [
        {"video_path": "real/videos/C1/benign_benchmark/c.mp4", "labels": []}])
    write_json(tmp_path / "genai/C3/sexual violence_benchmark.json", [
        {"video_path": "genai/videos/C3/d.mp4", "labels": [3, 1]}])
    (tmp_path / "README.md").write_text("not part of the layout")
    return tmp_path


def test_safewatch_layout(safewatch_root):
    ds = load_dataset(safewatch_root)
    assert ds.kind == "safewatch"
    got = [(i.split, i.category, i.subcategory, i.video_path, i.labels, i.benign, i.exists)
           for i in ds.items]
    assert got == [
        ("genai", "C3", "sexual violence", "genai/videos/C3/d.mp4", ("C3", "C1"), False, True),
        ("real", "C1", "benign", "real/videos/C1/benign_benchmark/c.mp4", (), True, True),
        ("real", "C1", "evident", "real/videos/C1/evident_benchmark/a.mp4", ("C1",), False, True),
        ("real", "C1", "evident", "real/videos/C1/evident_benchmark/b.mp4", ("C1", "C3"), False,
         True),
        ("real", "C1", "evident", "real/videos/C1/evident_benchmark/gone.mp4", ("C1",), False,
         False),
    ]
    assert ds.items[0].path == safewatch_root / "genai/videos/C3/d.mp4"


def test_one_split_folder_resolves_paths_from_its_parent(safewatch_root):
    ds = load_dataset(safewatch_root / "real")
    assert {i.split for i in ds.items} == {"real"}
    assert len(ds.items) == 4
    assert sum(i.exists for i in ds.items) == 3


def test_duplicate_videos_and_limit(safewatch_root):
    write_json(safewatch_root / "real/C3/fighting_benchmark.json", [
        {"video_path": "real/videos/C1/evident_benchmark/b.mp4", "labels": [3, 1]}])
    ds = load_dataset(safewatch_root)
    assert len(ds.items) == 6 and len(ds.videos()) == 5
    small = ds.limit(2)
    assert [i.video_path for i in small.videos()] == [i.video_path for i in ds.videos()[:2]]


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read"),
    ('{"video_path": "x.mp4"}', "JSON list"),
    ('[{"labels": [1]}]', "video_path"),
    ('[{"video_path": "x.mp4", "labels": [0]}]', "not a category"),
    ('[{"video_path": "x.mp4", "labels": [true]}]', "not a category"),
    ('[{"video_path": "x.mp4", "labels": 3}]', "must be a list"),
])
def test_safewatch_errors_name_the_file(tmp_path, content, message):
    bad = tmp_path / "real/C2/abuse_benchmark.json"
    bad.parent.mkdir(parents=True)
    bad.write_text(content)
    with pytest.raises(UsageError, match=message) as info:
        load_dataset(tmp_path)
    assert str(bad) in str(info.value)


def test_not_a_dataset(tmp_path):
    with pytest.raises(UsageError, match="not a dataset"):
        load_dataset(tmp_path)
    with pytest.raises(UsageError, match="no such dataset"):
        load_dataset(tmp_path / "nope")


def test_manifest(tmp_path, clip):
    videos.write(tmp_path, "a.mp4", clip)
    lines = [
        {"video": "a.mp4", "labels": ["C3"], "subcategory": "Fighting"},
        {"video": "a.mp4", "labels": [2, "C3"], "category": "C2", "split": "real"},
        {"video": "/abs/missing.mp4", "labels": []},
        {"video_path": "b.mp4"},
    ]
    manifest = tmp_path / "set.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    ds = load_dataset(manifest)
    assert ds.kind == "manifest" and ds.root == tmp_path
    got = [(i.video_path, i.labels, i.subcategory, i.category, i.split, i.benign, i.exists)
           for i in ds.items]
    assert got == [
        ("a.mp4", ("C3",), "fighting", None, "", False, True),
        ("a.mp4", ("C2", "C3"), "c2", "C2", "real", False, True),
        ("/abs/missing.mp4", (), "benign", None, "", True, False),
        ("b.mp4", (), "benign", None, "", True, False),
    ]
    (tmp_path / "d").mkdir()
    (tmp_path / "d/manifest.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert load_dataset(tmp_path / "d").kind == "manifest"


@pytest.mark.parametrize("line, message", [
    ("nope", "not JSON"), ('{"labels": []}', "needs a string `video`"),
    ('{"video": "a.mp4", "labels": "C1"}', "must be a list"),
])
def test_manifest_errors_name_the_line(tmp_path, line, message):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"video": "ok.mp4"}\n' + line + "\n")
    with pytest.raises(UsageError, match=message) as info:
        load_dataset(manifest)
    assert f"{manifest}:2" in str(info.value)
