"""`vqprior bench` runs end to end and its fast samples agree with the timed reference prefix.

No timing is asserted here (timed tests are flaky); speed targets are read off the bench output.
"""

from __future__ import annotations

import json

from vqprior.bench import format_table, main


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
    assert {r["model"] for r in saved["training"]} == {
        "vqvae-32x32x3",
        "prior-codes-8x8",
        "prior-pixels-32x32x3",
    }
    assert all(r["images_per_s"] > 0 for r in saved["training"])
    assert "speedup" in capsys.readouterr().out
    assert "extrapolated" in format_table(saved)
