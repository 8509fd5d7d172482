"""The README's commands, run as a new user runs them: the demo from the root of a clean copy of
the checkout (its default, relative output folder), and the Usage, export and generate commands
exactly as printed, from a user's folder holding models and data under the README's names. Only
sizes and step counts are turned down, by flags appended to the command (the last one wins)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, script_env

README = (ROOT / "README.md").read_text()


def _commands(section: str, starts: str) -> list[list[str]]:
    """The shell commands of the ```bash blocks under README heading `section` that start with
    `starts`, continuation lines joined, split as the shell would."""
    body = README.split(f"\n{section}\n", 1)[1]
    body = re.split(r"\n#{1,3} ", body, maxsplit=1)[0]
    found = []
    for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            words = shlex.split(line, comments=True)
            if words and " ".join(words).startswith(starts):
                found.append(words)
    return found


def _clean_copy(dest: Path) -> Path:
    """The checkout's files (what a clone holds), with this run's venv linked in."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    (dest / ".venv").symlink_to(Path(sys.prefix))
    return dest


def _run(words: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    if words[0] == "python":
        words = [sys.executable, *words[1:]]
    proc = subprocess.run(
        words, cwd=cwd, env=script_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
    return proc


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_demo_from_a_clean_copy_then_resume(backend, tmp_path):
    root = _clean_copy(tmp_path / "kandinsky")
    _run(["bash", "scripts/demo.sh", "--backend", backend, "--steps", "10"], root)
    out = root / "demo_output"
    assert (out / "samples" / "000.png").is_file()
    prior = out / "prior-finetuned"
    assert (prior / "checkpoint-10").is_dir() and (prior / "model_index.json").is_file()
    # Resume the demo's prior run from its relative output folder, as a user would.
    proc = _run(
        [
            ".venv/bin/python", "scripts/train_text_to_image_prior.py",
            "--train_data_dir", "demo_output/data", "--train_batch_size", "4",
            "--pretrained_prior_model_name_or_path", "demo_output/pretrained/prior",
            "--pretrained_decoder_model_name_or_path", "demo_output/pretrained/decoder",
            "--output_dir", "demo_output/prior-finetuned", "--backend", backend,
            "--resume_from_checkpoint", "latest", "--max_train_steps", "12",
            "--checkpointing_steps", "2", "--seed", "0",
        ],
        root,
    )  # fmt: skip
    assert "at update 10" in proc.stdout
    assert json.loads((prior / "train_summary.json").read_text())["updates"] == 12
    assert (prior / "checkpoint-12").is_dir()


def _readme_folders(root: Path, tiny_folders, sample_dataset) -> Path:
    """The checkout, holding what the README's commands name: the model folders and DATASET_DIR."""
    prior, decoder = tiny_folders
    (root / "kandinsky-2-2-prior").symlink_to(prior)
    (root / "kandinsky-2-2-decoder").symlink_to(decoder)
    (root / "DATASET_DIR").symlink_to(sample_dataset)
    return root


# Appended to both training commands: the last value of a flag wins.
SMALL = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--resolution", "64"]
SMALL += ["--validation_steps", "2"]


@pytest.mark.parametrize("backend", ["flax", "torch"])
def test_usage_export_and_generate_commands_as_printed(
    backend, tmp_path, tiny_folders, sample_dataset
):
    home = _readme_folders(_clean_copy(tmp_path / "kandinsky"), tiny_folders, sample_dataset)
    train = _commands("## Usage", "python scripts/train_text_to_image_")
    assert [w[1] for w in train] == [
        "scripts/train_text_to_image_prior.py",
        "scripts/train_text_to_image_decoder.py",
    ]
    outputs = {}
    for words in train:
        stage = "prior" if "prior" in words[1] else "decoder"
        words = [*words, "--backend", backend, *SMALL]
        _run(words, home)
        out = next(w.split("=", 1)[1] for w in words if w.startswith("--output_dir="))
        assert (home / out / "model_index.json").is_file()
        assert (home / out / "checkpoint-2").is_dir()
        outputs[stage] = out

    (export,) = _commands("## Usage", "python scripts/export_checkpoint.py")
    export = [
        w.replace("OUT/checkpoint-500", f"{outputs['decoder']}/checkpoint-2").replace(
            "OUT-500", "decoder-2"
        )
        for w in export
    ]
    _run(export, home)
    assert (home / "decoder-2" / "unet" / "config.json").is_file()

    generate = _commands("## Usage", "python scripts/generate.py")
    assert len(generate) == 2
    for words in generate:
        words = [w.replace("checkpoint-500", "checkpoint-2") for w in words]
        if backend == "torch" and "--checkpoint" in words:
            continue  # a flax training checkpoint (the README says so); its export ran above
        words = [*words, "--steps", "2", "--size", "64"]
        if backend == "torch":
            words += ["--backend", "torch"]
        proc = _run(words, home)
        out = words[words.index("--out") + 1]
        assert list((home / out).glob("*.png")), proc.stdout


@pytest.mark.parametrize("backend", ["printed", "flax", "torch"])
def test_lora_commands_and_snippet_as_printed(backend, tmp_path, tiny_folders, sample_dataset):
    """The LoRA section: both training commands as printed (each names its backend), or both
    on one backend (`--backend` appended), then its diffusers snippet, from the user's folder."""
    home = _readme_folders(_clean_copy(tmp_path / "kandinsky"), tiny_folders, sample_dataset)
    train = _commands("## LoRA", "python scripts/train_text_to_image_lora_")
    assert [w[1] for w in train] == [
        "scripts/train_text_to_image_lora_decoder.py",
        "scripts/train_text_to_image_lora_prior.py",
    ]
    assert {w[w.index("--backend") + 1] for w in train} == {"flax", "torch"}
    small = [*SMALL, "--num_validation_images", "1"]
    if backend != "printed":
        small += ["--backend", backend]
    for words in train:
        _run([*words, *small], home)
        out = next(w.split("=", 1)[1] for w in words if w.startswith("--output_dir="))
        assert (home / out / "pytorch_lora_weights.safetensors").is_file()
        assert list((home / out / "validation").glob("*.png"))
    section = README.split("\n## LoRA\n", 1)[1].split("\n## ", 1)[0]
    (snippet,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    program = "from diffusers import AutoPipelineForText2Image\n" + snippet
    program += "assert pipe.unet.peft_config and pipe.prior_prior.peft_config\n"
    _run(["python", "-c", program], home)


def test_dreambooth_command_as_printed(tmp_path, tiny_folders, sample_dataset):
    home = _readme_folders(_clean_copy(tmp_path / "kandinsky"), tiny_folders, sample_dataset)
    (home / "dog").mkdir()
    for f in sorted(sample_dataset.glob("*.png"))[:3]:
        shutil.copy(f, home / "dog" / f.name)
    (words,) = _commands("## DreamBooth", "python scripts/")
    small = [*SMALL, "--num_class_images", "2", "--class_image_steps", "2"]
    _run([*words, *small], home)
    assert len(list((home / "dog-class").glob("*.png"))) == 2
    assert (home / "dog-decoder-lora" / "pytorch_lora_weights.safetensors").is_file()


def test_pod_command_as_printed_on_a_bucket(gcs, tmp_path, tiny_folders, sample_dataset):
    """The README's TPU pod line, run on one host: its python command as printed (the venv of a
    clean copy), the bucket on the GCS emulator; run, then run again (it resumes latest), and
    the bucket holds the checkpoints, the cache, the exported folder and the logs."""
    import fsspec
    from etils import epath

    from kandinsky_common.storage import files_under

    home = _readme_folders(_clean_copy(tmp_path / "kandinsky"), tiny_folders, sample_dataset)
    (ssh,) = _commands("## Usage", "gcloud compute tpus tpu-vm ssh")
    remote = next(w.split("=", 1)[1] for w in ssh if w.startswith("--command="))
    cd, command = remote.split(" && ", 1)
    assert cd == "cd kandinsky"
    words = shlex.split(command)
    assert words[:2] == [".venv/bin/python", "scripts/train_text_to_image_decoder.py"]
    out = next(w.split("=", 1)[1] for w in words if w.startswith("--output_dir="))
    cache = next(w.split("=", 1)[1] for w in words if w.startswith("--embeddings_cache="))
    bucket = out.split("/")[2]
    fs = fsspec.filesystem("gs")
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    _run(
        [*words, "--max_train_steps", "2", "--checkpointing_steps", "1", "--resolution", "64"], home
    )
    proc = _run([*words, "--max_train_steps", "3", "--resolution", "64"], home)
    assert f"resumed from {out}/checkpoint-2 at update 2" in proc.stdout
    root = epath.Path(out)
    assert (root / "unet" / "config.json").is_file() and (root / "model_index.json").is_file()
    assert [p.name for p in sorted(root.glob("checkpoint-*"))] == [
        "checkpoint-1",
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert (epath.Path(cache) / "manifest.json").is_file()
    assert any("events.out.tfevents." in f for f in files_under(f"{out}/logs"))
