"""Encoder outputs kept between epochs (--encoder_memory_mb): later epochs skip the frozen
encoders and train on exactly what the first epoch computed, on both backends."""

from __future__ import annotations

import importlib
import shutil

import numpy as np
import pytest

from kandinsky_common.dreambooth import image_files
from kandinsky_common.encoded_memo import EncodedMemo
from kandinsky_common.flags import parse_config
from tests.helpers import train_args


def test_memo_gives_a_batch_only_when_all_its_examples_are_kept():
    memo = EncodedMemo(max_bytes=3 * 16)  # three rows of 4 float32
    outputs = {"image_embeds": np.arange(8, dtype=np.float32).reshape(2, 4)}
    memo.offer(["a", "b"], outputs)
    assert memo.batch(["a", "c"]) is None
    got = memo.batch(["b", "a"])
    np.testing.assert_array_equal(got["image_embeds"], outputs["image_embeds"][::-1])
    # Kept rows are copies: the batch's array is not held alive, and the budget counts rows.
    assert got["image_embeds"].base is not outputs["image_embeds"]
    memo.offer(["c", "d"], {"image_embeds": np.ones((2, 4), np.float32)})
    assert len(memo) == 3 and memo.used == 48  # "d" did not fit
    assert memo.batch(["d"]) is None
    assert memo.batch([]) is None


def _count_encodes(monkeypatch, backend) -> list[int]:
    """Patch the backend's loop so each batch the frozen encoders see is counted."""
    calls = [0]
    loop = importlib.import_module(f"{backend}_kandinsky.training.loop")
    if backend == "torch":
        real = loop._encode_numpy

        def counted(*args, **kw):
            calls[0] += 1
            return real(*args, **kw)

        monkeypatch.setattr(loop, "_encode_numpy", counted)
    else:
        real_maker = loop.make_encoder

        def maker(*args, **kw):
            encode = real_maker(*args, **kw)

            def counted(batch):
                calls[0] += 1
                return encode(batch)

            return counted

        monkeypatch.setattr(loop, "make_encoder", maker)
    return calls


def _train(backend, stage, args):
    cfg = parse_config(args, stage)
    return importlib.import_module(f"{backend}_kandinsky.training.loop").train(cfg, stage)


@pytest.mark.parametrize(
    "backend, stage, precision",
    [("flax", "prior", "bf16"), ("flax", "decoder", "no"), ("torch", "decoder", "no")],
)
def test_later_epochs_skip_the_encoders_and_train_the_same(
    backend, stage, precision, monkeypatch, tiny_folders, sample_dataset, tmp_path
):
    import jax

    prior, decoder = tiny_folders
    # 32 photos: 4 updates an epoch; 10 updates run into a third epoch.
    batch = 8 // jax.device_count() if backend == "flax" else 8
    flags = dict(
        backend=backend,
        report_to="none",
        train_batch_size=max(batch, 1),
        max_train_steps=10,
        checkpointing_steps=10,
        mixed_precision=precision,
    )
    calls = _count_encodes(monkeypatch, backend)
    kept = _train(
        backend, stage, train_args(prior, decoder, sample_dataset, tmp_path / "a", **flags)
    )
    encoded = calls[0]
    plain = _train(
        backend,
        stage,
        train_args(prior, decoder, sample_dataset, tmp_path / "b", encoder_memory_mb=0, **flags),
    )
    assert calls[0] == encoded  # with 0 MB the step encodes, the loop's encoder never runs
    assert encoded == 4  # the first epoch's batches, once each
    np.testing.assert_allclose(kept["losses"], plain["losses"], rtol=1e-6)


def test_a_small_budget_keeps_what_fits_and_trains_the_same(
    monkeypatch, tiny_folders, sample_dataset, tmp_path
):
    import kandinsky_common.run as run_module

    prior, decoder = tiny_folders
    flags = dict(backend="torch", report_to="none", train_batch_size=8, max_train_steps=8)
    memos, budget = [], [None]

    def memo(max_bytes):  # the run's memo, with the budget this test sets once it is known
        memos.append(EncodedMemo(budget[0] or max_bytes))
        return memos[-1]

    monkeypatch.setattr(run_module, "EncodedMemo", memo)
    calls = _count_encodes(monkeypatch, "torch")

    def train(name, **more):
        args = train_args(prior, decoder, sample_dataset, tmp_path / name, **flags, **more)
        return _train("torch", "prior", args)

    plain = train("plain", encoder_memory_mb=0)
    whole = train("whole")
    assert len(memos[0]) == 32 and calls[0] == 4
    budget[0] = memos[0].used * 3 // 4  # room for 24 of the 32 examples
    small = train("small")
    calls[0] -= 4
    assert len(memos[1]) == 24
    # The 4 batches of epoch 1, then in epoch 2 those holding one of the 8 examples not kept.
    assert 4 < calls[0] <= 4 + 4
    for run in (whole, small):
        np.testing.assert_allclose(run["losses"], plain["losses"], rtol=1e-6)


def test_dreambooth_batches_keep_instances_classes_and_weights(
    monkeypatch, tiny_folders, sample_dataset, tmp_path
):
    prior, decoder = tiny_folders
    photos = image_files(sample_dataset)
    for folder, chosen in (("dog", photos[:3]), ("dog-class", photos[3:5])):
        (tmp_path / folder).mkdir()
        for f in chosen:
            shutil.copy(f, tmp_path / folder / f.name)
    dreambooth = dict(
        instance_data_dir=tmp_path / "dog",
        instance_prompt="a photo of sks dog",
        with_prior_preservation=True,
        class_data_dir=tmp_path / "dog-class",
        class_prompt="a photo of a dog",
        num_class_images=2,
        prior_loss_weight=0.5,
    )
    flags = dict(backend="torch", report_to="none", train_batch_size=1, max_train_steps=7)
    calls = _count_encodes(monkeypatch, "torch")
    runs = [
        _train(
            "torch",
            "decoder",
            train_args(
                prior,
                decoder,
                None,
                tmp_path / f"o{mb}",
                encoder_memory_mb=mb,
                **dreambooth,
                **flags,
            ),
        )  # fmt: skip
        for mb in (1024, 0)
    ]
    assert calls[0] == 3  # 3 instance rows, each paired with class image r % 2: one epoch
    np.testing.assert_allclose(runs[0]["losses"], runs[1]["losses"], rtol=1e-6)


def test_torch_dataloader_workers_leave_the_memo_to_the_main_process(
    monkeypatch, tiny_folders, sample_dataset, tmp_path
):
    """Workers build batches in their own processes, where the main process's memo is not:
    their pixel batches of a later epoch are replaced by the kept outputs."""
    prior, decoder = tiny_folders
    flags = dict(
        backend="torch",
        report_to="none",
        train_batch_size=8,
        max_train_steps=10,
        dataloader_num_workers=1,
    )
    calls = _count_encodes(monkeypatch, "torch")
    runs = [
        _train(
            "torch",
            "decoder",
            train_args(prior, decoder, sample_dataset, tmp_path / f"o{mb}", encoder_memory_mb=mb,
                       **flags),
        )
        for mb in (1024, 0)
    ]  # fmt: skip
    assert calls[0] == 4
    np.testing.assert_allclose(runs[0]["losses"], runs[1]["losses"], rtol=1e-6)
