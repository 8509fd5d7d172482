"""Torch backend under --mixed_precision bf16, through the real scripts run from a working folder
with relative paths: validation of both stages, float32 exports that load, and a quiet stderr."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import SCRIPTS, script_env, train_args

# Library output that tells a user of the torch backend nothing (a failure shows which one).
NOISE = (
    "requires torchvision",
    "Loading weights",
    "Writing model shards",
    "Loading pipeline components",
    "were passed to UNet2DConditionModel",
    "were passed to PriorTransformer",
    "should be kept in float32",
)
# Keys of EMAModel's state that its folder's config carries beside the network's own.
EMA_KEYS = {"decay", "min_decay", "optimization_step", "inv_gamma", "power", "use_ema_warmup"}


def _run(cwd: Path, script: str, *args, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / script), *map(str, args)],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        _succeeded(proc)
    return proc


def _succeeded(proc: subprocess.CompletedProcess) -> None:
    script = Path(proc.args[1]).name
    assert proc.returncode == 0, f"{script} exited {proc.returncode}:\n{proc.stderr[-3000:]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_folders, sample_dataset) -> Path:
    """A folder holding pre/prior, pre/decoder and data, as a user's working directory."""
    root = tmp_path_factory.mktemp("bf16")
    (root / "pre").mkdir()
    (root / "pre" / "prior").symlink_to(tiny_folders[0])
    (root / "pre" / "decoder").symlink_to(tiny_folders[1])
    (root / "data").symlink_to(sample_dataset)
    return root


def _train(work: Path, stage: str) -> subprocess.CompletedProcess:
    # Two examples at batch 2: every update ends an epoch, so validation runs after update 1
    # (epoch 0, before the first checkpoint) and again after the export.
    args = train_args(
        "pre/prior",
        "pre/decoder",
        "data",
        f"out-{stage}",
        backend="torch",
        mixed_precision="bf16",
        max_train_steps=2,
        max_train_samples=2,
        validation_prompts="a cat",
        validation_steps=2,
        use_ema=True,
    )
    return _run(work, f"train_text_to_image_{stage}.py", *args)


@pytest.fixture(scope="module")
def prior_run(work) -> subprocess.CompletedProcess:
    return _train(work, "prior")


@pytest.fixture(scope="module")
def decoder_run(work) -> subprocess.CompletedProcess:
    return _train(work, "decoder")


@pytest.fixture(scope="module")
def exports(work, prior_run, decoder_run) -> dict[str, subprocess.CompletedProcess]:
    """export_checkpoint.py of both runs' EMA checkpoints, and generate.py on their outputs
    (not checked here: the test looks at the folders first)."""
    done = {}
    for stage in ("prior", "decoder"):
        done[f"export-{stage}"] = _run(
            work,
            "export_checkpoint.py",
            "--checkpoint",
            f"out-{stage}/checkpoint-2",
            "--output",
            f"export-{stage}",
            check=False,
        )
    done["generate"] = _run(
        work,
        "generate.py",
        "--backend",
        "torch",
        "--prior",
        "out-prior",
        "--decoder",
        "out-decoder",
        "--prompt",
        "x",
        "--size",
        "64",
        "--steps",
        "2",
        "--out",
        "s",
        check=False,
    )
    return done


def _dtypes(folder: Path) -> dict[str, set[str]]:
    from safetensors import safe_open

    found = {}
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            found[str(path.relative_to(folder))] = {
                str(f.get_slice(k).get_dtype()) for k in f.keys()
            }
    return found


@pytest.mark.parametrize("stage", ["prior", "decoder"])
def test_bf16_validation_images(work, stage, request):
    run = request.getfixturevalue(f"{stage}_run")
    made = sorted(p.name for p in (work / f"out-{stage}" / "validation").glob("*.png"))
    assert made == ["step-000001.png", "step-000002.png"]
    # The last update ends an epoch too; it is validated once, after the export.
    drawn = [line for line in run.stdout.splitlines() if line.startswith("validation images:")]
    assert [line.rsplit("/", 1)[1] for line in drawn] == made


def test_bf16_exports_are_float32_and_generate(work, exports):
    parts = {"prior": {"prior", "text_encoder", "image_encoder"}, "decoder": {"unet", "movq"}}
    for stage, names in parts.items():
        for folder in (f"out-{stage}", f"export-{stage}"):
            if folder.startswith("export"):
                _succeeded(exports[folder])
            dtypes = _dtypes(work / folder)
            assert names <= {Path(p).parts[0] for p in dtypes}, (folder, sorted(dtypes))
            assert all(d == {"F32"} for d in dtypes.values()), (folder, dtypes)
    for folder, sub in (("export-prior", "prior"), ("export-decoder", "unet")):
        config = json.loads((work / folder / sub / "config.json").read_text())
        assert not EMA_KEYS & config.keys(), (folder, sorted(EMA_KEYS & config.keys()))
    _succeeded(exports["generate"])
    assert (work / "s" / "000.png").is_file()


def test_torch_stderr_has_no_library_noise(prior_run, decoder_run, exports):
    runs = {"train-prior": prior_run, "train-decoder": decoder_run, **exports}
    for name, proc in runs.items():
        heard = [s for s in NOISE if s in proc.stderr]
        assert not heard, (name, heard, proc.stderr[-3000:])
    # Our own training bar stays.
    assert "prior (torch)" in prior_run.stderr and "decoder (torch)" in decoder_run.stderr
