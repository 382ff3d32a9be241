"""`guardrail.tiny`: tiny Qwen-VL checkpoints that load offline, run, and are byte-reproducible."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from guardrail.errors import UsageError
from guardrail.tiny import FAMILIES, make_tiny

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FPS, TOTAL_FRAMES = 30.0, 300  # a 10 s clip at 30 fps, 8 frames sampled from it
INDICES = np.linspace(0, TOTAL_FRAMES - 1, 8).round().astype(int).tolist()

# ~3,100 characters in SafeWatch's prompt style, worded apart from the tokenizer's corpus.
BOXES = {
    "C1: Sexual Content": "Protect users, especially minors, from sexual exploitation.",
    "C2: Harassment & Bullying": "A respectful environment free of intimidation.",
    "C3: Threats, Violence & Harm": "No glorification of violence, self-harm or dangerous acts.",
    "C4: False & Deceptive Information": "A trustworthy platform without deception.",
    "C5: Illegal/Regulated Activities": "Legal compliance for trade, gambling and weapons.",
    "C6: Hateful Content & Extremism": "Stand against hatred, discrimination and extremism.",
}
PROMPT = (
    "You are a helpful video guardrail model to detect if a video contains unsafe content.\n"
    'Your tasks:\n1. Summarize the content of the video, starting with "DESCRIPTION:".\n'
    "2. Analyze the video for the presence of the following harmful categories.\n"
    "<BEGIN HARMFUL CATEGORIES>\n" + "; ".join(BOXES) + "\n<END HARMFUL CATEGORIES>\n"
    "<BEGIN HARMFUL CATEGORIES EXPLANATIONS>\n"
    + "".join(
        f"<box>{name}:\nCore Value: {value}\n"
        "[BLOCKED] Content that shows, promotes or glorifies this kind of harm to people.\n"
        "[BLOCKED] Graphic, explicit or realistic depictions meant to shock or incite others.\n"
        "[ALLOWED] Educational, news, documentary or artistic context without endorsement.\n"
        "</box>\n"
        for name, value in BOXES.items()
    )
    + "<END HARMFUL CATEGORIES EXPLANATIONS>\n"
    'Answer in exactly three lines. Line 1 starts with "DESCRIPTION:" and describes the video '
    'in one to three sentences. Line 2 starts with "GUARDRAIL:" followed by a JSON object '
    'with one boolean per category key, for example "C1(Sexual Content)": false. Set a value '
    "to true only for the most relevant categories; set all of them to false when the video is "
    'safe. Line 3 starts with "EXPLANATION:" and explains each flagged category, citing the '
    "specific rules that were violated.\n"
)


@pytest.fixture(scope="module", autouse=True)
def _offline():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    for family in FAMILIES:
        make_tiny(root / family, family)
    return root


@pytest.fixture(scope="module")
def loaded(tiny_root):
    """family -> (model, processor), loaded the way the engine loads a model directory."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return {
        family: (
            AutoModelForImageTextToText.from_pretrained(tiny_root / family).eval(),
            AutoProcessor.from_pretrained(tiny_root / family),
        )
        for family in FAMILIES
    }


def video_inputs(processor, size: int, text: str = "Is this video safe?"):
    """8 pre-decoded RGB frames + the real fps, through the official processor."""
    frames = np.random.default_rng(size).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    metadata = {
        "fps": FPS,
        "total_num_frames": TOTAL_FRAMES,
        "frames_indices": INDICES,
        "duration": TOTAL_FRAMES / FPS,
    }
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return processor(
        text=[prompt],
        videos=[frames],
        video_metadata=[metadata],
        do_sample_frames=False,
        return_tensors="pt",
    )


def sha256_tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_config_names_the_family_and_matches_the_tokenizer(tiny_root, loaded, family):
    config = json.loads((tiny_root / family / "config.json").read_text())
    assert config["model_type"] == family
    model, processor = loaded[family]
    tok = processor.tokenizer
    assert sum(p.numel() for p in model.parameters()) < 50_000_000
    assert model.dtype == torch.float32
    assert model.config.video_token_id == tok.convert_tokens_to_ids("<|video_pad|>")
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.config.vision_end_token_id == tok.convert_tokens_to_ids("<|vision_end|>")
    assert model.generation_config.eos_token_id[0] == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.get_text_config().vocab_size == len(tok)


