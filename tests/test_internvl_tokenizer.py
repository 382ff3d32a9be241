"""The converted InternLM2 tokenizer encodes exactly like the original (sentencepiece on the text
between added tokens, BOS first) on what the engine sends: chat prompts with frames, policy text
with `<box>`, Chinese, whitespace runs and emoji."""

from __future__ import annotations

import json
from pathlib import Path

import internvl_original as orig
import pytest

from guardrail.convert.processor import fast_tokenizer
from guardrail.convert.tokenizer import (
    SpmReference,
    added_tokens,
    build_tokenizer,
    chat_template,
    load_proto,
)
from guardrail.probes import answer_tokens

FRAME = "<img>" + "<IMG_CONTEXT>" * 3 + "</img>"
TEXTS = [
    f"<|im_start|>system\n{orig.SYSTEM}<|im_end|><|im_start|>user\nFrame1: {FRAME}\n"
    f"Frame2: {FRAME}\nYou are a helpful video guardrail model.<|im_end|><|im_start|>assistant\n",
    "<box>\nC1: Sexual Content:\nCore Value: Protect users.\n[BLOCKED] Pornography.\n</box>\n"
    "<box>\nC2: Harassment & Bullying:\n[ALLOWED] Anti-bullying campaigns.\n</box>\n",
    'GUARDRAIL: {\n    "C1(Sexual Content)": true,\n    "C2(Harassment & Bullying)": false\n}',
    orig.SYSTEM + " 视频中有一个人在公园里散步。",
    "two  spaces,   three, \ttab,\n\nblank line,   \n  trailing   ",
    "  leading spaces and a lone space ",
    "emoji 😀🎉👍🏽 and 🇺🇸 flags, accents café naïve, symbols ±∞ ©",
    "<s>user text with <ref>a ref</ref> and <quad>q</quad> and <unk> markers</s>",
    "",
]
# (sentencepiece trainer options, round-trips exactly): InternLM2's style, and the defaults
# (dummy prefix, extra-whitespace removal, NFKC charsmap) to exercise the other normalizer paths.
STYLES = {
    "internlm2": ({}, True),
    "spm-defaults": ({"add_dummy_prefix": True, "remove_extra_whitespaces": True,
                      "normalization_rule_name": "nmt_nfkc"}, False),
}


@pytest.fixture(scope="module", params=list(STYLES))
def tokenizers_pair(request, tmp_path_factory):
    """(converted fast tokenizer saved and reloaded, sentencepiece reference, round-trips)."""
    from transformers import AutoTokenizer

    options, exact = STYLES[request.param]
    src = tmp_path_factory.mktemp(request.param)
    corpus = orig.default_corpus() + orig.CORPUS_EXTRA
    if options:
        _retrain(src, corpus, options)
    else:
        orig.train_spm(src, corpus)
        _write_tokenizer_config(src)
    added = added_tokens(json.loads((src / "tokenizer_config.json").read_text()))
    tok = build_tokenizer(load_proto(src / "tokenizer.model"), added)
    fast = fast_tokenizer(tok, chat_template(orig.SYSTEM))
    fast.save_pretrained(src / "hf")
    return AutoTokenizer.from_pretrained(src / "hf"), SpmReference(src / "tokenizer.model",
                                                                    added), exact


def _retrain(out: Path, corpus: list[str], options: dict) -> None:
    import io

    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=1200, model_type="bpe",
        byte_fallback=True, user_defined_symbols=[f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, hard_vocab_limit=False,
        character_coverage=1.0, minloglevel=2, **options)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    _write_tokenizer_config(out)


def _write_tokenizer_config(out: Path) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    n = sp.get_piece_size()
    decoder = {0: "<unk>", 1: "<s>", 2: "</s>", sp.piece_to_id("[UNUSED_TOKEN_145]"): "<|im_end|>",
               sp.piece_to_id("[UNUSED_TOKEN_146]"): "<|im_start|>"}
    decoder.update({n + i: t for i, t in enumerate(orig.INTERNVL_TOKENS)})
    (out / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(i): {"content": c, "special": True} for i, c in decoder.items()}}))


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encodes_like_sentencepiece(tokenizers_pair, text):
    fast, ref, exact = tokenizers_pair
    assert fast.encode(text) == ref.encode(text)
    assert fast.encode(text, add_special_tokens=False) == ref.encode(text, add_bos=False)
    if exact:
        assert fast.decode(fast.encode(text, add_special_tokens=False)) == text


def test_renamed_and_appended_tokens_keep_their_ids(tokenizers_pair):
    fast, ref, _ = tokenizers_pair
    for content, token_id in ref.ids.items():
        assert fast.convert_tokens_to_ids(content) == token_id
        assert fast.encode(content, add_special_tokens=False) == [token_id]
    size = ref.sp.get_piece_size()
    assert [ref.ids[t] for t in orig.INTERNVL_TOKENS] == list(range(size, size + 9))
    assert fast.context_image_token == "<IMG_CONTEXT>" and fast.start_image_token == "<img>"
    assert fast.convert_tokens_to_ids("<video>") == size + 9     # outside the model's vocab


def test_probe_reads_true_and_false_after_the_key(tokenizers_pair):
    fast, _, _ = tokenizers_pair
    answer = answer_tokens(lambda s: fast.encode(s, add_special_tokens=False))
    assert fast.decode([answer.true_id]).strip() == "true"
    assert fast.decode([answer.false_id]).strip() == "false"


def test_chat_template_is_internlm2_chat(tokenizers_pair):
    fast, _, _ = tokenizers_pair
    text = fast.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                    add_generation_prompt=True)
    assert text == (f"<s><|im_start|>system\n{orig.SYSTEM}<|im_end|><|im_start|>user\nhi"
                    "<|im_end|><|im_start|>assistant\n")
    own = fast.apply_chat_template([{"role": "system", "content": "S"},
                                    {"role": "user", "content": "Q"}], tokenize=False)
    assert own == "<s><|im_start|>system\nS<|im_end|><|im_start|>user\nQ<|im_end|>"
