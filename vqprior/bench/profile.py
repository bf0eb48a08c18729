"""``vqprior bench --profile``: where one training step's CPU time goes, grouped by cause.

One warm training step of each model is run under ``torch.profiler`` with Python stacks. Every
profiled event's self CPU time goes to one group: convolutions (forward and backward), the
mask multiply of masked convolutions, the likelihood (mixture / categorical), dropout,
activations (concat_elu, gates), the vector quantizer, weight norm, the optimizer, other
tensor ops, or Python and framework overhead (the self time of Python frames, module calls
and autograd's bookkeeping). A backward op is charged to the group of the forward op that
recorded its autograd node (matched by sequence number). Stack recording slows Python down,
so the overhead share is an upper bound.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from vqprior.bench.train import DEFAULT_TRAIN_MODELS, Variant, make_step

GROUPS = (
    "convolution",
    "mask multiply",
    "likelihood",
    "dropout",
    "activations",
    "vector quantizer",
    "weight norm",
    "optimizer",
    "other tensor ops",
    "python/framework overhead",
)
# first matching Python frame or module (innermost first) -> group
FRAME_GROUPS = (
    ("masked_weight", "mask multiply"),
    ("nn.Module: Dropout", "dropout"),
    ("weight_norm", "weight norm"),
    ("mixture.py", "likelihood"),
    ("categorical.py", "likelihood"),
    ("concat_elu", "activations"),
    ("): gate", "activations"),
    ("quantize.py", "vector quantizer"),
)
ACTIVATION_OPS = ("elu", "tanh", "sigmoid", "relu", "gelu")


@dataclass
class Profile:
    model: str
    variant: str
    total_ms: float  # summed self CPU time of the step's events
    groups: dict[str, float]  # group -> self CPU ms
    top_ops: list[tuple[str, float, int]]  # (op, self CPU ms, calls)


def _is_op(evt: FunctionEvent) -> bool:
    return evt.name.startswith(("aten::", "mkldnn::", "quantized::"))


def _ancestors(evt: FunctionEvent) -> list[FunctionEvent]:
    chain: list[FunctionEvent] = []
    cur: FunctionEvent | None = evt
    while cur is not None:
        chain.append(cur)
        cur = cur.cpu_parent
    return chain


def _forward_group(chain: list[FunctionEvent]) -> str:
    if any(_is_op(e) and "conv" in e.name for e in chain):
        return "convolution"
    if any(e.name == "phase: optimizer" for e in chain):
        return "optimizer"
    for e in chain:
        for key, group in FRAME_GROUPS:
            if key in e.name:
                return group
    if any(e.name.removeprefix("aten::").startswith(ACTIVATION_OPS) for e in chain[:1]):
        return "activations"
    return "other tensor ops"


def _backward_node(chain: list[FunctionEvent]) -> FunctionEvent | None:
    for e in chain:
        if e.name.startswith("autograd::engine::evaluate_function"):
            return e
    return None


def group_events(events: Sequence[FunctionEvent]) -> dict[str, float]:
    """Self CPU milliseconds per group for every event below a ``phase:`` range."""
    chains = {id(e): _ancestors(e) for e in events}
    by_seq: dict[int, str] = {}
    for e in events:  # forward ops name the group of the autograd node they record
        chain = chains[id(e)]
        if _is_op(e) and e.sequence_nr >= 0 and _backward_node(chain) is None:
            by_seq.setdefault(e.sequence_nr, _forward_group(chain))
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        chain = chains[id(e)]
        if not any(a.name.startswith("phase: ") for a in chain):
            continue
        node = _backward_node(chain)
        if not _is_op(e):
            group = "python/framework overhead"
        elif node is None or "conv" in e.name or any("conv" in a.name for a in chain[:-1]):
            group = _forward_group(chain)
        else:
            grad_fn = node.name.rsplit(": ", 1)[-1]
            group = by_seq.get(node.sequence_nr, "other tensor ops")
            if group == "other tensor ops" and "Convolution" in grad_fn:
                group = "convolution"
            elif group == "other tensor ops" and "ELU" in grad_fn.upper():
                group = "activations"
        totals[group] += max(e.self_cpu_time_total, 0.0) / 1e3
    return {g: totals.get(g, 0.0) for g in GROUPS}


def profile_model(name: str, variant: Variant, batch: int, device: torch.device) -> Profile:
    step = make_step(name, variant, batch, device, labels=True)
    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        step()
    events = list(prof.events())
    groups = group_events(events)
    table = prof.key_averages()
    ops = sorted(
        (
            (a.key, a.self_cpu_time_total / 1e3, a.count)
            for a in table
            if a.key.startswith("aten::")
        ),
        key=lambda t: -t[1],
    )
    return Profile(name, variant.label, sum(groups.values()), groups, ops[:8])


def profile_rows(
    device: torch.device, batch: int, models: Sequence[str] | None, precisions: Sequence[str]
) -> list[Profile]:
    return [
        profile_model(name, Variant(precision=p), batch, device)
        for name in models or DEFAULT_TRAIN_MODELS
        for p in precisions
    ]


def format_profiles(profiles: Sequence[Profile]) -> str:
    lines = ["profile of one training step (self CPU ms and share, grouped)"]
    for p in profiles:
        lines += ["", f"{p.model}  [{p.variant}]  total {p.total_ms:.0f} ms"]
        for group, ms in p.groups.items():
            share = 100 * ms / p.total_ms if p.total_ms else 0.0
            lines.append(f"  {group:<27}{ms:>9.1f} ms{share:>6.1f}%")
        lines.append("  top ops: " + ", ".join(f"{k} {ms:.0f} ms/{n}" for k, ms, n in p.top_ops))
    return "\n".join(lines)
