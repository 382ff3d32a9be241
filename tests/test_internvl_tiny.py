"""`make_tiny(DIR, "internvl")`: a native InternVL in the converter's output format that loads
offline, is byte-reproducible, and keeps the engine's PEPE invariants (a subset of
test_engine.py; the whole suite runs on the converted model in test_internvl_engine.py)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import test_engine
from test_engine import (  # noqa: F401 - collected here with this module's `engine`
    test_fast_mode_generates_nothing_and_flags_follow_thresholds,
    test_order_invariance,
    test_parallel_equals_stitched_per_chunk_caches,
)

from guardrail.engine import GuardEngine
from guardrail.tiny import ALL_FAMILIES, make_tiny

clip = test_engine.clip   # the same clip fixture


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("internvl"), "internvl")


@pytest.fixture(scope="module")
def engine(tiny) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny)


def test_config_tokenizer_and_processor_agree(engine, tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert "internvl" in ALL_FAMILIES and config["model_type"] == "internvl"
    assert config["text_config"]["model_type"] == "llama"
    assert config["tie_word_embeddings"] is False
    model, tok = engine.adapter.model, engine.adapter.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert model.config.get_text_config().vocab_size == len(tok)
    assert model.generation_config.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert list(engine.adapter.processor.image_processor.image_mean) == [0.485, 0.456, 0.406]
    before, after = engine.adapter.chat_frame()
    assert before.startswith("<s><|im_start|>system\n") and before.endswith(
        "<|im_end|><|im_start|>user\n")
    assert after == "<|im_end|><|im_start|>assistant\n"


def test_same_seed_same_files(tiny, tmp_path):
    def tree(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    assert tree(make_tiny(tmp_path / "again", "internvl")) == tree(tiny)
