"""The model-level step interface of :class:`vqprior.PixelCNN` (see :mod:`vqprior.nn.step`).

``start_steps`` -> ``step_output`` (head output at one element) -> ``step_write`` (commit its
values), in raster order. With a backbone that implements the step protocol each step costs a
few small matmuls; otherwise (or with ``naive=True``) ``step_output`` is a full forward pass
over the values written so far, which is the reference. The head evaluates one element
through the function its ``start_steps(dtype)`` returns, its matrices laid out once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch import Tensor

from vqprior.nn.precision import as_dtype
from vqprior.nn.step import StepBackbone, StepContext, supports_steps

if TYPE_CHECKING:
    from vqprior.models.pixelcnn import PixelCNN
    from vqprior.nn.gated import HeadStep


class HeadSteps(Protocol):
    """A head that evaluates one element (``CausalHead``, ``Conv1x1Head``)."""

    def start_steps(self, dtype: torch.dtype) -> HeadStep: ...


@dataclass
class ModelSteps:
    """Step state of one batch: the values written so far and the backbone's caches."""

    x: Tensor  # codes long [n, h, w] or pixels [n, C, H, W] (head dtype); unwritten: zero
    cond: Tensor | None
    spatial_cond: Tensor | None
    backbone: Any | None  # the backbone's step state; None: a full pass per step
    head: HeadStep | None = None  # the head at one element (with a backbone state)
    dtype: torch.dtype = torch.float32  # the weights' dtype: pixels enter the network in it
    # x's elements in raster order, views made once (codes [n], pixels [n, C]): indexing a
    # tensor costs about a microsecond a dimension, per step
    cells: tuple[Tensor, ...] = ()

    def __post_init__(self) -> None:
        self.cells = self.x.flatten(-2).unbind(-1)


def empty_values(model: PixelCNN, n: int, device: torch.device) -> Tensor:
    """All-zero values of a batch of ``n``: codes long, pixels in the head dtype."""
    dtype = torch.long if model.config.data == "codes" else model.head_dtype()
    return torch.zeros((n, *model.data_shape), dtype=dtype, device=device)


def start_model_steps(
    model: PixelCNN, n: int, cond: Tensor | None, spatial_cond: Tensor | None, naive: bool
) -> ModelSteps:
    device = next(model.parameters()).device
    x = empty_values(model, n, device)
    model.validate_input(x, cond, spatial_cond)
    state = ModelSteps(x, cond, spatial_cond, None, dtype=model.param_dtype())
    if naive or not supports_steps(model.backbone):
        return state
    cfg = model.config
    ctx = StepContext(
        n,
        cfg.height,
        cfg.width,
        model.class_vector(cond),
        spatial_cond,
        device,
        state.dtype,
    )
    state.backbone = cast(StepBackbone, model.backbone).start_steps(ctx)
    state.head = cast(HeadSteps, model.head).start_steps(state.dtype)
    return state


def model_step_output(model: PixelCNN, state: ModelSteps, r: int, c: int) -> Tensor:
    if state.backbone is None:
        return model(state.x, state.cond, state.spatial_cond)[:, :, r, c]
    feats = cast(StepBackbone, model.backbone).step_output(state.backbone, r, c)
    assert state.head is not None
    return state.head(feats)


def model_step_write(
    model: PixelCNN, state: ModelSteps, r: int, c: int, values: Tensor, group: int | None
) -> None:
    cell = state.cells[r * state.x.shape[-1] + c]  # [n] (codes) or [n, C], a view of x
    if group is None:  # codes, or a pixel's channels all at once
        cell.copy_(values)
    else:
        cell[:, group] = values[:, group] if values.dim() == 2 else values
    if state.backbone is None:
        return
    embed = model.embed  # else the pixel as written (all its channels, whatever the group)
    inp = embed(cell) if embed is not None else as_dtype(cell, state.dtype)
    cast(StepBackbone, model.backbone).step_write(state.backbone, r, c, inp)