def test_tokenizer_reads_verdicts_in_one_token_and_is_compact(loaded):
    tok = loaded["qwen2_5_vl"][1].tokenizer
    true, false = tok.encode(" true"), tok.encode(" false")
    assert len(true) == len(false) == 1 and true != false
    colon = tok.encode('":')
    assert len(colon) == 1
    assert tok.encode('": true') == colon + true
    assert tok.encode('"C1(Sexual Content)": false')[-1:] == false
    assert 2_800 < len(PROMPT) < 3_400
    ids = tok.encode(PROMPT)
    assert len(ids) < 1_200
    assert tok.decode(ids) == PROMPT


def test_chat_template_renders_video_parts(loaded):
    processor = loaded["qwen2_5_vl"][1]
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith(
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>hi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_processor_and_forward_on_eight_frames(loaded, family):
    model, processor = loaded[family]
    counts = {}
    for size in (112, 224):
        inputs = video_inputs(processor, size)
        assert set(inputs) >= {"pixel_values_videos", "video_grid_thw", "mm_token_type_ids"}
        ids, types = inputs["input_ids"][0], inputs["mm_token_type_ids"][0]
        is_video = ids == model.config.video_token_id
        merge = processor.video_processor.merge_size
        assert int(is_video.sum()) == int(inputs["video_grid_thw"].prod()) // merge**2
        assert inputs["video_grid_thw"][0, 0] == 4  # 8 frames, temporal patch 2
        assert torch.equal(types == 2, is_video) and not (types == 1).any()
        counts[size] = int(is_video.sum())
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape == (1, ids.shape[0], len(processor.tokenizer))
        assert torch.isfinite(logits).all()
    assert 16 <= counts[112] < counts[224] <= 256


@pytest.mark.parametrize("family", FAMILIES)
def test_rope_index_gets_the_real_fps(loaded, family):
    model, processor = loaded[family]
    inputs = video_inputs(processor, 112)
    extra = {k: inputs[k] for k in ("second_per_grid_ts",) if k in inputs}
    pos, _ = model.model.get_rope_index(
        inputs["input_ids"],
        inputs["mm_token_type_ids"],
        video_grid_thw=inputs["video_grid_thw"],
        attention_mask=inputs["attention_mask"],
        **extra,
    )  # pos: [3, B, T]
    assert pos.shape == (3, 1, inputs["input_ids"].shape[1])
    text = inputs["mm_token_type_ids"][0] == 0
    assert (pos[0, 0, text] == pos[1, 0, text]).all() and (pos[0, 0, text] == pos[2, 0, text]).all()
    video_t = pos[0, 0, inputs["mm_token_type_ids"][0] == 2].unique()
    if family == "qwen2_5_vl":
        # 8 frames over 10 s: 2.5 s per temporal patch; a lost fps (24 default) collapses these.
        assert extra["second_per_grid_ts"].tolist() == [pytest.approx(2.5)]
        assert len(video_t) == 4
    if family == "qwen3_vl":
        decoded = processor.tokenizer.decode(inputs["input_ids"][0])
        stamps = [(a + b) / 2 / FPS for a, b in zip(INDICES[::2], INDICES[1::2], strict=True)]
        assert all(f"<{s:.1f} seconds><|vision_start|>" in decoded for s in stamps)
        assert len(video_t) == 4  # one block, at its own position, per temporal patch


def test_same_seed_gives_identical_files_across_processes(tiny_root, tmp_path):
    code = (
        "import sys; from guardrail.tiny import FAMILIES, make_tiny\n"
        "for f in FAMILIES: make_tiny(sys.argv[1] + '/' + f, f)\n"
    )
    outs = [tmp_path / "run1", tmp_path / "run2"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(out)],
            env={**os.environ, "PYTHONHASHSEED": str(i), "HF_HUB_OFFLINE": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, out in enumerate(outs, start=1)
    ]  # two fresh processes at once, with different hash seeds
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    first = sha256_tree(outs[0])
    assert len(first) >= 3 * 6
    assert first == sha256_tree(outs[1]) == sha256_tree(tiny_root)


def test_seed_changes_only_the_weights(tiny_root, tmp_path):
    other = sha256_tree(make_tiny(tmp_path / "s1", "qwen2_vl", seed=1))
    base = sha256_tree(tiny_root / "qwen2_vl")
    assert other.keys() == base.keys()
    assert [k for k in base if base[k] != other[k]] == ["model.safetensors"]


def test_bad_arguments_raise_usage_error(tmp_path):
    with pytest.raises(UsageError, match="llava"):
        make_tiny(tmp_path / "x", "llava")
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError):
        make_tiny(tmp_path / "file", "qwen2_vl")
