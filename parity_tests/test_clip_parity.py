"""CLIP text and vision encoders: Flax port against transformers, weights only via the tables."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPTextConfig, CLIPVisionConfig
from transformers import CLIPTextModelWithProjection as TorchText
from transformers import CLIPVisionModelWithProjection as TorchVision

from flax_kandinsky import pretrained
from flax_kandinsky.convert import CONV, LINEAR, Table, to_torch_layout
from flax_kandinsky.convert.clip import TEXT_TABLE, VISION_TABLE
from flax_kandinsky.models import clip
from kandinsky_common.model_configs import get_configs
from parity_tests.conftest import max_rel

BOS, EOS = 49406, 49407


@nnx.jit
def text_forward(model, ids, attention_mask=None):
    return model(ids, attention_mask)


@nnx.jit
def vision_forward(model, pixels):
    return model(pixels)


def torch_sd(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def perturb_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """LayerNorms start at (1, 0); move them so a swapped scale/bias cannot pass unnoticed."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def token_ids(batch: int, seq: int, seed: int) -> np.ndarray:
    """Tokenizer-shaped ids: BOS, random tokens, EOS, then EOS padding (lengths vary per row)."""
    rng = np.random.default_rng(seed)
    ids = np.full((batch, seq), EOS, np.int64)
    ids[:, 0] = BOS
    for row in range(batch):
        n = int(rng.integers(1, seq - 1))
        ids[row, 1 : 1 + n] = rng.integers(0, BOS, n)
    return ids


def _text_pair(config: dict, seed: int):
    torch.manual_seed(seed)
    ref = TorchText(CLIPTextConfig(**config)).eval()
    perturb_norms(ref, torch.Generator().manual_seed(seed))
    factory = lambda rngs: clip.CLIPTextModelWithProjection(config, rngs=rngs)  # noqa: E731
    return ref, pretrained.from_state_dict(factory, TEXT_TABLE, torch_sd(ref))


def _vision_pair(config: dict, seed: int):
    torch.manual_seed(seed)
    ref = TorchVision(CLIPVisionConfig(**config)).eval()
    perturb_norms(ref, torch.Generator().manual_seed(seed))
    factory = lambda rngs: clip.CLIPVisionModelWithProjection(config, rngs=rngs)  # noqa: E731
    return ref, pretrained.from_state_dict(factory, VISION_TABLE, torch_sd(ref))


@pytest.fixture(scope="module", params=["tiny", "small"])
def text_pair(request):
    return request.param, *_text_pair(get_configs(request.param)["text_encoder"], 0)


@pytest.fixture(scope="module", params=["tiny", "small"])
def vision_pair(request):
    return request.param, *_vision_pair(get_configs(request.param)["image_encoder"], 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_text_forward(text_pair, batch, tol):
    size, ref, model = text_pair
    ids = token_ids(batch, 77, seed=batch)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids))
    got = text_forward(model, jnp.asarray(ids))
    for key in ("text_embeds", "last_hidden_state"):
        err = max_rel(got[key], want[key].numpy())
        print(f"text {size} B={batch} {key}: max rel {err:.2e}")
        assert err <= tol["forward"], (key, err)


@pytest.mark.parametrize("eos_token_id", [2, EOS])
def test_text_pooling_paths_and_attention_mask(eos_token_id, tol):
    """Legacy argmax pooling (eos 2) and first-EOS pooling; a padding attention_mask."""
    config = {**get_configs("tiny")["text_encoder"], "eos_token_id": eos_token_id}
    ref, model = _text_pair(config, seed=2)
    ids = token_ids(3, 77, seed=7)
    ids[1, 3] = EOS  # an early EOS: both pooling paths must pick this first occurrence
    first_eos = np.argmax(ids == EOS, axis=1)
    mask = np.arange(77)[None] <= first_eos[:, None]  # tokens up to and including the first EOS
    for attention_mask in (None, mask):
        with torch.no_grad():
            am = None if attention_mask is None else torch.from_numpy(attention_mask.astype(int))
            want = ref(torch.from_numpy(ids), attention_mask=am)
        am = None if attention_mask is None else jnp.asarray(attention_mask)
        got = text_forward(model, jnp.asarray(ids), am)
        for key in ("text_embeds", "last_hidden_state"):
            assert max_rel(got[key], want[key].numpy()) <= tol["forward"], key


