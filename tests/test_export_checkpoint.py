"""scripts/export_checkpoint.py: any checkpoint of either backend -> a diffusers pipeline folder."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from kandinsky_common.cli import main
from tests.helpers import run_script, train_args


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_export_equals_final_output(backend, tiny_folders, sample_dataset, tmp_path):
    prior, decoder = tiny_folders
    out = tmp_path / "run"
    args = train_args(
        prior, decoder, sample_dataset, out, backend=backend, use_ema=True, report_to="none"
    )
    assert main("prior", args) == 0
    run_script(
        "export_checkpoint.py", "--checkpoint", out / "checkpoint-4", "--output", tmp_path / "e4"
    )
    run_script(
        "export_checkpoint.py", "--checkpoint", out / "checkpoint-2", "--output", tmp_path / "e2"
    )
    name = "prior/diffusion_pytorch_model.safetensors"
    final, e4, e2 = (load_file(p / name) for p in (out, tmp_path / "e4", tmp_path / "e2"))
    assert all(np.array_equal(final[k], e4[k]) for k in final)  # final output = last EMA
    assert any(not np.array_equal(final[k], e2[k]) for k in final)
    for sub in ("text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor"):
        assert (tmp_path / "e2" / sub).is_dir()

    from diffusers import KandinskyV22PriorPipeline
    from transformers import CLIPImageProcessorPil

    folder = tmp_path / "e2"
    proc = CLIPImageProcessorPil.from_pretrained(folder, subfolder="image_processor")
    assert KandinskyV22PriorPipeline.from_pretrained(folder, image_processor=proc).prior is not None


def test_export_refuses_a_non_empty_output(tmp_path):
    (tmp_path / "x").mkdir()
    proc = run_script(
        "export_checkpoint.py",
        "--checkpoint",
        tmp_path / "nope",
        "--output",
        tmp_path / "x",
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error:")
