"""The flax backend as real separate processes, each a host of its own: 2 processes x 4 CPU
devices over loopback (jax.distributed, gloo collectives), each with a private HOME, TMPDIR and
compile cache, their output_dir and encode-once cache in a bucket (a GCS emulator), as on a TPU
pod whose hosts share no disk. They train to the weights of 1 process x 8 devices with local
folders on the same global batch, fill the cache together to the bytes one process writes,
resume from the bucket exactly after both were killed (-9), resume on another mesh, stop together
when only one of them is preempted, and refuse a local output_dir they do not share.

Every process is a subprocess of the real training script, bounded by a timeout and killed (with
its peers: a process whose peer died waits in a collective forever) when anything goes wrong.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from etils import epath
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import load_file

from kandinsky_common import checkpoints as ck
from kandinsky_common.storage import files_under
from tests.helpers import ROOT, SCRIPTS, script_env, train_args

NUM_PROCESSES, LOCAL_DEVICES = 2, 4
WEIGHTS = "diffusion_pytorch_model.safetensors"
TIMEOUT = 240  # seconds per launch; a healthy one takes ~30 s on 2 busy cores
FLAGS = dict(
    backend="flax",
    train_batch_size=1,  # per device: a global batch of 8
    mesh_shape="data=4,fsdp=2",
    max_train_steps=3,
    checkpointing_steps=2,
    gradient_accumulation_steps=2,
    # Adam's first updates are ~lr * sign(g): a different all-reduce order can flip the sign of
    # a ~0 gradient, so the weights' difference scales with lr (as in test_mesh_parity).
    learning_rate=1e-4,
    report_to="none",
)

# The noise stream is keyed by (seed, micro-step, process), each process drawing its own rows; one
# process with all 8 devices draws every row as process 0. The reference therefore draws what the
# processes would and concatenates it in process order, the order in which the sampler and
# make_array_from_process_local_data lay out the global batch.
REFERENCE = """
import sys

import numpy as np

from kandinsky_common import noise
from kandinsky_common.cli import main

num_processes, stage, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
draw = noise.draw


def as_processes(seed, micro_step, process_index, shape, num_timesteps):
    part = (shape[0] // num_processes, *shape[1:])
    draws = [draw(seed, micro_step, p, part, num_timesteps) for p in range(num_processes)]
    return tuple(np.concatenate(x) for x in zip(*draws))


noise.draw = as_processes
sys.exit(main(stage, argv))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_env(root: Path, i: int, devices: int) -> dict[str, str]:
    """Process i's environment: a disk of its own (HOME, TMPDIR, caches; the default compile
    cache lives under HOME), kept across launches as a host's disk is."""
    scratch = root / f"host-{i}"
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    env = script_env()
    env.update(
        HOME=str(scratch),
        TMPDIR=str(scratch / "tmp"),
        XDG_CACHE_HOME=str(scratch / ".cache"),
        HF_HOME=str(scratch / ".cache" / "huggingface"),
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_PLATFORMS="cpu",  # no libtpu probing when libtpu is installed
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # jax 0.10's default, pinned
    )
    return env


class Launch:
    """Processes started together, logging to files (pipes could fill and block a process)."""

    def __init__(self, name: str, commands: list[list[str]], devices: int, logs: Path):
        self.name, self.procs, self.outputs = name, [], []
        for i, command in enumerate(commands):
            out, err = logs / f"{name}.{i}.out", logs / f"{name}.{i}.err"
            self.outputs.append((out, err))
            with out.open("w") as o, err.open("w") as e:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        stdout=o,
                        stderr=e,
                        env=_host_env(logs, i, devices),
                        cwd=ROOT,
                        start_new_session=True,
                    )
                )
        self.deadline = time.monotonic() + TIMEOUT

    def stdout(self, i: int) -> str:
        return self.outputs[i][0].read_text()

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def report(self, why: str) -> str:
        tails = "".join(
            f"\n--- {self.name} process {i} (exit {p.returncode}) stderr:\n"
            + err.read_text()[-3000:]
            for i, (p, (_, err)) in enumerate(zip(self.procs, self.outputs))
        )
        return f"{self.name}: {why}{tails}"

    def wait(self, until=None) -> None:
        """Until all exit 0 (or `until()` holds while all run); a failure, an early exit or the
        deadline kills the rest and fails the test."""
        try:
            while any(p.poll() is None for p in self.procs):
                if until is not None and until():
                    return
                if any(p.returncode not in (None, 0) for p in self.procs):
                    raise AssertionError("a process failed")
                if time.monotonic() > self.deadline:
                    raise AssertionError(f"timed out after {TIMEOUT} s")
                time.sleep(0.2)
            if any(p.returncode != 0 for p in self.procs):
                raise AssertionError("a process failed")
            if until is not None:
                raise AssertionError("the processes exited before the awaited event")
        except AssertionError as e:
            self.kill()
            raise AssertionError(self.report(str(e))) from None


