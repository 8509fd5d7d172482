"""The flax backend end to end, through the real training scripts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import run_script, train_args


def _summary(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def flax_runs(tiny_folders, sample_dataset, tmp_path_factory):
    prior, decoder = tiny_folders
    root = tmp_path_factory.mktemp("flax_runs")
    runs = {}
    for stage, extra in (
        (
            "prior",
            dict(
                use_ema=True,
                snr_gamma=5.0,
                gradient_checkpointing=True,
                validation_prompts=["a photo of a cat", "a red car"],
                validation_epochs=1,
                validation_steps=2,
            ),
        ),
        ("decoder", dict(gradient_accumulation_steps=2, mixed_precision="bf16")),
    ):
        out = root / stage
        args = train_args(
            prior, decoder, sample_dataset, out, backend="flax", checkpoints_total_limit=1, **extra
        )
        runs[stage] = (out, _summary(run_script(f"train_text_to_image_{stage}.py", *args)))
    return runs


def test_prior_output_loads_in_diffusers(flax_runs):
    import torch
    from diffusers import KandinskyV22PriorPipeline
    from transformers import CLIPImageProcessorPil

    out, summary = flax_runs["prior"]
    assert summary["backend"] == "flax" and summary["updates"] == 4
    assert np.isfinite(summary["loss_last"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    # accelerate's layout on both backends: logs/<tracker_project_name>/
    assert list((out / "logs" / "text2image-fine-tune").glob("events.out.tfevents*"))
    grids = sorted((out / "validation").glob("step-*.png"))  # JAX sampling, no torch involved
    assert grids and grids[-1].name == "step-000004.png"
    pipe = KandinskyV22PriorPipeline.from_pretrained(
        out, image_processor=CLIPImageProcessorPil.from_pretrained(out, subfolder="image_processor")
    )
    embeds = pipe("a photo of a cat", num_inference_steps=2, generator=torch.manual_seed(0))
    assert embeds.image_embeds.shape == (1, 32) and torch.isfinite(embeds.image_embeds).all()


def test_decoder_output_loads_in_diffusers(flax_runs):
    import torch
    from diffusers import AutoPipelineForText2Image

    out, summary = flax_runs["decoder"]
    assert summary["backend"] == "flax" and np.isfinite(summary["loss_last"])
    combined = AutoPipelineForText2Image.from_pretrained(out)
    image = combined(
        "a photo of a cat",
        num_inference_steps=2,
        prior_num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.parametrize(
    "flags,words",
    [
        (dict(mixed_precision="fp16"), ["fp16", "bf16"]),
        (dict(use_8bit_adam=True), ["8bit", "flax"]),
        (dict(enable_xformers_memory_efficient_attention=True), ["xformers"]),
        (dict(mesh_shape="data=16"), ["mesh_shape", "devices"]),
        (dict(mesh_shape="model=2"), ["mesh_shape", "data"]),
    ],
)
def test_flax_flag_errors(flags, words, tiny_folders, sample_dataset, tmp_path, capsys):
    from kandinsky_common.cli import main

    prior, decoder = tiny_folders
    out = tmp_path / "out"
    args = train_args(prior, decoder, sample_dataset, out, backend="flax", **flags)
    assert main("decoder", args) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists()
