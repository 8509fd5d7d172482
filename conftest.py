"""Root pytest setup: 8 fake CPU devices (set before anything imports jax), and session fixtures:
random Kandinsky 2.2 folders and the real-photo dataset, built once per run.

The builders are imported inside the fixtures so that collecting tests that use none of them
(e.g. the flax-only ones) does not import torch or diffusers.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(prior_dir, decoder_dir) with the "tiny" configs and seed 0; treat them as read-only."""
    from kandinsky_fixtures.kandinsky_folders import build_kandinsky_folders

    return build_kandinsky_folders(tmp_path_factory.mktemp("tiny_kandinsky"), size="tiny", seed=0)


@pytest.fixture(scope="session")
def small_folders(tmp_path_factory) -> tuple[Path, Path]:
    """(prior_dir, decoder_dir) with the "small" configs and seed 0; treat them as read-only."""
    from kandinsky_fixtures.kandinsky_folders import build_kandinsky_folders

    return build_kandinsky_folders(tmp_path_factory.mktemp("small_kandinsky"), size="small", seed=0)


@pytest.fixture(scope="session")
def sample_dataset(tmp_path_factory) -> Path:
    """An imagefolder of 32 real photos (JPEG/PNG) with metadata.jsonl captions; read-only."""
    from kandinsky_fixtures.sample_data import build_sample_dataset

    return build_sample_dataset(tmp_path_factory.mktemp("sample_dataset"), n=32, seed=0)


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator on loopback for the whole session, its environment set in this process
    (so gcsfs here reads what the scripts write) and inherited by the scripts it starts. Yields
    the emulator; tests write under `gs://{gcs.bucket}/<their own prefix>`."""
    from kandinsky_fixtures.gcs_emulator import GcsEmulator

    with GcsEmulator(tmp_path_factory.mktemp("gcs")) as emulator:
        saved = {k: os.environ.get(k) for k in emulator.env}
        os.environ.update(emulator.env)
        import fsspec.config

        fsspec.config.conf.setdefault("gs", {})["batch_size"] = 4  # env read at import: set here
        try:
            yield emulator
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