@pytest.mark.parametrize("batch", [1, 3])
def test_vision_forward(vision_pair, batch, tol):
    size, ref, model = vision_pair
    pixels = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224), np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(pixels))
    got = vision_forward(model, jnp.asarray(pixels.transpose(0, 2, 3, 1)))  # NCHW -> NHWC
    err = max_rel(got["image_embeds"], want.image_embeds.numpy())
    print(f"vision {size} B={batch} image_embeds: max rel {err:.2e}")
    assert err <= tol["forward"]
    assert max_rel(got["last_hidden_state"], want.last_hidden_state.numpy()) <= tol["forward"]


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_round_trip_bit_exact(kind):
    pair = _text_pair if kind == "text" else _vision_pair
    config = get_configs("tiny")["text_encoder" if kind == "text" else "image_encoder"]
    ref, model = pair(config, seed=3)
    table = TEXT_TABLE if kind == "text" else VISION_TABLE
    sd, back = torch_sd(ref), to_torch_layout(model, table)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v), k


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_save_loads_in_transformers(kind, tmp_path):
    configs = get_configs("tiny")
    if kind == "text":
        config, cls = configs["text_encoder"], TorchText
        ref, model = _text_pair(config, seed=4)
        clip.save_text_encoder(model, config, tmp_path)
        inputs = (torch.from_numpy(token_ids(2, 77, seed=4)),)
        again, _ = clip.load_text_encoder(tmp_path)
    else:
        config, cls = configs["image_encoder"], TorchVision
        ref, model = _vision_pair(config, seed=5)
        clip.save_image_encoder(model, config, tmp_path)
        inputs = (torch.randn(2, 3, 224, 224),)
        again, _ = clip.load_image_encoder(tmp_path)
    loaded = cls.from_pretrained(tmp_path).eval()
    assert loaded.dtype == torch.float32
    sd = torch_sd(ref)
    assert all(np.array_equal(v, sd[k]) for k, v in torch_sd(loaded).items())
    assert sorted(torch_sd(loaded)) == sorted(sd)
    with torch.no_grad():
        a, b = ref(*inputs), loaded(*inputs)
    key = "text_embeds" if kind == "text" else "image_embeds"
    np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    # and the Flax loader reads the folder back to the same variables
    table = TEXT_TABLE if kind == "text" else VISION_TABLE
    back = to_torch_layout(again, table)
    assert all(np.array_equal(back[k], v) for k, v in sd.items())


@pytest.mark.parametrize("kind", ["text", "vision"])
def test_loads_folder_saved_by_transformers(kind, tmp_path):
    """save_pretrained output (fp32, and fp16 like the published text encoder) -> Flax loader."""
    configs = get_configs("tiny")
    if kind == "text":
        ref, _ = _text_pair(configs["text_encoder"], seed=6)
        load, table = clip.load_text_encoder, TEXT_TABLE
    else:
        ref, _ = _vision_pair(configs["image_encoder"], seed=6)
        load, table = clip.load_image_encoder, VISION_TABLE
    for dtype in (torch.float32, torch.float16):
        folder = tmp_path / str(dtype)
        ref.to(dtype).save_pretrained(folder)
        model, config = load(folder)
        assert config["model_type"].startswith("clip_")
        back = to_torch_layout(model, table)
        for k, v in torch_sd(ref).items():
            assert back[k].dtype == np.float32 and np.array_equal(back[k], v.astype(np.float32))


def abstract_torch_shapes(model: nnx.Module, table: Table) -> dict[str, tuple[int, ...]]:
    """Torch key -> torch shape of an abstract (eval_shape) Flax model, through `table`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Variable)):
        key = ".".join(str(getattr(p, "key", p)) for p in path)
        hit = table.torch_key(key)
        assert hit is not None, key
        tkey, op = hit
        shape = tuple(var.get_value().shape)
        if op == LINEAR:
            shape = shape[::-1]
        elif op == CONV:
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[tkey] = shape
    return out


@pytest.mark.parametrize(
    "kind, expected_millions",
    [("text", 694.7), ("vision", 1844.9)],
)
def test_real_config_names_shapes_counts(kind, expected_millions):
    """Published configs, no weights: abstract Flax model vs torch on the meta device."""
    config = get_configs("real")["text_encoder" if kind == "text" else "image_encoder"]
    if kind == "text":
        flax_cls, torch_cls, hf_cfg, table = (
            clip.CLIPTextModelWithProjection, TorchText, CLIPTextConfig, TEXT_TABLE,
        )  # fmt: skip
    else:
        flax_cls, torch_cls, hf_cfg, table = (
            clip.CLIPVisionModelWithProjection, TorchVision, CLIPVisionConfig, VISION_TABLE,
        )  # fmt: skip
    model = pretrained.build_abstract(lambda rngs: flax_cls(config, rngs=rngs))
    flax_shapes = abstract_torch_shapes(model, table)
    with torch.device("meta"):
        ref = torch_cls(hf_cfg(**config))
    torch_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert flax_shapes == torch_shapes
    count = sum(math.prod(s) for s in flax_shapes.values())
    assert count == sum(p.numel() for p in ref.parameters())
    print(f"real {kind} encoder: {count:,} parameters")
    assert abs(count / 1e6 - expected_millions) < 0.1, count
