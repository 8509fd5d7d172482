"""EpochSampler: fixed order, exact resume, process sharding, full coverage, static shapes."""

import itertools

import numpy as np
import pytest

from kandinsky_common.errors import UserError
from kandinsky_common.row_order import EpochSampler


def test_same_arguments_same_order_and_seed_changes_it():
    a = EpochSampler(23, 4, seed=7)
    b = EpochSampler(23, 4, seed=7)
    c = EpochSampler(23, 4, seed=8)
    first = [idx for _, _, idx in a.iterate(num_batches=20)]
    again = [idx for _, _, idx in b.iterate(num_batches=20)]
    other = [idx for _, _, idx in c.iterate(num_batches=20)]
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))
    # Epochs are shuffled independently of each other.
    assert not np.array_equal(a.permutation(0), a.permutation(1))


@pytest.mark.parametrize("n, batch", [(23, 4), (8, 4), (3, 5), (1, 2)])
def test_every_example_each_epoch_and_static_shapes(n, batch):
    sampler = EpochSampler(n, batch, seed=3)
    assert sampler.steps_per_epoch == -(-n // batch)
    for epoch in range(3):
        seen = [sampler.indices(epoch, step) for step in range(sampler.steps_per_epoch)]
        assert all(s.shape == (batch,) and s.dtype == np.int64 for s in seen)
        assert set(np.concatenate(seen).tolist()) == set(range(n))


def test_last_batch_wraps_to_start_of_same_epoch():
    sampler = EpochSampler(10, 4, seed=0)
    perm = sampler.permutation(2)
    last = sampler.indices(2, sampler.steps_per_epoch - 1)
    np.testing.assert_array_equal(last, np.concatenate([perm[8:], perm[:2]]))
    # Smaller than a batch: the permutation is cycled.
    tiny = EpochSampler(3, 7, seed=0)
    np.testing.assert_array_equal(tiny.indices(0, 0), np.resize(tiny.permutation(0), 7))


@pytest.mark.parametrize("start", [0, 1, 5, 6, 7, 13])
def test_resume_equals_tail_of_full_run(start):
    full = list(EpochSampler(23, 4, seed=1).iterate(num_batches=20))
    resumed_sampler = EpochSampler(23, 4, seed=1)  # a fresh process: no cached state
    epoch, step = resumed_sampler.position(start)
    tail = list(resumed_sampler.iterate(epoch, step, num_batches=20 - start))
    assert [(e, s) for e, s, _ in tail] == [(e, s) for e, s, _ in full[start:]]
    for (_, _, x), (_, _, y) in zip(tail, full[start:], strict=True):
        np.testing.assert_array_equal(x, y)


def test_step_past_epoch_end_rolls_over():
    sampler = EpochSampler(10, 4)
    (epoch, step, idx), *_ = sampler.iterate(0, sampler.steps_per_epoch, num_batches=1)
    assert (epoch, step) == (1, 0)
    np.testing.assert_array_equal(idx, sampler.indices(1, 0))


def test_processes_partition_the_global_batch():
    n, batch, procs = 29, 3, 4
    single = EpochSampler(n, batch * procs, seed=5)
    shards = [EpochSampler(n, batch, procs, p, seed=5) for p in range(procs)]
    assert all(s.steps_per_epoch == single.steps_per_epoch for s in shards)
    for epoch, step in itertools.product(range(2), range(single.steps_per_epoch)):
        parts = [s.indices(epoch, step) for s in shards]
        np.testing.assert_array_equal(np.concatenate(parts), single.indices(epoch, step))


def test_state_dict_roundtrip_and_mismatch():
    sampler = EpochSampler(23, 4, seed=2)
    state = sampler.state_dict(1, sampler.steps_per_epoch)  # "next" = first batch of epoch 2
    assert (state["epoch"], state["step"]) == (2, 0)
    # Same global batch over two processes: allowed, the global batches are unchanged.
    assert EpochSampler(23, 2, 2, 1, seed=2).resume_position(state) == (2, 0)
    changes = [(24, 4, 2), (23, 5, 2), (23, 4, 3)]  # examples, batch, seed
    for changed in (EpochSampler(n, b, seed=s) for n, b, s in changes):
        with pytest.raises(UserError, match="resume with the same"):
            changed.resume_position(state)


def test_bad_arguments():
    with pytest.raises(UserError, match="empty"):
        EpochSampler(0, 4)
    with pytest.raises(UserError, match="train_batch_size"):
        EpochSampler(5, 0)
    with pytest.raises(ValueError):
        EpochSampler(5, 2, num_processes=2, process_index=2)
    with pytest.raises(ValueError):
        EpochSampler(5, 2).indices(0, 3)
