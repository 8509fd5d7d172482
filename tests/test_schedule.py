"""kandinsky_common.schedule and the torch diffusion math against diffusers."""

from __future__ import annotations

import numpy as np
import pytest

from kandinsky_common.model_configs import get_configs
from kandinsky_common.schedule import NoiseSchedule

torch = pytest.importorskip("torch")


def test_prior_schedule_equals_diffusers():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
    ours = NoiseSchedule.prior()
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())
    assert ours.prediction_type == "sample"


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
def test_decoder_schedule_equals_diffusers(schedule):
    from diffusers import DDPMScheduler

    config = {**get_configs("tiny")["decoder_scheduler"], "beta_schedule": schedule}
    ref = DDPMScheduler.from_config(config)
    ours = NoiseSchedule.from_config(config)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=1e-6, atol=0)
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6)
    assert ours.prediction_type == "epsilon"


@pytest.mark.parametrize("prediction_type", ["sample", "epsilon", "v_prediction"])
@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_min_snr_weights_equal_diffusers_compute_snr(prediction_type, stage):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    from flax_kandinsky.diffusion import min_snr_weights as flax_weights
    from torch_kandinsky.diffusion import min_snr_weights as torch_weights

    if stage == "prior":
        sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="sample")
        ours = NoiseSchedule.prior()
    else:
        config = get_configs("tiny")["decoder_scheduler"]
        sched, ours = DDPMScheduler.from_config(config), NoiseSchedule.from_config(config)
    t = torch.tensor([0, 1, 17, 120, 261, 500, 998, 999])
    gamma = 5.0
    # The reference scripts' lines, verbatim in meaning.
    snr = compute_snr(sched, t)
    ref = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        ref = ref / snr
    elif prediction_type == "v_prediction":
        ref = ref / (snr + 1)
    np.testing.assert_allclose(ours.snr(t.numpy()), snr.numpy(), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(flax_weights(ours.snr(t.numpy()), gamma, prediction_type)),
        ref.numpy(),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        torch_weights(snr, gamma, prediction_type).numpy(), ref.numpy(), rtol=0
    )


def test_add_noise_and_v_target_match_diffusers():
    from diffusers import DDPMScheduler

    from torch_kandinsky.diffusion import add_noise, get_target

    config = {**get_configs("tiny")["decoder_scheduler"], "prediction_type": "v_prediction"}
    sched = DDPMScheduler.from_config(config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    ac = torch.from_numpy(NoiseSchedule.from_config(config).alphas_cumprod)
    torch.testing.assert_close(add_noise(x0, noise, t, ac), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(
        get_target("v_prediction", x0, noise, t, ac), sched.get_velocity(x0, noise, t)
    )


def test_noise_stream_is_a_function_of_position():
    from kandinsky_common.noise import draw

    a = draw(0, 5, 0, (2, 4, 8, 8), 1000)
    b = draw(0, 5, 0, (2, 4, 8, 8), 1000)
    c = draw(0, 6, 0, (2, 4, 8, 8), 1000)
    d = draw(0, 5, 1, (2, 4, 8, 8), 1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[0], d[0])
    assert a[1].dtype == np.int64 and a[1].min() >= 0 and a[1].max() < 1000
