"""Uses of a trained prior: scoring (bits/dim, NLL heatmaps, OOD scores), completion and
lossless compression. Plain torch (no Lightning); the click commands live in
:mod:`vqprior.uses.cli`."""
