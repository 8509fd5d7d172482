"""A run whose outputs live in a bucket: `--output_dir gs://...` (and the cache, the logs) on a GCS
emulator, through the real scripts: checkpoints, pruning, resume, the exported folder, the
validation images, the logs, export_checkpoint and generate, all in the bucket."""

from __future__ import annotations

import json

import numpy as np
import pytest
from etils import epath
from safetensors.numpy import load as load_safetensors

from kandinsky_common import checkpoints as ck
from kandinsky_common.storage import files_under
from tests.helpers import run_script, train_args

FLAGS = dict(
    backend="flax",
    train_batch_size=2,
    checkpointing_steps=1,
    checkpoints_total_limit=2,
    report_to="tensorboard",
)


def _files(url: str) -> set[str]:
    return set(files_under(url))


@pytest.fixture(scope="module")
def bucket_run(gcs, tiny_folders, sample_dataset, tmp_path_factory):
    """The prior trained for 2 updates into the bucket, then resumed to 3 with validation."""
    prior, decoder = tiny_folders
    out = f"gs://{gcs.bucket}/prior-run"
    cache = f"gs://{gcs.bucket}/prior-cache"
    first = run_script(
        "train_text_to_image_prior.py",
        *train_args(
            prior, decoder, sample_dataset, out, max_train_steps=2, embeddings_cache=cache, **FLAGS
        ),
    )
    after_first = {s for s, _ in ck.complete_checkpoints(out, "flax")}
    second = run_script(
        "train_text_to_image_prior.py",
        *train_args(
            prior,
            decoder,
            sample_dataset,
            out,
            max_train_steps=3,
            embeddings_cache=cache,
            resume_from_checkpoint="latest",
            validation_prompts="a photo",
            validation_steps=2,
            **FLAGS,
        ),
    )
    return {"out": out, "cache": cache, "first": first, "second": second, "after": after_first}


def test_checkpoints_resume_and_prune_in_the_bucket(bucket_run):
    out = bucket_run["out"]
    assert bucket_run["after"] == {1, 2}
    assert "resumed from gs://" in bucket_run["second"].stdout
    # --checkpoints_total_limit 2 pruned checkpoint-1 in the bucket
    assert [s for s, _ in ck.complete_checkpoints(out, "flax")] == [2, 3]
    meta = json.loads(epath.Path(out, "checkpoint-3", "meta", ck.STATE_FILE).read_text())
    assert meta["global_step"] == 3 and meta["stage"] == "prior"
    summary = json.loads(epath.Path(out, "train_summary.json").read_text())
    assert summary["updates"] == 3 and summary["output_dir"] == out


def test_export_logs_images_and_cache_in_the_bucket(bucket_run):
    files = _files(bucket_run["out"])
    assert "prior/diffusion_pytorch_model.safetensors" in files
    assert "prior/config.json" in files and "tokenizer/vocab.json" in files
    assert "validation/step-000003.png" in files
    events = [f for f in files if f.startswith("logs/text2image-fine-tune/events.out.tfevents")]
    assert len(events) == 2  # one per run, each whole (gcsfs cannot append: uploaded copies)
    losses = [epath.Path(bucket_run["out"], f).read_bytes().count(b"train_loss") for f in events]
    assert sorted(losses) == [1, 2]  # updates 1-2, then the resumed update 3
    assert "manifest.json" in _files(bucket_run["cache"])
    # the second run read the cache the first one filled: nothing was encoded again
    assert "encod" not in bucket_run["second"].stderr.lower()


def test_export_checkpoint_and_generate_from_the_bucket(bucket_run, gcs, tiny_folders, tmp_path):
    prior, decoder = tiny_folders
    out = bucket_run["out"]
    exported = f"gs://{gcs.bucket}/prior-export-2"
    run_script("export_checkpoint.py", "--checkpoint", f"{out}/checkpoint-2", "--output", exported)
    weights = epath.Path(exported, "prior", "diffusion_pytorch_model.safetensors").read_bytes()
    final = epath.Path(out, "prior", "diffusion_pytorch_model.safetensors").read_bytes()
    a, b = load_safetensors(weights), load_safetensors(final)
    assert a.keys() == b.keys()
    assert any(not np.array_equal(a[k], b[k]) for k in a)  # update 2 is not update 3
    images = f"gs://{gcs.bucket}/images"
    common = ["--decoder", decoder, "--prompt", "a photo", "--size", "64", "--steps", "2"]
    run_script("generate.py", "--prior", out, "--out", images, *common)
    run_script(
        "generate.py", "--prior", prior, "--checkpoint", f"{out}/checkpoint-3",
        "--out", tmp_path / "from-ckpt", *common,
    )  # fmt: skip
    assert "000.png" in _files(images)
    assert (tmp_path / "from-ckpt" / "000.png").is_file()


@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_dataset_from_the_bucket(layout, gcs, tiny_folders, sample_dataset, tmp_path):
    """--dataset_name gs://...: parquet files under a prefix, or a save_to_disk folder."""
    import datasets

    prior, decoder = tiny_folders
    from datasets.table import embed_table_storage

    data = datasets.load_dataset("imagefolder", data_dir=str(sample_dataset), split="train")
    # the images' bytes into the table (an imagefolder's rows name local files)
    data = data.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
    url = f"gs://{gcs.bucket}/data-{layout}"
    if layout == "parquet":
        local = tmp_path / "train-00000.parquet"
        data.to_parquet(str(local))
        epath.Path(url, "train", local.name).write_bytes(local.read_bytes())
    else:
        data.save_to_disk(url)
    out = tmp_path / "out"
    args = train_args(prior, decoder, None, out, max_train_steps=1, backend="flax")
    proc = run_script("train_text_to_image_prior.py", *args, "--dataset_name", url)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["updates"] == 1, proc.stdout
