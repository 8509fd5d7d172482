"""A training step that does not fit in memory ends in one line: what ran out, the sizes that
set it, the flags that shrink it, exit 2, no traceback, checkpoints kept."""

from __future__ import annotations

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
    from torch_kandinsky.training.loop import _memory_failure

    assert _memory_failure(torch.OutOfMemoryError("CUDA out of memory.")) == "GPU memory"
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate")
    assert _memory_failure(cpu) == "host memory (RAM)"
    assert _memory_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None
