"""The torch backend end to end, through the real training scripts."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from kandinsky_common.flags import DIFFUSERS_FLAGS
from tests.helpers import run_script, train_args

pytest.importorskip("torch")


def _summary(proc) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def prior_run(tiny_folders, sample_dataset, tmp_path_factory):
    prior, decoder = tiny_folders
    out = tmp_path_factory.mktemp("prior_run") / "out"
    args = train_args(
        prior,
        decoder,
        sample_dataset,
        out,
        gradient_accumulation_steps=2,
        use_ema=True,
        snr_gamma=5.0,
        gradient_checkpointing=True,
        checkpoints_total_limit=1,
        validation_prompts=["a photo of a cat"],
        validation_steps=2,
        lr_scheduler="cosine",
        lr_warmup_steps=1,
    )
    return out, _summary(run_script("train_text_to_image_prior.py", *args, "--backend", "torch"))


@pytest.fixture(scope="module")
def decoder_run(tiny_folders, sample_dataset, tmp_path_factory):
    prior, decoder = tiny_folders
    out = tmp_path_factory.mktemp("decoder_run") / "out"
    args = train_args(
        prior,
        decoder,
        sample_dataset,
        out,
        snr_gamma=5.0,
        gradient_checkpointing=True,
        backend="torch",
    )
    return out, _summary(run_script("train_text_to_image_decoder.py", *args))


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_help_lists_every_diffusers_flag(stage):
    text = run_script(f"train_text_to_image_{stage}.py", "--help").stdout
    missing = [f for f in DIFFUSERS_FLAGS if f"--{f}" not in text]
    assert not missing and len(DIFFUSERS_FLAGS) == 44
    assert "--backend" in text


def test_prior_run_outputs(prior_run):
    import torch
    from diffusers import KandinskyV22PriorPipeline

    out, summary = prior_run
    assert summary["updates"] == 4 and np.isfinite(summary["loss_last"])
    # checkpoints_total_limit=1 keeps only the newest; it holds the model and the run state.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    assert (out / "checkpoint-4" / "prior" / "config.json").is_file()
    # accelerate's layout on both backends: logs/<tracker_project_name>/
    assert list((out / "logs" / "text2image-fine-tune").glob("events.out.tfevents*"))
    assert sorted(p.name for p in (out / "validation").glob("*.png"))  # validation grids
    pipe = KandinskyV22PriorPipeline.from_pretrained(out)
    embeds = pipe("a photo of a cat", num_inference_steps=2, generator=torch.manual_seed(0))
    assert embeds.image_embeds.shape == (1, 32) and torch.isfinite(embeds.image_embeds).all()


def test_decoder_run_outputs_load_in_diffusers(decoder_run, tiny_folders):
    import torch
    from diffusers import AutoPipelineForText2Image, KandinskyV22Pipeline

    out, summary = decoder_run
    assert summary["updates"] == 4 and np.isfinite(summary["loss_last"])
    assert "prior:" in (out / "README.md").read_text()
    pipe = KandinskyV22Pipeline.from_pretrained(out)
    emb = torch.randn(1, 32, generator=torch.manual_seed(0))
    img = pipe(emb, emb * 0, height=64, width=64, num_inference_steps=2, output_type="np").images
    assert img.shape == (1, 64, 64, 3) and np.isfinite(img).all()
    combined = AutoPipelineForText2Image.from_pretrained(out)
    assert type(combined).__name__ == "KandinskyV22CombinedPipeline"
    image = combined(
        "a photo of a cat",
        num_inference_steps=2,
        prior_num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_torchrun_two_processes(tiny_folders, sample_dataset, tmp_path):
    """Both stages under DDP with 2 CPU processes (prior without find_unused_parameters)."""
    import subprocess
    import sys

    from tests.helpers import ROOT, script_env

    prior, decoder = tiny_folders
    env = {**script_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    for stage in ("prior", "decoder"):
        out = tmp_path / stage
        args = train_args(
            prior,
            decoder,
            sample_dataset,
            out,
            max_train_steps=2,
            report_to="none",
            backend="torch",
        )
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
        cmd += ["--master_port", "29533", str(ROOT / "scripts" / f"train_text_to_image_{stage}.py")]
        proc = subprocess.run(
            cmd + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        sub = "prior" if stage == "prior" else "unet"
        assert (out / sub / "diffusion_pytorch_model.safetensors").is_file()
        assert Path(out / "checkpoint-2" / "training_state.json").is_file()


def test_torchrun_nonfinite_loss_on_one_process_stops_both(tiny_folders, sample_dataset, tmp_path):
    """A NaN in one row of the encode-once cache: only the process that draws it sees a
    non-finite loss. Both processes stop at that update with the error line (none is left waiting
    in the gradient all-reduce), and no checkpoint after the last good update is written."""
    import subprocess
    import sys

    from kandinsky_common import checkpoints as ck
    from kandinsky_common.cli import main
    from tests.helpers import ROOT, script_env

    prior, decoder = tiny_folders
    cache = tmp_path / "cache"
    flags = dict(report_to="none", backend="torch", embeddings_cache=cache, train_batch_size=1)
    fill = train_args(prior, decoder, sample_dataset, tmp_path / "fill", max_train_steps=1, **flags)
    assert main("prior", fill) == 0
    # 32 rows: blocks of one row each; row 16 becomes NaN
    block = cache / "blocks" / "image_embeds" / "000016.npy"
    embeds = np.load(block)
    embeds[0] = np.nan
    np.save(block, embeds)

    out = tmp_path / "out"
    args = train_args(
        prior, decoder, sample_dataset, out, max_train_steps=16, checkpointing_steps=1, **flags
    )  # 16 updates x 2 processes x batch 1: every one of the 32 rows once
    env = {**script_env(), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", "29534", str(ROOT / "scripts" / "train_text_to_image_prior.py")]
    proc = subprocess.run(
        cmd + args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert proc.returncode != 0 and errors, proc.stderr[-3000:]
    # torchrun ends the other process once one exits 2, and prints its own ChildFailedError
    # traceback; none may come from this project's code (a gloo error in the all-reduce, say).
    ours = [x for x in proc.stderr.splitlines() if 'File "' in x and "site-packages" not in x]
    assert not [x for x in ours if str(ROOT) in x], proc.stderr[-3000:]
    update = {re.search(r"optimizer update (\d+)", e).group(1) for e in errors}
    assert len(update) == 1 and all("the loss became" in e for e in errors), errors
    kept = [int(p.name.split("-")[1]) for _, p in ck.complete_checkpoints(out, "torch")]
    assert max(kept, default=0) < int(update.pop()) and not (out / "model_index.json").exists()
