#!/usr/bin/env python
"""Generate images from a Kandinsky 2.2 prior folder and decoder folder (diffusers layout).

python scripts/generate.py --prior PRIOR_DIR --decoder DECODER_DIR --prompt "a cat" --out DIR
(--backend flax, the default, samples with JAX; --backend torch with diffusers' pipelines.)
Prior 25 steps and guidance 4, decoder guidance 4, as diffusers' combined pipeline.
"""

import argparse
import contextlib
import re
import shlex
import sys
from pathlib import Path

from kandinsky_common.errors import UserError, run_cli
from kandinsky_common.preemption import sigint_deferred


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The docstring as written, and every option's default (except required ones and None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def check_checkpoint(a) -> None:
    """--checkpoint reads flax training checkpoints with the flax backend only; anything else gets
    the one route that works for both: export the checkpoint, sample the exported folder."""
    from kandinsky_common.checkpoints import checkpoint_backend, read_state
    from kandinsky_common.stage_spec import SPECS
    from kandinsky_common.storage import location

    path = location(a.checkpoint)
    written_by = checkpoint_backend(path) if path.is_dir() else None
    if a.backend == "flax" and written_by != "torch":
        return  # a flax checkpoint, or the flax loader names what is wrong with the folder
    stage = read_state(path).get("stage") if written_by else None
    folder = f"--{stage}" if stage in SPECS else "--prior or --decoder"
    m = re.fullmatch(r"checkpoint-(\d+)", path.name)
    out = f"{path.parent}-{m.group(1)}" if m and path.parent.name else "EXPORTED"
    export = Path(__file__).resolve().with_name("export_checkpoint.py")
    if export.is_relative_to(Path.cwd()):
        export = export.relative_to(Path.cwd())
    ck, export, out = (shlex.quote(str(x)) for x in (a.checkpoint, export, out))
    why = (
        f"--backend torch samples pipeline folders, not training checkpoints (--checkpoint {ck})"
        if a.backend == "torch"
        else f"--checkpoint {ck} is a torch training checkpoint (--checkpoint takes flax ones)"
    )
    raise UserError(
        f"{why}: export it with `python {export} --checkpoint {ck} --output {out}` and pass "
        f"{folder} {out} instead (either backend)"
    )


def torch_images(a) -> list:
    from kandinsky_common.folders import check_pipeline_folder

    prior = check_pipeline_folder(a.prior, "prior", "--prior")
    decoder = check_pipeline_folder(a.decoder, "decoder", "--decoder")
    with sigint_deferred():  # a Ctrl-C waits for the import's end (see kandinsky_common.cli)
        from torch_kandinsky.sampling import Sampler

    sampler = Sampler.from_folders(prior, decoder)
    # what a diffusers user types to load a LoRA run's adapter
    if a.prior_lora is not None:
        sampler.prior.prior.load_lora_adapter(a.prior_lora, prefix="prior", use_safetensors=True)
    if a.decoder_lora is not None:
        sampler.decoder.unet.load_lora_adapter(a.decoder_lora, prefix="unet", use_safetensors=True)
    return sampler.generate(
        a.prompt, height=a.size, width=a.size, decoder_steps=a.steps, seed=a.seed
    )


def flax_images(a) -> list:
    from kandinsky_common.folders import check_pipeline_folder

    prior = check_pipeline_folder(a.prior, "prior", "--prior")
    decoder = check_pipeline_folder(a.decoder, "decoder", "--decoder")
    with sigint_deferred():  # jaxlib's initialisation crashes (SIGSEGV) when interrupted
        from flax_kandinsky.sampling import Sampler, memory_failure

    trained = {}
    if a.checkpoint is not None:  # the trained network replaces its twin from --prior/--decoder
        from flax_kandinsky.export import checkpoint_params
        from flax_kandinsky.stages import STAGES

        stage, params = checkpoint_params(a.checkpoint)
        if getattr(a, f"{stage}_lora") is not None:
            raise UserError(
                f"--checkpoint and --{stage}_lora both replace the {stage}; pass one of them"
            )
        trained = {STAGES[stage].params_key: params}
    if a.prior_lora is not None or a.decoder_lora is not None:
        trained.update(flax_lora_params(a, prior, decoder))
    sampler = Sampler.from_folders(prior, decoder, attention=a.attention, **trained)
    try:
        return sampler.generate(
            a.prompt, height=a.size, width=a.size, decoder_steps=a.steps, seed=a.seed
        )
    except Exception as e:
        what = memory_failure(e)
        if what is None:
            raise
        fixes = ["--attention chunked"] if a.attention != "chunked" else []
        fixes.append(f"a smaller --size (e.g. {max(64, a.size // 2 // 64 * 64)})")
        fixes += ["fewer prompts"] if len(a.prompt) > 1 else []
        fixes = " or ".join(fixes) if len(fixes) < 3 else f"{fixes[0]}, {' or '.join(fixes[1:])}"
        raise UserError(
            f"generating {len(a.prompt)} image(s) of {a.size}x{a.size} px ran out of {what}; "
            f"try {fixes}"
        ) from None


