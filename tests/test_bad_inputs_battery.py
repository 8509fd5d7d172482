"""A battery of user mistakes, each on both backends where it applies: one `error:` line naming
the problem and the fix, exit status 2, no traceback, and output_dir untouched (every case starts
from an output_dir holding a sentinel file and checks that nothing in it was written or deleted).

The runs are in-process (`kandinsky_common.cli.main`, what the scripts call): the flax ones pass
`--mesh_shape data=1`, one of the 8 fake devices. A full disk during a checkpoint is the one case
that starts training: it must end the same way and leave no half checkpoint as "latest".
"""

from __future__ import annotations

import errno
import importlib
import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kandinsky_common import checkpoints as ck
from kandinsky_common.cli import main
from tests.helpers import train_args

BOTH = ("flax", "torch")


@dataclass
class Case:
    """`setup(ctx)` returns the flags that make the mistake; `words` must be in the error."""

    name: str
    setup: Callable[[Ctx], dict]
    words: tuple[str, ...]
    backends: tuple[str, ...] = BOTH
    stage: str = "prior"
    needs_gcs: bool = False  # the case names a bucket: run with the GCS emulator up


@dataclass
class Ctx:
    tmp: Path
    prior: Path
    decoder: Path
    data: Path
    backend: str
    out: Path = field(init=False)

    def __post_init__(self):
        self.out = self.tmp / "out"


def _snapshot(root: Path) -> dict:
    if not root.exists():
        return {}
    entries = [root, *root.rglob("*")]
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in entries
    }


def _imagefolder(ctx: Ctx, rows: list[dict], name: str = "data") -> Path:
    """A copy of the sample images with its own metadata.jsonl rows (file_name added)."""
    folder = ctx.tmp / name
    shutil.copytree(ctx.data, folder, ignore=shutil.ignore_patterns("metadata.*"))
    images = sorted(p.name for p in folder.iterdir())
    lines = [json.dumps({"file_name": f, **row}) for f, row in zip(images, rows * len(images))]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _decoder_copy(ctx: Ctx, *, drop: str | None = None, unet_config: dict | None = None) -> Path:
    """A decoder folder of symlinks to the tiny one, minus a subfolder or with a changed UNet
    config (cheap: no weights are copied)."""
    folder = ctx.tmp / "decoder"
    folder.mkdir()
    for p in ctx.decoder.iterdir():
        if p.name == drop or (p.name == "unet" and unet_config):
            continue
        (folder / p.name).symlink_to(p)
    if unet_config:
        (folder / "unet").mkdir()
        for p in (ctx.decoder / "unet").iterdir():
            if p.name != "config.json":
                (folder / "unet" / p.name).symlink_to(p)
        config = json.loads((ctx.decoder / "unet" / "config.json").read_text())
        (folder / "unet" / "config.json").write_text(json.dumps({**config, **unet_config}))
    return folder


def _checkpoint(ctx: Ctx, backend: str, **state) -> dict:
    """A checkpoint folder as `backend` lays it out, holding only its JSON state: enough for the
    checks that run before any array is read."""
    state = {"stage": "prior", "backend": backend, "use_ema": False, "global_step": 2, **state}
    state.setdefault("num_examples", 32)
    path = ck.checkpoint_dir(ctx.out, 2)
    if backend == "torch":
        path.mkdir(parents=True)
        ck.write_state(path, state)
    else:
        (path / "state").mkdir(parents=True)
        (path / "meta").mkdir()
        ck.write_state(path / "meta", state)
    return {"resume_from_checkpoint": "latest"}


def _other(backend: str) -> str:
    return "torch" if backend == "flax" else "flax"


def _empty(ctx: Ctx) -> Path:
    (ctx.tmp / "empty").mkdir()
    return ctx.tmp / "empty"


