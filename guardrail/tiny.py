"""Tiny randomly initialised Qwen-VL and InternVL checkpoints for smoke tests, CI and dry runs.

`make_tiny(DIR, family)` writes a directory that `AutoModelForImageTextToText.from_pretrained`
and `AutoProcessor.from_pretrained` load offline: a few-million-parameter model of the real
family (the config's `model_type` is the family's), the family's official processor with its
real patch sizes, a byte-level BPE `Qwen2Tokenizer` trained here on a built-in English corpus,
a Qwen chat template and a generation config. Its verdicts are meaningless.

The output depends only on `family` and `seed`: the same call gives byte-identical files in any
process (weights are seeded; the tokenizer is built without hash- or set-order dependence).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from guardrail.errors import UsageError
from guardrail.tiny_tokenizer import SPECIAL_TOKENS, build_tokenizer

__all__ = ["ALL_FAMILIES", "FAMILIES", "SPECIAL_TOKENS", "build_tokenizer", "make_tiny",
           "internvl_tokenizer"]

FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # the Qwen-VL families (tests/test_tiny.py)
ALL_FAMILIES = (*FAMILIES, "internvl")           # everything `make_tiny` writes

INITIALIZER_RANGE = 0.1  # at 0.02 every verdict score sits in a narrow band

# Per family, the real layout shrunk. NOTE: mrope_section must sum to head_dim / 2 (64 / 2 here);
# these are the real sections halved. Vision towers keep the real patch and merge sizes.
_TEXT = {
    "qwen2_vl": {"rope_parameters": {"rope_theta": 1e6, "mrope_section": [8, 12, 12]}},
    "qwen2_5_vl": {"rope_parameters": {"rope_theta": 1e6, "mrope_section": [8, 12, 12]}},
    "qwen3_vl": {
        "head_dim": 64,
        "rope_parameters": {
            "rope_theta": 5e6,
            "mrope_section": [12, 10, 10],
            "mrope_interleaved": True,
        },
    },
}
_VISION = {
    "qwen2_vl": dict(embed_dim=64, mlp_ratio=2, hidden_size=128, patch_size=14),
    "qwen2_5_vl": dict(
        hidden_size=64,
        intermediate_size=128,
        out_hidden_size=128,
        patch_size=14,
        window_size=112,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    ),
    "qwen3_vl": dict(
        hidden_size=64,
        intermediate_size=128,
        out_hidden_size=128,
        patch_size=16,
        num_position_embeddings=256,
        deepstack_visual_indexes=[0, 1],
    ),
}
_CLIP_NORM = {"image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711]}  # fmt: skip
_HALF_NORM = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}
_QWEN2_PROCESSOR = dict(
    video_processor="Qwen2VLVideoProcessor",
    patch_size=14,
    norm=_CLIP_NORM,
    image_size={"shortest_edge": 56 * 56, "longest_edge": 168 * 168},
    video_size={"shortest_edge": 56 * 56, "longest_edge": 168 * 168},  # pixels per frame
    default_system="You are a helpful assistant.",
)
_PROCESSOR = {
    "qwen2_vl": dict(_QWEN2_PROCESSOR, processor="Qwen2VLProcessor"),
    "qwen2_5_vl": dict(_QWEN2_PROCESSOR, processor="Qwen2_5_VLProcessor"),
    "qwen3_vl": dict(
        processor="Qwen3VLProcessor",
        video_processor="Qwen3VLVideoProcessor",
        patch_size=16,
        norm=_HALF_NORM,
        image_size={"shortest_edge": 64 * 64, "longest_edge": 192 * 192},
        # NOTE: Qwen3-VL's video size bounds the whole clip (frames x height x width).
        video_size={"shortest_edge": 2 * 64 * 64, "longest_edge": 8 * 192 * 192},
        default_system=None,
    ),
}

# Training text for the BPE merges: prompt, policy and answer vocabulary, so that an English
# SafeWatch-style prompt tokenizes compactly. The answer skeleton is repeated so that `":`,
# ` true` and ` false` become single tokens.
TEST_MODEL_KEY = "guardrail_test_model"   # in config.json: made by make-tiny, random weights
TEST_MODEL_WARNING = ("random test model (guardrail model make-tiny): its scores, flags and "
                      "text are meaningless")


def mark_test_model(model) -> None:
    """Mark a random model's config, so every verdict it gives says so."""
    setattr(model.config, TEST_MODEL_KEY, True)


