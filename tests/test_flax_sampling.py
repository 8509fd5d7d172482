"""flax_kandinsky.sampling without torch: timestep tables, scheduler steps, the pipelines' contracts
(seeds, params overrides, mesh padding) and scripts/generate.py. Parity with diffusers lives in
parity_tests/test_sampling_parity.py."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from flax_kandinsky.sampling import (
    DDPMScheduler,
    DecoderPipeline,
    PriorPipeline,
    Sampler,
    UnCLIPScheduler,
    downscale_height_and_width,
    load_scheduler,
)
from flax_kandinsky.sharding import make_mesh
from kandinsky_common.errors import UserError
from kandinsky_common.model_configs import get_configs
from parity_tests.tolerances import TOLERANCES
from tests.helpers import ROOT, run_script, script_env

PRIOR_CONFIG = get_configs("tiny")["prior_scheduler"]
DECODER_CONFIG = get_configs("tiny")["decoder_scheduler"]


def ddpm(**changes) -> DDPMScheduler:
    return DDPMScheduler.from_config({**DECODER_CONFIG, **changes})


# --- timestep tables (diffusers' set_timesteps) ---------------------------------------------------


def test_unclip_timesteps_are_the_priors_25():
    expected = [999, 957, 916, 874, 832, 791, 749, 708, 666, 624, 583, 541, 500]
    expected += [458, 416, 375, 333, 291, 250, 208, 166, 125, 83, 42, 0]
    np.testing.assert_array_equal(UnCLIPScheduler.from_config(PRIOR_CONFIG).timesteps(25), expected)


@pytest.mark.parametrize(
    "changes, steps, expected",
    [
        ({}, 20, list(range(951, 0, -50))),  # leading + steps_offset 1 (K2.2)
        ({}, 3, [667, 334, 1]),
        ({"steps_offset": 0}, 4, [750, 500, 250, 0]),
        ({"timestep_spacing": "trailing"}, 4, [999, 749, 499, 249]),
        ({"timestep_spacing": "trailing"}, 3, [999, 666, 332]),
        ({"timestep_spacing": "linspace"}, 4, [999, 666, 333, 0]),
    ],
)
def test_ddpm_timestep_spacings(changes, steps, expected):
    np.testing.assert_array_equal(ddpm(**changes).timesteps(steps), expected)


def test_step_counts_diffusers_cannot_run_are_user_errors():
    with pytest.raises(UserError, match="at least 2"):
        UnCLIPScheduler.from_config(PRIOR_CONFIG).timesteps(1)
    with pytest.raises(UserError, match="exceed"):
        ddpm().timesteps(1001)
    with pytest.raises(UserError, match="outside 0..999"):
        ddpm().timesteps(1000)  # leading 0..999 + steps_offset 1 reaches 1000
    with pytest.raises(UserError, match="integer"):
        ddpm().timesteps(2.5)


@pytest.mark.parametrize(
    "config, match",
    [
        ({**DECODER_CONFIG, "thresholding": True}, "thresholding"),
        ({**DECODER_CONFIG, "variance_type": "fixed_large_log"}, "variance_type"),
        ({**DECODER_CONFIG, "timestep_spacing": "karras"}, "timestep_spacing"),
        ({**DECODER_CONFIG, "prediction_type": "flow"}, "prediction_type"),
        ({**PRIOR_CONFIG, "variance_type": "learned_range"}, "variance_type"),
        ({**DECODER_CONFIG, "_class_name": "DDIMScheduler"}, "DDIMScheduler"),
    ],
)
def test_unsupported_scheduler_configs_are_user_errors(tmp_path, config, match):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=match):
        load_scheduler(tmp_path)


# --- steps ----------------------------------------------------------------------------------------


def test_ddpm_table_rows_and_last_step():
    table = ddpm().table(20)
    assert set(table) >= {"timestep", "x0_coef", "sample_coef", "std"}
    assert all(v.shape == (20,) for v in table.values())
    assert table["timestep"].dtype == np.int32 and table["x0_coef"].dtype == np.float32
    # the last step (t = 1 -> "t = -1", a_prev = 1) returns x0 itself plus a vanishing std
    assert table["x0_coef"][-1] == pytest.approx(1.0, abs=1e-6)
    assert table["sample_coef"][-1] == 0.0
    assert 0 < table["std"][-1] < 1e-9


@pytest.mark.parametrize("shape", [(3, 32), (2, 5, 7, 4)])
def test_steps_keep_shape_and_ignore_noise_at_t0(shape):
    unclip = UnCLIPScheduler.from_config(PRIOR_CONFIG)
    table = unclip.table(2)  # [999, 0]
    rng = np.random.default_rng(0)
    x, out = rng.standard_normal((2, *shape), dtype=np.float32)
    noise = np.full(shape, 1e6, np.float32)
    last = {k: v[-1] for k, v in table.items()}
    quiet = unclip.step(last, out, x, np.zeros(shape, np.float32))
    loud = unclip.step(last, out, x, noise)
    assert loud.shape == shape and loud.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(loud), np.asarray(quiet))
    first = {k: v[0] for k, v in table.items()}
    assert not np.allclose(unclip.step(first, out, x, noise), unclip.step(first, out, x, 0 * noise))
    step = jax.jit(ddpm().step)
    row = {k: v[0] for k, v in ddpm().table(4).items()}
    assert step(row, out, x, noise).shape == shape


def test_clip_sample_bounds_x0():
    sched = ddpm(clip_sample=True, prediction_type="sample")
    last = {k: v[-1] for k, v in sched.table(3).items()}  # x0_coef 1, sample_coef 0
    out = np.linspace(-5, 5, 12, dtype=np.float32).reshape(1, 3, 1, 4)
    prev = np.asarray(sched.step(last, out, np.zeros_like(out), np.zeros_like(out)))
    np.testing.assert_allclose(prev, np.clip(out, -1, 1), atol=1e-6)


def test_downscale_height_and_width_rounds_pixels_up():
    assert downscale_height_and_width(512, 512, 8) == (64, 64)
    assert downscale_height_and_width(768, 500, 8) == (96, 64)
    assert downscale_height_and_width(520, 64, 8) == (72, 8)
    assert downscale_height_and_width(50, 70, 2) == (26, 36)


# --- pipelines on the tiny folders ----------------------------------------------------------------


@pytest.fixture(scope="module")
def sampler(tiny_folders):
    return Sampler.from_folders(*tiny_folders)


def test_prior_embeddings_seeds_and_negatives(sampler):
    prior = sampler.prior
    embeds, negative = prior(["a cat", "a dog"], num_inference_steps=2, seed=0)
    assert embeds.shape == negative.shape == (2, prior.embedding_dim)
    np.testing.assert_array_equal(negative[0], negative[1])  # the zero-image embedding
    again, _ = prior(["a cat", "a dog"], num_inference_steps=2, seed=jax.random.key(0))
    np.testing.assert_array_equal(embeds, again)  # a typed key is the same as its int seed
    other, _ = prior(["a cat", "a dog"], num_inference_steps=2, seed=1)
    assert not np.allclose(embeds, other)
    with_neg, neg = prior(["a cat", "a dog"], "blurry", num_inference_steps=2, seed=0)
    assert with_neg.shape == neg.shape == (2, prior.embedding_dim)
    assert not np.allclose(neg[0], negative[0])
    with pytest.raises(UserError, match="negative prompts"):
        prior(["a", "b", "c"], ["x", "y"], num_inference_steps=2)
    with pytest.raises(ValueError, match="latents"):
        prior(["a"], num_inference_steps=2, latents=np.zeros((2, prior.embedding_dim)))


def test_params_override_is_used(sampler):
    decoder = sampler.decoder
    embeds = np.ones((2, 32), np.float32)
    kw = dict(height=32, width=32, num_inference_steps=2, seed=3, output_type="np")
    base = decoder(embeds, embeds, **kw)
    same = decoder(embeds, embeds, params=decoder.params, **kw)
    np.testing.assert_array_equal(base, same)
    zeros = jax.tree.map(jnp.zeros_like, decoder.params)
    assert not np.allclose(decoder(embeds, embeds, params=zeros, **kw), base)


def test_mesh_pads_and_shards_to_the_same_images(tiny_folders, sampler):
    mesh = make_mesh("data=4,fsdp=2")  # 3 prompts are padded to 8 rows; big weights split
    prompts = ["a cat", "a dog", "a horse"]
    prior = PriorPipeline.from_folder(tiny_folders[0], mesh=mesh)
    decoder = DecoderPipeline.from_folder(tiny_folders[1], mesh=mesh)
    embeds, negative = prior(prompts, num_inference_steps=2, seed=5)
    ref_embeds, ref_negative = sampler.prior(prompts, num_inference_steps=2, seed=5)
    np.testing.assert_allclose(embeds, ref_embeds, atol=TOLERANCES["sharded"])
    kw = dict(height=32, width=32, num_inference_steps=2, seed=5, output_type="np")
    images = decoder(ref_embeds, ref_negative, **kw)
    assert images.shape == (3, 32, 32, 3)
    # pixels, not a forward output: the fixture's unclipped latents reach |x| ~ 10 in 2 steps
    expected = sampler.decoder(ref_embeds, ref_negative, **kw)
    np.testing.assert_allclose(images, expected, atol=TOLERANCES["sampling"])


def test_generate_returns_pil_images(sampler):
    # the shapes of the two tests above: both loops are compiled already
    images = sampler.generate(
        ["a red cat", "a blue dog"], height=32, width=32, prior_steps=2, decoder_steps=2, seed=0
    )
    assert [(im.size, im.mode) for im in images] == [((32, 32), "RGB")] * 2
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_bf16_compute_keeps_fp32_sampling(tiny_folders):
    prior = PriorPipeline.from_folder(tiny_folders[0], dtype=jnp.bfloat16)
    embeds, negative = prior(["a cat"], num_inference_steps=2)
    assert embeds.dtype == negative.dtype == np.float32  # the scheduler math stays fp32
    assert np.isfinite(embeds).all() and embeds.std() > 0


# --- scripts/generate.py --------------------------------------------------------------------------


def test_generate_help_names_backend_and_checkpoint():
    out = run_script("generate.py", "--help").stdout
    for flag in ("--backend", "--prior", "--decoder", "--checkpoint", "--prompt", "--out"):
        assert flag in out


@pytest.mark.parametrize("backend, match", [("flax", "not a folder"), ("torch", "export it")])
def test_generate_checkpoint_errors(tiny_folders, tmp_path, backend, match):
    prior, decoder = tiny_folders
    args = ["--prior", prior, "--decoder", decoder, "--prompt", "a", "--out", tmp_path / "o"]
    args += ["--backend", backend, "--checkpoint", tmp_path / "checkpoint-7"]
    proc = run_script("generate.py", *args, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and match in proc.stderr
    assert not (tmp_path / "o").exists()


def test_checkpoint_params_and_overrides_must_fit(tiny_folders, sampler, monkeypatch):
    from flax_kandinsky import export
    from flax_kandinsky.export import checkpoint_params

    # what the loader needs of a full fine-tune's stage
    stage = SimpleNamespace(
        spec=SimpleNamespace(name="decoder"), trainable=nnx.Param, sampling_params=lambda p: p
    )
    d = sampler.decoder
    unet = nnx.merge(d._unet_graph, d.params, d._unet_rest)
    monkeypatch.setattr(export, "load_checkpoint_model", lambda path, use_ema: (stage, unet))
    name, params = checkpoint_params("checkpoint-1")
    assert name == "decoder"
    assert jax.tree.structure(params) == jax.tree.structure(sampler.decoder.params)
    with pytest.raises(UserError, match="do not fit"):
        sampler.prior(["a"], num_inference_steps=2, params=params)
    with pytest.raises(UserError, match="do not fit"):
        Sampler.from_folders(*tiny_folders, prior_params=params)


def test_generate_flax_writes_pngs_without_torch(tiny_folders, tmp_path):
    prior, decoder = tiny_folders
    argv = ["--prior", str(prior), "--decoder", str(decoder), "--prompt", "a cat", "a dog"]
    argv += ["--out", str(tmp_path), "--size", "32", "--steps", "2"]
    code = (
        "import sys; sys.path.insert(0, 'scripts'); import generate; "
        f"generate.main({argv!r}); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=script_env(), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = proc.stdout.split()
    assert printed == [str(tmp_path / n) for n in ("000.png", "001.png", "grid.png")]
    assert Image.open(tmp_path / "000.png").size == (32, 32)
    assert Image.open(tmp_path / "grid.png").size == (64, 32)
