"""PriorModule: likelihood losses, metrics, Polyak EMA weights and the optimizer around a PixelCNN."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from vqprior.models.pixelcnn import PixelCNN, PixelCNNConfig
from vqprior.train.config import TrainConfig
from vqprior.train.module import StageModule, configure_adamw

Inputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # x, labels, spatial condition
LN2 = math.log(2.0)


def warmup_ema(decay: float) -> Any:
    """Polyak/EMA update whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    A plain EMA at 0.999 still weighs the random initial weights by 0.999**n (0.55 after 600
    steps), so short runs would validate and sample an almost untrained model.
    """

    @torch.no_grad()
    def update(
        ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor
    ) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n))
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    return update


class PriorModule(StageModule):
    """Trains one PixelCNN (codes or pixels); validation, sampling and export use the EMA weights.

    ``vae`` (a plain dict, or None for pixels) records which VAE produced the codes.
    """

    is_prior = True  # fp32 CPU training in channels-last too (nn.layout.trains_channels_last)

    def __init__(
        self,
        model: dict[str, Any],
        train: dict[str, Any],
        vae: dict[str, Any] | None = None,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters({"kind": "prior", "model": model, "train": train, "vae": vae})
        self.model = PixelCNN(PixelCNNConfig.from_dict(model))
        self.train_cfg = TrainConfig.from_dict(train)
        # Not Lightning 2.6's EMAWeightAveraging callback: it copies the average over the trained
        # weights at on_train_end, so the last.ckpt written after fit (and so an extended run)
        # would continue from the averaged weights instead of the trained ones, and its decay is
        # fixed (no min(d, (1 + n) / (10 + n)) warm-up). Here the module owns the EMA copy: it
        # travels in every checkpoint (exact resume), validation, sampling and export use it.
        self.ema: AveragedModel | None = None
        if self.train_cfg.ema_decay > 0:
            self.ema = AveragedModel(self.model, multi_avg_fn=warmup_ema(self.train_cfg.ema_decay))
            self.ema.requires_grad_(False)
        self._log_prob = {
            "fn": torch.compile(self.model.log_prob) if compile else self.model.log_prob
        }

    @property
    def eval_model(self) -> PixelCNN:
        """The Polyak-averaged model (or the raw one when EMA is off)."""
        if self.ema is None:
            return self.model
        module = self.ema.module
        assert isinstance(module, PixelCNN)
        return module

    def _inputs(self, batch: Any) -> Inputs:
        """A batch -> (x, labels, spatial condition): here batches (x, y), no spatial condition.

        Subclasses (the bottom prior) override this hook, never :meth:`_step`.
        """
        return self.memory_format(batch[0]), batch[1], None

    def _labels(self, model: PixelCNN, y: torch.Tensor, train: bool) -> torch.Tensor | None:
        """The class condition: None for an unconditional prior; in training a learned null
        class replaces each label with probability ``class_dropout`` (classifier-free guidance)."""
        if not model.config.num_classes:
            return None
        if not train or model.null_class is None:
            return y
        drop = torch.rand(y.shape, device=y.device) < model.config.class_dropout
        return torch.where(drop, torch.full_like(y, model.null_class), y)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        """The one step of every prior: train, val and test, plain or bottom (see _inputs)."""
        train = stage == "train"
        model = self.model if train else self.eval_model
        x, y, spatial = self._inputs(batch)
        cond = self._labels(model, y, train)
        log_prob = self._log_prob["fn"] if train else model.log_prob
        # check=False: no host sync per step (shapes and dtypes are still checked). The data
        # module's batches are in range when loaded: images are uint8 mapped to [-1, 1]
        # (vqprior.data), labels lie in [0, num_classes) with num_classes taken from the data
        # (train.config.fill_num_classes), codes are a VAE's nearest codes (a stored code file
        # must match the VAE's hash, num_codes and grid; load_codes checks its shapes and
        # dtypes, not the code range).
        nll = -log_prob(x, cond, spatial_cond=spatial, check=False).float()  # nats per example [b]
        loss = nll.mean() / model.num_dims  # nats per element
        if model.config.data == "pixels":
            metrics = {"nats_per_dim": loss, "bits_per_dim": loss / LN2}
        else:
            metrics = {"nats_per_code": loss, "bits_per_image": nll.mean() / LN2}
        self.log_dict(
            {f"{stage}/{k}": v.detach() for k, v in {"loss": loss, **metrics}.items()},
            on_step=train,
            on_epoch=not train,
            batch_size=x.shape[0],
            sync_dist=not train,
            prog_bar=True,
        )
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update_parameters(self.model)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0
    ) -> torch.Tensor:
        """``n`` samples from the EMA model: codes long [n, h, w] or pixels [n, c, H, W].

        A conditional prior draws labels 0, 1, ..., num_classes - 1 in turn.
        """
        model = self.eval_model
        k = model.config.num_classes
        cond = torch.arange(n, device=model.device) % k if k else None
        return model.sample(n, cond=cond, temperature=temperature, generator=generator)

    def configure_optimizers(self) -> Any:
        return configure_adamw(self.model.parameters(), self.train_cfg)
