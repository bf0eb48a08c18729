"""Layers, heads and likelihoods (plain torch).

Importing this package evaluates one float32 ``expm1`` at ``-0.0`` on the CPU (~20 us). With
torch 2.14.1's x86-64 CPU build, the ``expm1`` family (``F.elu``, ``expm1``, ``log1p``,
``logsigmoid``, ``softplus``) was measured 8-17x slower in a process until a float32 ``expm1`` or
``log1p`` had been evaluated at ``-0.0`` (by any thread; float64, ``+0.0`` or ``-1e-30`` do not
do it; the cause is inside torch). A PixelCNN++ model usually triggers it itself (its zero
padding reaches ``concat_elu`` as ``-0.0``), but not always: a plain channels-last PixelCNN++
training loop took 1.23 s a step without this call and 0.71 s with it. See docs/benchmarks.md.
"""

import torch

torch.expm1(torch.tensor([-0.0]))
