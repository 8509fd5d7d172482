"""Stopping after a checkpoint and resuming ends bit-identical to an uninterrupted run, on both
backends: accumulation, EMA, LR warm-up, data position and the noise stream all continue."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from kandinsky_common.cli import main
from tests.helpers import train_args

EXTRA = {
    "torch": {},
    "flax": {"train_batch_size": 1, "mesh_shape": "data=2"},  # a real 2-device mesh
}


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_resume_is_bit_identical(backend, tiny_folders, sample_dataset, tmp_path):
    prior, decoder = tiny_folders
    flags = dict(
        backend=backend,
        gradient_accumulation_steps=2,
        use_ema=True,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=3,
        report_to="none",
        **EXTRA[backend],
    )
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main("prior", train_args(prior, decoder, sample_dataset, straight, **flags)) == 0
    first = train_args(prior, decoder, sample_dataset, split, **{**flags, "max_train_steps": 2})
    assert main("prior", first) == 0
    resumed = train_args(
        prior, decoder, sample_dataset, split, resume_from_checkpoint="latest", **flags
    )
    assert main("prior", resumed) == 0
    a = load_file(straight / "prior" / "diffusion_pytorch_model.safetensors")
    b = load_file(split / "prior" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    start = load_file(prior / "prior" / "diffusion_pytorch_model.safetensors")
    assert any(not np.array_equal(a[k], start[k]) for k in a)  # training moved the weights


def test_a_bucket_folder_gone_between_its_check_and_its_listing_holds_no_checkpoint(monkeypatch):
    """In a bucket a folder exists only through its objects: the shared-storage marker of a
    starting run, deleted between `is_dir` and `iterdir`, took the folder with it."""
    from kandinsky_common import checkpoints

    class Vanished:
        def is_dir(self):
            return True

        def iterdir(self):
            raise FileNotFoundError("b/bucket/o/run")

    monkeypatch.setattr(checkpoints, "location", lambda path: Vanished())
    assert checkpoints.complete_checkpoints("gs://bucket/run", "flax") == []
