"""A training step that does not fit in memory ends in one line: what ran out, the sizes that
set it, the flags that shrink it, exit 2, no traceback, checkpoints kept."""

from __future__ import annotations

import os

import pytest

from tests.helpers import run_script, train_args


def test_flax_decoder_too_large_for_memory(tmp_path, tiny_folders, sample_dataset):
    # The tiny fixture's MoVQ keeps latents at half the pixel size: at 1024 px the UNet's dense
    # attention needs about 1.4 TB, more than any host this runs on.
    prior, decoder = tiny_folders
    args = train_args(
        prior, decoder, sample_dataset, "out", resolution=1024, max_train_steps=2,
        report_to="none",
    )  # fmt: skip
    proc = run_script("train_text_to_image_decoder.py", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: the decoder training step ran out of host memory (RAM)")
    assert (
        "--resolution 1024" in line and "try a smaller --resolution or --train_batch_size" in line
    )
    assert "--resume_from_checkpoint latest" in line
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def test_torch_memory_failures_are_recognised():
    torch = pytest.importorskip("torch")
    from torch_kandinsky.sampling import memory_failure

    assert memory_failure(torch.OutOfMemoryError("CUDA out of memory.")) == "GPU memory"
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate")
    assert memory_failure(cpu) == "host memory (RAM)"
    assert memory_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def _fail_to_allocate(backend: str):
    """What each backend's allocator raises when 35 GB does not fit in host memory."""
    if backend == "flax":
        import jax

        return jax.errors.JaxRuntimeError(
            "RESOURCE_EXHAUSTED: Out of memory allocating 35128772792 bytes."
        )
    return RuntimeError(
        "[enforce fail at alloc_cpu.cpp:121] . DefaultCPUAllocator: can't allocate memory: you "
        "tried to allocate 35128772792 bytes."
    )


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_validation_out_of_memory_warns_once_and_training_goes_on(
    backend, monkeypatch, capsys, tmp_path, tiny_folders, sample_dataset
):
    """Validation images that do not fit stop the validation, not the run: one warning with what
    to pass instead, every update trained and exported."""
    pytest.importorskip("jax" if backend == "flax" else "torch")
    from kandinsky_common.cli import backend_train
    from kandinsky_common.flags import parse_config

    module = "flax_kandinsky.sampling" if backend == "flax" else "torch_kandinsky.sampling"
    sampler = __import__(module, fromlist=["Sampler"]).Sampler
    calls = []

    def generate(self, prompts, **kw):
        calls.append(len(prompts))
        raise _fail_to_allocate(backend)

    monkeypatch.setattr(sampler, "generate", generate)
    # the run sets XLA_FLAGS for this process (the low-memory schedule): put them back after
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    prior, decoder = tiny_folders
    out = tmp_path / "out"
    # 32 photos at batch 16: epoch 0 ends at update 2, validated before updates 3-4 run
    args = train_args(
        prior, decoder, sample_dataset, out, backend=backend, train_batch_size=16,
        max_train_steps=4, validation_prompts=["a cat", "a dog"], validation_epochs=1,
        validation_steps=2, report_to="none",
    )  # fmt: skip
    summary = backend_train(backend)(parse_config(args, "prior"), "prior")
    err = capsys.readouterr().err
    assert calls == [2]  # once: the final validation is not tried again
    assert summary["updates"] == 4 and len(summary["losses"]) == 4
    assert (out / "prior" / "config.json").exists() or list(out.rglob("model_index.json"))
    warnings = [line for line in err.splitlines() if line.startswith("warning: rendering")]
    assert warnings == [
        "warning: rendering 2 validation image(s) at 64x64 px ran out of host memory (RAM)"
        + (" (XLA asked for 35.1 GB)" if backend == "flax" else "")
        + "; training goes on without validation images. To have them, pass fewer "
        "--validation_prompts (they render as one batch), or a smaller --resolution (the prior "
        "trains without it; it is 64), or no --validation_prompts and render a checkpoint or the "
        "export afterwards with scripts/generate.py --size N"
    ]
    assert not list(out.glob("validation/*.png"))


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_class_images_out_of_memory_is_one_line(
    backend, monkeypatch, capsys, tmp_path, tiny_folders, sample_dataset
):
    """DreamBooth class images that do not fit while generated: one line, exit 2."""
    pytest.importorskip("jax" if backend == "flax" else "torch")
    from kandinsky_common.cli import main

    module = "flax_kandinsky.sampling" if backend == "flax" else "torch_kandinsky.sampling"
    sampler = __import__(module, fromlist=["Sampler"]).Sampler

    def generate(self, prompts, **kw):
        raise _fail_to_allocate(backend)

    monkeypatch.setattr(sampler, "generate", generate)
    prior, decoder = tiny_folders
    args = train_args(
        prior, decoder, None, tmp_path / "out", backend=backend, train_data_dir=None,
        instance_data_dir=sample_dataset, instance_prompt="a photo of sks",
        with_prior_preservation=True, class_data_dir=tmp_path / "class",
        class_prompt="a photo", num_class_images=2, sample_batch_size=2, report_to="none",
    )  # fmt: skip
    assert main("decoder", args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        "error: generating class images at 64x64 px ran out of host memory (RAM)"
        + (" (XLA asked for 35.1 GB)" if backend == "flax" else "")
        + f"; pass --sample_batch_size 1 (it is 2), or put 2 images of 'a photo' in "
        f"{tmp_path / 'class'} yourself (the ones generated so far are kept there)"
    )


@pytest.mark.parametrize(
    ("flags", "low_memory"),
    [({}, False), ({"validation_prompts": ["a cat"]}, True)],
)
def test_flax_runs_that_render_images_use_the_low_memory_schedule(
    flags, low_memory, monkeypatch, tmp_path
):
    """XLA:CPU's default scheduler starts every block of the sampler's chunked attention at once;
    a flax run that renders images asks for the memory-minimising one before jax starts."""
    pytest.importorskip("jax")
    from flax_kandinsky.training import start
    from flax_kandinsky.xla_flags import CPU_LOW_MEMORY_SCHEDULE
    from kandinsky_common.flags import parse_config

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    monkeypatch.setattr(start, "init_distributed", lambda cfg: None)
    args = train_args("p", "d", "data", tmp_path / "out", compile_cache_dir="", **flags)
    start.configure_jax(parse_config(args, "prior"))
    assert (CPU_LOW_MEMORY_SCHEDULE in os.environ["XLA_FLAGS"]) is low_memory
    assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"]
