"""The alignment losses: pure functions on tensors, shared by the healers and by the pruner that
measures each block's sensitivity with STARFISH's own loss."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _groups(x: torch.Tensor) -> torch.Tensor:
    """Rows to compare: per token for (B, T, D) states, per sample (flattened) otherwise."""
    return x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x.reshape(x.shape[0], -1)


_FLOOR = 1e-8  # on |s| |t|, as F.cosine_similarity's eps: a zero state row gives cos 0, not a division by zero


class _CosineDistance(torch.autograd.Function):
    """Mean over rows of 1 - s.t / max(|s| |t|, 1e-8), `t` a constant, with its gradient written
    out: (t - cos |t|/|s| s) / (|s| |t|) per row, t / 1e-8 where the floor holds. Autograd's graph
    of the same expression passes over the states about twice as often; the loss is the largest
    part of what a heal step costs over a plain one on a small model."""

    @staticmethod
    def forward(ctx: Any, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        norm_s, norm_t = torch.linalg.vector_norm(s, dim=-1), torch.linalg.vector_norm(t, dim=-1)
        product = norm_s * norm_t
        inv = product.clamp_min(_FLOOR).reciprocal()
        cos = torch.linalg.vecdot(s, t) * inv
        ctx.save_for_backward(s, t, inv, cos, torch.where(product > _FLOOR, norm_t * inv / norm_s, 0.0))
        return 1.0 - cos.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        s, t, inv, cos, along_s = ctx.saved_tensors
        scale = -grad / cos.numel()
        return (t * (scale * inv).unsqueeze(-1)).addcmul_(s, (scale * cos * along_s).unsqueeze(-1), value=-1), None


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher): over the hidden dim per token, or per flattened sample.

    The teacher is a constant (no gradient reaches it). The same values and gradients as
    F.cosine_similarity up to rounding, in about half the passes of autograd's graph of the same
    formula (`_CosineDistance`), in the wider of the two dtypes (bfloat16 states against float32
    targets: float32)."""
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    return _CosineDistance.apply(_groups(student).to(dtype), _groups(teacher).detach().to(dtype))


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
