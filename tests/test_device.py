"""Device and dtype safety, checked on a CPU.

On a GPU a tensor made on the default device (the CPU) next to the model's tensors crashes, or
silently copies every step. A CPU run cannot see that, since both are the CPU. So the engine
runs here under a torch function mode that records every tensor factory called from
guardrail's own code without naming a device (and, for floating-point factories, a dtype): the
list must be empty. transformers' internals are not ours and are not audited.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from guardrail.engine import GuardEngine
from guardrail.layout import additive_mask
from guardrail.video import load_video

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.tensor,
             torch.as_tensor, torch.rand, torch.randn, torch.eye, torch.linspace}
FLOAT_FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.rand, torch.randn}


class FactoryAudit(TorchFunctionMode):
    """Records (file:line, factory) for factories called from guardrail/ without a device."""

    def __init__(self):
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            inherits = func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)
            missing = [] if inherits or "device" in kwargs else ["device"]
            if func in FLOAT_FACTORIES and "dtype" not in kwargs:
                missing.append("dtype")
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            if missing and "/guardrail/" in where and "/tests/" not in where:
                short = where[where.rindex("/guardrail/") + 1:]
                self.found.add(f"{short}:{caller.f_lineno} {func.__name__} without "
                               f"{' and '.join(missing)}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "internvl"])
def engine(request, tiny_model) -> GuardEngine:
    return GuardEngine.from_pretrained(tiny_model(request.param))


CASES = {
    "parallel": {"layout": "parallel"},
    "sequential-kv": {"layout": "sequential", "keep_ratio": 0.5},
    "parallel_cached-kv": {"layout": "parallel_cached", "keep_ratio": 0.5},
    "parallel-pre_prefill": {"layout": "parallel", "keep_ratio": 0.5,
                             "pruning_mode": "pre_prefill"},
    "parallel-explain": {"layout": "parallel", "mode": "explain", "max_new_tokens": 6},
}


@pytest.mark.parametrize("case", list(CASES))
def test_engine_names_device_of_every_tensor(engine, video_files, case):
    eng = engine.with_config(**CASES[case])
    videos = [load_video(video_files[f]) for f in ("mp4_h264", "gif")]
    eng.check_batch(videos)                               # warm: the chunk cache, lazy imports
    with FactoryAudit() as audit:
        eng.check_batch(videos)
    assert not audit.found, "\n".join(sorted(audit.found))


def test_additive_mask_is_made_where_the_visibility_is():
    """Regression: the mask was made on the default device and then filled from the model's."""
    visible = torch.ones(2, 3, 5, dtype=torch.bool, device="meta").tril()
    mask = additive_mask(visible, torch.bfloat16)
    assert mask.device.type == "meta" and mask.dtype == torch.bfloat16
    assert mask.shape == (2, 1, 3, 5)
