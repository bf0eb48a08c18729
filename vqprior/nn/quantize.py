"""Vector quantizer: nearest code, straight-through gradient, EMA or learned codebook.

The codebook lives in ``embed`` ([k, d]): a buffer updated by exponential moving averages
(VQ-VAE paper appendix A.1, Sonnet's ``VectorQuantizerEMA``) for ``kind="ema"``, or a
parameter trained through the codebook loss for ``kind="learned"``. Training-time extras:
dead-code restart from encoder outputs and optional k-means initialisation on the first batch.
Under ``torch.distributed`` every rank applies the identical codebook update: batch
statistics are all-reduced, random choices are made on rank 0 and broadcast.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vqprior.nn.precision import full_precision, upcast

logger = logging.getLogger(__name__)

KINDS = ("ema", "learned")


class QuantizerOutput(NamedTuple):
    """``quantized`` [b, d, h, w] (straight-through), ``codes`` long [b, h, w], scalar losses."""

    quantized: torch.Tensor
    codes: torch.Tensor
    commit_loss: torch.Tensor
    codebook_loss: torch.Tensor
    perplexity: torch.Tensor


class UsageStats(NamedTuple):
    """Code usage since the last ``reset_usage``: distinct codes used and exp(entropy)."""

    codes_used: int
    perplexity: float


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def squared_distances(z: torch.Tensor, embed: torch.Tensor) -> torch.Tensor:
    """``||z||^2 - 2 z.e + ||e||^2`` in fp32: z [n, d], embed [k, d] -> [n, k]."""
    with full_precision(z.device.type):
        z, embed = z.float(), embed.float()
        return (
            z.pow(2).sum(1, keepdim=True)
            - 2.0 * z @ embed.t()
            + rearrange(embed.pow(2).sum(1), "k -> 1 k")
        )


def perplexity_of_counts(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the distribution ``counts / counts.sum()``; 0 counts contribute 0."""
    counts = upcast(counts)
    probs = counts / counts.sum().clamp_min(1e-12)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
    return torch.exp(entropy)