def make_tiny(out_dir: str | os.PathLike, family: str, seed: int = 0,
              tokenizer: str | os.PathLike | None = None) -> Path:
    """Write a tiny random `family` model, its tokenizer and its processor to `out_dir`.

    `tokenizer`: a Qwen tokenizer directory to use instead of the built-in tiny one (Qwen-VL
    families; it must hold the Qwen vision tokens). Raises `UsageError` for an unknown family,
    an unusable tokenizer or an `out_dir` that is a file. Returns the directory. The same
    `(family, seed, tokenizer)` always gives byte-identical files.
    """
    if family not in ALL_FAMILIES:
        raise UsageError(f"unknown model family {family!r}; choose one of "
                         f"{', '.join(ALL_FAMILIES)}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if family == "internvl":
        if tokenizer is not None:
            raise UsageError("--tokenizer applies to the Qwen-VL families only")
        return _make_tiny_internvl(out, seed)

    import torch
    from transformers import AutoModelForImageTextToText, GenerationConfig

    tokenizer = build_tokenizer() if tokenizer is None else _qwen_tokenizer(tokenizer)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    config = _model_config(family, len(tokenizer), ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    mark_test_model(model)
    model.save_pretrained(out, safe_serialization=True)
    _processor(family, tokenizer).save_pretrained(out)
    return out


def _qwen_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: cannot load a tokenizer ({err})") from None
    missing = [t for t in SPECIAL_TOKENS if tok.convert_tokens_to_ids(t) in (None,
                                                                             tok.unk_token_id)]
    if missing:
        raise UsageError(f"{path}: not a Qwen tokenizer (no {', '.join(missing)})")
    return tok


def _model_config(family: str, vocab_size: int, ids: dict[str, int]):
    """A ~1.5M-parameter config of `family`: the real layout, shrunk (text head_dim 64)."""
    from transformers import AutoConfig

    text = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32768,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        **copy.deepcopy(_TEXT[family]),
    )
    text["rope_parameters"]["rope_type"] = "default"
    vision = dict(depth=2, num_heads=2, initializer_range=INITIALIZER_RANGE)
    vision.update(copy.deepcopy(_VISION[family]))
    return AutoConfig.for_model(
        family,
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        initializer_range=INITIALIZER_RANGE,
        tie_word_embeddings=False,
    )


def _processor(family: str, tokenizer):
    """The family's official processor classes with real patch sizes and small pixel budgets."""
    import transformers

    spec = copy.deepcopy(_PROCESSOR[family])
    image = transformers.Qwen2VLImageProcessor(
        patch_size=spec["patch_size"], size=spec["image_size"], **spec["norm"]
    )
    video = getattr(transformers, spec["video_processor"])(
        patch_size=spec["patch_size"],
        size=spec["video_size"],
        cap_pixels_per_frame=False,  # explicit: unset, 5.2x warns on every call
        **spec["norm"],
    )
    tokenizer.chat_template = _chat_template(spec["default_system"])
    return getattr(transformers, spec["processor"])(
        image_processor=image,
        tokenizer=tokenizer,
        video_processor=video,
        chat_template=tokenizer.chat_template,
    )


def _chat_template(default_system: str | None) -> str:
    """Qwen-VL's chat template: `<|im_start|>role\\ncontent<|im_end|>\\n`, media as vision pads."""
    system = ""
    if default_system:
        system = (
            "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
            + default_system
            + "<|im_end|>\n{% endif %}"
        )
    return (
        "{% for message in messages %}" + system + "<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
        "<|vision_start|><|image_pad|><|vision_end|>"
        "{% elif part['type'] == 'video' or 'video' in part %}"
        "<|vision_start|><|video_pad|><|vision_end|>"
        "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# InternVL2's added tokens in their order, plus the chat markers and `<video>` (named by
# transformers' InternVLProcessor); `<s>`/`</s>` as in InternLM2.
INTERNVL_TOKENS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                   "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>",
                   "<video>")
_INTERNVL_IMAGE = 112  # 8 x 8 patches of 14 -> 16 tokens per frame after the pixel shuffle
_INTERNVL_SYSTEM = "You are a helpful assistant."


def internvl_tokenizer():
    """The tiny InternVL tokenizer: the byte-level BPE above with InternVL's tokens, the
    `internlm2-chat` template and the media-token names transformers' processor reads."""
    from guardrail.convert.processor import fast_tokenizer
    from guardrail.convert.tokenizer import chat_template

    qwen = build_tokenizer(INTERNVL_TOKENS, eos_token="</s>", pad_token="</s>")
    tok = fast_tokenizer(copy.deepcopy(qwen.backend_tokenizer),
                         chat_template(_INTERNVL_SYSTEM), unk=None)
    assert len(tok) == len(qwen), "media tokens must already be in the tiny vocabulary"
    return tok


def _make_tiny_internvl(out: Path, seed: int) -> Path:
    """Native transformers InternVL (Llama text model, GQA) in the converter's output format."""
    import torch
    from transformers import (
        AutoModelForImageTextToText,
        InternVLConfig,
        InternVLVisionConfig,
        LlamaConfig,
    )

    from guardrail.convert.processor import generation_config, save_all

    tok = internvl_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in INTERNVL_TOKENS}
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=32768, initializer_range=INITIALIZER_RANGE,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["</s>"],
        tie_word_embeddings=False)
    vision = InternVLVisionConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        image_size=_INTERNVL_IMAGE, patch_size=14, attention_bias=True, norm_type="layer_norm",
        use_mean_pooling=True, initializer_range=INITIALIZER_RANGE)
    per_frame = (_INTERNVL_IMAGE // 14 // 2) ** 2
    config = InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<IMG_CONTEXT>"],
        image_seq_length=per_frame, downsample_ratio=0.5, projector_hidden_act="gelu",
        tie_word_embeddings=False, initializer_range=INITIALIZER_RANGE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = generation_config(
        bos=ids["<s>"], stop=ids["<|im_end|>"], pad=ids["</s>"])
    mark_test_model(model)
    model.save_pretrained(out, safe_serialization=True)
    save_all(out, tok, _INTERNVL_IMAGE, per_frame, model.generation_config)
    return out
