"""Generating from a flax training checkpoint equals generating from its exported folder."""

from __future__ import annotations

import numpy as np
from safetensors.numpy import load_file

from kandinsky_common.cli import main
from tests.helpers import train_args


def test_checkpoint_and_export_generate_the_same_image(tiny_folders, sample_dataset, tmp_path):
    from flax_kandinsky.export import checkpoint_params
    from flax_kandinsky.sampling import Sampler

    prior, decoder = tiny_folders
    run = tmp_path / "run"
    args = train_args(
        prior, decoder, sample_dataset, run, backend="flax", max_train_steps=2, report_to="none"
    )
    assert main("decoder", args) == 0
    name = "unet/diffusion_pytorch_model.safetensors"
    trained, start = load_file(run / name), load_file(decoder / name)
    assert any(not np.array_equal(trained[k], start[k]) for k in trained)

    stage, params = checkpoint_params(run / "checkpoint-2")
    assert stage == "decoder"
    kw = dict(height=64, width=64, prior_steps=2, decoder_steps=3, seed=1)
    from_checkpoint = Sampler.from_folders(prior, decoder, unet_params=params)
    a = from_checkpoint.generate(["a photo of a cat"], **kw)[0]
    b = Sampler.from_folders(prior, run).generate(["a photo of a cat"], **kw)[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))