def flax_lora_params(a, prior: Path, decoder: Path) -> dict:
    """The Sampler keywords of --prior_lora/--decoder_lora: each network with its adapter folded
    in."""
    from flax_kandinsky.lora import merged_from_file
    from flax_kandinsky.models.prior import load_prior
    from flax_kandinsky.models.unet import load_unet
    from flax_kandinsky.stages import DecoderStage, PriorStage

    out = {}
    if a.prior_lora is not None:
        base = load_prior(prior / "prior")[0]
        out[PriorStage.params_key] = merged_from_file(base, a.prior_lora, PriorStage.spec)
    if a.decoder_lora is not None:
        base = load_unet(decoder / "unet")[0]
        out[DecoderStage.params_key] = merged_from_file(base, a.decoder_lora, DecoderStage.spec)
    return out


def check_lora(a) -> None:
    for flag in ("prior_lora", "decoder_lora"):
        folder = getattr(a, flag)
        if folder is not None and not Path(folder).is_dir():
            raise UserError(f"--{flag} {folder} is not a folder; pass a LoRA run's output_dir")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--backend",
        choices=("flax", "torch"),
        default="flax",
        help="flax: this project's JAX pipelines; torch: diffusers' pipelines",
    )
    p.add_argument("--prior", required=True, help="prior pipeline folder")
    p.add_argument("--decoder", required=True, help="decoder pipeline folder")
    p.add_argument(
        "--checkpoint",
        help="flax training checkpoint (checkpoint-N) whose network (EMA weights if kept) "
        "replaces the prior or the UNet of --prior/--decoder; flax backend only (export a torch "
        "checkpoint with scripts/export_checkpoint.py and pass the folder instead)",
    )
    p.add_argument(
        "--prior_lora",
        help="a LoRA run's output_dir: its adapter (pytorch_lora_weights.safetensors) is added to "
        "the prior of --prior",
    )
    p.add_argument(
        "--decoder_lora",
        help="a LoRA run's output_dir: its adapter is added to the UNet of --decoder",
    )
    p.add_argument("--prompt", nargs="+", required=True, help="one image per prompt")
    p.add_argument("--out", required=True, help="output folder for PNGs (and grid.png)")
    p.add_argument("--size", type=int, default=512, help="height and width in pixels")
    p.add_argument("--steps", type=int, default=50, help="decoder denoising steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the prior's and decoder's noise")
    p.add_argument(
        "--attention",
        choices=("chunked", "dot"),
        default="chunked",
        help="flax: the decoder's attention kernel; 'chunked' equals 'dot' up to 1024 tokens and "
        "bounds the memory of longer ones (on CPU with XLA's low-memory scheduler)",
    )
    p.error = lambda msg: (_ for _ in ()).throw(UserError(f"{msg} (see --help)"))
    a = p.parse_args(argv)
    if a.size < 1 or a.steps < 1:
        raise UserError(f"--size {a.size} and --steps {a.steps} must be positive")
    from kandinsky_common.storage import fetched_folder, is_url, location, staged_folder

    with contextlib.ExitStack() as downloads:
        # folders in a bucket (a pod's exported run) are read from a local copy
        # (orbax reads --checkpoint from the bucket itself; --out is uploaded below)
        for flag, value in list(vars(a).items()):
            if flag not in ("checkpoint", "out") and is_url(value):
                setattr(a, flag, str(downloads.enter_context(fetched_folder(value))))
        if a.checkpoint is not None:
            check_checkpoint(a)
        check_lora(a)
        if a.backend == "torch":
            images = torch_images(a)
        else:
            if a.attention == "chunked":
                with sigint_deferred():
                    from flax_kandinsky.sampling import use_cpu_low_memory_schedule
                use_cpu_low_memory_schedule()
            images = flax_images(a)
    from kandinsky_common.images import save_images

    with staged_folder(a.out) as out:
        written = save_images(images, out)
    for path in written:
        print(location(a.out) / path.name if is_url(a.out) else path)


if __name__ == "__main__":
    sys.exit(run_cli(main))
