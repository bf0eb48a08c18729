"""Former home of the training helpers, split by concern (kept so older imports still work).

- :mod:`vqprior.train.rundir`: run directory layout, config check, JSON files, metrics.csv
  (no Lightning);
- :mod:`vqprior.train.checkpoints`: atomic checkpoint IO, periodic / last / best checkpoints;
- :mod:`vqprior.train.trainer`: strategy, loggers, the Trainer and the fit;
- :mod:`vqprior.train.module`: StageModule, AdamW and the LR schedule.
"""

from __future__ import annotations

from vqprior.train.rundir import find_export, prepare_run_dir, read_json, write_json
from vqprior.train.trainer import resolve_strategy

__all__ = ["find_export", "prepare_run_dir", "read_json", "resolve_strategy", "write_json"]
