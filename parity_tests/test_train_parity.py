"""Training-step parity: the two backends' losses and gradients from the same weights, batch,
noise and timesteps (the tiny K2.2 folders, fp32, highest matmul precision)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from flax_kandinsky import stages as fstages
from flax_kandinsky.convert import flatten
from flax_kandinsky.convert.prior import PRIOR_TABLE
from flax_kandinsky.convert.unet import UNET_TABLE
from flax_kandinsky.training.step import split_stage, stage_loss
from kandinsky_common import noise as noise_stream
from kandinsky_common.data import load_train_dataset
from kandinsky_common.preprocess import BatchBuilder
from parity_tests.conftest import max_rel, rel_l2
from torch_kandinsky import stages as tstages
from torch_kandinsky.training.step import stage_loss as torch_stage_loss

CASES = [
    ("prior", None, None),
    ("prior", None, 5.0),
    ("decoder", "epsilon", None),
    ("decoder", "epsilon", 5.0),
    ("decoder", "v_prediction", 5.0),
]


def _stages(name, folders, prediction_type):
    prior, decoder = folders
    if name == "prior":
        return tstages.PriorStage(str(prior), torch.device("cpu")), fstages.PriorStage.from_folders(
            prior
        )
    t = tstages.DecoderStage(
        str(decoder), str(prior), torch.device("cpu"), torch.float32, prediction_type
    )
    f = fstages.DecoderStage.from_folders(decoder, prior, prediction_type=prediction_type)
    return t, f


def _batch(tstage, dataset_dir, name):
    ds = load_train_dataset(
        dataset_name=None,
        dataset_config_name=None,
        train_data_dir=str(dataset_dir),
        cache_dir=None,
        image_column="image",
        caption_column="text" if name == "prior" else None,
        max_train_samples=None,
        seed=0,
    )
    builder = BatchBuilder(
        ds,
        image_column="image",
        caption_column="text" if name == "prior" else None,
        tokenizer=getattr(tstage, "tokenizer", None),
        resolution=64 if name == "decoder" else None,
    )
    return builder(np.array([3, 1, 4]), 0)


def losses_and_grads(tstage, fstage, dataset_dir, name, gamma):
    """Both backends on one batch, noise and timesteps: (torch loss, torch grads by parameter
    name, flax loss, flax grads as a pure dict of the trained params)."""
    batch = _batch(tstage, dataset_dir, name)
    noise, t = noise_stream.draw(7, 0, 0, tstage.x0_shape(3, 64), 1000)

    model = tstage.model.train()
    enc = tstage.encode(tstage.to_device(batch, torch.device("cpu"), torch.float32))
    loss_t = torch_stage_loss(
        tstage, model, enc, torch.from_numpy(noise), torch.from_numpy(t), gamma
    )
    loss_t.backward()
    grads_t = {k: p.grad.numpy() for k, p in model.named_parameters() if p.grad is not None}

    graphdefs, params, consts = split_stage(fstage)
    ac = jnp.asarray(fstage.schedule.alphas_cumprod)
    jbatch = jax.tree.map(jnp.asarray, batch)

    def loss_fn(p):
        n = jnp.asarray(fstage.noise_layout(noise))
        return stage_loss(fstage, graphdefs, p, consts, jbatch, n, jnp.asarray(t), ac, gamma)

    loss_f, grads_f = jax.value_and_grad(loss_fn)(params)
    return loss_t.item(), grads_t, float(loss_f), grads_f


@pytest.mark.parametrize("name,prediction_type,gamma", CASES)
def test_loss_and_gradients_match(name, prediction_type, gamma, tiny_folders, sample_dataset, tol):
    tstage, fstage = _stages(name, tiny_folders, prediction_type)
    loss_t, grads_t, loss_f, grads_f = losses_and_grads(tstage, fstage, sample_dataset, name, gamma)
    assert abs(loss_f - loss_t) / abs(loss_t) <= tol["loss"]

    table = PRIOR_TABLE if name == "prior" else UNET_TABLE
    grads_f = table.to_torch(flatten(grads_f))
    keys = sorted(grads_t)
    assert keys == sorted(k for k in grads_f if k not in ("clip_mean", "clip_std"))
    ref = np.concatenate([grads_t[k].ravel() for k in keys])
    ours = np.concatenate([grads_f[k].ravel() for k in keys])
    assert rel_l2(ours, ref) <= tol["gradient"], rel_l2(ours, ref)
    assert max_rel(ours, ref) < 1e-2  # no single tensor far off
