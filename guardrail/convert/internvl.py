"""The original InternVL2-chat checkpoint (SafeWatch-8B's format) and how each of its tensors
becomes a tensor of transformers' native `InternVLForConditionalGeneration` with a Llama text
model. Pure reading, validation and tensor math; `command.py` streams and writes.

Traps handled here (reference/internvl.md): InternLM2's `wqkv` rows are grouped per KV head
(the group's query heads, then its key head, then its value head), the ViT's qkv is contiguous,
the LLM config carries a flash-attention setting (so the target configs are built from
whitelists), and InternVLConfig ties the LM head unless told not to at the top level.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from guardrail.convert.tokenizer import AddedToken, added_tokens
from guardrail.errors import ModelError

# InternVL2's default `internlm2-chat` system message (conversation.py), used when neither the
# config nor the checkpoint's conversation.py names one.
INTERNVL2_SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
                    "是一个有用无害的人工智能助手。")
IMAGE_CONTEXT = "<IMG_CONTEXT>"
V = "model.vision_tower."
L = "model.language_model."
# (original key, native key); `{q}` marks a fused qkv split into q_proj / k_proj / v_proj.
_RULES = [(re.compile(a), b) for a, b in (
    (r"vision_model\.embeddings\.class_embedding", V + "embeddings.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", V + "embeddings.position_embeddings"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)",
     V + r"embeddings.patch_embeddings.projection.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.qkv\.(weight|bias)",
     V + r"encoder.layer.\1.attention.{q}.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.proj\.(weight|bias)",
     V + r"encoder.layer.\1.attention.projection_layer.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.attn\.(q_norm|k_norm)\.weight",
     V + r"encoder.layer.\1.attention.\2.weight"),
    (r"vision_model\.encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)",
     V + r"encoder.layer.\1.mlp.\2.\3"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     V + r"encoder.layer.\1.layernorm_before.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     V + r"encoder.layer.\1.layernorm_after.\2"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls1", V + r"encoder.layer.\1.lambda_1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.ls2", V + r"encoder.layer.\1.lambda_2"),
    (r"mlp1\.0\.(weight|bias)", r"model.multi_modal_projector.layer_norm.\1"),
    (r"mlp1\.1\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
    (r"mlp1\.3\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1"),
    (r"language_model\.model\.tok_embeddings\.weight", L + "embed_tokens.weight"),
    (r"language_model\.model\.norm\.weight", L + "norm.weight"),
    (r"language_model\.output\.weight", "lm_head.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wqkv\.weight",
     L + r"layers.\1.self_attn.{q}.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention\.wo\.weight",
     L + r"layers.\1.self_attn.o_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w1\.weight",
     L + r"layers.\1.mlp.gate_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w3\.weight",
     L + r"layers.\1.mlp.up_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.feed_forward\.w2\.weight",
     L + r"layers.\1.mlp.down_proj.weight"),
    (r"language_model\.model\.layers\.(\d+)\.attention_norm\.weight",
     L + r"layers.\1.input_layernorm.weight"),
    (r"language_model\.model\.layers\.(\d+)\.ffn_norm\.weight",
     L + r"layers.\1.post_attention_layernorm.weight"),
)]


@dataclass(frozen=True)
class Source:
    """A validated original InternVL2-chat checkpoint directory."""

    root: Path
    config: dict
    tokenizer_config: dict
    added: list[AddedToken]
    shards: dict[str, list[str]]        # safetensors file -> the tensor names it holds
    system_message: str
    system_source: str                  # where system_message came from

    @property
    def llm(self) -> dict:
        return self.config["llm_config"]

    @property
    def vision(self) -> dict:
        return self.config["vision_config"]

    @property
    def image_size(self) -> int:
        return int(self.config["force_image_size"])

    @property
    def tokens_per_tile(self) -> int:
        side = self.image_size // int(self.vision["patch_size"])
        return int(side * self.config["downsample_ratio"]) ** 2

    @property
    def image_token_id(self) -> int:
        return next(t.id for t in self.added if t.content == IMAGE_CONTEXT)

    def token_id(self, content: str) -> int | None:
        return next((t.id for t in self.added if t.content == content), None)


def read_source(root: Path) -> Source:
    """Read and validate `root`; any layout we do not convert exactly raises `ModelError`."""
    if not root.is_dir():
        raise ModelError(f"{root}: no such checkpoint directory")
    config = _json(root / "config.json")
    kind = config.get("model_type")
    if kind == "internvl":
        raise ModelError(f"{root}: already a native transformers InternVL model; use it directly")
    if kind != "internvl_chat":
        raise ModelError(f"{root}: model_type is {kind!r}, not 'internvl_chat' (an original "
                         "InternVL2-chat checkpoint such as SafeWatch-8B)")
    llm, vit = config.get("llm_config") or {}, config.get("vision_config") or {}
    arch = (llm.get("architectures") or [None])[0]
    _require(root, arch == "InternLM2ForCausalLM", f"language model is {arch!r}; only "
             "InternLM2ForCausalLM (InternVL2-2B/8B/26B, SafeWatch-8B) is supported")
    _require(root, config.get("ps_version") == "v2",
             f"ps_version is {config.get('ps_version')!r}; only pixel-shuffle 'v2' is supported")
    _require(root, config.get("select_layer") == -1,
             f"select_layer is {config.get('select_layer')!r}; only -1 is supported")
    _require(root, config.get("downsample_ratio") == 0.5,
             f"downsample_ratio is {config.get('downsample_ratio')!r}; only 0.5 is supported")
    _require(root, config.get("template") in (None, "internlm2-chat"),  # None: InternLM2's own
             f"template is {config.get('template')!r}; only 'internlm2-chat' is supported")
    size, patch = config.get("force_image_size"), vit.get("patch_size")
    _require(root, isinstance(size, int) and isinstance(patch, int) and size == vit.get(
        "image_size") and size % patch == 0 and (size // patch) % 2 == 0,
        f"image size {size!r} / vision image size {vit.get('image_size')!r} / patch {patch!r} "
        "do not fit (need force_image_size == vision image_size, a multiple of 2 x patch)")
    _require(root, not config.get("use_backbone_lora") and not config.get("use_llm_lora"),
             "LoRA adapters are not merged (use_backbone_lora / use_llm_lora); merge them first")
    heads, kv, hidden = (llm.get(k) for k in ("num_attention_heads", "num_key_value_heads",
                                              "hidden_size"))
    _require(root, all(isinstance(v, int) and v > 0 for v in (heads, kv, hidden))
             and hidden % heads == 0 and heads % kv == 0,
             f"bad attention shape: hidden {hidden}, heads {heads}, kv heads {kv}")
    _require(root, not llm.get("bias"), "InternLM2 with bias=True is not supported")
    _require(root, vit.get("norm_type", "rms_norm") in ("layer_norm", "rms_norm"),
             f"vision norm_type {vit.get('norm_type')!r} is not supported")
    scaling = llm.get("rope_scaling")
    _require(root, scaling is None or scaling.get("type") in ("dynamic", "linear"),
             f"rope_scaling {scaling!r} is not supported (only none, dynamic or linear)")
    tok_config = _json(root / "tokenizer_config.json")
    added = added_tokens(tok_config)
    if IMAGE_CONTEXT not in {t.content for t in added}:
        raise ModelError(f"{root / 'tokenizer_config.json'}: no {IMAGE_CONTEXT} in "
                         "added_tokens_decoder")
    if not (root / "tokenizer.model").is_file():
        raise ModelError(f"{root}: missing tokenizer.model (the sentencepiece model)")
    system, where = _system_message(root, config)
    return Source(root, config, tok_config, added, _shards(root), system, where)


def target_config(src: Source):
    """`InternVLConfig` for `src`, every field from an explicit whitelist."""
    from transformers import InternVLConfig, InternVLVisionConfig, LlamaConfig

    llm, vit = src.llm, src.vision
    scaling = llm.get("rope_scaling") or {}
    rope = {"rope_type": "default", "rope_theta": float(llm.get("rope_theta", 10000.0))}
    if scaling.get("type") == "linear":
        rope.update(rope_type="linear", factor=float(scaling["factor"]))
    # NOTE: original dynamic NTK RoPE only rescales past max_position_embeddings; below that it
    # is plain RoPE, so "default" is exact for every length the engine uses.
    text = LlamaConfig(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"],
        intermediate_size=llm["intermediate_size"], num_hidden_layers=llm["num_hidden_layers"],
        num_attention_heads=llm["num_attention_heads"],
        num_key_value_heads=llm["num_key_value_heads"],
        head_dim=llm["hidden_size"] // llm["num_attention_heads"],
        hidden_act=llm.get("hidden_act", "silu"),
        max_position_embeddings=llm.get("max_position_embeddings", 32768),
        rms_norm_eps=llm.get("rms_norm_eps", 1e-6), rope_parameters=rope,
        attention_bias=False, mlp_bias=False, initializer_range=llm.get("initializer_range", 0.02),
        bos_token_id=llm.get("bos_token_id", 1), eos_token_id=llm.get("eos_token_id", 2),
        pad_token_id=llm.get("pad_token_id", 2), tie_word_embeddings=False, use_cache=True)
    vision = InternVLVisionConfig(
        hidden_size=vit["hidden_size"], num_hidden_layers=vit["num_hidden_layers"],
        num_attention_heads=vit["num_attention_heads"], intermediate_size=vit["intermediate_size"],
        image_size=src.image_size, patch_size=vit["patch_size"],
        num_channels=vit.get("num_channels", 3), attention_bias=bool(vit.get("qkv_bias", True)),
        use_qk_norm=bool(vit.get("qk_normalization", False)),
        norm_type=vit.get("norm_type", "rms_norm"), layer_norm_eps=vit.get("layer_norm_eps", 1e-6),
        hidden_act=vit.get("hidden_act", "gelu"), use_mean_pooling=True,
        use_absolute_position_embeddings=True, initializer_range=vit.get("initializer_range", 0.02))
    config = InternVLConfig(
        text_config=text, vision_config=vision, image_token_id=src.image_token_id,
        image_seq_length=src.tokens_per_tile, downsample_ratio=src.config["downsample_ratio"],
        projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=False)
    config.architectures = ["InternVLForConditionalGeneration"]
    return config


def native_names(key: str) -> list[str]:
    """Native key(s) of an original key (three for a fused qkv); [] when unknown."""
    for pattern, repl in _RULES:
        if pattern.fullmatch(key):
            name = pattern.sub(repl, key)
            if "{q}" in name:
                return [name.replace("{q}", p) for p in ("q_proj", "k_proj", "v_proj")]
            return [name]
    return []


def convert_tensor(key: str, tensor: torch.Tensor, config) -> list[tuple[str, torch.Tensor]]:
    """The native (name, tensor) pairs of one original tensor (works on meta tensors too)."""
    names = native_names(key)
    if not names:
        raise ModelError(f"unknown tensor {key!r} in the checkpoint")
    if len(names) == 1:
        return [(names[0], tensor)]
    if key.startswith("language_model."):
        text = config.text_config
        parts = split_wqkv(tensor, text.num_attention_heads, text.num_key_value_heads,
                           text.head_dim)
    else:
        if tensor.shape[0] % 3:
            raise ModelError(f"{key}: {tuple(tensor.shape)} is not a fused q|k|v")
        parts = tensor.chunk(3, dim=0)     # the ViT's qkv is contiguous: q rows, k rows, v rows
    return list(zip(names, parts, strict=True))


def split_wqkv(w: torch.Tensor, heads: int, kv_heads: int, head_dim: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InternLM2's grouped wqkv [(kv * (G + 2) * D), hidden] -> q [H*D, hidden], k, v
    [KV*D, hidden]. Rows of KV head h: its G query heads, then key h, then value h; query head
    i = h*G + g uses KV head i // G, as transformers' `repeat_kv` expects."""
    g = heads // kv_heads
    if w.shape[0] != (heads + 2 * kv_heads) * head_dim:
        raise ModelError(f"wqkv has {w.shape[0]} rows; expected (heads {heads} + 2 x kv "
                         f"{kv_heads}) x head_dim {head_dim}")
    grouped = w.reshape(kv_heads, g + 2, head_dim, *w.shape[1:])
    q = grouped[:, :g].reshape(heads * head_dim, *w.shape[1:])
    k = grouped[:, g].reshape(kv_heads * head_dim, *w.shape[1:])
    v = grouped[:, g + 1].reshape(kv_heads * head_dim, *w.shape[1:])
    return q, k, v


