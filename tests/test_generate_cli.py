"""scripts/generate.py as a user runs it: from their own folder, with relative paths.

The tiny folders are linked into a fresh working directory as `prior/` and `decoder/`. Their MoVQ
upsamples only 2x, so the README's default 512 px means a 256x256 latent map: 65536-token MoVQ
attention and 16384-token UNet attention, the long sequences the "chunked" kernel exists for.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys

import jax
import pytest
from PIL import Image

from tests.helpers import SCRIPTS, script_env, train_args


def run(cwd, script: str, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPTS / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=script_env(),
        cwd=cwd,
        timeout=timeout,
    )


@pytest.fixture
def cwd(tiny_folders, tmp_path):
    prior, decoder = tiny_folders
    (tmp_path / "prior").symlink_to(prior, target_is_directory=True)
    (tmp_path / "decoder").symlink_to(decoder, target_is_directory=True)
    return tmp_path


def generate(cwd, *args, **kw) -> subprocess.CompletedProcess:
    return run(cwd, "generate.py", "--prior", "prior", "--decoder", "decoder", *args, **kw)


def assert_one_error_line(proc, *words):
    """Exit status 2 and stderr ending in one `error:` line with `words`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    for word in words:
        assert word in last, last
    return last


@pytest.mark.slow  # ~2 min on 2 CPU cores: one UNet step and the MoVQ over a 256x256 latent
def test_readme_default_size_generates_with_flax(cwd):
    proc = generate(cwd, "--prompt", "A robot pokemon, 4k photo", "--out", "samples", "--steps", 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["samples/000.png"]
    image = Image.open(cwd / "samples" / "000.png")
    assert image.size == (512, 512) and len(set(image.getdata())) > 1


def test_out_of_memory_is_one_error_line(cwd):
    # dense attention over 1024 px (UNet logits 2 x 16 x 65546^2 fp32: ~550 GB) cannot fit
    args = ("--prompt", "a cat", "--out", "o", "--size", 1024, "--steps", 1, "--attention", "dot")
    last = assert_one_error_line(generate(cwd, *args), "1024x1024 px", "ran out of", "--size")
    assert "memory" in last and "--attention chunked" in last
    assert not (cwd / "o").exists()


def test_memory_failure_names_only_allocation_failures():
    from flax_kandinsky.sampling import memory_failure

    exhausted = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 35e9")
    assert "memory" in memory_failure(exhausted)
    assert "35.1 GB" in memory_failure(
        jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 35064387256 bytes")
    )
    assert "memory" in memory_failure(MemoryError())
    ynn = jax.errors.JaxRuntimeError("INTERNAL: YNNPACK operation failed: error")
    assert ("YNNPACK" in memory_failure(ynn)) == (jax.default_backend() == "cpu")
    for other in (
        jax.errors.JaxRuntimeError("INTERNAL: YNNPACK operation failed: invalid parameter"),
        jax.errors.JaxRuntimeError("INVALID_ARGUMENT: shapes do not match"),
        ValueError("RESOURCE_EXHAUSTED"),  # not XLA's report
    ):
        assert memory_failure(other) is None


def test_other_sampling_errors_are_not_called_out_of_memory(tiny_folders, tmp_path, monkeypatch):
    from flax_kandinsky.sampling import Sampler

    monkeypatch.syspath_prepend(str(SCRIPTS))
    import generate as script

    def broken(self, *a, **kw):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else failed")

    monkeypatch.setattr(Sampler, "generate", broken)
    prior, decoder = tiny_folders
    argv = ["--prior", str(prior), "--decoder", str(decoder), "--prompt", "a", "--out", "o"]
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        script.main([*argv, "--size", "32", "--steps", "2", "--attention", "dot"])


def test_torch_checkpoint_gets_one_route_and_it_works(cwd, sample_dataset):
    (cwd / "photos").symlink_to(sample_dataset, target_is_directory=True)
    flags = dict(backend="torch", max_train_steps=2, report_to="none")
    args = train_args("prior", "decoder", "photos", "run", **flags)
    trained = run(cwd, "train_text_to_image_decoder.py", *args)
    assert trained.returncode == 0, trained.stderr[-3000:]

    out = ("--prompt", "a cat", "--out", "o", "--size", 64, "--steps", 2)
    messages = set()
    for backend in ("flax", "torch"):
        proc = generate(cwd, "--checkpoint", "run/checkpoint-2", "--backend", backend, *out)
        last = assert_one_error_line(proc, "export_checkpoint.py", "--decoder run-2")
        assert "resume" not in last and "use --backend" not in last
        messages.add(last.split(": export it", 1)[1])
    assert len(messages) == 1  # the same advice from either backend
    assert not (cwd / "o").exists()

    # follow the advice word for word
    command = shlex.split(re.search(r"`python ([^`]*)`", last).group(1))
    assert command[0] == str(SCRIPTS / "export_checkpoint.py")  # cwd is outside the repository
    exported = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, env=script_env(), cwd=cwd
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    for backend in ("flax", "torch"):
        args = ("--prior", "prior", "--decoder", "run-2", "--backend", backend, "--out", backend)
        proc = run(cwd, "generate.py", *args, "--prompt", "a cat", "--size", 64, "--steps", 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert Image.open(cwd / backend / "000.png").size == (64, 64)


def test_help_shows_defaults_and_describes_every_option(tmp_path):
    proc = run(tmp_path, "generate.py", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    assert text.startswith("usage: generate.py")
    assert "Generate images from a Kandinsky 2.2 prior folder and decoder folder" in text
    for default in ("flax", "512", "50", "0", "chunked"):
        assert f"(default: {default})" in text
    assert "(default: None)" not in text  # required options and unset ones show none
    assert "--seed SEED seed of" in text
    assert "export_checkpoint.py" in text  # the route for torch checkpoints
