"""`guardrail model convert SRC DST [--dtype]`: an original InternVL2-chat checkpoint
(SafeWatch-8B) -> a native transformers InternVL directory that `guardrail check` runs.

    convert("SafeWatch-8B", "safewatch-8b-hf", dtype="bf16")

Everything is checked before a byte is written: the source's layout, the tokenizer, every tensor
name (unknown ones are refused) and every converted shape against the target model built on the
meta device.
Weights then stream shard by shard, one output shard in memory at a time, into a temporary
sibling directory that is renamed to DST only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from guardrail.convert.internvl import Source, convert_tensor, read_source, target_config
from guardrail.convert.processor import fast_tokenizer, generation_config, save_all
from guardrail.convert.tokenizer import build_tokenizer, chat_template, load_proto
from guardrail.errors import ModelError, UsageError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SHARD_BYTES = 2 << 30
PROVENANCE = "conversion_provenance.json"


def convert(src: str | os.PathLike, dst: str | os.PathLike, dtype: str = "bf16",
            shard_bytes: int = SHARD_BYTES) -> Path:
    """Convert `src` into `dst` (which must not exist or be empty). Returns `dst`.
    Raises `UsageError` for bad arguments and `ModelError` for a source we do not convert."""
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    out = Path(dst).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not an empty directory")
    source = read_source(Path(src).expanduser())
    config = target_config(source)
    expected = _meta_shapes(config)
    _check_plan(source, config, expected)
    tokenizer, gen = _tokenizer(source)
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        written = _stream_weights(source, config, DTYPES[dtype], work, shard_bytes)
        if written != expected:
            raise ModelError("converted tensors do not match the target model (internal error)")
        config.dtype = DTYPES[dtype]
        config.save_pretrained(work)
        save_all(work, tokenizer, source.image_size, source.tokens_per_tile, gen)
        shutil.copyfile(source.root / "tokenizer.model", work / "tokenizer.model")
        _write_provenance(source, config, work, dtype, len(written))
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out


def _meta_shapes(config) -> dict[str, tuple[int, ...]]:
    from transformers import InternVLForConditionalGeneration

    with torch.device("meta"):
        model = InternVLForConditionalGeneration(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_plan(source: Source, config, expected: dict[str, tuple[int, ...]]) -> None:
    """Map every tensor on the meta device and compare with the target model, strictly."""
    from safetensors import safe_open

    planned: dict[str, tuple[int, ...]] = {}
    unknown: list[str] = []
    for file, keys in source.shards.items():
        with safe_open(source.root / file, framework="pt") as f:
            for key in keys:
                shape = f.get_slice(key).get_shape()
                try:
                    pairs = convert_tensor(key, torch.empty(shape, device="meta"), config)
                except ModelError:
                    unknown.append(key)
                    continue
                planned.update((name, tuple(t.shape)) for name, t in pairs)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise ModelError(f"{source.root}: unknown tensors {', '.join(unknown[:3])}{more}; "
                         "not an InternVL2-chat (InternViT + InternLM2) checkpoint")
    missing = sorted(set(expected) - set(planned))
    if missing:
        raise ModelError(f"{source.root}: missing tensors for {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}")
    extra = sorted(set(planned) - set(expected))
    if extra:
        raise ModelError(f"{source.root}: tensors with no place in the target: {extra[:3]}")
    bad = [f"{k} {planned[k]} != {expected[k]}" for k in expected if planned[k] != expected[k]]
    if bad:
        raise ModelError(f"{source.root}: shape mismatch: {'; '.join(bad[:3])}")


def _stream_weights(source: Source, config, dtype: torch.dtype, out: Path, shard_bytes: int
                    ) -> dict[str, tuple[int, ...]]:
    """Read one tensor at a time, write output shards of at most `shard_bytes`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    files: list[list[str]] = []
    shapes: dict[str, tuple[int, ...]] = {}
    buffer: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        nonlocal buffer, size
        if buffer:
            save_file(buffer, out / f"part-{len(files):05d}.safetensors", metadata={"format": "pt"})
            files.append(list(buffer))
            buffer, size = {}, 0

    for file, keys in source.shards.items():
        with safe_open(source.root / file, framework="pt") as f:
            for key in keys:
                for name, tensor in convert_tensor(key, f.get_tensor(key), config):
                    t = tensor.to(dtype=dtype, copy=True).contiguous()   # own storage each
                    nbytes = t.numel() * t.element_size()
                    if buffer and size + nbytes > shard_bytes:
                        flush()
                    buffer[name], shapes[name] = t, tuple(t.shape)
                    size, total = size + nbytes, total + nbytes
    flush()
    if len(files) == 1:
        (out / "part-00000.safetensors").rename(out / "model.safetensors")
        return shapes
    weight_map = {}
    for i, names in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (out / f"part-{i:05d}.safetensors").rename(out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return shapes


def _tokenizer(source: Source):
    """The fast tokenizer (with the original chat template) and the generation config."""
    proto = load_proto(source.root / "tokenizer.model")
    add_bos = bool(source.tokenizer_config.get("add_bos_token", True))
    tok = build_tokenizer(proto, source.added, add_bos=add_bos)
    spec = proto.trainer_spec
    piece = {t.id: t.content for t in source.added}
    names = {k: piece.get(i, proto.pieces[i].piece) if 0 <= i < len(proto.pieces) else None
             for k, i in (("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id))}
    pad = source.tokenizer_config.get("pad_token") or names["eos"]
    stop = source.token_id("<|im_end|>")
    if stop is None:
        raise ModelError(f"{source.root}: no <|im_end|> in added_tokens_decoder")
    vocab = int(source.llm["vocab_size"])
    if tok.get_vocab_size(with_added_tokens=True) > vocab:
        raise ModelError(f"{source.root}: the tokenizer has "
                         f"{tok.get_vocab_size(with_added_tokens=True)} tokens, more than the "
                         f"model's vocab_size {vocab}")
    fast = fast_tokenizer(tok, chat_template(source.system_message), bos=names["bos"],
                          eos=names["eos"], unk=names["unk"], pad=_content(pad),
                          max_length=int(source.llm.get("max_position_embeddings", 32768)))
    return fast, generation_config(bos=spec.bos_id, stop=stop, pad=fast.pad_token_id)


def _content(token) -> str:
    return token["content"] if isinstance(token, dict) else str(token)


def _write_provenance(source: Source, config, out: Path, dtype: str, tensors: int) -> None:
    from importlib.metadata import PackageNotFoundError, version

    import transformers

    try:
        ours = version("guardrail")
    except PackageNotFoundError:
        ours = "unknown"
    cfg = source.config
    record = {
        "converted_by": f"guardrail {ours} (guardrail model convert)",
        "transformers": transformers.__version__, "torch": torch.__version__,
        "source": str(source.root.resolve()), "source_model_type": cfg.get("model_type"),
        "source_architectures": cfg.get("architectures"),
        "llm_architecture": source.llm.get("architectures"),
        "template": cfg.get("template"), "system_message": source.system_message,
        "system_message_from": source.system_source,
        "original_rope": {"rope_theta": source.llm.get("rope_theta"),
                          "rope_scaling": source.llm.get("rope_scaling"),
                          "max_position_embeddings": source.llm.get("max_position_embeddings")},
        # NOTE: dynamic NTK equals plain RoPE below max_position_embeddings, hence "default".
        "rope_used": dict(config.text_config.rope_parameters),
        "image_size": source.image_size, "tokens_per_tile": source.tokens_per_tile,
        "image_token_id": source.image_token_id, "dtype": dtype,
        "source_files": {f: (source.root / f).stat().st_size for f in sorted(source.shards)},
        "tensors_written": tensors,
    }
    (out / PROVENANCE).write_text(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
