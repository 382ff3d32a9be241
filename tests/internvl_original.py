"""A tiny checkpoint in the ORIGINAL InternVL2-chat layout (what SafeWatch-8B ships), and a
plain-torch forward of those original weights, written from the original architecture.

Layout as in InternVL2-8B, shrunk: `config.json` with `model_type: internvl_chat` and InternLM2 /
InternViT sub-configs, two safetensors shards with an index, `tokenizer.model` (a sentencepiece
BPE trained here with byte fallback and the `[UNUSED_TOKEN_141..146]` placeholder pieces) and a
`tokenizer_config.json` whose `added_tokens_decoder` renames two placeholders to
`<|im_end|>`/`<|im_start|>` and appends the 9 InternVL tokens. The language model keeps the 8B's
grouping: 8 query heads over 2 KV heads, grouped `wqkv` rows.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

INTERNVL_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                   "<box>", "</box>")
SYSTEM = ("你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
          "是一个有用无害的人工智能助手。")
VIT = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, intermediate_size=64,
           image_size=28, patch_size=7)
LLM = dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
           intermediate_size=96)
CORPUS_EXTRA = [
    'GUARDRAIL: {"C1(Sexual Content)": true, "C2(Harassment & Bullying)": false}',
    'GUARDRAIL: {\n    "C1(Sexual Content)": false,\n    "C2(Harassment & Bullying)": true\n}',
    "DESCRIPTION: A man walks a dog in a park.\nEXPLANATION: No safety violations were detected.",
    "Frame1: Frame2: Frame3: Frame4: Frame5: Frame6: Frame7: Frame8:",
    SYSTEM, "user\nassistant\nsystem\n",
]


def default_corpus() -> list[str]:
    """Text the tiny sentencepiece model is trained on: the engine's prompts for the shipped
    SafeWatch policy set, in both prompt styles, and the chat frame."""
    from guardrail.policy import load_policy
    from guardrail.prompt import build_prompt, render_prompt

    policies = load_policy(Path(__file__).resolve().parents[1] / "policies" / "safewatch.yaml")
    texts = [render_prompt(build_prompt(policies, style), "parallel")
             for style in ("default", "safewatch")]
    return [line for text in texts for line in text.splitlines() if line.strip()]


def train_spm(out: Path, corpus: list[str], vocab_size: int = 4000) -> Path:
    """A sentencepiece BPE in InternLM2's style: byte fallback, no dummy prefix, identity
    normalisation, whitespace kept, placeholder pieces as user-defined symbols."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=buf, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity",
        user_defined_symbols=[f"[UNUSED_TOKEN_{i}]" for i in range(141, 147)],
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, character_coverage=1.0,
        split_digits=True, hard_vocab_limit=False, allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16, minloglevel=2)
    path = out / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def write_original(out: Path, corpus: list[str], seed: int = 0, shards: int = 2) -> Path:
    """Write the tiny original-layout checkpoint into `out`; returns `out`."""
    import sentencepiece as spm
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    sp = spm.SentencePieceProcessor(model_file=str(train_spm(out, corpus + CORPUS_EXTRA)))
    n = sp.get_piece_size()
    decoder = {0: "<unk>", 1: "<s>", 2: "</s>"}
    decoder.update({sp.piece_to_id(f"[UNUSED_TOKEN_{i}]"): name for i, name in
                    ((145, "<|im_end|>"), (146, "<|im_start|>"))})
    decoder.update({n + i: tok for i, tok in enumerate(INTERNVL_TOKENS)})
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "model_max_length": 8192,
        "added_tokens_decoder": {str(i): {"content": c, "special": True, "lstrip": False,
                                          "rstrip": False, "normalized": False,
                                          "single_word": False} for i, c in decoder.items()},
    }, ensure_ascii=False, indent=2))
    vocab = n + len(INTERNVL_TOKENS)
    config = original_config(vocab)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    state = original_state_dict(config, seed)
    names = list(state)
    cut = [round(i * len(names) / shards) for i in range(shards + 1)]
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in names[cut[s]:cut[s + 1]]}
        save_file(part, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())},
         "weight_map": weight_map}, indent=2))
    return out


