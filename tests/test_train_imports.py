"""Using trained models from Python imports neither Lightning nor click, nor huggingface_hub
(an optional extra, imported only for a hub id or push_to_hub)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
import vqprior
from vqprior import PixelCNN, PixelCNNConfig, VQVAE, VQVAEConfig, load_pretrained
from vqprior.data import DataConfig

tmp = sys.argv[1]
VQVAE(VQVAEConfig(in_channels=1, hidden_channels=8, res_channels=4, num_res_blocks=1,
                  downsample=2, num_codes=16, code_dim=4)).save_pretrained(tmp + "/vae")
PixelCNN(PixelCNNConfig(data="pixels", in_channels=1, height=8, width=8, channels=8,
                        num_layers=2, num_mixtures=2)).save_pretrained(tmp + "/prior")
assert isinstance(load_pretrained(tmp + "/vae"), VQVAE)
from vqprior.train import encode_codes, evaluate, generate

data = {"name": "digits", "limit": 32, "val_fraction": 0.1, "test_fraction": 0.1}
encode_codes(tmp + "/vae", data, tmp + "/codes", device="cpu")
generate(tmp + "/prior", num=2, out_png=tmp + "/s.png", device="cpu")
evaluate(tmp + "/prior", split="val", device="cpu", data=DataConfig.from_dict(data))
heavy = ("lightning", "click", "pytorch_lightning", "huggingface_hub")
print(sorted(m for m in sys.modules if m.split(".")[0] in heavy))
"""


def test_load_encode_generate_evaluate_import_no_lightning_click_or_hub(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "s.png").is_file() and (tmp_path / "codes" / "train.safetensors").is_file()
