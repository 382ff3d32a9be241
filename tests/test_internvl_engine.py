"""The `internvl` family in the engine, on a tiny ORIGINAL-layout InternVL2 checkpoint after
`convert`: SPEC §4.2's invariants and the pruning / chunk-cache / batching paths (the tests of
test_engine.py and test_prefill.py, collected here with this module's `engine`), plus what is
InternVL-specific: the video segment, SafeWatch's preprocessing and prompt style, and
`guardrail check --json` on the converted directory. (test_prefill's chunk-cache bookkeeping and
mixed-batching tests exercise engine logic only; they run on the Qwen families, not here.)"""

from __future__ import annotations

import json

import internvl_original
import pytest
import test_engine
import test_prefill
import torch
from test_engine import (  # noqa: F401 - collected here with this module's `engine`
    test_deterministic_and_video_sensitive,
    test_explain_mode_always_parses,
    test_fast_mode_generates_nothing_and_flags_follow_thresholds,
    test_long_video_is_judged_in_windows,
    test_order_invariance,
    test_parallel_equals_stitched_per_chunk_caches,
    test_sequential_depends_on_order,
    test_thresholds_from_the_policy,
)
from test_prefill import (  # noqa: F401 - pruning, chunk cache and batching on InternVL
    test_batched_equals_single,
    test_keep_ratio_one_is_no_pruning,
    test_quarter_keep_ratio,
    test_verdict_reports_pruning,
    test_warm_chunk_cache_equals_cold,
)

from guardrail.convert import convert
from guardrail.engine import GuardEngine
from guardrail.runner import Batch, Item

clip, clips = test_engine.clip, test_prefill.clips   # the same clip fixtures


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> GuardEngine:
    src = internvl_original.write_original(tmp_path_factory.mktemp("orig"),
                                           internvl_original.default_corpus())
    return GuardEngine.from_pretrained(convert(src, tmp_path_factory.mktemp("conv") / "m",
                                               dtype="fp32"))


# ------------------------------------------------------------------ InternVL specifics


def test_video_segment_is_safewatch_frame_lines(engine, clip):
    adapter = engine.adapter
    video = adapter.video_inputs(clip)
    per_frame = adapter.model.config.image_seq_length
    assert video.num_visual == 8 * per_frame
    assert video.rel_pos.tolist() == [list(range(video.ids.numel()))]
    assert video.advance == video.ids.numel()
    text = adapter.tokenizer.decode(video.ids)
    frame = "<img>" + "<IMG_CONTEXT>" * per_frame + "</img>"
    assert text == "\n".join(f"Frame{i}: {frame}" for i in range(1, 9))
    size = adapter.model.config.vision_config.image_size[0]
    assert video.encoder_inputs["pixel_values"].shape == (8, 3, size, size)


def test_frames_are_preprocessed_as_safewatch_does(engine, clip):
    """SafeWatch's `build_transform`: PIL bicubic resize, ToTensor, ImageNet Normalize."""
    import torchvision.transforms as T
    from PIL import Image
    from torchvision.transforms.functional import InterpolationMode

    size = engine.adapter.model.config.vision_config.image_size[0]
    transform = T.Compose([T.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
                           T.ToTensor(), T.Normalize((0.485, 0.456, 0.406),
                                                     (0.229, 0.224, 0.225))])
    want = torch.stack([transform(Image.fromarray(f)) for f in clip.frames])
    got = engine.adapter.video_inputs(clip).encoder_inputs["pixel_values"]
    assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_sequential_prefill_equals_the_model_own_forward(engine, clip):
    """The adapter's path (own embeddings, features scattered, explicit 1-D positions and a 4-D
    mask) gives what transformers' InternVL forward gives on the same ids and pixels."""
    eng = engine.with_config(layout="sequential")
    video = eng.adapter.video_inputs(clip)
    feats = eng.adapter.visual_features(video)
    lay, visual = eng.layout(video)
    end = lay.group_span(len(lay.groups) - 1).start
    hidden, _ = Batch(eng.adapter, [Item(lay, visual, feats)]).step([torch.arange(end)])
    ours = eng.adapter.logits(hidden[0, -1])
    with torch.no_grad():
        ref = eng.adapter.model(input_ids=lay.ids[:end][None],
                                pixel_values=video.encoder_inputs["pixel_values"]).logits[0, -1]
    assert float((ours - ref).abs().max()) < 1e-4


def test_safewatch_prompt_style_is_order_invariant(engine, clip):
    eng = engine.with_config(prompt_style="safewatch")
    ordered = eng.tokens.ordered
    assert [k for k, _ in ordered][:2] == ["system", "video"]
    head, tail = ordered[1][1]
    assert head == [] and eng.adapter.tokenizer.decode(tail).startswith("\nYou are a helpful")
    want = test_engine._scores(eng, clip)
    got = test_engine._scores(test_engine._reordered(eng, [5, 4, 3, 2, 1, 0]), clip)
    assert max(abs(got[k] - want[k]) for k in want) <= 1e-4


def test_check_cli_json_is_order_invariant(engine, video_files, tmp_path):
    """`guardrail check --model DIR --json`, the categories of the policy file reversed."""
    import yaml
    from typer.testing import CliRunner

    from guardrail.cli import app

    data = yaml.safe_load((test_engine.POLICY_DIR / "safewatch.yaml").read_text())
    data["categories"] = data["categories"][::-1]
    (tmp_path / "reversed.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    model = str(engine.adapter.model.name_or_path)
    scores = []
    for policy in (test_engine.POLICY_DIR / "safewatch.yaml", tmp_path / "reversed.yaml"):
        result = CliRunner().invoke(app, ["check", str(video_files["mp4_h264"]), "--model",
                                          model, "--policy", str(policy), "--json"])
        assert result.exit_code == 0, result.output
        verdict = json.loads(result.stdout.strip().splitlines()[-1])
        scores.append({c["id"]: c["score"] for c in verdict["categories"]})
    assert max(abs(scores[0][k] - scores[1][k]) for k in scores[0]) <= 1e-4
