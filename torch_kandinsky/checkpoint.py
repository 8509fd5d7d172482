"""Resumable checkpoints of the torch backend: accelerate state + model folder + data position.

Crash safety: a checkpoint is written into `.checkpoint-N.tmp` and renamed to `checkpoint-N` once
complete (training_state.json last), so a run killed mid-write never leaves a folder that "latest"
would pick. Checkpoints beyond --checkpoints_total_limit are deleted only once the new one is in
place (the reference deletes first, so a crash during the save could leave none). A write that fails
(a full disk) removes its temporary folder and ends the run with one line.

Damage found when resuming (a truncated or deleted file) is a CheckpointDamaged naming the file;
`resume` with 'latest' then falls back to the previous checkpoint with a warning. A checkpoint whose
shapes do not match the model (other model folder) is a plain UserError: older ones would not fit
either.
"""

from __future__ import annotations

import shutil
import sys
import zipfile
from pathlib import Path

from kandinsky_common import checkpoints as ck
from kandinsky_common.errors import CheckpointDamaged, UserError
from kandinsky_common.lora import LoraSettings, write_adapter
from torch_kandinsky import lora as lora_ops

# accelerate's file names for the first prepared model and optimizer, and registered objects.
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.bin"
CUSTOM_FILE = "custom_checkpoint_{}.pkl"


