"""The engine against references it does not compute (SPEC §4.2-4.4), on every family.

Expected values come from `tests/reference.py`: transformers' own forward over one plain token
sequence (sequential prompts are plain causal text), attention weights read from transformers'
eager attention, embeddings as the language model receives them, and a greedy decode written
there. A score must be transformers' P(` true`), a kept token must be one the policies attend to
most, an explanation must be the model's own greedy text.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import VIDEO, Reference, find, selection_violations

from guardrail.engine import GuardEngine
from guardrail.prompt import build_prompt, render_prompt
from guardrail.runner import Batch, Item
from guardrail.tiny import ALL_FAMILIES
from guardrail.video import SamplingConfig, load_video


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def engine(family, tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model(family), layout="sequential")


@pytest.fixture(scope="module")
def ref(family, tiny_model) -> Reference:
    return Reference(tiny_model(family))


@pytest.fixture(scope="module")
def clip(video_files):
    return load_video(video_files["mp4_h264"]).clips[0]


def _chat_prompt(engine: GuardEngine, ref: Reference) -> str:
    """The whole prompt in prompt order (S V P_1..P_m Q), chat-framed, without probes."""
    return ref.chat(render_prompt(build_prompt(engine.policies), "sequential", video=VIDEO))


def test_tokens_are_the_processors(engine, ref, clip):
    """The engine's sequential prompt is token for token what the official processor makes of
    the same text (so the references below judge the same sequence)."""
    lay, _ = engine.layout(engine.adapter.video_inputs(clip))
    probes = lay.span("R0").start
    assert torch.equal(lay.ids[:probes], ref.inputs(_chat_prompt(engine, ref), clip).ids)


def test_sequential_score_is_transformers_probability(engine, ref, clip):
    """Score of category i == softmax(logits[[true, false]])[0] of transformers' forward over
    the prompt followed by probe i, with ` true` / ` false` from the tokenizer here."""
    chat = _chat_prompt(engine, ref)
    prompt = build_prompt(engine.policies)
    want = [ref.probability_true(ref.inputs(chat + probe, clip)) for probe in prompt.probes]
    got = engine.judge([clip])[0][0].scores.tolist()
    assert got == pytest.approx(want, abs=1e-5)
    assert max(want) - min(want) > 1e-3              # the probes really differ


def test_isolated_score_is_transformers_probability_of_its_own_prompt(engine, ref, clip):
    """Under `isolated`, category i's score is transformers' P(true) over its own plain prompt
    S V P_i Q_i R_i: in the one-pass layout each branch sees the shared prefix and itself only,
    at the positions a prompt of its own would have."""
    eng = engine.with_config(layout="isolated")
    prompt = build_prompt(eng.policies, style=eng.config.prompt_style)
    head, *branches = render_prompt(prompt, "isolated", video=VIDEO).split("--- branch ")
    want = [ref.probability_true(ref.inputs(ref.chat(head + b.split("\n", 1)[1]) + probe, clip))
            for b, probe in zip(branches, prompt.probes, strict=True)]
    got = eng.judge([clip])[0][0].scores.tolist()
    assert got == pytest.approx(want, abs=1e-5)


def test_prompt_logits_equal_transformers_forward(engine, ref, clip):
    """The engine's forward over the whole sequential prompt (visual features included) gives
    transformers' logits at every position."""
    adapter = engine.adapter
    video = adapter.video_inputs(clip)
    lay, visual = engine.layout(video)
    batch = Batch(adapter, [Item(lay, visual, adapter.visual_features(video))])
    hidden, _ = batch.step([torch.arange(lay.span("R0").start)])
    got = adapter.logits(hidden[0])
    want = ref.logits(ref.inputs(_chat_prompt(engine, ref), clip))
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-4, rtol=0), float((got - want).abs().max())


def _kept(engine: GuardEngine, clip) -> set[int]:
    """Ordinals (in video order) of the video tokens the engine keeps in its cache."""
    _, batch = engine.judge([clip])
    item = batch.items[0]
    video = item.visual.nonzero().flatten()
    return set(torch.isin(video, batch.slots[0]).nonzero().flatten().tolist())


