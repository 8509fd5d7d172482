"""Paths as users type them: relative, with spaces, through a symlink and with `~`, on both
backends, through the real scripts run from the user's folder. A relative --output_dir used to
break every flax checkpoint (orbax takes absolute paths only) and then call good ones damaged.

Also what a resume says when there is nothing (or less than nothing) left to train."""

from __future__ import annotations

import json
import os

import pytest

from tests.helpers import run_script, script_env, train_args

PRIOR = "train_text_to_image_prior.py"


@pytest.fixture
def user_dir(tmp_path, tiny_folders, sample_dataset):
    """A user's folder: models and data under relative names, a symlinked runs folder."""
    prior, decoder = tiny_folders
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "prior").symlink_to(prior)
    (tmp_path / "models" / "decoder").symlink_to(decoder)
    (tmp_path / "my data").symlink_to(sample_dataset)
    (tmp_path / "real_runs").mkdir()
    (tmp_path / "runs").symlink_to(tmp_path / "real_runs")
    return tmp_path


def _args(backend: str, out: str, **flags) -> list[str]:
    flags = dict(backend=backend, report_to="none", **flags)
    return train_args("models/prior", "models/decoder", "my data", out, **flags)


def _listing(folder) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_relative_paths_checkpoint_resume_export_and_the_end_of_a_run(backend, user_dir):
    env = dict(script_env(), HOME=str(user_dir))
    out = "runs/my run"
    run_script(PRIOR, *_args(backend, out, checkpoints_total_limit=2), cwd=user_dir, env=env)
    real = user_dir / "real_runs" / "my run"
    assert sorted(p.name for p in real.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (real / "prior").is_dir()
    summary = json.loads((real / "train_summary.json").read_text())
    assert summary["loss_first"] is not None and summary["updates"] == 4

    # 'latest', and an explicit relative checkpoint path, from the same folder.
    proc = run_script(
        PRIOR,
        *_args(backend, out, resume_from_checkpoint="latest", max_train_steps=6),
        cwd=user_dir,
        env=env,
    )
    assert "resumed from" in proc.stdout and "checkpoint-4 at update 4" in proc.stdout
    proc = run_script(
        PRIOR,
        *_args(backend, out, resume_from_checkpoint=f"{out}/checkpoint-4", max_train_steps=6),
        cwd=user_dir,
        env=env,
    )
    assert "checkpoint-4 at update 4" in proc.stdout

    # The export script takes relative and ~ paths.
    run_script(
        "export_checkpoint.py",
        "--checkpoint",
        f"{out}/checkpoint-6",
        "--output",
        "~/exported",
        cwd=user_dir,
        env=env,
    )
    assert (user_dir / "exported" / "prior" / "config.json").is_file()

    # Resuming a finished run only exports again: the recorded losses stay.
    before = json.loads((real / "train_summary.json").read_text())
    proc = run_script(
        PRIOR,
        *_args(backend, out, resume_from_checkpoint="latest", max_train_steps=6),
        cwd=user_dir,
        env=env,
    )
    assert "nothing to train" in proc.stdout
    after = json.loads((real / "train_summary.json").read_text())
    assert after["loss_last"] == before["loss_last"] is not None
    assert after["loss_first"] == before["loss_first"] and after["updates"] == 6

    # Fewer updates than the checkpoint holds: one line, exit 2, nothing touched.
    files = _listing(real)
    proc = run_script(
        PRIOR,
        *_args(backend, out, resume_from_checkpoint="latest", max_train_steps=3),
        cwd=user_dir,
        env=env,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "checkpoint-6 has 6 updates" in line
    assert "--max_train_steps 3" in line and "export_checkpoint.py" in line
    assert _listing(real) == files


def test_flax_checkpoint_from_a_relative_path_is_not_called_damaged(user_dir):
    """The read side: generate and export from a relative flax checkpoint path."""
    env = script_env()
    run_script(PRIOR, *_args("flax", "out", max_train_steps=2), cwd=user_dir, env=env)
    proc = run_script(
        "export_checkpoint.py",
        "--checkpoint",
        "out/checkpoint-2",
        "--output",
        "exp",
        cwd=user_dir,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "damaged" not in proc.stderr
    assert os.path.isfile(user_dir / "exp" / "prior" / "config.json")
