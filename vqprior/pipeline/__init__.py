"""``vqprior pipeline``: chain training, encoding, sampling and evaluation stages.

- :mod:`vqprior.pipeline.spec`: the pipeline file format, validation and stage keys;
- :mod:`vqprior.pipeline.run`: the runner (manifest, skip/resume/redo, summary);
- :mod:`vqprior.pipeline.ddp`: several devices and nodes (which rank does what);
- :mod:`vqprior.pipeline.report`: key figures, ``summary.md``/``summary.json``, ``losses.png``.
"""

from __future__ import annotations

from vqprior.pipeline.run import read_manifest, run_pipeline
from vqprior.pipeline.spec import Pipeline, Stage, load_pipeline, stage_key

__all__ = ["Pipeline", "Stage", "load_pipeline", "read_manifest", "run_pipeline", "stage_key"]
