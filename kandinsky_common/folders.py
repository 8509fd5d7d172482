"""Diffusers/transformers folder IO, framework-free: configs, safetensors as numpy, layout checks.

A *prior folder* is a KandinskyV22PriorPipeline folder (prior/, text_encoder/, image_encoder/,
tokenizer/, image_processor/, scheduler/); a *decoder folder* is a KandinskyV22Pipeline folder
(unet/, movq/, scheduler/). Both are what `save_pretrained` writes and what the hub repos
kandinsky-community/kandinsky-2-2-prior and -decoder hold.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from kandinsky_common.errors import UserError
from kandinsky_common.storage import is_url, location

# what each kind of Kandinsky 2.2 pipeline folder must hold
SUBFOLDERS = {
    "prior": ("prior", "text_encoder", "image_encoder", "tokenizer", "scheduler"),
    "decoder": ("unet", "movq", "scheduler"),
}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
HUB_HINT = (
    "this machine has no access to the Hugging Face hub; download the repo elsewhere "
    "(e.g. `hf download {name} --local-dir DIR`) and pass the local folder"
)


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from e


def user_path(path: str | os.PathLike) -> str:
    """A path as the user typed it (relative, `~`, spaces, symlinks kept), made absolute once:
    also the argparse `type` of every path option of the scripts. A URL (gs://...) is kept."""
    if is_url(path):
        return str(path).rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def write_json(path: str | os.PathLike, data: dict) -> None:
    location(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_config(folder: str | os.PathLike) -> dict:
    """config.json of a model subfolder, or scheduler_config.json of a scheduler subfolder."""
    folder = Path(folder)
    for name in ("config.json", "scheduler_config.json", "preprocessor_config.json"):
        if (folder / name).is_file():
            return read_json(folder / name)
    raise UserError(f"{folder} has no config.json; is it a diffusers/transformers model folder?")


def weights_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise UserError(
        f"{folder} holds no safetensors weights ({' or '.join(WEIGHT_FILES)}); "
        "re-save the model with save_pretrained(safe_serialization=True)"
    )


def load_weights(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a model folder's safetensors file, as numpy arrays keyed by torch names."""
    path = weights_path(folder)
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise UserError(f"{path} is unreadable ({e}); the file is damaged, fetch it again") from e


def save_weights(
    folder: str | os.PathLike,
    tensors: dict[str, np.ndarray],
    filename: str = "diffusion_pytorch_model.safetensors",
) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    save_file(arrays, str(folder / filename), metadata={"format": "pt"})
    return folder / filename


def resolve_model_path(name_or_path: str, what: str) -> Path:
    """A local folder for a --pretrained_* flag; a hub name fails with the offline message."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what} {name_or_path!r} is a file, not a model folder")
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local:
        raise UserError(f"{what} folder {name_or_path!r} does not exist")
    hint = HUB_HINT.format(name=name_or_path)
    raise UserError(f"{what} {name_or_path!r} is not a local folder; {hint}")


def _kind_of(folder: Path) -> str | None:
    index = folder / "model_index.json"
    if index.is_file():
        cls = read_json(index).get("_class_name", "")
        if "Prior" in cls:
            return "prior"
        if cls:
            return "decoder"
    if (folder / "prior").is_dir():
        return "prior"
    if (folder / "unet").is_dir():
        return "decoder"
    return None


def check_pipeline_folder(name_or_path: str, kind: str, flag: str) -> Path:
    """Resolve and check a prior or decoder pipeline folder, naming the flag in any error."""
    folder = resolve_model_path(name_or_path, flag)
    found = _kind_of(folder)
    if found is not None and found != kind:
        raise UserError(
            f"{flag} {str(folder)!r} is a Kandinsky {found} folder, not a {kind} folder; "
            f"pass the {kind} folder (e.g. kandinsky-2-2-{kind}) here"
        )
    missing = [s for s in SUBFOLDERS[kind] if not (folder / s).is_dir()]
    if missing:
        raise UserError(
            f"{flag} {str(folder)!r} lacks the subfolder(s) {', '.join(missing)} of a "
            f"Kandinsky 2.2 {kind} folder; pass a complete kandinsky-2-2-{kind} folder"
        )
    return folder


def write_decoder_readme(folder: str | os.PathLike, prior: str, base_model: str) -> None:
    """README.md front matter that lets AutoPipelineForText2Image build the combined pipeline."""
    text = (
        "---\n"
        "license: creativeml-openrail-m\n"
        f"base_model: {base_model}\n"
        "prior:\n"
        f"- {prior}\n"
        "tags:\n- kandinsky\n- text-to-image\n- diffusers\n- diffusers-training\n"
        "inference: true\n"
        "---\n\n"
        f"# Kandinsky 2.2 decoder fine-tuned from {base_model}\n\n"
        f"Use it with the prior at `{prior}`.\n"
    )
    Path(folder, "README.md").write_text(text)
