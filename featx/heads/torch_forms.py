"""The torch pieces the heads' ``to_torch`` forms are built from (imported only when a torch form is asked for)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Standardise(nn.Module):
    """(x - mean) / scale, in ``dtype`` (the numpy heads standardise in float64)."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, dtype=torch.float32):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean), dtype=dtype))
        self.register_buffer("scale", torch.as_tensor(np.asarray(scale), dtype=dtype))

    def forward(self, x):
        return (x.to(self.mean.dtype) - self.mean) / self.scale


class Cast(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


def linear_layer(weight: np.ndarray, bias: np.ndarray, dtype=torch.float32) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0]).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.as_tensor(weight))
        linear.bias.copy_(torch.as_tensor(bias))
    return linear


def probabilities(logits: nn.Module) -> nn.Module:
    """features -> float64 logits -> softmax probabilities."""
    return nn.Sequential(Cast(torch.float64), logits, nn.Softmax(1))


class Normalise(nn.Module):
    """Rows divided by their sums (the per-column Platt sigmoids of svm files written before temperature scaling)."""

    def forward(self, p):
        return p / p.sum(1, keepdim=True).clamp_min(1e-300)