def _assert_selection(kept: set[int], relevance: torch.Tensor, ratio: float) -> None:
    n = relevance.shape[1]
    keep = math.ceil(ratio * n)
    assert len(kept) == keep
    assert not selection_violations(kept, relevance)
    assert kept != set(range(keep))                 # not simply the first tokens


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_kv_pruning_keeps_what_policies_attend_to_sequential(engine, ref, clip, ratio):
    """`kv` pruning under `sequential`: the kept video tokens are the top-k union of the
    attention each policy's tokens pay them at the pruning layer (mean over heads and the
    policy's tokens), read from transformers' eager attention over the plain prompt."""
    eng = engine.with_config(keep_ratio=ratio)
    inputs = ref.inputs(_chat_prompt(engine, ref), clip)
    att = ref.forward(inputs, attentions=True).attentions[eng.config.pruning_layer][0]  # [H,T,T]
    cols = (inputs.ids == ref.visual_id).nonzero().flatten()
    chunks = [find(inputs.ids, ref.encode(c)) for c in build_prompt(engine.policies).chunks]
    relevance = torch.stack([att[:, rows][:, :, cols].mean(dim=(0, 1)) for rows in chunks])
    _assert_selection(_kept(eng, clip), relevance, ratio)


def test_kv_pruning_keeps_what_policies_attend_to_parallel(engine, ref, clip):
    """Under `parallel` policy i sees S, V and itself only, so its attention to the video is
    that of the plain sequence [S V P_i]: one transformers forward per policy."""
    ratio = 0.25
    eng = engine.with_config(layout="parallel", keep_ratio=ratio)
    chat = _chat_prompt(engine, ref)
    chunks = build_prompt(engine.policies).chunks
    prefix = chat[: chat.index(chunks[0])]
    layer, relevance = eng.config.pruning_layer, []
    for chunk in chunks:
        inputs = ref.inputs(prefix + chunk, clip)
        att = ref.forward(inputs, attentions=True).attentions[layer][0]
        rows = find(inputs.ids, ref.encode(chunk))
        assert rows.stop == inputs.ids.numel()
        cols = (inputs.ids == ref.visual_id).nonzero().flatten()
        relevance.append(att[:, rows][:, :, cols].mean(dim=(0, 1)))
    _assert_selection(_kept(eng, clip), torch.stack(relevance), ratio)


def test_pre_prefill_pruning_keeps_most_similar(engine, ref, clip):
    """`pre_prefill`: cosine similarity of each visual embedding (as the language model would
    receive it) to the mean input embedding of each policy's tokens."""
    ratio = 0.25
    eng = engine.with_config(layout="parallel", keep_ratio=ratio, pruning_mode="pre_prefill")
    inputs = ref.inputs(_chat_prompt(engine, ref), clip)
    embeds = ref.input_embeddings(inputs)                                  # [T, D]
    visual = torch.nn.functional.normalize(embeds[inputs.ids == ref.visual_id], dim=-1)
    chunks = [find(inputs.ids, ref.encode(c)) for c in build_prompt(engine.policies).chunks]
    means = torch.nn.functional.normalize(torch.stack([embeds[c].mean(0) for c in chunks]), dim=-1)
    _assert_selection(_kept(eng, clip), means @ visual.T, ratio)


def test_explanation_is_the_models_greedy_text(engine, ref, video_files):
    """Explain mode's description and explanation are transformers' greedy continuation of the
    prompt around the forced verdict line, token for token, and not empty."""
    path = video_files["mp4_h264"]
    eng = engine.with_config(mode="explain", max_new_tokens=24)
    verdict = eng.check(path)
    clip = load_video(path).clips[0]
    prompt = build_prompt(engine.policies)
    description, explanation = ref.explain(
        ref.inputs(_chat_prompt(engine, ref), clip), list(prompt.keys),
        [c.flagged for c in verdict.categories], 24)
    assert description and explanation
    assert (verdict.description, verdict.explanation) == (description, explanation)


def test_explanation_comes_from_the_top_scoring_window(engine, ref, long_video):
    """With several windows the text is decoded over the window whose top score is highest."""
    sampling = SamplingConfig(num_frames=4, window_s=10.0)
    eng = engine.with_config(mode="explain", max_new_tokens=18, sampling=sampling)
    verdict = eng.check(long_video)
    tops = [max(s.scores.values()) for s in verdict.segments]
    best = tops.index(max(tops))
    assert len(tops) == 4 and tops.index(min(tops)) != best
    clip = load_video(long_video, sampling).clips[best]
    prompt = build_prompt(engine.policies)
    want = ref.explain(ref.inputs(_chat_prompt(engine, ref), clip), list(prompt.keys),
                       [c.flagged for c in verdict.categories], 18)
    assert (verdict.description, verdict.explanation) == want
