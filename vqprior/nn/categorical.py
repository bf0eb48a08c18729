"""K-way categorical output head: log-likelihood and inverse-CDF sampling as pure functions.

Logits are ``[b, n, *rest]`` (class axis 1, e.g. ``[b, k, h, w]`` for code maps); targets and
samples are long ``[b, *rest]``. All math runs in fp32 (fp64 inputs stay fp64) with autocast
disabled, so bf16 logits from an autocast region give fp32 log-probabilities.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["CategoricalHead", "categorical_log_prob", "categorical_sample"]


def _upcast(t: Tensor) -> Tensor:
    """Return ``t`` as float32, or unchanged if it is already float64."""
    return t if t.dtype == torch.float64 else t.float()


def _check_temperature(temperature: float) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def _check_rest(logits: Tensor, other: Tensor, name: str) -> None:
    expected = (logits.shape[0], *logits.shape[2:])
    if logits.dim() < 2 or tuple(other.shape) != expected:
        raise ValueError(
            f"{name} must have shape {expected} for logits of shape {tuple(logits.shape)}, "
            f"got {tuple(other.shape)}"
        )


def categorical_log_prob(logits: Tensor, target: Tensor) -> Tensor:
    """Log-probability in nats of each target under ``softmax(logits, dim=1)``.

    Args:
        logits: float ``[b, n, *rest]``.
        target: long ``[b, *rest]`` with values in [0, n).

    Returns:
        float32 ``[b, *rest]`` (float64 for float64 logits).
    """
    _check_rest(logits, target, "target")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        log_p = torch.log_softmax(_upcast(logits), dim=1)
        return log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)


def categorical_sample(logits: Tensor, u: Tensor, temperature: float = 1.0) -> Tensor:
    """Draw classes by the inverse CDF of ``softmax(logits / temperature)``.

    The class is the number of cumulative probabilities below ``u`` (scaled by the total mass,
    so a rounding shortfall can never pick a zero-probability class), clamped to ``n - 1``.
    ``temperature == 0`` gives the argmax and ignores ``u``.

    Args:
        logits: float ``[b, n, *rest]``.
        u: uniforms in (0, 1), ``[b, *rest]``, drawn by the caller (so sampling is deterministic).
        temperature: >= 0; below 1 sharpens, above 1 flattens.

    Returns:
        long ``[b, *rest]``.
    """
    _check_temperature(temperature)
    _check_rest(logits, u, "u")
    with torch.autocast(device_type=logits.device.type, enabled=False):
        logits = _upcast(logits)
        if temperature == 0.0:
            return logits.argmax(dim=1)
        # Subtract the max before dividing so tiny temperatures cannot overflow to inf.
        shifted = (logits - logits.amax(dim=1, keepdim=True)) / temperature
        cdf = torch.softmax(shifted, dim=1).cumsum(dim=1)  # [b, n, *rest]
        u = _upcast(u).clamp(torch.finfo(cdf.dtype).tiny, 1.0)  # u == 0 must not pick p == 0
        threshold = u.unsqueeze(1) * cdf[:, -1:]  # [b, 1, *rest]
        idx = (cdf < threshold).sum(dim=1)
        return idx.clamp(max=logits.shape[1] - 1)


class CategoricalHead(nn.Module):
    """Parameter-free wrapper around the categorical functions for ``num_classes`` classes."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes

    @property
    def num_params(self) -> int:
        """Number of network output channels the head consumes (one logit per class)."""
        return self.num_classes

    def _check(self, logits: Tensor) -> None:
        if logits.dim() < 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits must have {self.num_classes} classes on dim 1, got shape "
                f"{tuple(logits.shape)}"
            )

    def log_prob(self, logits: Tensor, target: Tensor) -> Tensor:
        """``[b, n, *rest]``, long ``[b, *rest]`` -> fp32 nats ``[b, *rest]``."""
        self._check(logits)
        return categorical_log_prob(logits, target)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Same as :meth:`log_prob`."""
        return self.log_prob(logits, target)

    def sample(
        self,
        logits: Tensor,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Draw long ``[b, *rest]`` classes from ``[b, n, *rest]`` logits.

        The uniforms come from ``torch.rand`` on the generator's device, then move to the logits'.
        """
        self._check(logits)
        shape = (logits.shape[0], *logits.shape[2:])
        draw_device = generator.device if generator is not None else logits.device
        u = torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float32)
        u = u.to(logits.device)
        return categorical_sample(logits, u, temperature)
