"""VQVAEModule: losses, metrics and the optimizer around a VQVAE (no model code here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange

from vqprior.models.hierarchy import VQVAE2Output, level_quantizers, reconstruct
from vqprior.models.vqvae import VQVAE, VQVAEConfig, VQVAEOutput
from vqprior.train.config import TrainConfig
from vqprior.train.module import StageModule, configure_adamw

Batch = tuple[torch.Tensor, torch.Tensor]


class VQVAEModule(StageModule):
    """Trains one VQVAE; hparams hold plain dicts only (weights_only checkpoints)."""

    def __init__(self, model: dict[str, Any], train: dict[str, Any], compile: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters({"kind": "vae", "model": model, "train": train})
        self.model = VQVAE(VQVAEConfig.from_dict(model))
        self.train_cfg = TrainConfig.from_dict(train)
        forward: Callable[[torch.Tensor], VQVAEOutput] = self.model
        self._forward = {"fn": torch.compile(self.model) if compile else forward}
        self._saved_usage: dict[str, torch.Tensor] | None = None

    def _step(self, batch: Batch, stage: str) -> torch.Tensor:
        x = self.memory_format(batch[0])
        out: VQVAEOutput = self._forward["fn"](x)
        metrics = {
            "loss": out.loss,
            "recon_loss": out.recon_loss,
            "commit_loss": out.commit_loss,
            "codebook_loss": out.codebook_loss,
            "recon_mse": F.mse_loss(out.recon.detach().float(), x.float()),
            "batch_perplexity": out.perplexity,
        }
        if isinstance(out, VQVAE2Output):  # two levels: batch_perplexity is the bottom's
            metrics["batch_perplexity_top"] = out.top_perplexity
        if self.model.config.recon == "mixture":
            metrics["bits_per_dim"] = out.bits_per_dim
        train = stage == "train"
        self.log_dict(
            {f"{stage}/{k}": v.detach().float() for k, v in metrics.items()},
            on_step=train,
            on_epoch=not train,
            batch_size=x.shape[0],
            sync_dist=not train,
            prog_bar=True,
        )
        return out.loss

    # Codebook usage over each epoch, from the quantizer's counters (summed over ranks).
    # (one codebook per level for a two-level VAE: level_quantizers)
    def on_train_epoch_start(self) -> None:
        for q in level_quantizers(self.model).values():
            q.reset_usage()

    def on_train_epoch_end(self) -> None:
        self._log_usage("train")

    def on_validation_epoch_start(self) -> None:
        # validation shares the counters: set the training counts aside until it ends
        quantizers = level_quantizers(self.model)
        self._saved_usage = {k: q.usage_counts.clone() for k, q in quantizers.items()}
        for q in quantizers.values():
            q.reset_usage()

    def on_validation_epoch_end(self) -> None:
        self._log_usage("val")
        if self._saved_usage is not None:
            for k, q in level_quantizers(self.model).items():
                q.usage_counts.copy_(self._saved_usage[k])
            self._saved_usage = None

    def _log_usage(self, stage: str) -> None:
        for level, q in level_quantizers(self.model).items():
            used, perplexity = q.usage_stats()
            suffix = f"_{level}" if level else ""  # codes_used_top, perplexity_bottom, ...
            # already summed over ranks: the sync only averages equal values
            self.log(f"{stage}/codes_used{suffix}", float(used), sync_dist=True)
            self.log(f"{stage}/perplexity{suffix}", perplexity, sync_dist=True)

    @torch.no_grad()
    def reconstruction_grid(self, x: torch.Tensor, per_row: int = 8) -> tuple[torch.Tensor, int]:
        """Images x [b, c, H, W] -> grid images [2b', c, H, W] and images per row: each row of
        inputs sits above the row of their reconstructions (b' = b rounded down to full rows)."""
        nrow = min(len(x), per_row)
        x = x[: len(x) // nrow * nrow].to(next(self.model.parameters()).device)
        recon = reconstruct(self.model, x).float()  # through both levels of a VQVAE2
        both = torch.stack([x.float(), recon])  # [2, b', c, H, W]
        return rearrange(both, "two (r n) c h w -> (r two n) c h w", n=nrow), nrow

    def configure_optimizers(self) -> Any:
        return configure_adamw(self.model.parameters(), self.train_cfg)