def _sample_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` rows of ``x`` [m, d] chosen at random (without replacement when m >= n)."""
    m = x.shape[0]
    if m >= n:
        idx = torch.randperm(m, device=x.device)[:n]
    else:
        idx = torch.randint(0, m, (n,), device=x.device)
    return x[idx]


def _broadcast_from_rank0(x: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        x = x.contiguous()
        dist.broadcast(x, src=0)
    return x


def kmeans(x: torch.Tensor, num_clusters: int, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on x [n, d] (fp32) from random rows; returns centroids [k, d], counts [k].

    An empty cluster keeps its previous centroid.
    """
    x = x.float()
    centroids = _sample_rows(x, num_clusters).clone()
    counts = torch.zeros(num_clusters, device=x.device)
    for _ in range(iters):
        assign = squared_distances(x, centroids).argmin(1)
        counts = torch.bincount(assign, minlength=num_clusters).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / rearrange(counts[filled], "k -> k 1")
    return centroids, counts


class VectorQuantizer(nn.Module):
    """Map z [b, d, h, w] to its nearest codebook vectors (straight-through gradient).

    Buffers (persistent unless noted): ``embed`` [k, d] (a parameter for ``kind="learned"``),
    ``cluster_size`` [k] (EMA of per-code counts, used by both kinds for dead-code restart),
    ``embed_avg`` [k, d] (EMA of per-code sums, ``kind="ema"`` only), ``initted`` (k-means done),
    and ``usage_counts`` [k] float64 (non-persistent; reset with :meth:`reset_usage`).
    """

    embed: torch.Tensor
    cluster_size: torch.Tensor
    embed_avg: torch.Tensor
    initted: torch.Tensor
    usage_counts: torch.Tensor

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        beta: float = 0.25,
        kind: str = "ema",
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        restart_dead_codes: bool = True,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not allowed; choose one of {list(KINDS)}")
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be >= 1, got {num_codes}, {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay={decay} must lie in [0, 1)")
        self.num_codes, self.code_dim, self.beta, self.kind = num_codes, code_dim, beta, kind
        self.decay, self.eps = decay, eps
        self.dead_code_threshold, self.restart_dead_codes = dead_code_threshold, restart_dead_codes
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        embed = torch.empty(num_codes, code_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if kind == "learned":
            self.embed = nn.Parameter(embed)  # type: ignore[assignment]
        else:
            self.register_buffer("embed", embed)
            self.register_buffer("embed_avg", embed.clone())
        # Start at one so an unused code's EMA (count, sum) keeps its vector rather than
        # blowing up from a zero count; its count then decays below the dead-code threshold.
        self.register_buffer("cluster_size", torch.ones(num_codes))
        self.register_buffer("initted", torch.tensor(not kmeans_init))
        self._kmeans_done = not kmeans_init  # python cache of ``initted``
        self.register_buffer(
            "usage_counts", torch.zeros(num_codes, dtype=torch.float64), persistent=False
        )

    def extra_repr(self) -> str:
        return f"num_codes={self.num_codes}, code_dim={self.code_dim}, kind={self.kind!r}"

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes long [b, h, w] -> code vectors [b, d, h, w]."""
        return rearrange(F.embedding(codes, self.embed), "b h w d -> b d h w")

    def nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of z_flat [n, d] -> long [n]."""
        return squared_distances(z_flat, self.embed).argmin(dim=1)

    def _needs_kmeans(self) -> bool:
        """True on the first training batch when k-means init is on (one host sync, cached)."""
        if not (self.training and self.kmeans_init) or self._kmeans_done:
            return False
        self._kmeans_done = bool(self.initted)
        return not self._kmeans_done

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z [b, d, h, w] -> :class:`QuantizerOutput`; updates the codebook in training mode."""
        b, d, h, w = z.shape
        z_flat = rearrange(z, "b d h w -> (b h w) d").detach().float()
        if self._needs_kmeans():
            self._kmeans_init(z_flat)
        codes_flat = self.nearest(z_flat)
        q = rearrange(F.embedding(codes_flat, self.embed), "(b h w) d -> b d h w", b=b, h=h, w=w)
        zf = z.float()
        commit_loss = self.beta * F.mse_loss(zf, q.detach())
        if self.kind == "learned":
            codebook_loss = F.mse_loss(q.float(), zf.detach())
        else:
            codebook_loss = zf.new_zeros(())
        # Straight-through: the value is exactly q (so decode(encode(x)) matches bit for bit),
        # the gradient w.r.t. z is the identity. Same gradients as z + (q - z).detach().
        quantized = (q.detach() + (z - z.detach())).to(z.dtype)
        counts = torch.bincount(codes_flat, minlength=self.num_codes).float()
        with torch.no_grad():
            self.usage_counts += counts.to(self.usage_counts.dtype)
            if self.training:
                self._update(z_flat, codes_flat, counts)
        codes = rearrange(codes_flat, "(b h w) -> b h w", b=b, h=h, w=w)
        return QuantizerOutput(
            quantized, codes, commit_loss, codebook_loss, perplexity_of_counts(counts).float()
        )

    @torch.no_grad()
    def _update(self, z_flat: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> None:
        """Training-time codebook update: EMA statistics, then dead-code restart."""
        counts = counts.clone()
        sums = torch.zeros(self.num_codes, self.code_dim, device=z_flat.device)
        if self.kind == "ema":
            sums.index_add_(0, codes, z_flat)
        if is_distributed():
            dist.all_reduce(counts)
            if self.kind == "ema":
                dist.all_reduce(sums)
        self.ema_update(counts, sums)
        if self.restart_dead_codes:
            self._restart_dead(z_flat)

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """One EMA step from (global) batch counts [k] and per-code sums of z [k, d].

        N <- g N + (1 - g) n;  m <- g m + (1 - g) sum z;  N' = (N + eps) / (sum N + k eps) sum N;
        e = m / N'. For ``kind="learned"`` only N is tracked (for dead-code detection).
        """
        g = self.decay
        self.cluster_size.mul_(g).add_(counts.to(self.cluster_size.dtype), alpha=1.0 - g)
        if self.kind != "ema":
            return
        self.embed_avg.mul_(g).add_(sums.to(self.embed_avg.dtype), alpha=1.0 - g)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.embed.copy_(self.embed_avg / rearrange(smoothed, "k -> k 1"))

    @torch.no_grad()
    def _restart_dead(self, z_flat: torch.Tensor) -> None:
        """Replace codes whose EMA count < threshold by random encoder outputs of this batch.

        Candidates are drawn for every code and applied under the dead mask, so there is no
        host sync and no data-dependent shape; rank 0's candidates are used on every rank.
        """
        if z_flat.shape[0] == 0:
            return
        dead = rearrange(self.cluster_size < self.dead_code_threshold, "k -> k 1")
        new = _broadcast_from_rank0(_sample_rows(z_flat, self.num_codes).to(self.embed.dtype))
        size = max(self.dead_code_threshold, self.eps)
        self.embed.data.copy_(torch.where(dead, new, self.embed.data))
        self.cluster_size.copy_(torch.where(dead[:, 0], size, self.cluster_size))
        if self.kind == "ema":
            self.embed_avg.copy_(torch.where(dead, new * size, self.embed_avg))

    @torch.no_grad()
    def _kmeans_init(self, z_flat: torch.Tensor) -> None:
        """Set the codebook by k-means on the first training batch (rank 0's result everywhere)."""
        centroids, counts = kmeans(z_flat, self.num_codes, self.kmeans_iters)
        centroids = _broadcast_from_rank0(centroids.to(self.embed.dtype))
        counts = _broadcast_from_rank0(counts.clamp_min(1.0).to(self.cluster_size.dtype))
        self.embed.data.copy_(centroids)
        self.cluster_size.copy_(counts)
        if self.kind == "ema":
            self.embed_avg.copy_(centroids * rearrange(counts, "k -> k 1"))
        self.initted.fill_(True)
        self._kmeans_done = True
        logger.debug("k-means initialised %d codes from %d vectors", self.num_codes, len(z_flat))

    def reset_usage(self) -> None:
        """Zero the usage counts (call at the start of an epoch)."""
        self.usage_counts.zero_()

    def usage_stats(self) -> UsageStats:
        """Codes used and usage perplexity since the last reset, summed over all ranks."""
        counts = self.usage_counts.clone()
        if is_distributed():
            dist.all_reduce(counts)
        if counts.sum() <= 0:
            return UsageStats(0, 0.0)
        perplexity = float(perplexity_of_counts(counts))
        return UsageStats(int((counts > 0).sum()), perplexity if math.isfinite(perplexity) else 0.0)
