"""DreamBooth as users run it: a folder of subject images and a prompt, class images generated
once by the base model and reused, the loss instance + prior_loss_weight x class on both
backends, and each mistake in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky_common.dreambooth import fill_class_images, image_files
from tests.helpers import run_script

COMMON = ["--max_train_steps", "3", "--checkpointing_steps", "3", "--resolution", "64"]
COMMON += ["--report_to", "none", "--seed", "0", "--learning_rate", "1e-3"]


def _subject(tmp_path, sample_dataset, n=3):
    """The user's folder: a few subject photos in `dog/`, models beside."""
    (tmp_path / "dog").mkdir()
    for f in image_files(sample_dataset)[:n]:
        shutil.copy(f, tmp_path / "dog" / f.name)
    return tmp_path


def _models(tiny_folders):
    prior, decoder = tiny_folders
    return [
        "--pretrained_prior_model_name_or_path", prior,
        "--pretrained_decoder_model_name_or_path", decoder,
    ]  # fmt: skip


def test_prior_preservation_on_both_backends_reuses_class_images(
    tiny_folders, sample_dataset, tmp_path
):
    home = _subject(tmp_path, sample_dataset)
    flags = [
        "--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog",
        "--with_prior_preservation", "--class_data_dir", "dog-class",
        "--class_prompt", "a photo of a dog", "--num_class_images", "3",
        "--sample_batch_size", "2", "--class_image_steps", "2", "--prior_loss_weight", "0.5",
        *COMMON, *_models(tiny_folders),
    ]  # fmt: skip
    script = "train_text_to_image_lora_prior.py"
    first = run_script(script, *flags, "--output_dir", "flax-out", cwd=home)
    assert "class images" in first.stderr  # generated, with a progress bar
    made = {p.name: p.stat().st_mtime_ns for p in image_files(home / "dog-class")}
    assert len(made) == 3
    second = run_script(script, *flags, "--output_dir", "torch-out", "--backend", "torch", cwd=home)
    assert "class images" not in second.stderr  # reused
    assert {p.name: p.stat().st_mtime_ns for p in image_files(home / "dog-class")} == made
    # Same data, noise and initial adapter: the two backends' losses agree.
    summaries = [
        json.loads((home / o / "train_summary.json").read_text()) for o in ("flax-out", "torch-out")
    ]  # noqa: E501
    for key in ("loss_first", "loss_last"):
        f, t = summaries[0][key], summaries[1][key]
        assert abs(f - t) / abs(t) < 1e-4, (key, f, t)
    assert (home / "flax-out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_dreambooth_decoder_full_fine_tune_without_class_images(
    backend, tiny_folders, sample_dataset, tmp_path
):
    home = _subject(tmp_path, sample_dataset)
    run_script(
        "train_text_to_image_decoder.py",
        "--instance_data_dir", "dog", "--instance_prompt", "a photo of sks dog",
        "--output_dir", "out", "--backend", backend, *COMMON, *_models(tiny_folders),
        cwd=home,
    )  # fmt: skip
    assert (home / "out" / "unet" / "config.json").is_file()


def test_the_loss_is_instance_plus_weighted_class_on_both_backends():
    import jax.numpy as jnp

    from flax_kandinsky.diffusion import diffusion_loss as flax_loss
    from torch_kandinsky.diffusion import diffusion_loss as torch_loss

    rng = np.random.default_rng(0)
    pred, target = rng.standard_normal((2, 4, 3, 5, 5), dtype=np.float32)
    w = 0.3
    weights = np.repeat(np.float32([2.0, 2.0 * w]), 2)  # RunPlan.batch's, for 2 rows
    per = ((pred - target) ** 2).reshape(4, -1).mean(axis=1)
    want = per[:2].mean() + w * per[2:].mean()  # diffusers' instance loss + weight x prior loss
    ac, t = np.linspace(0.99, 0.01, 1000, dtype=np.float32), np.array([1, 5, 9, 700])
    got_t = torch_loss(
        *map(torch.from_numpy, (pred, target, t, ac)), "epsilon", weights=torch.from_numpy(weights)
    )
    got_f = flax_loss(*map(jnp.asarray, (pred, target, t, ac)), "epsilon", weights=weights)
    np.testing.assert_allclose([float(got_t), float(got_f)], [want, want], rtol=1e-6)


def test_a_class_image_fill_goes_on_where_it_stopped(tmp_path):
    class Cfg:
        class_data_dir, class_prompt = str(tmp_path / "cls"), "a dog"
        num_class_images, sample_batch_size, seed = 5, 2, 0

    (tmp_path / "cls").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cls" / "class-00001.png")  # the user's own, kept
    (tmp_path / "cls" / ".class-00003.png.tmp").write_bytes(b"half")  # a killed fill's remains
    calls = []

    def make():
        def generate(prompts, seed):
            calls.append((len(prompts), seed))
            return [Image.new("RGB", (8, 8), (seed, 0, 0)) for _ in prompts]

        return generate

    assert (
        fill_class_images(
            Cfg, make, is_main=True, barrier=lambda: None, memory_failure=lambda e: None
        )
        == 4
    )
    assert calls == [(2, 0), (2, 2)]
    names = [p.name for p in image_files(tmp_path / "cls")]
    assert names == [f"class-{i:05d}.png" for i in range(5)]
    assert (
        fill_class_images(
            Cfg, make, is_main=True, barrier=lambda: None, memory_failure=lambda e: None
        )
        == 0
    )
    assert len(calls) == 2  # nothing missing: no model loaded, nothing generated


def _fails(tmp_path, *args):
    proc = run_script("train_text_to_image_lora_prior.py", *args, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    return line


def test_dreambooth_mistakes_are_one_line(tiny_folders, sample_dataset, tmp_path):
    home = _subject(tmp_path, sample_dataset)
    base = [*_models(tiny_folders), *COMMON, "--output_dir", "o"]
    inst = ["--instance_data_dir", "dog"]
    assert "needs --instance_prompt" in _fails(home, *base, *inst)
    line = _fails(home, *base, *inst, "--instance_prompt", "x", "--with_prior_preservation")
    assert "needs --class_data_dir" in line and "--class_prompt" in line
    line = _fails(home, *base, *inst, "--instance_prompt", "x", "--train_data_dir", "dog")
    assert "not --train_data_dir and --instance_data_dir" in line
    (home / "empty").mkdir()
    line = _fails(home, *base, "--instance_data_dir", "empty", "--instance_prompt", "x")
    assert "holds no images" in line
    pp = ["--with_prior_preservation", "--class_data_dir", "c", "--class_prompt", "y"]
    line = _fails(home, *base, *inst, "--instance_prompt", "x", *pp, "--embeddings_cache", "e")
    assert "--embeddings_cache" in line
    assert not (home / "o").exists()  # nothing written before the mistake was found
