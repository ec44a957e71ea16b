"""The training stages' optimiser."""

from __future__ import annotations

from typing import Any, Iterable

import torch


def adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.AdamW:
    """torch.optim.AdamW with its fused kernel where the parameters' device has one (CPU and CUDA in torch 2.4+):
    the same update in one kernel over every tensor, where the default on a CPU is a Python loop of small ops per
    tensor (docs/results.md [Speed]). Falls back to the default implementation where
    fused is refused (an older torch, a device without the kernel, a parameter that is not floating point)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **kwargs)
