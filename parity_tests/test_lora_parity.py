"""LoRA parity: the two backends' adapters give the same losses and gradients (prior and decoder,
plain and Min-SNR), follow the same 20-update trajectory through their real loops, and an
adapter file loaded into diffusers' pipelines samples what our JAX pipelines sample with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flax_kandinsky import lora as flora
from flax_kandinsky import stages as fstages
from flax_kandinsky.models.prior import load_prior
from flax_kandinsky.models.unet import load_unet
from kandinsky_common.lora import LoraSettings, read_adapter
from kandinsky_common.stage_spec import SPECS
from parity_tests.conftest import max_rel, rel_l2
from parity_tests.test_sampling_parity import (
    load_decoder_pair,
    load_prior_pair,
    run_decoder,
    run_prior,
)
from parity_tests.test_train_parity import losses_and_grads
from parity_tests.test_trajectory_parity import _run as run_trajectory
from parity_tests.test_trajectory_parity import run_both
from torch_kandinsky import lora as tlora
from torch_kandinsky import stages as tstages


def _settings(name: str, alpha: float = 8.0) -> LoraSettings:
    spec = SPECS[name]
    return LoraSettings(4, alpha, spec.lora_targets, spec.model_subfolder)


def _random_adapter(shapes: dict, seed: int = 3) -> dict[str, np.ndarray]:
    """An adapter whose A and B are both non-zero (a fresh one has B = 0: no gradient for A)."""
    rng = np.random.default_rng(seed)
    return {k: (0.2 * rng.standard_normal(s)).astype(np.float32) for k, s in sorted(shapes.items())}


def _lora_stages(name, folders, lora):
    prior, decoder = folders
    if name == "prior":
        t = tstages.PriorStage(str(prior), torch.device("cpu"))
        f = fstages.PriorStage.from_folders(prior, lora=lora)
    else:
        t = tstages.DecoderStage(str(decoder), str(prior), torch.device("cpu"), torch.float32)
        f = fstages.DecoderStage.from_folders(decoder, prior, lora=lora)
    t.use_lora(lora)
    adapter = _random_adapter({k: v.shape for k, v in tlora.to_peft(t.model).items()})
    tlora.from_peft(t.model, adapter)
    flora.from_peft(f.model, adapter)
    return t, f


@pytest.mark.parametrize("name", ["prior", "decoder"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_lora_loss_and_gradients_match(name, gamma, tiny_folders, sample_dataset, tol):
    tstage, fstage = _lora_stages(name, tiny_folders, _settings(name))
    loss_t, grads_t, loss_f, grads_f = losses_and_grads(tstage, fstage, sample_dataset, name, gamma)
    assert abs(loss_f - loss_t) / abs(loss_t) <= tol["loss"]
    grads_t = {k.replace(".default", ""): v for k, v in grads_t.items()}  # PEFT's adapter name
    grads_f = flora.peft_layout(grads_f)
    keys = sorted(grads_t)
    assert keys == sorted(grads_f) and len(keys) == 2 * len(flora.adapted(fstage.model))
    ref = np.concatenate([grads_t[k].ravel() for k in keys])
    ours = np.concatenate([grads_f[k].ravel() for k in keys])
    assert np.linalg.norm(ref) > 0
    assert rel_l2(ours, ref) <= tol["gradient"], rel_l2(ours, ref)
    assert max_rel(ours, ref) < 1e-2


def _run(backend, stage, tiny_folders, data, out, **flags):
    return run_trajectory(backend, stage, tiny_folders, data, out, True, **flags)


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_lora_twenty_updates_match(stage, tiny_folders, sample_dataset, tmp_path, tol):
    run_both(
        stage, tiny_folders, sample_dataset, tmp_path, tol, True, learning_rate=2e-3, rank=4,
        lora_alpha=8,
    )  # fmt: skip
    prefix = SPECS[stage].model_subfolder
    at, _ = read_adapter(tmp_path / "t", prefix)
    af, _ = read_adapter(tmp_path / "f", prefix)
    keys = sorted(at)
    assert keys == sorted(af)
    flat = lambda d: np.concatenate([d[k].ravel() for k in keys])  # noqa: E731
    assert rel_l2(flat(af), flat(at)) <= tol["trajectory_params"]
    b = [k for k in keys if k.endswith("lora_B.weight")]
    # B starts at zero: the adapters trained. (Not every one: the tiny prior's one layer reads
    # the prd token, whose query input is LayerNorm of zeros, so to_q's weights get no gradient.)
    assert sum(np.abs(at[k]).max() > 0 for k in b) >= len(b) - 1


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_a_runs_adapter_in_diffusers_samples_as_ours(
    backend, tiny_folders, sample_dataset, tmp_path, monkeypatch, tol
):
    """The adapter a LoRA run of `backend` wrote, in diffusers' pipelines through
    `load_lora_adapter` and in ours folded into the weights: same initial latents and noise,
    the same result (fp32 round-off), and not the base model's."""
    prior_dir, decoder_dir = tiny_folders
    pairs = {"prior": load_prior_pair(prior_dir), "decoder": load_decoder_pair(decoder_dir)}
    base_networks = {
        "prior": lambda: load_prior(prior_dir / "prior")[0],
        "decoder": lambda: load_unet(decoder_dir / "unet")[0],
    }

    def sample(name):
        if name == "prior":
            got, want = run_prior(pairs[name], monkeypatch, 3, 4.0)
            return np.asarray(got[0]), np.asarray(want[0])
        got, want = run_decoder(pairs[name], monkeypatch, 3, 4.0, output_type="latent")
        return np.asarray(got), np.asarray(want)

    for name in ("prior", "decoder"):
        _, base = sample(name)
        out = tmp_path / name
        # a few large steps, so that the adapter moves the samples well past round-off
        _run(backend, name, tiny_folders, sample_dataset, out, max_train_steps=3,
             learning_rate=5e-2, lr_warmup_steps=0, report_to="none")  # fmt: skip
        ours, ref = pairs[name]
        network = ref.prior if name == "prior" else ref.unet
        network.load_lora_adapter(str(out), prefix=network_prefix(name), use_safetensors=True)
        ours.params = ours.place.params(
            flora.merged_from_file(base_networks[name](), out, SPECS[name])
        )
        got, want = sample(name)
        assert max_rel(want, base) > 1e-3, name  # the adapter changes what is drawn
        assert np.abs(got - want).max() <= tol["sampling"] * max(1.0, np.abs(want).max()), name


def network_prefix(name: str) -> str:
    return SPECS[name].model_subfolder
