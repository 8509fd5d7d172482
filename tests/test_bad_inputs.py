"""User mistakes: one `error:` line naming the problem and the fix, exit 2, nothing written."""

from __future__ import annotations

import shutil

import pytest

from kandinsky_common.cli import main
from tests.helpers import run_script, train_args


def _fails(capsys, stage, args, out, *words, clean=True):
    code = main(stage, args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert not any("Traceback" in line for line in err)
    for w in words:
        assert w.lower() in errors[0].lower(), errors[0]
    if clean:
        assert not out.exists(), "output_dir must not be created by a failed start"
    return errors[0]


@pytest.fixture
def base(tiny_folders, sample_dataset, tmp_path):
    prior, decoder = tiny_folders
    out = tmp_path / "out"

    def make(**flags):
        return train_args(prior, decoder, sample_dataset, out, **flags)

    return make, out


def test_missing_dataset_path(capsys, base, tmp_path):
    make, out = base
    _fails(capsys, "prior", make(train_data_dir=tmp_path / "nope"), out, "nope")


def test_no_dataset_given(capsys, base):
    make, out = base
    _fails(capsys, "decoder", make(train_data_dir=None), out, "--train_data_dir")


def test_wrong_caption_column(capsys, base):
    make, out = base
    _fails(capsys, "prior", make(caption_column="caption"), out, "caption", "text")


def test_wrong_image_column(capsys, base):
    make, out = base
    _fails(capsys, "decoder", make(image_column="picture"), out, "picture")


def test_hub_dataset_name_offline(capsys, base):
    make, out = base
    args = make(train_data_dir=None, dataset_name="lambdalabs/naruto-blip-captions")
    _fails(capsys, "prior", args, out, "hub")


def test_hub_model_name_offline(capsys, base):
    make, out = base
    args = make(pretrained_prior_model_name_or_path="kandinsky-community/kandinsky-2-2-prior")
    _fails(capsys, "prior", args, out, "hub", "local folder")


def test_prior_folder_passed_as_decoder(capsys, base, tiny_folders):
    make, out = base
    args = make(pretrained_decoder_model_name_or_path=tiny_folders[0])
    _fails(capsys, "decoder", args, out, "prior folder", "--pretrained_decoder_model_name_or_path")


def test_resolution_not_multiple_of_64(capsys, base):
    make, out = base
    _fails(capsys, "decoder", make(resolution=100), out, "multiple of 64")


def test_unknown_lr_scheduler(capsys, base):
    make, out = base
    _fails(capsys, "prior", make(lr_scheduler="warmup_cosine"), out, "lr_scheduler")


def test_piecewise_without_rules(capsys, base):
    make, out = base
    _fails(capsys, "prior", make(lr_scheduler="piecewise_constant"), out, "--lr_step_rules")


def test_fp16_without_gpu(capsys, base):
    make, out = base
    _fails(capsys, "decoder", make(mixed_precision="fp16"), out, "fp16", "bf16")


def test_8bit_adam_without_bitsandbytes(capsys, base):
    pytest.importorskip("torch")
    make, out = base
    _fails(capsys, "prior", make(use_8bit_adam=True), out, "bitsandbytes")


def test_xformers_missing(capsys, base):
    make, out = base
    flag = {"enable_xformers_memory_efficient_attention": True}
    _fails(capsys, "decoder", make(**flag), out, "xformers")


def test_push_to_hub_offline(capsys, base, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    make, out = base
    _fails(capsys, "prior", make(push_to_hub=True), out, "hub")


def test_output_dir_is_a_file(capsys, base, tmp_path):
    make, _ = base
    f = tmp_path / "file"
    f.write_text("x")
    code = main("prior", make(output_dir=f))
    assert code == 2 and "is a file" in capsys.readouterr().err
    assert f.read_text() == "x"


def test_resume_from_missing_checkpoint(capsys, base):
    make, out = base
    _fails(capsys, "prior", make(resume_from_checkpoint="checkpoint-7"), out, "checkpoint-7")


def test_corrupt_image_names_the_file(capsys, base, sample_dataset, tmp_path):
    make, out = base
    data = tmp_path / "data"
    shutil.copytree(sample_dataset, data)
    victim = sorted(data.glob("*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:300])  # truncated JPEG
    # Found by the load-time check of each file's header and end marker, before anything runs.
    args = make(train_data_dir=data, max_train_steps=40, report_to="none")
    _fails(capsys, "decoder", args, out, victim.name)


def test_script_prints_one_line_and_exits_2(tmp_path):
    proc = run_script(
        "train_text_to_image_decoder.py",
        "--train_data_dir",
        tmp_path,
        "--resolution",
        "65",
        "--output_dir",
        tmp_path / "o",
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: --resolution 65")


@pytest.mark.parametrize("backend,framework", [("torch", "torch"), ("flax", "jax")])
def test_backend_not_installed(capsys, base, monkeypatch, backend, framework):
    """An install without the backend's extra: the line names the package and the extra."""
    import sys

    make, out = base
    for name in list(sys.modules):
        if name.startswith(f"{backend}_kandinsky"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, framework, None)  # `import jax` now fails as if absent
    error = _fails(capsys, "prior", make(backend=backend), out, framework)
    assert f"pip install -e .[{backend}]" in error
