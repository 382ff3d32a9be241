"""Model family registry and the one place models are loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guardrail.adapters.base import ModelAdapter
from guardrail.adapters.internvl import InternVLAdapter
from guardrail.adapters.qwen_vl import QwenVLAdapter
from guardrail.errors import ModelError, UsageError

# config.model_type -> adapter class. The family is read from the config, never from the path.
FAMILIES: dict[str, type] = {
    "qwen2_vl": QwenVLAdapter,
    "qwen2_5_vl": QwenVLAdapter,
    "qwen3_vl": QwenVLAdapter,
    "internvl": InternVLAdapter,
}

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
           "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_ATTN = ("auto", "sdpa", "eager", "flex_attention")


@dataclass(frozen=True)
class Placement:
    """Device, dtype and attention backend, with "auto" resolved once."""

    device: torch.device
    dtype: torch.dtype
    attn: str


def resolve_placement(device: str = "auto", dtype: str = "auto", attn: str = "auto") -> Placement:
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       "cpu" if device == "auto" else device)
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif dtype in _DTYPES:
        dt = _DTYPES[dtype]
    else:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(_DTYPES)}")
    if attn not in _ATTN:
        raise UsageError(f"unknown attention backend {attn!r}; choose one of {', '.join(_ATTN)}")
    # NOTE: "auto" is sdpa with additive masks: exact everywhere, no compile step. flex_attention
    # (block-sparse PEPE masks) compiles per shape; it pays on GPU for long prompts.
    return Placement(dev, dt, "sdpa" if attn == "auto" else attn)


def default_model() -> str:
    return os.environ.get("GUARDRAIL_MODEL") or DEFAULT_MODEL


def locate_model(model: str | os.PathLike | None = None) -> tuple[str, str, Any]:
    """(name, source, config) of a model directory or hub id, checked without loading weights:
    ModelError (one line, what to do) for a missing or non-model directory, a hub id neither
    cached nor reachable, a config that cannot be read, an unconverted InternVL2 checkpoint.
    Cheap enough for a driver to call before it starts workers."""
    from transformers import AutoConfig

    name = str(model or default_model())
    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    if not local.exists() and name.startswith(("/", "./", "../", "~")):
        raise ModelError(f"{name}: no such model directory; make a test model with "
                         "`guardrail model make-tiny DIR --family qwen2_5_vl`")
    if local.exists() and not (local / "config.json").is_file():
        raise ModelError(f"{name}: not a model directory (no config.json)")
    how = ("give --model a local model directory, set GUARDRAIL_MODEL, or make a test model "
           "with `guardrail model make-tiny /tmp/m --family qwen2_5_vl`")
    if not local.exists() and not _in_hub_cache(name) and not _hub_reachable():
        raise ModelError(f"model {name!r} is not on this machine and the Hugging Face hub is "
                         f"unreachable: {how}")
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for "not found"
        raise ModelError(f"cannot load model {name!r} ({type(err).__name__}): {how}") from None
    if config.model_type == "internvl_chat":
        raise ModelError(f"{name}: an original InternVL2-chat checkpoint; convert it first: "
                         f"guardrail model convert {name} DST")
    return name, source, config


def create_adapter(model: str | os.PathLike | None = None, placement: Placement | None = None
                   ) -> ModelAdapter:
    """Load a model directory (or hub id where the network allows) and its processor."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, source, config = locate_model(model)
    placement = placement or resolve_placement()
    family = config.model_type
    if family not in FAMILIES:
        raise ModelError(f"{name}: model type {family!r} is not supported; supported: "
                         f"{', '.join(FAMILIES)}")
    try:
        # flex applies to the language model only (the adapter switches it): load with sdpa
        load_attn = "sdpa" if placement.attn == "flex_attention" else placement.attn
        hf_model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=placement.dtype, attn_implementation=load_attn)
        processor = AutoProcessor.from_pretrained(source)
    except Exception as err:  # noqa: BLE001
        raise ModelError(f"cannot load model {name!r}: {type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}") from None
    hf_model.to(placement.device)
    return FAMILIES[family](hf_model, processor, name, attn=placement.attn)


def _in_hub_cache(name: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False
    return True


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """One quick TCP connect instead of transformers' minute of retries when offline."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout_s).close()
    except OSError:
        return False
    return True