def _truncated_image(ctx: Ctx) -> dict:
    folder = ctx.tmp / "data"
    shutil.copytree(ctx.data, folder)
    victim = sorted(folder.glob("*.png"))[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    return {"train_data_dir": folder}


def _image_ints(ctx: Ctx) -> dict:
    rows = "".join(json.dumps({"image": i, "text": "a photo"}) + "\n" for i in range(4))
    (ctx.tmp / "rows.jsonl").write_text(rows)
    return {"train_data_dir": None, "dataset_name": ctx.tmp / "rows.jsonl"}


def _output_dir_parent_is_file(ctx: Ctx) -> dict:
    (ctx.out / "file").write_text("x")
    return {"output_dir": ctx.out / "file" / "run"}


CASES = [
    Case("missing data folder", lambda c: {"train_data_dir": c.tmp / "nope"}, ("nope", "exist")),
    Case("empty data folder", lambda c: {"train_data_dir": _empty(c)}, ("is empty",)),
    Case(
        "metadata without the caption column",
        lambda c: {"train_data_dir": _imagefolder(c, [{"caption": "a photo"}])},
        ("caption column 'text'", "--caption_column"),
    ),
    Case("image column of the wrong type", _image_ints, ("image column 'image'", "--image_column")),
    Case("truncated image", _truncated_image, ("000_chelsea_full.png", "remove or replace")),
    Case(
        "a row without a caption",
        lambda c: {"train_data_dir": _imagefolder(c, [{"text": "a photo"}, {"text": None}])},
        ("caption column 'text'", "no caption"),
    ),
    Case(
        "numbers as captions",
        lambda c: {"train_data_dir": _imagefolder(c, [{"text": 7}])},
        ("captions must be strings",),
    ),
    Case(
        "an empty list of captions",
        lambda c: {"train_data_dir": _imagefolder(c, [{"text": ["a"]}, {"text": []}])},
        ("caption column 'text'", "empty list"),
    ),
    Case(
        "hub dataset name offline",
        lambda c: {"train_data_dir": None, "dataset_name": "someone/pokemon-captions"},
        ("hub", "local folder"),
    ),
    Case(
        "hub model name offline",
        lambda c: {"pretrained_decoder_model_name_or_path": "kandinsky-community/k-2-2-decoder"},
        ("hub", "local folder"),
        stage="decoder",
    ),
    Case(
        "decoder folder without movq/",
        lambda c: {"pretrained_decoder_model_name_or_path": _decoder_copy(c, drop="movq")},
        ("movq", "complete"),
        stage="decoder",
    ),
    Case(
        "UNet config outside the flax port",
        lambda c: {
            "pretrained_decoder_model_name_or_path": _decoder_copy(
                c, unet_config={"up_block_types": ["CrossAttnUpBlock2D", "ResnetUpsampleBlock2D"]}
            )
        },
        ("CrossAttnUpBlock2D", "not supported", "torch backend"),
        backends=("flax",),
        stage="decoder",
    ),
    Case(
        "UNet config with an unknown block type",
        lambda c: {
            "pretrained_decoder_model_name_or_path": _decoder_copy(
                c, unet_config={"up_block_types": ["NoSuchUpBlock2D", "ResnetUpsampleBlock2D"]}
            )
        },
        ("unet", "intact"),
        backends=("torch",),
        stage="decoder",
    ),
    Case(
        "prior folder passed as the decoder",
        lambda c: {"pretrained_decoder_model_name_or_path": c.prior},
        ("prior folder", "--pretrained_decoder_model_name_or_path"),
        stage="decoder",
    ),
    Case(
        "resolution not a multiple of 64",
        lambda c: {"resolution": 96},
        ("multiple of 64", "128"),
        stage="decoder",
    ),
    Case("train batch size 0", lambda c: {"train_batch_size": 0}, ("--train_batch_size",)),
    Case(
        "negative image memory",
        lambda c: {"image_memory_mb": -1},
        ("--image_memory_mb -1 is negative", "pass 0"),
    ),
    Case(
        "negative encoder memory",
        lambda c: {"encoder_memory_mb": -1},
        ("--encoder_memory_mb -1 is negative", "pass 0"),
    ),
    Case(
        "mesh larger than the devices",
        lambda c: {"mesh_shape": "data=3,fsdp=3"},
        ("mesh_shape", "devices"),
        backends=("flax",),
    ),
    Case("unknown lr_scheduler", lambda c: {"lr_scheduler": "warmup"}, ("lr_scheduler", "cosine")),
    Case("fp16 on the flax backend", lambda c: {"mixed_precision": "fp16"}, ("fp16", "bf16")),
    Case(
        "output_dir inside a file",
        _output_dir_parent_is_file,
        ("--output_dir", "is a file", "folder"),
    ),
    Case(
        "resume a checkpoint of the other stage",
        lambda c: _checkpoint(c, c.backend, stage="decoder"),
        ("decoder stage", "--output_dir"),
    ),
    Case(
        "resume with another --use_ema",
        lambda c: _checkpoint(c, c.backend, use_ema=True),
        ("use_ema",),
    ),
    Case(
        "resume on other data",
        lambda c: _checkpoint(c, c.backend, num_examples=500),
        ("500 examples", "same data"),
    ),
    Case(
        "checkpoints of the other backend",
        lambda c: _checkpoint(c, _other(c.backend)),
        ("backend", "--output_dir"),
    ),
]
CASES += [
    Case(
        "output_dir in a bucket on torch",
        lambda c: {"output_dir": "gs://kandinsky-test/run"},
        ("torch backend writes to local folders", "--backend flax"),
        backends=("torch",),
    ),
    Case(
        "embeddings cache in a bucket on torch",
        lambda c: {"embeddings_cache": "gs://kandinsky-test/cache"},
        ("--embeddings_cache", "--backend flax"),
        backends=("torch",),
    ),
    Case(
        "output_dir URL of an unsupported store",
        lambda c: {"output_dir": "s3://bucket/run"},
        ("s3:// is not supported", "gs:// URL"),
    ),
    Case(
        "output_dir in a bucket that does not exist",
        lambda c: {"output_dir": "gs://no-such-bucket/run"},
        ("bucket gs://no-such-bucket does not exist", "create it"),
        backends=("flax",),
        needs_gcs=True,
    ),
    Case(
        "dataset in a bucket prefix without data",
        lambda c: {"dataset_name": "gs://kandinsky-test/nothing-here", "train_data_dir": None},
        ("holds no parquet files", "save_to_disk"),
        needs_gcs=True,
    ),
]
PARAMS = [
    pytest.param(case, backend, id=f"{case.name.replace(' ', '_')}-{backend}")
    for case in CASES
    for backend in case.backends
]


def _fails(capsys, stage: str, args: list[str]) -> str:
    capsys.readouterr()
    code = main(stage, args)
    err = capsys.readouterr().err.splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, err[-20:]
    assert not any("Traceback" in line for line in err), err
    return errors[0]


@pytest.mark.parametrize("case,backend", PARAMS)
def test_bad_input(case, backend, tiny_folders, sample_dataset, tmp_path, capsys, request):
    if case.needs_gcs:
        request.getfixturevalue("gcs")
    ctx = Ctx(tmp_path, *tiny_folders, sample_dataset, backend)
    ctx.out.mkdir()
    (ctx.out / "keep.txt").write_text("the user's own file")
    flags = {"backend": backend, "report_to": "none", **case.setup(ctx)}
    if backend == "flax":
        flags.setdefault("mesh_shape", "data=1")
    before = _snapshot(ctx.out)
    args = train_args(ctx.prior, ctx.decoder, ctx.data, ctx.out, **flags)
    error = _fails(capsys, case.stage, args)
    for word in case.words:
        assert word.lower() in error.lower(), error
    assert _snapshot(ctx.out) == before, "output_dir was changed"


@pytest.fixture
def read_only_dir(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", folder]).returncode:
        pytest.skip("needs root to mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", folder], check=True)


@pytest.mark.parametrize("backend", BOTH)
def test_output_dir_not_writable(backend, read_only_dir, tiny_folders, sample_dataset, capsys):
    args = train_args(*tiny_folders, sample_dataset, read_only_dir / "run", backend=backend)
    error = _fails(capsys, "prior", args)
    assert "not writable" in error and "folder you can write" in error


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "disk"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", folder]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    yield folder
    subprocess.run(["umount", "--lazy", folder], check=True)  # orbax may still hold a handle


def _fill_disk_once(disk: Path, after: Path) -> threading.Thread:
    """Once `after` exists, fill the disk (another job's output, say) until writes fail."""

    def fill():
        deadline = time.monotonic() + 300
        while not after.is_dir() and time.monotonic() < deadline:
            time.sleep(0.002)
        with open(disk / "filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()
            except OSError:
                pass

    thread = threading.Thread(target=fill, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("backend", BOTH)
def test_disk_full_during_a_checkpoint(backend, small_disk, tiny_folders, sample_dataset, capsys):
    out = small_disk / "run"
    flags = dict(backend=backend, train_batch_size=1, report_to="none", max_train_steps=20)
    if backend == "flax":
        flags["mesh_shape"] = "data=1"
    filler = _fill_disk_once(small_disk, ck.checkpoint_dir(out, 2))
    error = _fails(capsys, "prior", train_args(*tiny_folders, sample_dataset, out, **flags))
    filler.join(timeout=60)
    failed = int(re.search(r"writing checkpoint-(\d+)", error).group(1))
    assert failed > 2 and "no space left" in error, error
    latest = ck.resolve_resume(out, "latest", backend)
    assert latest is not None and int(latest.name.split("-")[1]) < failed
    assert f"{latest.name} is the newest complete checkpoint" in error, error
    left = [p.name for p in out.iterdir() if not re.fullmatch(r"checkpoint-\d+", p.name)]
    assert not left, f"a half-written checkpoint was left: {left}"


def _full_disk_export(real):
    """An export that writes part of the folder, then finds the disk full (as a real one would:
    the final export copies the frozen encoders, the biggest write of a run)."""

    def export(*args):
        out = Path(args[-1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "model_index.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "prior"))

    return export


@pytest.mark.parametrize("backend", BOTH)
def test_disk_full_during_the_final_export(
    backend, tiny_folders, sample_dataset, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "run"
    flags = dict(backend=backend, train_batch_size=1, report_to="none", max_train_steps=2)
    if backend == "flax":
        flags["mesh_shape"] = "data=1"
    args = train_args(*tiny_folders, sample_dataset, out, **flags)
    stages = importlib.import_module(f"{backend}_kandinsky.stages")
    monkeypatch.setattr(stages.PriorStage, "export", _full_disk_export(stages.PriorStage.export))
    error = _fails(capsys, "prior", args)
    assert "writing the final pipeline folder" in error and "no space left" in error, error
    assert "checkpoint-2 is the newest complete checkpoint" in error, error
    assert not (out / "train_summary.json").exists()
    monkeypatch.undo()
    # Space freed: resuming trains nothing and writes the export.
    assert main("prior", [*args, "--resume_from_checkpoint", "latest"]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["updates"] == 2
    assert (out / "prior" / "config.json").exists()