def original_config(vocab: int) -> dict:
    llm = dict(LLM, architectures=["InternLM2ForCausalLM"], model_type="internlm2",
               attn_implementation="flash_attention_2", rms_norm_eps=1e-5, hidden_act="silu",
               max_position_embeddings=32768, rope_theta=1e6,
               rope_scaling={"type": "dynamic", "factor": 2.0}, vocab_size=vocab, bias=False,
               bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
               auto_map={"AutoModel": "modeling_internlm2.InternLM2ForCausalLM"})
    vit = dict(VIT, architectures=["InternVisionModel"], model_type="intern_vit_6b",
               qkv_bias=True, qk_normalization=False, norm_type="layer_norm",
               layer_norm_eps=1e-6, hidden_act="gelu", drop_path_rate=0.0, num_channels=3,
               use_flash_attn=True)
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
        "auto_map": {"AutoModel": "modeling_internvl_chat.InternVLChatModel"},
        "downsample_ratio": 0.5, "force_image_size": VIT["image_size"], "select_layer": -1,
        "ps_version": "v2", "template": "internlm2-chat", "dynamic_image_size": True,
        "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": 12,
        "use_backbone_lora": 0, "use_llm_lora": 0, "torch_dtype": "bfloat16",
        "llm_config": llm, "vision_config": vit,
    }


