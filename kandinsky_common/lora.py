"""LoRA, framework-free: the settings a run trains with and the adapter file both backends write.

The file is what diffusers loads with `pipe.unet.load_lora_adapter(folder, prefix="unet")` (or
`pipe.prior.load_lora_adapter(folder, prefix="prior")`): `pytorch_lora_weights.safetensors` with
PEFT key names, `<prefix>.<module>.lora_A.weight` (rank, in) and `.lora_B.weight` (out, rank),
and the PEFT `LoraConfig` as JSON metadata under the same prefix, so a loader needs no guessing
of rank or alpha.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from kandinsky_common.errors import UserError
from kandinsky_common.stage_spec import StageSpec

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class LoraSettings:
    """A LoRA adapter on the attention projections of the trained network.

    Parameters:
        rank: the inner dimension r of each B @ A update.
        alpha: the update is scaled by alpha / rank (PEFT's lora_alpha).
        targets: PEFT target-module suffixes (`StageSpec.lora_targets`).
        prefix: the key prefix of the adapter file, the pipeline attribute of the network
            ("prior" or "unet").
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    prefix: str

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def peft_config(self) -> dict:
        """The keyword arguments of peft.LoraConfig (what diffusers rebuilds from the file);
        A ~ N(0, 1/r) and B = 0 at the start, as diffusers' LoRA scripts initialise."""
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": list(self.targets),
            "lora_dropout": 0.0,
            "init_lora_weights": "gaussian",
        }

    @classmethod
    def from_config(cls, cfg, spec: StageSpec) -> LoraSettings | None:
        """The settings of a LoRA script's flags (`rank`, `lora_alpha`); None for a full
        fine-tune's TrainConfig."""
        rank = getattr(cfg, "rank", None)
        if rank is None:
            return None
        alpha = cfg.lora_alpha if cfg.lora_alpha is not None else float(rank)
        return cls(int(rank), float(alpha), spec.lora_targets, spec.model_subfolder)


def module_keys(module: str) -> tuple[str, str]:
    """The file keys of one adapted module's A and B, without prefix."""
    return module + A_SUFFIX, module + B_SUFFIX


def check_fits(tensors: dict[str, np.ndarray], wanted: dict[str, tuple[int, ...]]) -> None:
    """The adapter `tensors` (file layout) fit a network whose adapter has these shapes: no
    unknown key, none missing, every shape equal; else a UserError naming the first ones."""
    unused = sorted(tensors.keys() - wanted.keys())
    missing = sorted(wanted.keys() - tensors.keys())
    if unused or missing:
        raise UserError(
            f"the adapter does not fit this network: {len(unused)} unknown keys "
            f"({', '.join(unused[:3])}), {len(missing)} missing ({', '.join(missing[:3])}); "
            "pass the adapter of this model and stage"
        )
    for key, shape in wanted.items():
        if tuple(tensors[key].shape) != tuple(shape):
            raise UserError(
                f"adapter key {key} has shape {tuple(tensors[key].shape)}, this network needs "
                f"{tuple(shape)} (another --rank or model size?)"
            )


def initial_adapter(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    """A fresh adapter for modules of these file-layout shapes: A ~ N(0, 1/r) and B = 0 (PEFT's
    "gaussian" init, as diffusers' LoRA scripts), drawn from one numpy stream in key order, so
    that both backends start a run of the same --seed from the same adapter."""
    rng = np.random.default_rng([seed, 0x10A])
    out = {}
    for key in sorted(shapes):
        shape = tuple(shapes[key])
        if key.endswith(A_SUFFIX):  # (rank, in)
            out[key] = (rng.standard_normal(shape) / shape[0]).astype(np.float32)
        else:
            out[key] = np.zeros(shape, np.float32)
    return out


def write_adapter(folder: str | os.PathLike, tensors: dict[str, np.ndarray], lora: LoraSettings):
    """Write `tensors` (unprefixed PEFT keys -> float32 arrays) as the adapter file of `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefixed = {
        f"{lora.prefix}.{k}": np.ascontiguousarray(v, np.float32) for k, v in tensors.items()
    }
    config = {f"{lora.prefix}.{k}": v for k, v in lora.peft_config().items()}
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    path = folder / ADAPTER_FILE
    save_file(prefixed, str(path), metadata=metadata)
    return path


def read_adapter(folder: str | os.PathLike, prefix: str) -> tuple[dict[str, np.ndarray], dict]:
    """(tensors with the prefix removed, the LoraConfig keywords) of an adapter file; a file
    that is missing, unreadable or holds no `prefix` keys is a UserError that says which."""
    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise UserError(
            f"{folder} holds no LoRA adapter ({ADAPTER_FILE}); pass the output_dir of a LoRA run"
        )
    try:
        with safe_open(str(path), framework="np") as f:
            raw = f.metadata() or {}
            tensors = {
                k.removeprefix(prefix + "."): f.get_tensor(k)
                for k in f.keys()
                if k.startswith(prefix + ".")
            }
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is unreadable ({e}); write it again") from e
    if not tensors:
        raise UserError(f"{path} holds no '{prefix}.' weights: it is an adapter of another network")
    config = json.loads(raw.get(METADATA_KEY, "{}"))
    config = {k.removeprefix(prefix + "."): v for k, v in config.items() if k.startswith(prefix)}
    return tensors, config


def settings_of_file(config: dict, prefix: str, spec: StageSpec) -> LoraSettings:
    """The LoraSettings an adapter file was written with (its metadata)."""
    if "r" not in config:
        raise UserError(f"the adapter file has no LoRA config in its metadata ({METADATA_KEY})")
    targets = config.get("target_modules") or spec.lora_targets
    return LoraSettings(
        int(config["r"]), float(config.get("lora_alpha", config["r"])), tuple(targets), prefix
    )
