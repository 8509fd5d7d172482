"""LoRA runs as users make them: the diffusers README's LoRA commands pasted with --backend added,
outputs that current diffusers loads, checkpoints that hold the adapter only and resume exactly,
exports of a LoRA checkpoint, generate with adapters, and every refusal as one line."""

from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
import torch
from diffusers import KandinskyV22Pipeline, UNet2DConditionModel
from safetensors.numpy import load_file

from kandinsky_common.flags import parse_config
from kandinsky_common.lora import ADAPTER_FILE, read_adapter
from tests.helpers import run_script, train_args

BOTH = ["flax", "torch"]

# examples/kandinsky2_2/text_to_image/README.md of diffusers ("Training with LoRA"), as printed.
REFERENCE = {
    "decoder": """accelerate launch --mixed_precision="fp16" train_text_to_image_decoder_lora.py \\
  --dataset_name=$DATASET_NAME --caption_column="text" \\
  --resolution=768 \\
  --train_batch_size=1 \\
  --num_train_epochs=100 --checkpointing_steps=5000 \\
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0 \\
  --seed=42 \\
  --rank=4 \\
  --gradient_checkpointing \\
  --output_dir="kandi22-decoder-pokemon-lora" \\
  --validation_prompt="cute dragon creature" --report_to="wandb" \\
  --push_to_hub \\""",
    "prior": """accelerate launch --mixed_precision="fp16" train_text_to_image_prior_lora.py \\
  --dataset_name=$DATASET_NAME --caption_column="text" \\
  --resolution=768 \\
  --train_batch_size=1 \\
  --num_train_epochs=100 --checkpointing_steps=5000 \\
  --learning_rate=1e-04 --lr_scheduler="constant" --lr_warmup_steps=0 \\
  --seed=42 \\
  --rank=4 \\
  --output_dir="kandi22-prior-pokemon-lora" \\
  --validation_prompt="cute dragon creature" --report_to="wandb" \\
  --push_to_hub \\""",
}
# What this machine cannot do (no hub, no wandb, no GPU for fp16) and the sizes, turned down by
# flags appended after the pasted command (the last value of a flag wins).
OFFLINE = ["--report_to", "none", "--push_to_hub", "false"]
SMALL = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--resolution", "64"]
SMALL += ["--validation_steps", "2", "--num_validation_images", "1"]


def _pasted(stage: str, data, prior, decoder) -> tuple[list[str], str]:
    """The reference command as a user runs it here: `accelerate launch --mixed_precision=...`
    becomes python (fp16 is the launcher's, for GPUs), $DATASET_NAME a local folder, and the
    models local folders (the scripts' defaults are hub names). The printed command ends in a
    line continuation followed by nothing, which the shell ignores."""
    text = REFERENCE[stage].replace("\\\n", " ").rstrip(" \\").replace("$DATASET_NAME", str(data))
    words = shlex.split(text)
    assert words[:3] == ["accelerate", "launch", "--mixed_precision=fp16"]
    return [
        *words[4:],
        f"--pretrained_prior_model_name_or_path={prior}",
        f"--pretrained_decoder_model_name_or_path={decoder}",
    ], words[3]


@pytest.mark.parametrize("stage,backend", [("decoder", "flax"), ("prior", "torch")])
def test_reference_lora_commands_run_with_backend_added(
    stage, backend, tiny_folders, sample_dataset, tmp_path
):
    prior, decoder = tiny_folders
    args, script = _pasted(stage, sample_dataset, prior, decoder)
    run_script(script, *args, "--backend", backend, *OFFLINE, *SMALL, cwd=tmp_path)
    out = tmp_path / f"kandi22-{stage}-pokemon-lora"
    assert (out / ADAPTER_FILE).is_file() and (out / "checkpoint-2").is_dir()
    assert list((out / "validation").glob("*.png"))


def _unet_output(unet, seed=0):
    rng = np.random.default_rng(seed)
    c = unet.config
    x = torch.from_numpy(rng.standard_normal((2, c.in_channels, 8, 8), dtype=np.float32))
    e = torch.from_numpy(rng.standard_normal((2, c.encoder_hid_dim), dtype=np.float32))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), None, added_cond_kwargs={"image_embeds": e}).sample


