"""`vqprior bench` runs end to end and its fast samples agree with the timed reference prefix.

No timing is asserted here (timed tests are flaky); speed targets are read off the bench output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vqprior.bench import format_table, main
from vqprior.bench.ab import WORKER, compare_trees, this_tree
from vqprior.bench.profile import GROUPS, format_profiles, profile_model
from vqprior.bench.train import (
    DEFAULT_TRAIN_MODELS,
    TRAIN_MODELS,
    Variant,
    bench_model,
    build_model,
    variants,
)


def test_bench_writes_json_and_a_table(tmp_path, capsys) -> None:
    out = tmp_path / "bench.json"
    result = main(
        [
            "--batch-sizes",
            "2",
            "--models",
            "codes-8x8",
            "--naive-steps",
            "3",
            "--train-steps",
            "1",
            "--train-batch",
            "2",
            "--train-models",
            "prior-codes-8x8",
            "--out",
            str(out),
        ]
    )
    saved = json.loads(out.read_text())
    assert saved["sampling"] == result["sampling"]
    (row,) = saved["sampling"]
    assert row["model"] == "codes-8x8" and row["batch"] == 2 and row["steps"] == 64
    assert row["naive_steps_timed"] == 3 and row["prefix_equal"] is True
    assert row["speedup"] > 0 and row["fast_method"] == "cached"
    assert row["forward_s"] > 0 and row["passes"] == pytest.approx(row["fast_s"] / row["forward_s"])
    got = [(r["model"], r["precision"], r["mode"]) for r in saved["training"]]
    assert got == [("prior-codes-8x8", "fp32", "eager"), ("prior-codes-8x8", "bf16", "eager")]
    assert all(r["images_per_s"] > 0 for r in saved["training"])
    assert saved["training"][0]["ratio"] == 1.0  # the fp32 row is the baseline
    text = capsys.readouterr().out
    assert "speedup" in text and "ratio" in text and "passes" in text
    assert "extrapolated" in format_table(saved)


def test_threads_apply_to_every_row(tmp_path) -> None:
    before = torch.get_num_threads()
    try:
        args = ["--models", "", "--train-steps", "0", "--threads", "1"]
        result = main([*args, "--out", str(tmp_path / "b.json")])
        assert result["threads"] == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_training_variants_put_the_fp32_eager_baseline_first() -> None:
    assert variants(["bf16"], True) == [
        Variant(),
        Variant(precision="bf16"),
        Variant(compiled=True),
        Variant(precision="bf16", compiled=True),
    ]
    assert variants(["fp32"], False) == [Variant()]
    with pytest.raises(ValueError, match="unknown precision"):
        variants(["fp16"], False)


def test_every_training_model_builds_and_the_tiny_config_matches_the_port() -> None:
    for name in TRAIN_MODELS:
        assert isinstance(build_model(name), torch.nn.Module)
    tiny = build_model("pixelcnnpp-tiny")
    assert sum(p.numel() for p in tiny.parameters()) == pytest.approx(577_000, rel=0.01)
    paper = build_model("pixelcnnpp-paper")  # 160 filters x 5 blocks per scale: ~53M (paper)
    assert sum(p.numel() for p in paper.parameters()) == pytest.approx(53.6e6, rel=0.01)
    assert "pixelcnnpp-paper" not in DEFAULT_TRAIN_MODELS  # a GPU row, asked for by name
    with pytest.raises(ValueError, match="unknown training model"):
        build_model("nope")


def test_rows_train_in_the_memory_format_training_uses() -> None:
    """bf16 rows in channels-last; fp32 rows as training on CPU: NHWC for priors, NCHW for the
    VQ-VAE."""
    variants = [Variant(), Variant(precision="bf16")]
    rows = bench_model("prior-codes-8x8", variants, 2, torch.device("cpu"), 1)
    assert [r.channels_last for r in rows] == [True, True]
    assert rows[0].ratio == 1.0 and rows[1].ratio > 0
    rows = bench_model("vqvae-32x32x3", variants, 2, torch.device("cpu"), 1)
    assert [r.channels_last for r in rows] == [False, True]


def test_profile_charges_time_to_the_right_groups() -> None:
    prof = profile_model("pixelcnnpp-tiny", Variant(), 1, torch.device("cpu"))
    assert set(prof.groups) == set(GROUPS)
    assert prof.total_ms == pytest.approx(sum(prof.groups.values()))
    for group in ("convolution", "dropout", "likelihood", "activations", "optimizer"):
        assert prof.groups[group] > 0, group
    assert prof.groups["vector quantizer"] == 0 and prof.groups["weight norm"] == 0
    codes = profile_model("prior-codes-8x8", Variant(), 1, torch.device("cpu"))
    assert codes.groups["dropout"] == 0 and codes.groups["convolution"] > 0
    vae = profile_model("vqvae-32x32x3", Variant(), 1, torch.device("cpu"))
    assert vae.groups["vector quantizer"] > 0 and vae.groups["likelihood"] == 0
    assert "top ops" in format_profiles([prof, codes])


def test_baseline_tree_comparison_runs_alternating_subprocesses() -> None:
    rows = compare_trees(this_tree(), ["prior-codes-8x8"], ["fp32", "bf16"], 2, 1, 1, 1)
    assert [(r.precision, r.base_precision) for r in rows] == [("fp32", "fp32"), ("bf16", "bf16")]
    for row in rows:  # each precision against the baseline in the same precision
        assert row.model == "prior-codes-8x8"
        assert row.base_images_per_s > 0 and row.images_per_s > 0 and row.ratio > 0
    with pytest.raises(ValueError, match="no vqprior package"):
        compare_trees(this_tree() / "tests", ["prior-codes-8x8"], ["fp32"], 2, 1, 1, 1)


def test_baseline_jobs_time_sampling_too(tmp_path: Path) -> None:
    """--baseline-jobs train,sample: one row per job, sampling at batch 16 in fp32."""
    from vqprior.bench import main

    args = ["--models", "", "--train-steps", "0", "--train-models", "prior-codes-8x8"]
    args += ["--precisions", "fp32", "--baseline-tree", str(this_tree()), "--repeats", "1"]
    result = main([*args, "--baseline-jobs", "train,sample", "--out", str(tmp_path / "b.json")])
    jobs = {(r["job"], r["batch"]) for r in result["baseline"]}
    assert jobs == {("train", 32), ("sample", 16)}
    assert all(r["ratio"] > 0 for r in result["baseline"])


def test_the_baseline_worker_imports_only_what_old_trees_have() -> None:
    assert (this_tree() / "vqprior" / "bench" / "ab.py").is_file()
    imported = set(re.findall(r"^from (vqprior[\w.]*) import", WORKER, flags=re.M))
    assert imported == {"vqprior.models.pixelcnn", "vqprior.models.vqvae"}
    assert "import vqprior\n" not in WORKER


def test_bench_lives_outside_the_light_top_level() -> None:
    code = "import sys, vqprior; print(sorted(m for m in sys.modules if m.startswith('vqprior.bench')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    for args in (["-m", "vqprior", "bench", "--help"], ["-m", "vqprior.bench.sweep", "--help"]):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
