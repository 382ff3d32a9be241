"""`guardrail.convert`: an ORIGINAL-layout InternVL2-chat checkpoint -> native transformers
InternVL. Keys and shapes strictly equal the native model's, the grouped `wqkv` splits per KV
head, and the converted model reproduces a plain-torch forward of the original weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import internvl_original as orig
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from guardrail.convert import convert
from guardrail.convert.command import PROVENANCE, _meta_shapes
from guardrail.convert.internvl import convert_tensor, split_wqkv
from guardrail.errors import ModelError, UsageError
from guardrail.layout import additive_mask, plan, text_segment, visibility

MEASURED: dict[str, float] = {}   # printed by test_report_measured_differences


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> Path:
    return orig.write_original(tmp_path_factory.mktemp("orig"), orig.default_corpus())


@pytest.fixture(scope="module")
def converted(original, tmp_path_factory) -> Path:
    return convert(original, tmp_path_factory.mktemp("conv") / "m", dtype="fp32")


@pytest.fixture(scope="module")
def weights(original) -> tuple[dict, dict]:
    state = {}
    for file in sorted(original.glob("model-*.safetensors")):
        state.update(load_file(file))
    return state, json.loads((original / "config.json").read_text())


def _native(converted: Path, attn: str):
    from transformers import InternVLForConditionalGeneration

    return InternVLForConditionalGeneration.from_pretrained(
        converted, dtype=torch.float32, attn_implementation=attn).eval()


def _written(path: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            names = f.keys()
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in names})
    return shapes


def test_keys_and_shapes_equal_the_native_model(converted):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(converted)
    assert _written(converted) == _meta_shapes(config)
    assert config.model_type == "internvl" and config.text_config.model_type == "llama"
    assert config.vision_config.image_size == [28, 28] and config.image_seq_length == 4
    assert config.text_config.num_key_value_heads == 2
    # the raw LLM config's flash-attention setting never reaches the target
    assert "flash" not in (converted / "config.json").read_text()


def test_lm_head_is_untied(converted, weights):
    state, _ = weights
    model = _native(converted, "eager")
    assert model.config.tie_word_embeddings is False
    assert model.config.text_config.tie_word_embeddings is False
    head, embed = model.lm_head.weight, model.model.language_model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr()
    assert torch.equal(head, state["language_model.output.weight"])
    assert torch.equal(embed, state["language_model.model.tok_embeddings.weight"])


def test_wqkv_rows_go_to_q_k_v_per_kv_head():
    heads, kv, d, hidden = 8, 2, 3, 5
    g = heads // kv
    w = torch.arange((heads + 2 * kv) * d, dtype=torch.float32)[:, None].expand(-1, hidden)
    q, k, v = split_wqkv(w.clone(), heads, kv, d)
    block = (g + 2) * d
    for i in range(heads):                    # query head i = (kv head h, slot g) uses kv head h
        h, slot = divmod(i, g)
        assert q[i * d:(i + 1) * d, 0].tolist() == [h * block + slot * d + j for j in range(d)]
    for h in range(kv):
        assert k[h * d:(h + 1) * d, 0].tolist() == [h * block + g * d + j for j in range(d)]
        assert v[h * d:(h + 1) * d, 0].tolist() == [h * block + (g + 1) * d + j for j in range(d)]
    naive_q = w[: heads * d]
    assert not torch.equal(q, naive_q)


def _inputs(converted: Path, pepe: bool):
    """ids [T], positions [T], additive mask [1, 1, T, T]: an S segment with two one-tile images,
    then (PEPE) two parallel policy chunks sharing positions, then Q continuing after them."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted)
    image = "<img>" + "<IMG_CONTEXT>" * 4 + "</img>"
    parts = [
        "<s><|im_start|>user\nFrame1: " + image + "\nFrame2: " + image + "\nJudge this.\n",
        "<box>\nC1: Sexual Content:\n[BLOCKED] Nudity.\n</box>\n",
        "<box>\nC2: Harassment & Bullying:\n[BLOCKED] Bullying of a person.\n</box>\n",
        '<|im_end|><|im_start|>assistant\nGUARDRAIL: {"C1(Sexual Content)":',
    ]
    segs = [text_segment(n, tok.encode(t, add_special_tokens=False), 1)
            for n, t in zip(("S", "P0", "P1", "Q"), parts, strict=True)]
    groups = [[segs[0]], [segs[1], segs[2]], [segs[3]]] if pepe else [[s] for s in segs]
    lay = plan(groups)
    idx = torch.arange(lay.length)
    return lay.ids, lay.positions[0], additive_mask(visibility(lay, idx, idx), torch.float32)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("pepe", [False, True], ids=["causal", "pepe"])
def test_converted_equals_original_forward(converted, weights, attn, pepe):
    state, config = weights
    model = _native(converted, attn)
    ids, pos, mask = _inputs(converted, pepe)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(input_ids=ids[None], pixel_values=pixels, attention_mask=mask,
                     position_ids=pos[None]).logits
        ref = orig.reference_logits(state, config, ids, pixels, model.config.image_token_id,
                                    pos, mask)
    diff = float((ours - ref).abs().max())
    MEASURED[f"{'pepe' if pepe else 'causal'}/{attn}"] = diff
    assert diff <= 1e-4, diff
    assert float(ref.abs().max()) > 1.0          # not a trivially small comparison
    if pepe:                                      # the PEPE mask really changes the answer
        _, cpos, cmask = _inputs(converted, False)
        with torch.no_grad():
            causal = orig.reference_logits(state, config, ids, pixels,
                                           model.config.image_token_id, cpos, cmask)
        assert float((causal[0, -1] - ref[0, -1]).abs().max()) > 1e-3


