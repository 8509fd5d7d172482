"""The project's own fixtures: real CLIP tokenizer, random K2.2 folders, real-photo dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kandinsky_common.errors import UserError
from kandinsky_common.model_configs import get_configs
from kandinsky_fixtures import clip_vocab
from kandinsky_fixtures.sample_data import build_sample_dataset

REPO = Path(__file__).resolve().parents[1]
# Ids of OpenAI CLIP's tokenizer (openai/clip-vit-large-patch14, kandinsky-2-2-prior/tokenizer).
CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def _run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, **kw
    )


# ----------------------------------------------------------------------------------- tokenizer


def test_clip_vocab_layout():
    vocab, merges = clip_vocab.clip_vocab_and_merges()
    assert len(vocab) == clip_vocab.VOCAB_SIZE == 49408
    assert len(merges) == clip_vocab.NUM_MERGES == 48894
    assert vocab["!"] == 0 and vocab["!</w>"] == 256
    assert vocab["a</w>"] == 320 and vocab["photo</w>"] == 1125 and vocab["cat</w>"] == 2368
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[0] == ("i", "n")


def test_tokenizer_ids_padding_and_lower_case():
    tok = clip_vocab.make_clip_tokenizer()
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    enc = tok("A Photo of a CAT", padding="max_length", max_length=77, truncation=True)
    assert enc.input_ids == CAT_IDS + [49407] * 70
    assert sum(enc.attention_mask) == 7
    long = tok("cat " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_tokenizer_folder_reloads_from_either_format(tmp_path):
    from transformers import CLIPTokenizer

    folder = clip_vocab.build_clip_tokenizer(tmp_path / "tok")
    names = {p.name for p in folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= names
    # vocab.json + merges.txt alone (the older hub layout) must give the same tokenizer.
    (folder / "tokenizer.json").unlink()
    tok = CLIPTokenizer.from_pretrained(folder)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == CAT_IDS


def test_bpe_source_override_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(clip_vocab.ENV_BPE, str(tmp_path / "missing.txt.gz"))
    with pytest.raises(UserError, match=clip_vocab.ENV_BPE):
        clip_vocab.bpe_text()
    bogus = tmp_path / "bogus.txt.gz"
    bogus.write_bytes(b"not gzip")
    monkeypatch.setenv(clip_vocab.ENV_BPE, str(bogus))
    with pytest.raises(UserError, match="gzip"):
        clip_vocab.bpe_text()
    # The cached wheel itself is an accepted override.
    monkeypatch.setenv(clip_vocab.ENV_BPE, str(clip_vocab.fetch_open_clip_wheel()))
    vocab, _ = clip_vocab.clip_vocab_and_merges()
    assert len(vocab) == 49408


def test_failed_download_names_the_override(tmp_path, monkeypatch):
    def failing_pip(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable\n")

    monkeypatch.setattr(clip_vocab.subprocess, "run", failing_pip)
    with pytest.raises(UserError, match=f"network is unreachable.*{clip_vocab.ENV_BPE}"):
        clip_vocab.fetch_open_clip_wheel(tmp_path)
    assert not list(tmp_path.iterdir())  # no half-written wheel, no leftover temp folder


def test_common_builders_stay_framework_free(tmp_path):
    code = (
        "import sys\n"
        "from kandinsky_fixtures.clip_vocab import build_clip_tokenizer\n"
        "from kandinsky_fixtures.sample_data import build_sample_dataset\n"
        f"build_clip_tokenizer({str(tmp_path / 'tok')!r})\n"
        f"build_sample_dataset({str(tmp_path / 'data')!r}, n=2)\n"
        "bad = [m for m in ('torch', 'jax', 'flax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------- model folders


def test_folder_layout(tiny_folders):
    prior_dir, decoder_dir = tiny_folders
    for sub in ("prior", "text_encoder", "image_encoder", "tokenizer", "image_processor"):
        assert (prior_dir / sub).is_dir(), sub
    index = json.loads((prior_dir / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyV22PriorPipeline"
    assert index["image_processor"] == ["transformers", "CLIPImageProcessor"]
    assert index["scheduler"] == ["diffusers", "UnCLIPScheduler"]
    assert (prior_dir / "prior" / "diffusion_pytorch_model.safetensors").is_file()
    assert (prior_dir / "text_encoder" / "model.safetensors").is_file()
    assert not list(prior_dir.rglob("*.bin"))

    index = json.loads((decoder_dir / "model_index.json").read_text())
    assert index["_class_name"] == "KandinskyV22Pipeline"
    assert set(index) >= {"unet", "movq", "scheduler"}
    sched = json.loads((decoder_dir / "scheduler" / "scheduler_config.json").read_text())
    want = get_configs("tiny")["decoder_scheduler"]
    assert {k: sched[k] for k in want} == want
    readme = (decoder_dir / "README.md").read_text()
    assert f"prior:\n- {prior_dir}\n" in readme


def test_prior_statistics_and_determinism(tiny_folders, tmp_path):
    from safetensors.numpy import load_file

    from kandinsky_fixtures.kandinsky_folders import build_kandinsky_folders

    prior_w = load_file(tiny_folders[0] / "prior" / "diffusion_pytorch_model.safetensors")
    assert prior_w["clip_std"].min() > 0.4 and 0 < np.abs(prior_w["clip_mean"]).max() < 1
    again, _ = build_kandinsky_folders(tmp_path, size="tiny", seed=0)
    again_w = load_file(again / "prior" / "diffusion_pytorch_model.safetensors")
    assert prior_w.keys() == again_w.keys()
    assert all(np.array_equal(prior_w[k], again_w[k]) for k in prior_w)
    with pytest.raises(UserError, match="not empty"):
        build_kandinsky_folders(tmp_path, size="tiny", seed=0)


def test_pipelines_load_offline_and_generate(tiny_folders):
    import torch
    from diffusers import KandinskyV22Pipeline, KandinskyV22PriorPipeline

    prior_dir, decoder_dir = tiny_folders
    prior = KandinskyV22PriorPipeline.from_pretrained(prior_dir)
    assert len(prior.tokenizer) == 49408
    gen = torch.Generator().manual_seed(0)
    out = prior("a photo of a cat", num_inference_steps=2, generator=gen)
    assert out.image_embeds.shape == (1, 32)
    assert torch.isfinite(out.image_embeds).all()
    pixels = prior.image_processor(Image.new("RGB", (300, 200)), return_tensors="pt")
    assert pixels.pixel_values.shape == (1, 3, 224, 224)

    decoder = KandinskyV22Pipeline.from_pretrained(decoder_dir)
    images = decoder(
        image_embeds=out.image_embeds,
        negative_image_embeds=out.negative_image_embeds,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=gen,
        output_type="np",
    ).images
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()


# diffusers' combined pipeline passes its own deprecated callback_steps to the decoder pipeline.
@pytest.mark.filterwarnings("ignore:`callback_steps` is deprecated:FutureWarning")
def test_auto_pipeline_builds_combined_pipeline(tiny_folders):
    import torch
    from diffusers import AutoPipelineForText2Image

    pipe = AutoPipelineForText2Image.from_pretrained(tiny_folders[1])
    assert type(pipe).__name__ == "KandinskyV22CombinedPipeline"
    image = pipe(
        "a photo of a cat",
        num_inference_steps=2,
        prior_num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_small_folders_match_configs(small_folders):
    from diffusers import PriorTransformer, UNet2DConditionModel

    prior_dir, decoder_dir = small_folders
    cfg = get_configs("small")
    prior = PriorTransformer.from_pretrained(prior_dir / "prior")
    assert prior.config.embedding_dim == cfg["prior"]["embedding_dim"]
    unet = UNet2DConditionModel.from_pretrained(decoder_dir / "unet")
    assert list(unet.config.block_out_channels) == cfg["unet"]["block_out_channels"]
    text = json.loads((prior_dir / "text_encoder" / "config.json").read_text())
    assert text["hidden_size"] == cfg["text_encoder"]["hidden_size"]
    assert text["vocab_size"] == 49408


# ------------------------------------------------------------------------------------- dataset


def test_sample_dataset_rows(sample_dataset):
    rows = [
        json.loads(line)
        for line in (sample_dataset / "metadata.jsonl").read_text().split("\n")
        if line
    ]
    assert len(rows) >= 30
    sizes, suffixes = set(), set()
    for row in rows:
        assert set(row) == {"file_name", "text"} and row["text"].strip()
        with Image.open(sample_dataset / row["file_name"]) as im:
            im.load()
            assert im.mode == "RGB"
            sizes.add(im.size)
        suffixes.add(Path(row["file_name"]).suffix)
    assert suffixes == {".jpg", ".png"}
    assert len(sizes) >= 20
    ratios = [w / h for w, h in sizes]
    assert min(ratios) < 0.7 and max(ratios) > 1.5 and any(r == 1 for r in ratios)
    assert min(min(s) for s in sizes) < 224 < max(min(s) for s in sizes)
    assert len({row["text"] for row in rows}) == len(rows)


def test_sample_dataset_loads_as_imagefolder(sample_dataset, tmp_path):
    from datasets import load_dataset

    ds = load_dataset(
        "imagefolder", data_dir=str(sample_dataset), split="train", cache_dir=str(tmp_path)
    )
    assert ds.num_rows == 32 and set(ds.column_names) == {"image", "text"}


def test_sample_dataset_is_deterministic(tmp_path):
    a = build_sample_dataset(tmp_path / "a", n=5, seed=3)
    b = build_sample_dataset(tmp_path / "b", n=5, seed=3)
    c = build_sample_dataset(tmp_path / "c", n=5, seed=4)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert any((a / f).read_bytes() != (c / f).read_bytes() for f in files if f.endswith("g"))
    with pytest.raises(UserError, match="not an empty folder"):
        build_sample_dataset(a, n=2)
    with pytest.raises(UserError, match="at least 1"):
        build_sample_dataset(tmp_path / "d", n=0)


# ------------------------------------------------------------------------------------- scripts


@pytest.mark.parametrize("script", ["make_tiny_kandinsky.py", "make_sample_dataset.py"])
def test_script_help(script):
    proc = _run([f"scripts/{script}", "--help"])
    assert proc.returncode == 0 and "--out" in proc.stdout


def test_make_sample_dataset_script(tmp_path):
    proc = _run(
        ["scripts/make_sample_dataset.py", "--out", str(tmp_path / "d"), "--num_images", "4"]
    )
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == tmp_path / "d"
    assert len((tmp_path / "d" / "metadata.jsonl").read_text().splitlines()) == 4
    proc = _run(["scripts/make_sample_dataset.py", "--out", str(tmp_path / "d")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_make_tiny_kandinsky_script(tmp_path):
    proc = _run(["scripts/make_tiny_kandinsky.py", "--out", str(tmp_path), "--seed", "1"])
    assert proc.returncode == 0, proc.stderr
    prior_dir, decoder_dir = (Path(p) for p in proc.stdout.split())
    assert prior_dir == tmp_path / "prior" and decoder_dir == tmp_path / "decoder"
    assert (decoder_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (prior_dir / "tokenizer" / "tokenizer.json").is_file()