@pytest.mark.parametrize("backend", BOTH)
def test_decoder_adapter_and_merged_folder_load_in_diffusers(
    backend, tiny_folders, sample_dataset, tmp_path
):
    prior, decoder = tiny_folders
    out = tmp_path / "lora"  # relative paths and resumes are covered by the tests below
    args = train_args(prior, decoder, sample_dataset, out, backend=backend, rank=4, merge_lora=True)
    run_script("train_text_to_image_lora_decoder.py", *args, "--mixed_precision", "bf16")
    pipe = KandinskyV22Pipeline.from_pretrained(decoder)
    base = _unet_output(pipe.unet)
    pipe.unet.load_lora_adapter(str(out), prefix="unet", use_safetensors=True)
    adapted = _unet_output(pipe.unet)
    assert (adapted - base).abs().max() > 1e-4  # the adapter is in and does something
    merged = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert merged.dtype == torch.float32  # exports are fp32 whatever the training precision
    torch.testing.assert_close(_unet_output(merged), adapted, rtol=1e-4, atol=1e-5)
    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()


def _train(backend, stage, tiny_folders, data, out, **flags):
    import importlib

    prior, decoder = tiny_folders
    cfg = parse_config(
        train_args(prior, decoder, data, out, backend=backend, report_to="none", **flags),
        stage,
        lora=True,
    )
    return importlib.import_module(f"{backend}_kandinsky.training.loop").train(cfg, stage)


def _bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("backend", BOTH)
def test_lora_checkpoints_hold_the_adapter_and_resume_exactly(
    backend, tiny_folders, sample_dataset, tmp_path
):
    flags = dict(max_train_steps=4, checkpointing_steps=2, rank=4)
    _train(backend, "decoder", tiny_folders, sample_dataset, tmp_path / "straight", **flags)
    split = tmp_path / "split"
    _train(
        backend, "decoder", tiny_folders, sample_dataset, split, **{**flags, "max_train_steps": 2}
    )
    resumed = _train(
        backend, "decoder", tiny_folders, sample_dataset, split, resume_from_checkpoint="latest",
        **flags,
    )  # fmt: skip
    assert len(resumed["losses"]) == 2  # it went on from update 2
    a, _ = read_adapter(tmp_path / "straight", "unet")
    b, _ = read_adapter(split, "unet")
    assert sorted(a) == sorted(b)
    for k in a:
        # Bit-identical on an AVX-512 CPU. On an AVX2 one (AMD EPYC) flax's resumed decoder run
        # ends up to 5e-9 away from the uninterrupted one in ~10% of the adapter's values (Adam
        # divides the gradients' rounding by their own small size), while two uninterrupted runs
        # agree to the bit. A wrong batch, LR or moment moves values by ~lr = 1e-4 per update.
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)
    # A checkpoint holds the adapter and its optimizer state, not the frozen UNet.
    unet = _bytes(tiny_folders[1] / "unet")
    # Size as a second witness: a full fine-tune's checkpoint holds the UNet and its two Adam
    # moments, three times `unet`. Not tighter: orbax's OCDBT files are compressed, and their
    # size moves with the values and the installed tensorstore (0.5-1.2 MB, or 1.84 MB).
    assert _bytes(split / "checkpoint-4") < unet, (_bytes(split / "checkpoint-4"), unet)
    if backend == "torch":
        keys = load_file(split / "checkpoint-4" / "model.safetensors")
        assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    else:  # every array orbax holds is an adapter's (params, Adam moments) or a counter
        tree = json.loads((split / "checkpoint-4" / "state" / "_METADATA").read_text())
        arrays = [k for k in tree["tree_metadata"] if "'mu'" in k or "'params'" in k]
        assert arrays and all("'lora'" in k for k in arrays), arrays[:5]
    # Its export writes the adapter the run ended with.
    run_script(
        "export_checkpoint.py", "--checkpoint", split / "checkpoint-4", "--output", tmp_path / "x"
    )
    c, config = read_adapter(tmp_path / "x", "unet")
    assert config["r"] == 4 and sorted(c) == sorted(b)
    for k in b:
        np.testing.assert_array_equal(b[k], c[k], err_msg=k)


def _fails(script, *args, cwd=None):
    proc = run_script(script, *args, check=False, **({"cwd": cwd} if cwd else {}))
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_lora_flag_mistakes_are_one_line(tiny_folders, sample_dataset, tmp_path):
    prior, decoder = tiny_folders
    args = train_args(prior, decoder, sample_dataset, tmp_path / "o")
    script = "train_text_to_image_lora_prior.py"
    assert "--use_ema is not a flag of the LoRA scripts" in _fails(script, *args, "--use_ema")
    both = ["--validation_prompt", "a", "--validation_prompts", "b"]
    assert "not both" in _fails(script, *args, *both)
    assert "--rank must be positive" in _fails(script, *args, "--rank", "0")