def original_state_dict(config: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random, non-trivial weights under the original key names (fp32)."""
    g = torch.Generator().manual_seed(seed)
    vit, llm = config["vision_config"], config["llm_config"]
    cv, cl = vit["hidden_size"], llm["hidden_size"]
    hd = cl // llm["num_attention_heads"]
    rows = (llm["num_attention_heads"] + 2 * llm["num_key_value_heads"]) * hd
    grid = vit["image_size"] // vit["patch_size"]
    merged = cv * 4

    def w(*shape, scale=None):
        scale = scale if scale is not None else 1 / math.sqrt(shape[-1])
        return torch.randn(*shape, generator=g) * scale

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=g)

    sd = {
        "vision_model.embeddings.class_embedding": w(1, 1, cv, scale=0.5),
        "vision_model.embeddings.patch_embedding.weight": w(cv, 3, vit["patch_size"],
                                                            vit["patch_size"], scale=0.1),
        "vision_model.embeddings.patch_embedding.bias": w(cv, scale=0.1),
        "vision_model.embeddings.position_embedding": w(1, grid * grid + 1, cv, scale=0.5),
    }
    for i in range(vit["num_hidden_layers"]):
        p = f"vision_model.encoder.layers.{i}."
        sd.update({
            p + "attn.qkv.weight": w(3 * cv, cv), p + "attn.qkv.bias": w(3 * cv, scale=0.1),
            p + "attn.proj.weight": w(cv, cv), p + "attn.proj.bias": w(cv, scale=0.1),
            p + "mlp.fc1.weight": w(vit["intermediate_size"], cv),
            p + "mlp.fc1.bias": w(vit["intermediate_size"], scale=0.1),
            p + "mlp.fc2.weight": w(cv, vit["intermediate_size"]),
            p + "mlp.fc2.bias": w(cv, scale=0.1),
            p + "norm1.weight": norm(cv), p + "norm1.bias": w(cv, scale=0.1),
            p + "norm2.weight": norm(cv), p + "norm2.bias": w(cv, scale=0.1),
            p + "ls1": 0.5 + torch.rand(cv, generator=g),
            p + "ls2": 0.5 + torch.rand(cv, generator=g),
        })
    sd.update({
        "mlp1.0.weight": norm(merged), "mlp1.0.bias": w(merged, scale=0.1),
        "mlp1.1.weight": w(cl, merged), "mlp1.1.bias": w(cl, scale=0.1),
        "mlp1.3.weight": w(cl, cl), "mlp1.3.bias": w(cl, scale=0.1),
        "language_model.model.tok_embeddings.weight": w(llm["vocab_size"], cl, scale=1.0),
        "language_model.model.norm.weight": norm(cl),
        "language_model.output.weight": w(llm["vocab_size"], cl),
    })
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        sd.update({
            p + "attention.wqkv.weight": w(rows, cl), p + "attention.wo.weight": w(cl, cl),
            p + "feed_forward.w1.weight": w(llm["intermediate_size"], cl),
            p + "feed_forward.w3.weight": w(llm["intermediate_size"], cl),
            p + "feed_forward.w2.weight": w(cl, llm["intermediate_size"]),
            p + "attention_norm.weight": norm(cl), p + "ffn_norm.weight": norm(cl),
        })
    return sd


# --------------------------------------------------------------------- original forward

def vision_features(sd: dict, config: dict, pixel_values: torch.Tensor) -> torch.Tensor:
    """InternViT (layer scale, contiguous qkv) -> drop CLS -> pixel shuffle v2 -> mlp1.
    pixel_values [N, 3, S, S] -> [N, tokens, llm_hidden]."""
    vit = config["vision_config"]
    heads, eps, p = vit["num_attention_heads"], vit["layer_norm_eps"], vit["patch_size"]
    x = F.conv2d(pixel_values, sd["vision_model.embeddings.patch_embedding.weight"],
                 sd["vision_model.embeddings.patch_embedding.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)                                       # [N, P, C]
    cls = sd["vision_model.embeddings.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["vision_model.embeddings.position_embedding"]
    n, t, c = x.shape
    for i in range(vit["num_hidden_layers"]):
        q = f"vision_model.encoder.layers.{i}."
        h = F.layer_norm(x, (c,), sd[q + "norm1.weight"], sd[q + "norm1.bias"], eps)
        qkv = (h @ sd[q + "attn.qkv.weight"].T + sd[q + "attn.qkv.bias"])
        qkv = qkv.reshape(n, t, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(qkv[0] @ qkv[1].transpose(-1, -2) / math.sqrt(c // heads), dim=-1)
        o = (att @ qkv[2]).transpose(1, 2).reshape(n, t, c)
        o = o @ sd[q + "attn.proj.weight"].T + sd[q + "attn.proj.bias"]
        x = x + o * sd[q + "ls1"]
        h = F.layer_norm(x, (c,), sd[q + "norm2.weight"], sd[q + "norm2.bias"], eps)
        h = F.gelu(h @ sd[q + "mlp.fc1.weight"].T + sd[q + "mlp.fc1.bias"])
        x = x + (h @ sd[q + "mlp.fc2.weight"].T + sd[q + "mlp.fc2.bias"]) * sd[q + "ls2"]
    x = x[:, 1:]
    side = int(math.sqrt(x.shape[1]))
    x = pixel_shuffle_v2(x.reshape(n, side, side, c), config["downsample_ratio"])
    x = x.reshape(n, -1, x.shape[-1])
    x = F.layer_norm(x, (x.shape[-1],), sd["mlp1.0.weight"], sd["mlp1.0.bias"])
    x = F.gelu(x @ sd["mlp1.1.weight"].T + sd["mlp1.1.bias"])
    return x @ sd["mlp1.3.weight"].T + sd["mlp1.3.bias"]


def pixel_shuffle_v2(x: torch.Tensor, r: float) -> torch.Tensor:
    n, w, h, c = x.shape
    x = x.view(n, w, int(h * r), int(c / r)).permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * r), int(w * r), int(c / (r * r)))
    return x.permute(0, 2, 1, 3).contiguous()


def language_logits(sd: dict, config: dict, embeds: torch.Tensor, positions: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """InternLM2 over embeds [1, T, C] with positions [T] and an additive mask [1, 1, T, T]."""
    llm = config["llm_config"]
    heads, kv = llm["num_attention_heads"], llm["num_key_value_heads"]
    c, eps, groups = llm["hidden_size"], llm["rms_norm_eps"], heads // kv
    d, t = c // heads, embeds.shape[1]
    inv_freq = 1.0 / (llm["rope_theta"] ** (torch.arange(0, d, 2).float() / d))
    freqs = positions.float()[:, None] * inv_freq[None]                   # [T, D/2]
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rope(x):                                                          # x [1, H, T, D]
        half = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
        return x * cos + half * sin

    x = embeds
    for i in range(llm["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"])
        qkv = (h @ sd[p + "attention.wqkv.weight"].T).view(1, t, kv, groups + 2, d)
        q = qkv[..., :groups, :].reshape(1, t, heads, d).transpose(1, 2)
        k = qkv[..., -2, :].transpose(1, 2)
        v = qkv[..., -1, :].transpose(1, 2)
        q, k = rope(q), rope(k)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask
        o = (torch.softmax(scores.float(), dim=-1) @ v).transpose(1, 2).reshape(1, t, c)
        x = x + o @ sd[p + "attention.wo.weight"].T
        h = rms(x, sd[p + "ffn_norm.weight"])
        gate = F.silu(h @ sd[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[
            p + "feed_forward.w2.weight"].T
    x = rms(x, sd["language_model.model.norm.weight"])
    return x @ sd["language_model.output.weight"].T


def reference_logits(sd: dict, config: dict, ids: torch.Tensor, pixel_values: torch.Tensor,
                     image_token_id: int, positions: torch.Tensor, mask: torch.Tensor
                     ) -> torch.Tensor:
    """The original model's logits [1, T, V] for ids [T] with its images' tokens filled in."""
    embeds = sd["language_model.model.tok_embeddings.weight"][ids].clone()
    feats = vision_features(sd, config, pixel_values)
    embeds[ids == image_token_id] = feats.reshape(-1, feats.shape[-1])
    return language_logits(sd, config, embeds[None], positions, mask)