def _script(stage: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / f"train_text_to_image_{stage}.py")]


def _multi_process(name, args, logs) -> Launch:
    address = f"127.0.0.1:{_free_port()}"
    commands = [
        _script("prior")
        + args
        + ["--coordinator_address", address, "--num_processes", str(NUM_PROCESSES)]
        + ["--process_id", str(i)]
        for i in range(NUM_PROCESSES)
    ]
    return Launch(name, commands, LOCAL_DEVICES, logs)


def _summaries(launch: Launch, i: int) -> list[dict]:
    """The summary lines a process printed (gloo prints its own lines to stdout too)."""
    return [json.loads(x) for x in launch.stdout(i).splitlines() if x.startswith("{")]


def _weights(out) -> dict[str, np.ndarray]:
    return load_safetensors(epath.Path(out, "prior", WEIGHTS).read_bytes())


def _files(root) -> dict[str, bytes]:
    """Every file under a local folder or a bucket prefix: relative path -> bytes."""
    return {rel: epath.Path(root, rel).read_bytes() for rel in files_under(root)}


def _copy(src, dst) -> None:
    for rel, data in _files(src).items():
        target = epath.Path(dst) / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _flat(weights: dict[str, np.ndarray], keys) -> np.ndarray:
    return np.concatenate([weights[k].ravel().astype(np.float64) for k in keys])


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def runs(gcs, tiny_folders, sample_dataset, tmp_path_factory):
    """(2 processes x 4 devices writing to the bucket, 1 process x 8 devices writing locally),
    trained side by side, each filling its own encode-once cache."""
    prior, decoder = tiny_folders
    root = tmp_path_factory.mktemp("multiprocess")
    bucket = f"gs://{gcs.bucket}/multiprocess"
    multi, single = f"{bucket}/multi", root / "single"
    caches = {"multi": f"{bucket}/cache", "single": root / "single-cache"}
    launches = [
        _multi_process(
            "multi",
            train_args(
                prior, decoder, sample_dataset, multi, embeddings_cache=caches["multi"], **FLAGS
            ),
            root,
        ),
        Launch(
            "single",
            [
                [sys.executable, "-c", REFERENCE, str(NUM_PROCESSES), "prior"]
                + train_args(
                    prior,
                    decoder,
                    sample_dataset,
                    single,
                    embeddings_cache=caches["single"],
                    **FLAGS,
                )
            ],
            NUM_PROCESSES * LOCAL_DEVICES,
            root,
        ),
    ]
    try:
        for launch in launches:
            launch.wait()
    finally:
        for launch in launches:
            launch.kill()
    return {
        "multi": (multi, launches[0]),
        "single": (single, launches[1]),
        "root": root,
        "bucket": bucket,
        "caches": caches,
    }


def test_two_processes_train_like_one(runs, tiny_folders):
    (multi, launch), (single, reference) = runs["multi"], runs["single"]
    [got], [want] = _summaries(launch, 0), _summaries(reference, 0)
    assert got["updates"] == want["updates"] == FLAGS["max_train_steps"]
    for k in ("loss_first", "loss_last"):
        assert abs(got[k] - want[k]) <= 1e-5 * abs(want[k]), (k, got[k], want[k])
    assert _summaries(launch, 1) == []  # only process 0 reports and exports

    a, b = _weights(multi), _weights(single)
    keys = sorted(b)
    assert sorted(a) == keys
    assert _rel_l2(_flat(a, keys), _flat(b, keys)) <= 1e-5
    # The weights barely move in 3 updates, so compare what training changed too.
    w0 = load_file(tiny_folders[0] / "prior" / WEIGHTS)
    moved = _flat(b, keys) - _flat(w0, keys)
    assert np.linalg.norm(moved) > 0
    assert _rel_l2(_flat(a, keys) - _flat(w0, keys), moved) <= 1e-4

    steps = [s for s, _ in ck.complete_checkpoints(multi, backend="flax")]
    assert steps == [2, 3]


