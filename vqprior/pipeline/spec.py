"""Pipeline files: parse, apply ``--set``, validate every stage up front, and key each stage.

A pipeline YAML names its stages in order; each has a ``kind`` and refers to earlier stages
by name::

    out: runs/quickstart            # run directory (``--out`` overrides)
    stages:
      vae:          {kind: train-vae, config: configs/vae_digits.yaml, train: {max_steps: 800}}
      codes:        {kind: encode, vae: vae}
      prior_codes:  {kind: train-prior, config: configs/prior_codes_digits.yaml, vae: vae,
                     codes: codes}
      samples:      {kind: generate, prior: prior_codes, num: 100}
      eval_codes:   {kind: evaluate, prior: prior_codes}

Training stages (``train-vae``, ``train-prior``) take a base ``config`` (a path relative to
the pipeline file, or to the folder above it, i.e. the repository root for
``pipelines/*.yaml``) and inline ``model``/``data``/``train`` sections merged over it.
``train-prior`` takes ``vae`` (a train-vae stage, or null for a prior on pixels) and
optionally ``codes`` (an encode stage of the same VAE and data). ``encode`` takes ``vae``,
``data`` overrides merged over that VAE's data, ``batch_size``. ``generate`` takes ``prior``,
``num``, ``seed``, ``temperature``, ``label``, ``method``; ``evaluate`` takes ``prior``,
``split``, ``batch_size``. Both take ``bottom_prior`` for a two-level VAE (``prior`` is then
its top prior), so a two-level model goes to its samples and its bound like a one-level one. ``--set STAGE.key.sub=value`` edits a stage's mapping.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vqprior.config import Config, ConfigError, apply_overrides, check_choice, check_range
from vqprior.data import DataConfig
from vqprior.train.config import PER_INVOCATION, TrainConfig, check_sections, recorded_steps

KINDS = ("train-vae", "encode", "train-prior", "generate", "evaluate")
TRAINING = ("train-vae", "train-prior")
SECTIONS = ("model", "data", "train")
# reference key -> the kind of stage it must name
REFS = {
    "vae": "train-vae",
    "codes": "encode",
    "prior": "train-prior",
    "bottom_prior": "train-prior",
}
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


@dataclass(frozen=True, kw_only=True)
class EncodeOptions(Config):
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_range("batch_size", self.batch_size, 1)


@dataclass(frozen=True, kw_only=True)
class GenerateOptions(Config):
    num: int = 64
    seed: int = 0
    temperature: float = 1.0
    label: int | None = None
    method: str = "auto"

    def __post_init__(self) -> None:
        check_range("num", self.num, 1)
        check_range("temperature", self.temperature, 0.0)


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(Config):
    split: str = "test"
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_choice("split", self.split, ("train", "val", "test"))
        check_range("batch_size", self.batch_size, 1)


OPTIONS: dict[str, type[Config]] = {
    "encode": EncodeOptions,
    "generate": GenerateOptions,
    "evaluate": EvaluateOptions,
}
ALLOWED = {
    "train-vae": ("kind", "config", *SECTIONS),
    "train-prior": ("kind", "config", *SECTIONS, "vae", "codes"),
    "encode": ("kind", "vae", "data", *(f for f in EncodeOptions.__dataclass_fields__)),
    "generate": ("kind", "prior", "bottom_prior", *GenerateOptions.__dataclass_fields__),
    "evaluate": ("kind", "prior", "bottom_prior", *EvaluateOptions.__dataclass_fields__),
}


@dataclass(frozen=True)
class Stage:
    """One resolved stage: ``config`` is what identifies its work (refs as stage names).

    Training stages: the stage YAML (base file + inline sections), ``vae`` a stage name or
    None. encode: ``{"data": ..., "batch_size": ...}``. generate/evaluate: their options.
    """

    name: str
    kind: str
    config: dict[str, Any]
    refs: dict[str, str] = field(default_factory=dict)  # e.g. {"vae": "vae", "codes": "codes"}
    deps: tuple[str, ...] = ()  # every earlier stage whose output it reads

    @property
    def training(self) -> bool:
        return self.kind in TRAINING


@dataclass(frozen=True)
class Pipeline:
    file: Path
    out: Path
    stages: list[Stage]

    def index(self, name: str, what: str = "stage") -> int:
        for i, stage in enumerate(self.stages):
            if stage.name == name:
                return i
        raise ConfigError(f"{what}: unknown stage {name!r}; stages: {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.stages]


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} not found") from None
    except yaml.YAMLError as err:
        first = str(err).strip().splitlines()[0]
        raise ConfigError(f"{path} is not valid YAML ({first})") from None


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` merged over ``base``: nested mappings merge key by key, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _apply_sets(specs: dict[str, dict[str, Any]], sets: list[str]) -> None:
    """``STAGE.key.sub=value`` edits stage ``STAGE``'s mapping in place."""
    for item in sets:
        target, sep, _ = item.partition("=")
        stage, dot, rest = target.strip().partition(".")
        if not sep or not dot or not rest:
            raise ConfigError(f"--set {item!r} must look like STAGE.section.key=value")
        if stage not in specs:
            raise ConfigError(
                f"--set {item!r}: unknown stage {stage!r}; stages: {', '.join(specs)}"
            )
        specs[stage] = apply_overrides(specs[stage], [item.split(".", 1)[1]])


