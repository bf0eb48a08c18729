"""Incremental (cached) evaluation: the step protocol of layers, backbones and models.

An autoregressive sampler visits elements in raster order (row ``r``, column ``c``, then
channel group). Re-running the whole network per step costs a full pass each time; instead
every layer keeps a cache of what it has already computed and advances by one row or one
element. Each layer owns its cache and its incremental maths; a stack only wires them up and
the sampler (:func:`vqprior.sampling.autoregress`) only talks to the model.

Streams
-------
A gated stack carries two streams through its blocks (:mod:`vqprior.nn.gated`):

- the vertical stream ``v``: at row ``r`` it depends only on input rows ``< r``, so a block
  computes a whole row of it at once, as soon as the input's row ``r - 1`` is complete;
- the horizontal stream ``h``: at ``(r, c)`` it depends on ``v`` of row ``r`` and on
  elements up to ``(r, c)`` (for channel groups: the earlier groups of ``(r, c)``), so it is
  evaluated one element at a time.

The first block's vertical input at row ``r`` is the network input's row ``r - 1`` (zeros
for ``r = 0``): the stack down-shifts the input, so that "row ``r`` of a block's vertical
input" always means "information from rows ``< r``" and every block sees the same geometry.

Block protocol (:class:`StepBlock`)
-----------------------------------
A block (a gated layer, a causal self-attention block, ...) implements::

    state = block.start_steps(ctx)            # ctx: StepContext (batch, grid, condition)
    v_row = block.step_row(state, r, v_in)    # v_in [n, Cin, W]: vertical input row r
                                              # -> [n, F, W] vertical output row r
    h_row, skips = block.step_element(state, r, c, h_in, skips)
        # h_in [n, pad + W, Cin]: the horizontal input row r (``pad = ctx.pad`` zero columns
        # on the left; column ``pad + c'`` holds element (r, c'), its channels contiguous);
        # columns left of ``pad + c`` are final, column ``pad + c`` is the current element.
        # Returns the block's own output row buffer (same layout, column ``pad + c`` updated;
        # a block whose horizontal output equals its input may return ``h_in``) and
        # ``skips`` [n, F] (the skip features summed over the blocks so far; [F] before the
        # first) plus its own skip, if it has one.

Rules every block follows (the stack relies on them):

- ``step_row(state, r, ...)`` is called once per row, for ``r = 0, 1, ...`` in order, before
  any ``step_element`` of that row; the block keeps whatever earlier rows it needs.
- A block never writes into ``h_in`` (the producer owns it) and keeps the row buffer it
  returns intact until the next block has read it: the next block reads its columns ``<= c``.
  The producer of the first block's ``h_in`` is the stack's input row, which ``step_write``
  updates, so a value written after an element was evaluated is seen by later elements.
- ``step_element(state, r, c, h_in)`` is called for the elements of row ``r`` in order of
  ``c``, and possibly several times at the same ``(r, c)`` (once per channel group, each time
  with more of the element's groups filled in). Re-evaluating an element must be idempotent:
  a block writes its caches *at* position ``(r, c)`` (e.g. an attention block writes its
  key/value cache at ``t = r * W + c`` of a buffer preallocated in ``start_steps``) rather than
  appending, so the last evaluation wins and nothing is counted twice.
- The conditioning (``ctx.cond``: class embedding ``[n, cond_dim]``; ``ctx.spatial``: a
  ``[n, s, H, W]`` map) is given once, to ``start_steps``; a block that uses it precomputes
  its biases there and reads row ``r`` / element ``(r, c)`` of them when stepping.
- A block's full-tensor ``forward(v, h, cond, spatial) -> LayerOut`` (training and
  ``log_prob``) computes exactly what the steps compute, so the cached sampler equals the
  reference loop.

Attention hook: with ``attention_every = k > 0`` :class:`vqprior.nn.gated.GatedStack`
builds ``vqprior.nn.attention.AttentionBlock(channels=F, heads=..., groups=G, cond_dim=...,
spatial_channels=...)`` (keyword arguments) and inserts it after gated layers ``k, 2k, ...``
(never after the last). Its ``forward(v, h, cond, spatial)`` returns ``LayerOut(v, h, skip)``
(``skip`` may be None); a block that leaves the vertical stream alone returns ``v_in`` from
``step_row``. It needs nothing else: the stack, the model and the sampler call it through
this protocol only. Channel groups: at ``(r, c)`` the block's inputs never depend on the
element's last group, so the last evaluation of an element always sees its final inputs and
the cache written then is final.

Backbone and model protocol (:class:`StepBackbone`)
---------------------------------------------------
A backbone offers, at its level (features instead of head output)::

    state = backbone.start_steps(ctx)
    feats = backbone.step_output(state, r, c)        # [n, F] at (r, c)
    backbone.step_write(state, r, c, inp)            # network input at (r, c), [n, Cin]

and :class:`vqprior.PixelCNN` the model-level ``start_steps`` / ``step_output`` /
``step_write`` (head output and data values). A backbone without ``start_steps`` (no
incremental maths) makes the model fall back to a full forward pass per step.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["LayerOut", "StepBackbone", "StepBlock", "StepContext", "supports_steps"]


class LayerOut(NamedTuple):
    """What a block's full-tensor ``forward(v, h, cond, spatial)`` returns."""

    v: Tensor  # [b, F, H, W] gated vertical features
    h: Tensor  # [b, F, H, W] horizontal features (residual stream)
    skip: Tensor | None  # [b, F, H, W]; None: the block adds nothing to the skip sum


class StepContext(NamedTuple):
    """What a block needs to allocate its caches for one batch."""

    n: int  # batch size
    height: int
    width: int
    cond: Tensor | None  # class embedding [n, cond_dim]
    spatial: Tensor | None  # spatial condition [n, s, H, W]
    device: torch.device
    dtype: torch.dtype  # the dtype the caches hold (the network's parameter dtype)
    pad: int = 0  # left zero columns of horizontal row buffers (a stack sets its own)


@runtime_checkable
class StepBlock(Protocol):
    """A block of a two-stream (vertical / horizontal) stack; see the module docstring."""

    def start_steps(self, ctx: StepContext) -> Any: ...

    def step_row(self, state: Any, r: int, v_in: Tensor) -> Tensor: ...

    def step_element(
        self, state: Any, r: int, c: int, h_in: Tensor, skips: Tensor
    ) -> tuple[Tensor, Tensor]: ...


@runtime_checkable
class StepBackbone(Protocol):
    """A backbone that evaluates its features one element at a time."""

    def start_steps(self, ctx: StepContext) -> Any: ...

    def step_output(self, state: Any, r: int, c: int) -> Tensor: ...

    def step_write(self, state: Any, r: int, c: int, inp: Tensor) -> None: ...


def supports_steps(module: object) -> bool:
    """True if ``module`` implements the backbone step protocol."""
    return isinstance(module, StepBackbone)
