"""The alignment losses: pure functions on tensors, shared by the healers and by the pruner that
measures each block's sensitivity with STARFISH's own loss."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _groups(x: torch.Tensor) -> torch.Tensor:
    """Rows to compare: per token for (B, T, D) states, per sample (flattened) otherwise."""
    return x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x.reshape(x.shape[0], -1)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher): over the hidden dim per token, or per flattened sample.

    Written out (s.t / max(|s||t|, 1e-8)) rather than F.cosine_similarity: the same values up to
    rounding, at two thirds of its time forward and backward, which a small model's step notices."""
    s, t = _groups(student), _groups(teacher)
    norms = (torch.linalg.vecdot(s, s) * torch.linalg.vecdot(t, t)).clamp_min(1e-16)
    return (1.0 - torch.linalg.vecdot(s, t) * norms.rsqrt()).mean()


def nmse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ||s - t||^2 / ||t||^2 over the same groups as `cosine_loss`."""
    s, t = _groups(student), _groups(teacher)
    return ((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def kd_loss(temperature: float) -> LossFn:
    """KL(dense || student) on temperature-softened logits, scaled by T^2 (Hinton et al.)."""

    def loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                        reduction="batchmean", log_target=True) * temperature**2

    return loss


STATE_LOSSES: dict[str, LossFn] = {"cosine": cosine_loss, "nmse": nmse_loss}