def load_pipeline(
    file: str | Path, sets: list[str] | tuple[str, ...] = (), out: str | Path | None = None
) -> Pipeline:
    """Read a pipeline YAML, apply ``--set``, check every stage; paths are made absolute."""
    path = Path(file)
    raw = _read_yaml(path, "pipeline file")
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict) or not raw["stages"]:
        raise ConfigError(f"{path} must hold a mapping with `stages:` (name -> stage) and `out:`")
    unknown = sorted(set(raw) - {"out", "stages", "description"})
    if unknown:
        raise ConfigError(
            f"{path}: unknown key {unknown[0]!r}; known keys: description, out, stages"
        )
    specs: dict[str, dict[str, Any]] = {}
    for name, spec in raw["stages"].items():
        if not isinstance(name, str) or not NAME.match(name):
            raise ConfigError(f"stage name {name!r} must use letters, digits, _ and - only")
        if not isinstance(spec, dict):
            raise ConfigError(f"stage {name} must be a mapping with a kind")
        specs[name] = spec
    _apply_sets(specs, list(sets))
    target = out if out is not None else raw.get("out")
    if not target:
        raise ConfigError(f"{path} sets no `out:` directory: pass --out DIR")
    stages: list[Stage] = []
    for name, spec in specs.items():
        try:
            stages.append(_resolve(name, spec, stages, path))
        except ConfigError as err:
            raise ConfigError(f"stage {name}: {err}") from None
    return Pipeline(file=path.resolve(), out=Path(target).resolve(), stages=stages)


def _find_config(value: Any, pipeline_file: Path) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError("config must be a path to a stage YAML (e.g. configs/vae_digits.yaml)")
    p = Path(value)
    candidates = (
        [p] if p.is_absolute() else [pipeline_file.parent / p, pipeline_file.parent.parent / p]
    )
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ConfigError(f"config {value} not found next to {pipeline_file} or in the folder above it")


def _ref(spec: dict[str, Any], key: str, earlier: list[Stage], optional: bool) -> str | None:
    """The earlier stage that ``spec[key]`` names (None when optional and null/absent)."""
    value = spec.get(key)
    if value is None and optional:
        return None
    kind = REFS[key]
    names = [s.name for s in earlier if s.kind == kind]
    if value not in names:
        raise ConfigError(
            f"{key}: {value!r} is not an earlier {kind} stage "
            f"(earlier {kind} stages: {', '.join(names) or 'none'})"
        )
    return str(value)


def _check_keys(kind: str, spec: dict[str, Any]) -> None:
    unknown = sorted(set(spec) - set(ALLOWED[kind]))
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} for a {kind} stage; known keys: {', '.join(ALLOWED[kind])}"
        )