@pytest.mark.parametrize("backend", BOTH)
def test_resume_across_lora_and_full_is_refused_with_the_script_to_use(
    backend, tiny_folders, sample_dataset, tmp_path
):
    prior, decoder = tiny_folders
    out = tmp_path / "o"
    args = train_args(prior, decoder, sample_dataset, out, backend=backend, max_train_steps=2)
    run_script("train_text_to_image_lora_prior.py", *args)
    resume = [*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    line = _fails("train_text_to_image_prior.py", *resume)
    assert "is a LoRA run's checkpoint (rank 4)" in line, line
    assert "train_text_to_image_lora_prior.py" in line and "damaged" not in line
    line = _fails("train_text_to_image_lora_prior.py", *resume, "--rank", "8")
    assert "--rank 4" in line, line
    full = tmp_path / "full"
    args = train_args(prior, decoder, sample_dataset, full, backend=backend, max_train_steps=2)
    run_script("train_text_to_image_prior.py", *args)
    resume = [*args, "--resume_from_checkpoint", "latest", "--max_train_steps", "4"]
    line = _fails("train_text_to_image_lora_prior.py", *resume)
    assert "is a full fine-tune's checkpoint" in line and "train_text_to_image_prior.py" in line


def test_generate_with_adapters_on_both_backends(tiny_folders, sample_dataset, tmp_path):
    """A prior and a decoder adapter from a run each, drawn by generate.py on both backends from
    relative paths; a wrong adapter folder is one line."""
    prior, decoder = tiny_folders
    for stage in ("prior", "decoder"):
        args = train_args(prior, decoder, sample_dataset, f"{stage}-lora", max_train_steps=2)
        run_script(f"train_text_to_image_lora_{stage}.py", *args, cwd=tmp_path)
    common = ["--prior", prior, "--decoder", decoder, "--prompt", "a cat", "--size", "64"]
    common += ["--steps", "2", "--prior_lora", "prior-lora", "--decoder_lora", "decoder-lora"]
    for backend in BOTH:
        proc = run_script(
            "generate.py", *common, "--out", f"img-{backend}", "--backend", backend, cwd=tmp_path
        )
        assert re.search(r"img-\w+/000.png", proc.stdout), proc.stdout
    swapped = [w if w != "decoder-lora" else "prior-lora" for w in common]
    line = _fails("generate.py", *swapped, "--out", "x", cwd=tmp_path)
    assert "holds no 'unet.' weights" in line, line
    line = _fails("generate.py", *common[:-1], "nowhere", "--out", "x", cwd=tmp_path)
    assert "--decoder_lora nowhere is not a folder" in line, line


def test_an_adapter_that_does_not_fit_is_refused_on_both_backends(tiny_folders):
    from diffusers import PriorTransformer

    from flax_kandinsky import lora as flora
    from flax_kandinsky.models.prior import load_prior
    from kandinsky_common.errors import UserError
    from kandinsky_common.lora import LoraSettings
    from kandinsky_common.stage_spec import PRIOR
    from torch_kandinsky import lora as tlora

    lora = LoraSettings(4, 4.0, PRIOR.lora_targets, "prior")
    flax_net = load_prior(tiny_folders[0] / "prior")[0]
    flora.add_lora(flax_net, lora)
    torch_net = tlora.add_lora(PriorTransformer.from_pretrained(tiny_folders[0] / "prior"), lora)
    good = flora.to_peft(flax_net)
    assert sorted(good) == sorted(tlora.to_peft(torch_net))
    first = sorted(good)[0]
    missing = {k: v for k, v in good.items() if k != first}
    wrong = {**good, first: np.zeros((8, good[first].shape[1]), np.float32)}
    for load, net in ((flora.from_peft, flax_net), (tlora.from_peft, torch_net)):
        with pytest.raises(UserError, match="1 missing"):
            load(net, missing)
        with pytest.raises(UserError, match="another --rank"):
            load(net, wrong)
        with pytest.raises(UserError, match="1 unknown keys"):
            load(net, {**good, "other.lora_A.weight": good[first]})
        load(net, good)
