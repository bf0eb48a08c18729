"""K-way categorical output head: log-likelihood and inverse-CDF sampling as pure functions.

Logits are ``[b, n, *rest]`` (class axis 1, e.g. ``[b, k, h, w]`` for code maps); targets and
samples are long ``[b, *rest]``. All math runs in fp32 (fp64 inputs stay fp64) with autocast
disabled, so bf16 logits from an autocast region give fp32 log-probabilities.

Temperature ``T`` means ``softmax(logits / T)`` (below 1 sharpens, above 1 flattens); ``T = 0``
is the mode (the argmax, ties to the lowest index). Truncation (``top_k``, ``top_p``) acts on
the tempered distribution, which is then renormalised; ``top_k = 1`` equals ``T = 0``.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor, nn

from vqprior.nn.precision import full_precision, upcast

__all__ = [
    "CategoricalHead",
    "categorical_log_prob",
    "categorical_sample",
    "check_truncation",
    "inverse_cdf_rows",
]


def _check_temperature(temperature: float) -> None:
    if not temperature >= 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")


def check_truncation(top_k: int | None, top_p: float | None) -> None:
    """ValueError unless ``top_k`` is None or an int >= 1 and ``top_p`` None or in (0, 1]."""
    if top_k is not None and (
        isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1
    ):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k!r}")
    if top_p is not None and (
        isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0.0 < top_p <= 1.0
    ):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


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
    with full_precision(logits.device.type):
        log_p = torch.log_softmax(upcast(logits), dim=1)
        return log_p.gather(1, target.long().unsqueeze(1)).squeeze(1)


def _keep_mask(logits: Tensor, probs: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
    """Classes kept by truncation, bool ``[b, n, *rest]`` (``probs``: the tempered
    probabilities, or any positive multiple of them).

    Classes are ranked by logit, ties by index (a stable sort, so rank 0 is the argmax);
    ``top_k`` keeps ranks ``< k``, ``top_p`` the ranks whose mass before them is ``< p`` (the
    smallest prefix with mass ``>= p``; rank 0 always).
    """
    n = logits.shape[1]
    order = torch.sort(logits, dim=1, descending=True, stable=True).indices
    rank = torch.arange(n, device=logits.device).view(1, n, *[1] * (logits.dim() - 2))
    keep = (rank < (n if top_k is None else min(int(top_k), n))).expand_as(logits)
    if top_p is not None and top_p < 1.0:
        sorted_p = probs.gather(1, order)
        before = torch.cat([torch.zeros_like(sorted_p[:, :1]), sorted_p[:, :-1].cumsum(1)], 1)
        keep = keep & (before < top_p * sorted_p.sum(dim=1, keepdim=True))
    return torch.zeros_like(keep).scatter(1, order, keep)


def categorical_sample(
    logits: Tensor,
    u: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """Draw classes by the inverse CDF of the (truncated) ``softmax(logits / temperature)``.

    The class is the number of cumulative probabilities (in class order, over the kept classes)
    below ``u`` times the kept mass (so a rounding shortfall can never pick a zero-probability
    or dropped class), clamped to ``n - 1``. ``temperature == 0`` gives the argmax (ties: the
    lowest index) and ignores ``u``, ``top_k`` and ``top_p``.

    Args:
        logits: float ``[b, n, *rest]``.
        u: uniforms in (0, 1), ``[b, *rest]``, drawn by the caller (so sampling is deterministic).
        temperature: >= 0; below 1 sharpens, above 1 flattens.
        top_k: keep the ``k`` largest logits (ties: lowest indices first); ``k >= n`` keeps all.
        top_p: keep the smallest set of most probable classes whose tempered mass is ``>= p``
            (at least one class); ``1`` keeps all.

    Returns:
        long ``[b, *rest]``.
    """
    _check_temperature(temperature)
    check_truncation(top_k, top_p)
    _check_rest(logits, u, "u")
    if logits.dim() > 2:  # one row per distribution: [R, n] reductions run several times
        # faster than strided ones on [b, n, *rest], most of all for a sampler's one element
        rows = logits.movedim(1, -1).reshape(-1, logits.shape[1])
        return categorical_sample(rows, u.reshape(-1), temperature, top_k, top_p).view(u.shape)
    with full_precision(logits.device.type):
        logits = upcast(logits)
        if temperature == 0.0:
            return logits.argmax(dim=1)
        return inverse_cdf_rows(logits, u, temperature, top_k, top_p).squeeze(1)


def inverse_cdf_rows(
    logits: Tensor,
    u: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Tensor:
    """The draw of :func:`categorical_sample` on rows, its arguments unchecked: ``logits``
    ``[R, n]`` in full precision (autocast off), ``u`` ``[R]``, ``temperature > 0`` -> long
    ``[R, 1]``. For a sampler's step, which checked its options once."""
    # Subtract the max before dividing so tiny temperatures cannot overflow to inf; the
    # weights exp(shifted) are left unnormalised (the threshold scales by their total).
    shifted = logits - logits.amax(dim=1, keepdim=True)
    weights = torch.exp(shifted if temperature == 1.0 else shifted / temperature)
    if top_k is not None or top_p is not None:
        weights = torch.where(_keep_mask(logits, weights, top_k, top_p), weights, 0.0)
    cdf = weights.cumsum(dim=1)  # [R, n], nondecreasing
    u = upcast(u).clamp(torch.finfo(cdf.dtype).tiny, 1.0)  # u == 0 must not pick p == 0
    threshold = u.unsqueeze(1) * cdf[:, -1:]  # [R, 1]
    idx = torch.searchsorted(cdf, threshold)  # how many cdf values < threshold
    return idx.clamp_(max=logits.shape[1] - 1)


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
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> Tensor:
        """Draw long ``[b, *rest]`` classes from ``[b, n, *rest]`` logits (see categorical_sample).

        The uniforms come from ``torch.rand`` on the generator's device, then move to the logits'.
        """
        self._check(logits)
        shape = (logits.shape[0], *logits.shape[2:])
        draw_device = generator.device if generator is not None else logits.device
        u = torch.rand(shape, generator=generator, device=draw_device, dtype=torch.float32)
        u = u.to(logits.device)
        return categorical_sample(logits, u, temperature, top_k, top_p)