def _resolve(name: str, spec: dict[str, Any], earlier: list[Stage], file: Path) -> Stage:
    kind = spec.get("kind")
    check_choice("kind", kind, KINDS)
    assert isinstance(kind, str)
    _check_keys(kind, spec)
    if kind in TRAINING:
        return _training_stage(name, kind, spec, earlier, file)
    if kind == "encode":
        vae = _ref(spec, "vae", earlier, optional=False)
        assert vae is not None
        base = next(s for s in earlier if s.name == vae).config.get("data") or {}
        data = deep_merge(base, spec.get("data") or {})
        DataConfig.from_dict(data, prefix="data.")
        opts = EncodeOptions.from_dict(
            {k: spec[k] for k in EncodeOptions.__dataclass_fields__ if k in spec}
        )
        return Stage(name, kind, {"data": data, **opts.to_dict()}, {"vae": vae}, (vae,))
    prior = _ref(spec, "prior", earlier, optional=False)
    assert prior is not None
    options = {k: v for k, v in spec.items() if k not in ("kind", "prior", "bottom_prior")}
    config = OPTIONS[kind].from_dict(options).to_dict()
    refs = {"prior": prior}
    bottom = _ref(spec, "bottom_prior", earlier, optional=True)  # a two-level VAE's levels
    if bottom is not None:
        refs["bottom_prior"] = bottom
    vae = next(s for s in earlier if s.name == prior).refs.get("vae")
    if vae is not None:
        refs["vae"] = vae
    return Stage(name, kind, config, refs, tuple(refs.values()))


def _training_stage(
    name: str, kind: str, spec: dict[str, Any], earlier: list[Stage], file: Path
) -> Stage:
    base = _read_yaml(_find_config(spec.get("config"), file), "config") or {}
    if not isinstance(base, dict):
        raise ConfigError(f"config {spec['config']} must hold a mapping with model, data, train")
    config = deep_merge(base, {k: spec[k] for k in SECTIONS if k in spec})
    refs: dict[str, str] = {}
    if kind == "train-prior":
        if "vae" in spec:
            config["vae"] = spec["vae"]
        vae = _ref(config, "vae", earlier, optional=True)
        codes = _ref(spec, "codes", earlier, optional=True)
        refs = {k: v for k, v in (("vae", vae), ("codes", codes)) if v is not None}
        if codes is not None:
            by_name = {s.name: s for s in earlier}
            _check_codes(config, by_name.get(vae or ""), by_name[codes])
    check_sections(config, "vae" if kind == "train-vae" else "prior")
    DataConfig.from_dict(config.get("data"), prefix="data.")
    TrainConfig.from_dict(config.get("train"), prefix="train.")
    return Stage(name, kind, config, refs, tuple(refs.values()))


def _check_codes(config: dict[str, Any], vae: Stage | None, codes: Stage) -> None:
    """An encode stage feeds a prior only when it encoded the same VAE's codes of the same data
    (the prior's data: its VAE's, but for the keys it names, as the stage resolves it)."""
    if vae is None or vae.name != codes.refs["vae"]:
        raise ConfigError(
            f"codes: {codes.name} holds codes of VAE stage {codes.refs['vae']}, "
            f"not of vae: {vae and vae.name}"
        )
    named = {**(vae.config.get("data") or {}), **(config.get("data") or {})}
    mine = DataConfig.from_dict(named, prefix="data.").to_dict()
    theirs = DataConfig.from_dict(codes.config["data"], prefix="data.").to_dict()
    for key, value in mine.items():
        if theirs[key] != value:
            raise ConfigError(
                f"data.{key} is {value!r} here but {theirs[key]!r} in encode stage {codes.name}: "
                "set the same data on both"
            )


def max_steps(stage: Stage) -> int | None:
    """A training stage's ``train.max_steps``, unset read as the bound it has without a budget
    (:func:`~vqprior.train.config.recorded_steps`); None for other stages."""
    if not stage.training:
        return None
    return recorded_steps(
        TrainConfig.from_dict(stage.config.get("train"), prefix="train.").max_steps
    )


def stage_key(stage: Stage, deps: dict[str, dict[str, Any]]) -> str:
    """Hash of the stage's kind, config and the keys and output hashes of its dependencies.

    A training stage's ``train.max_steps`` is left out: a longer schedule extends the same
    run (see :func:`max_steps`, which the manifest records beside the key); so is its time
    budget ``train.max_time_s``, which belongs to one invocation.
    """
    config = stage.config
    if stage.training:
        left_out = ("max_steps", *PER_INVOCATION)
        train = {k: v for k, v in (config.get("train") or {}).items() if k not in left_out}
        config = {**config, "train": train}
    ident = {
        "kind": stage.kind,
        "config": config,
        "refs": stage.refs,
        "deps": {d: {"key": deps[d]["key"], "outputs": deps[d]["outputs"]} for d in stage.deps},
    }
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