def test_naive_contiguous_wqkv_split_is_caught(converted, weights, monkeypatch):
    """A regression guard: split wqkv as plain q|k|v blocks and the logits move far."""
    state, config = weights
    model = _native(converted, "eager")
    text = model.config.text_config
    sizes = [text.num_attention_heads * text.head_dim, text.num_key_value_heads * text.head_dim,
             text.num_key_value_heads * text.head_dim]
    monkeypatch.setattr("guardrail.convert.internvl.split_wqkv",
                        lambda w, *a: tuple(w.split(sizes, dim=0)))
    naive = {}
    for key, t in state.items():
        naive.update(convert_tensor(key, t, model.config))
    model.load_state_dict(naive, strict=True)
    ids, pos, mask = _inputs(converted, False)
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(input_ids=ids[None], pixel_values=pixels, attention_mask=mask,
                     position_ids=pos[None]).logits
        ref = orig.reference_logits(state, config, ids, pixels, model.config.image_token_id,
                                    pos, mask)
    MEASURED["naive-split"] = float((ours - ref).abs().max())
    assert MEASURED["naive-split"] > 0.5


def test_bf16_in_several_shards_with_provenance(original, tmp_path):
    out = convert(original, tmp_path / "bf16", shard_bytes=64 << 10)   # default dtype: bf16
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    with safe_open(out / files[0], framework="pt") as f:
        names = f.keys()
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    record = json.loads((out / PROVENANCE).read_text())
    assert record["source_model_type"] == "internvl_chat" and record["dtype"] == "bf16"
    assert record["original_rope"]["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    assert record["system_message"] == orig.SYSTEM
    decoder = json.loads((original / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    im_end = next(int(i) for i, t in decoder.items() if t["content"] == "<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [im_end] and gen["do_sample"] is False
    assert not list(tmp_path.glob(".*partial"))


def _broken(original: Path, tmp_path: Path, how: str) -> Path:
    src = tmp_path / "src"
    shutil.copytree(original, src)
    config = json.loads((src / "config.json").read_text())
    if how == "model_type":
        config["model_type"] = "llava"
    elif how == "llm":
        config["llm_config"]["architectures"] = ["Qwen2ForCausalLM"]
    elif how == "ps_version":
        config["ps_version"] = "v1"
    elif how == "no_tokenizer":
        (src / "tokenizer.model").unlink()
    elif how == "missing_shard":
        (src / "model-00002-of-00002.safetensors").unlink()
    elif how == "unknown_key":
        shard = src / "model-00001-of-00002.safetensors"
        tensors = load_file(shard)
        tensors["vision_model.encoder.layers.0.attn.extra.weight"] = torch.zeros(2)
        save_file(tensors, shard)
        index = json.loads((src / "model.safetensors.index.json").read_text())
        index["weight_map"]["vision_model.encoder.layers.0.attn.extra.weight"] = shard.name
        (src / "model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps(config))
    return src


@pytest.mark.parametrize("how, message", [
    ("model_type", "not 'internvl_chat'"),
    ("llm", "only InternLM2ForCausalLM"),
    ("ps_version", "pixel-shuffle 'v2'"),
    ("no_tokenizer", "missing tokenizer.model"),
    ("missing_shard", "missing shard model-00002-of-00002.safetensors"),
    ("unknown_key", "unknown tensors vision_model.encoder.layers.0.attn.extra.weight"),
])
def test_bad_sources_are_refused_with_exit_2(original, tmp_path, how, message):
    with pytest.raises(ModelError, match=message) as err:
        convert(_broken(original, tmp_path, how), tmp_path / "out")
    assert err.value.exit_code == 2 and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".*partial"))


def test_bad_arguments(original, converted, tmp_path):
    with pytest.raises(ModelError, match="already a native"):
        convert(converted, tmp_path / "a")
    with pytest.raises(ModelError, match="no such checkpoint"):
        convert(tmp_path / "nothing", tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(UsageError, match="not an empty directory"):
        convert(original, tmp_path / "full")
    with pytest.raises(UsageError, match="unknown dtype"):
        convert(original, tmp_path / "c", dtype="int8")


def test_report_measured_differences(capsys):
    with capsys.disabled():
        print("\nconverted vs original forward, max |logit diff|:",
              {k: f"{v:.2e}" for k, v in sorted(MEASURED.items())})


def test_cli_model_convert(original, tmp_path):
    """`guardrail model convert SRC DST [--dtype]`: exit 0, or 2 with one line for a bad source."""
    from typer.testing import CliRunner

    from guardrail.cli import app

    runner = CliRunner()
    if runner.invoke(app, ["model", "convert", "--help"]).exit_code != 0:
        pytest.skip("`guardrail model convert` is not wired into the CLI yet")
    bad = _broken(original, tmp_path, "model_type")
    result = runner.invoke(app, ["model", "convert", str(bad), str(tmp_path / "x")])
    assert result.exit_code == 2 and "internvl_chat" in result.output
    result = runner.invoke(app, ["model", "convert", str(original), str(tmp_path / "ok"),
                                 "--dtype", "fp16"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["dtype"] == "float16"