def _shards(root: Path) -> dict[str, list[str]]:
    from safetensors import safe_open

    index = root / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json(index).get("weight_map") or {}
        files: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            files.setdefault(file, []).append(key)
        for file in files:
            if not (root / file).is_file():
                raise ModelError(f"{root}: missing shard {file} (listed in {index.name})")
    elif (root / "model.safetensors").is_file():
        files = {"model.safetensors": []}
    else:
        found = "pytorch_model.bin" if any(root.glob("pytorch_model*.bin")) else "no weights"
        raise ModelError(f"{root}: no safetensors weights ({found}); only safetensors "
                         "checkpoints are converted")
    for file in files:  # the index must agree with what the shards hold
        with safe_open(root / file, framework="pt") as f:
            keys = sorted(f.keys())
        if files[file] and sorted(files[file]) != keys:
            raise ModelError(f"{root / file}: tensors differ from the index")
        files[file] = keys
    return files


def _system_message(root: Path, config: dict) -> tuple[str, str]:
    if isinstance(config.get("system_message"), str):
        return config["system_message"], "config.json system_message"
    conv = root / "conversation.py"
    if conv.is_file():  # read, never run: the `internlm2-chat` template's system_message
        try:
            tree = ast.parse(conv.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            tree = None
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.Call):
                kw = {k.arg: k.value for k in node.keywords if k.arg}
                name, msg = kw.get("name"), kw.get("system_message")
                if (isinstance(name, ast.Constant) and name.value == "internlm2-chat"
                        and isinstance(msg, ast.Constant) and isinstance(msg.value, str)):
                    return msg.value, "conversation.py internlm2-chat template"
    return INTERNVL2_SYSTEM, "InternVL2 default (not in config.json or conversation.py)"


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path.parent}: missing {path.name}") from None
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: cannot read JSON ({err})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: not a JSON object")
    return data


def _require(root: Path, ok: bool, message: str) -> None:
    if not ok:
        raise ModelError(f"{root}: {message}")