def test_two_processes_fill_the_cache_to_one_process_bytes(runs):
    multi, single = (_files(runs["caches"][k]) for k in ("multi", "single"))
    assert "manifest.json" in multi
    assert multi.keys() == single.keys()
    assert all(multi[k] == single[k] for k in single), [k for k in single if multi[k] != single[k]]


def test_kill_9_of_both_then_resume_from_the_bucket_is_exact(runs, tiny_folders, sample_dataset):
    """Both hosts die at once (no checkpoint on the way out); a new launch resumes the bucket's
    checkpoint-2 and its update 3 equals the uninterrupted run's bit for bit."""
    prior, decoder = tiny_folders
    root, out = runs["root"], f"{runs['bucket']}/killed"
    flags = {**FLAGS, "max_train_steps": 500, "embeddings_cache": runs["caches"]["multi"]}
    launch = _multi_process(
        "killed", train_args(prior, decoder, sample_dataset, out, **flags), root
    )
    try:
        launch.wait(until=lambda: any(s >= 2 for s, _ in ck.complete_checkpoints(out, "flax")))
    finally:
        launch.kill()
    flags.update(max_train_steps=FLAGS["max_train_steps"], resume_from_checkpoint="checkpoint-2")
    resumed = _multi_process(
        "resumed", train_args(prior, decoder, sample_dataset, out, **flags), root
    )
    try:
        resumed.wait()
    finally:
        resumed.kill()
    assert f"resumed from {out}/checkpoint-2" in resumed.stdout(0)
    a, b = _weights(out), _weights(runs["multi"][0])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in b)


def test_unshared_local_output_dir_is_one_line_on_every_process(runs, tiny_folders, sample_dataset):
    """`~/run` on hosts with their own disks: each host's ~ is another folder, as on a pod."""
    prior, decoder = tiny_folders
    root = runs["root"]
    flags = {**FLAGS, "max_train_steps": 1}
    args = train_args(prior, decoder, sample_dataset, "~/unshared-run", **flags)
    launch = _multi_process("unshared", args, root)
    try:
        while any(p.poll() is None for p in launch.procs) and time.monotonic() < launch.deadline:
            time.sleep(0.2)
    finally:
        launch.kill()
    for i, (p, (_, err)) in enumerate(zip(launch.procs, launch.outputs)):
        lines = err.read_text().splitlines()
        errors = [x for x in lines if x.startswith("error:")]
        assert p.returncode == 2 and len(errors) == 1, launch.report(f"process {i}")
        assert "Traceback" not in err.read_text()
        assert "not shared by the hosts" in errors[0] and "gs://BUCKET" in errors[0], errors
        assert "process(es) 1 cannot see" in errors[0], errors
    for i in range(NUM_PROCESSES):
        # nothing was trained, and process 0 removed the folder it made for its marker
        assert not (root / f"host-{i}" / "unshared-run").exists()


def test_resume_on_another_mesh_and_preempt_one_process(runs, tiny_folders, sample_dataset):
    """Resume the 2-process checkpoint with FSDP across the processes (data=1,fsdp=8: no process
    holds whole weights), then SIGTERM process 1 only: both must save the same update and exit 0.
    """
    prior, decoder = tiny_folders
    multi, root = runs["multi"][0], runs["root"]
    out = f"{runs['bucket']}/preempted"
    _copy(ck.checkpoint_dir(multi, 2), ck.checkpoint_dir(out, 2))
    horizon = 500  # far beyond where the signal lands
    flags = {
        **FLAGS,
        "mesh_shape": "data=1,fsdp=8",
        "max_train_steps": horizon,
        "resume_from_checkpoint": "latest",
    }
    args = train_args(prior, decoder, sample_dataset, out, **flags)
    launch = _multi_process("preempted", args, root)
    try:
        launch.wait(until=lambda: any(s >= 4 for s, _ in ck.complete_checkpoints(out, "flax")))
        launch.procs[1].send_signal(signal.SIGTERM)
        launch.wait()
    finally:
        launch.kill()
    assert "resumed from" in launch.stdout(0)
    # Process 0 prints for both; it stopped because process 1 was told to.
    assert "stopped by a signal to another process after update" in launch.stdout(0)
    saved = ck.complete_checkpoints(out, backend="flax")
    last, path = saved[-1]
    assert 4 <= last < horizon
    meta = json.loads((path / ck.FLAX_META_ITEM / ck.STATE_FILE).read_text())
    assert meta["global_step"] == last
    assert not epath.Path(out, "prior").exists()  # a preempted run exports nothing