def _brief(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def _adapter_only(models, weights, output_dir) -> None:
    """accelerate save-state hook of a LoRA run: the model file holds the adapter, not the
    frozen base (which the pretrained folder has)."""
    for i, state in enumerate(weights):
        weights[i] = {k: v for k, v in state.items() if _is_adapter_key(k)}


def _check_files(path: Path, model, num_custom: int, adapter_only: bool = False) -> None:
    """Cheap structural checks that name the damaged file (accelerate's own errors do not)."""
    needed = [MODEL_FILE, OPTIMIZER_FILE] + [CUSTOM_FILE.format(i) for i in range(num_custom)]
    for name in needed:
        if not (path / name).is_file():
            raise CheckpointDamaged(path, f"{name} is missing")
    try:
        from safetensors import safe_open

        with safe_open(str(path / MODEL_FILE), framework="pt") as f:
            saved = {k.removeprefix("module."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointDamaged(path, f"{MODEL_FILE} is unreadable: {_brief(e)}") from e
    for name in needed[1:]:
        try:  # torch.save writes zip archives: a truncated one has no central directory
            zipfile.ZipFile(path / name).close()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointDamaged(path, f"{name} is truncated or corrupt: {_brief(e)}") from e
    wanted = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if adapter_only:
        wanted = {k: v for k, v in wanted.items() if _is_adapter_key(k)}
    common = wanted.keys() & saved.keys()
    wrong = [k for k in sorted(common) if wanted[k] != saved[k]]
    missing = sorted(wanted.keys() - saved.keys()) if adapter_only else []
    if not common or wrong or missing:
        if wrong:
            detail = f"{wrong[0]} has shape {saved[wrong[0]]} there, {wanted[wrong[0]]} here"
        elif missing:
            detail = f"it has no {missing[0]}: not a LoRA checkpoint of these targets"
        else:
            detail = "no parameter names in common"
        raise UserError(
            f"checkpoint {path} does not fit this run's model ({detail}): resume with the model "
            "folder and flags it was written with, or use another --output_dir"
        )


class CheckpointStore:
    """The torch run's checkpoints in `output_dir`: crash-safe writes, pruning to `max_to_keep`,
    restores that name the damaged file, and 'latest' falling back past damaged ones.

    Mirrors flax_kandinsky.checkpoint.CheckpointStore.

    Parameters:
        accelerator: the run's Accelerator (every process calls save and restore together).
        output_dir: the run's output folder (checkpoint-N folders inside).
        max_to_keep: --checkpoints_total_limit (None keeps all).
        model_subfolder: where the trained network's diffusers folder goes ("prior" or "unet").
        lora: a LoRA run's adapter settings: checkpoints then hold the adapter (accelerate's
            model file, and the adapter file as the export writes it), not the frozen base.
    """

    def __init__(
        self,
        accelerator,
        output_dir,
        max_to_keep: int | None,
        model_subfolder: str,
        lora: LoraSettings | None = None,
    ):
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.max_to_keep = max_to_keep
        self.model_subfolder = model_subfolder
        self.lora = lora
        if lora is not None:
            accelerator.register_save_state_pre_hook(_adapter_only)

    def path(self, step: int) -> Path:
        return ck.checkpoint_dir(self.output_dir, step)

    def steps(self) -> list[int]:
        return [step for step, _ in ck.complete_checkpoints(self.output_dir, "torch")]

    def save(self, step: int, model, meta: dict, ema=None) -> Path:
        """Every process calls this (accelerate writes per-process RNG files); main renames."""
        acc, out = self.accelerator, self.output_dir
        tmp = ck.temp_dir(out, step)
        final = self.path(step)
        if acc.is_main_process:
            # Saves of one run are sequential: any temporary folder now is a killed run's leftover.
            for stale in ck.stale_temp_dirs(out):
                shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        try:
            acc.save_state(str(tmp), safe_serialization=True)
            if acc.is_main_process:
                if self.lora is not None:  # the adapter, as the export writes it
                    write_adapter(tmp, lora_ops.to_peft(acc.unwrap_model(model)), self.lora)
                else:
                    acc.unwrap_model(model).save_pretrained(tmp / self.model_subfolder)
                if ema is not None:  # as the reference: <model>_ema/, loadable by from_pretrained
                    ema.save_pretrained(str(tmp / f"{self.model_subfolder}_ema"))
                ck.write_state(tmp, meta)
        except Exception as e:  # a full disk shows as OSError, or as RuntimeError from torch.save
            error = ck.write_failed(final, e, "torch")
            shutil.rmtree(tmp, ignore_errors=True)  # never a checkpoint; give the space back
            raise error from e
        if acc.is_main_process:
            ck.finalize(tmp, final)
            ck.prune(out, self.max_to_keep, keep_room_for_one=False)
        acc.wait_for_everyone()
        return final

    def restore(self, path: str | Path, model=None) -> dict:
        """Restore the accelerate state of `path` into the prepared objects; returns its JSON state.

        Raises CheckpointDamaged for a missing, truncated or unloadable file.
        """
        path = Path(path)
        try:
            state = ck.read_state(path)
        except UserError as e:
            raise CheckpointDamaged(path, f"{ck.STATE_FILE} is unreadable") from e
        if model is not None:
            _check_files(
                path,
                self.accelerator.unwrap_model(model),
                len(self.accelerator._custom_objects),
                adapter_only=self.lora is not None,
            )
        try:
            # A LoRA checkpoint holds the adapter only; _check_files made sure it holds all of it.
            self.accelerator.load_state(str(path), strict=self.lora is None)
        except MemoryError:
            raise  # not the checkpoint's fault
        except Exception as e:
            raise CheckpointDamaged(path, f"accelerate cannot load it: {_brief(e)}") from e
        return state

    def _warn(self, message: str) -> None:
        if self.accelerator.is_main_process:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def resume(self, plan, model, requested: str | None) -> dict | None:
        """Load the checkpoint the run resumes from: its JSON state, or None for a fresh start.

        An explicit checkpoint must load. 'latest' takes the newest complete checkpoint that loads,
        warning about each damaged one it passes over, and points `plan.resume`/`plan.resumed_state`
        at the one used (the data position follows it). If all are damaged, that is an error, not a
        silent fresh start.
        """
        if plan.resume is None:
            return None
        if requested != "latest":
            return self.restore(plan.resume, model)
        found = [p for _, p in reversed(ck.complete_checkpoints(plan.resume.parent, "torch"))]
        damaged = []
        for i, path in enumerate(found):
            try:
                state = self.restore(path, model)
            except CheckpointDamaged as e:
                damaged.append(e)
                fallback = found[i + 1].name if i + 1 < len(found) else "nothing older"
                self._warn(f"{path.name} is damaged ({e.damage}); trying {fallback}")
                continue
            ck.check_compatible(state, stage=plan.spec.name, backend="torch", path=path)
            plan.resume, plan.resumed_state = path, state
            return state
        raise UserError(
            f"every checkpoint in {plan.resume.parent} is damaged ("
            + "; ".join(f"{e.path.name}: {e.damage}" for e in damaged)
            + "); delete them to start over, or use another --output_dir"
        )
