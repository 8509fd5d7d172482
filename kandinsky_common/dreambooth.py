"""DreamBooth data, the Kandinsky way: the prior learns `--instance_prompt` -> the CLIP image
embeddings of the `--instance_data_dir` images, the decoder learns to draw those images from
their embeddings. With `--with_prior_preservation`, every batch also holds as many class images
(`--class_data_dir`, captioned `--class_prompt`), generated first by the base model where fewer
than `--num_class_images` exist, and the loss is instance loss + `--prior_loss_weight` x class
loss, as diffusers' train_dreambooth_lora.py computes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import datasets
from tqdm.auto import tqdm

from kandinsky_common.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files directly in `folder`, by name."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def prompt_dataset(
    folder: str | os.PathLike, prompt: str, image_column: str, caption_column: str, limit=None
) -> datasets.Dataset:
    """The images of `folder` (the first `limit`), each captioned `prompt`."""
    files = image_files(folder)[:limit]
    if not files:
        raise UserError(
            f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}); put the images there"
        )
    data = {image_column: [str(f) for f in files], caption_column: [prompt] * len(files)}
    return datasets.Dataset.from_dict(data).cast_column(image_column, datasets.Image())


def _free_names(folder: Path, count: int) -> list[Path]:
    taken = {p.name for p in folder.iterdir()}
    names, i = [], 0
    while len(names) < count:
        name = f"class-{i:05d}.png"
        if name not in taken:
            names.append(folder / name)
        i += 1
    return names


def out_of_memory(cfg, what: str) -> UserError:
    """The line for class images that do not fit in memory while generated."""
    size, batch = cfg.resolution, cfg.sample_batch_size
    fix = f"--sample_batch_size 1 (it is {batch}), or " if batch > 1 else ""
    return UserError(
        f"generating class images at {size}x{size} px ran out of {what}; pass {fix}put "
        f"{cfg.num_class_images} images of {cfg.class_prompt!r} in {cfg.class_data_dir} yourself "
        "(the ones generated so far are kept there)"
    )


def fill_class_images(
    cfg,
    make_generator: Callable[[], Callable[[list[str], int], list]],
    *,
    is_main: bool,
    barrier: Callable[[], None],
    memory_failure: Callable[[BaseException], str | None],
) -> int:
    """Generate the class images `--class_data_dir` lacks (up to `--num_class_images`) on the
    main process, `--sample_batch_size` at a time with a progress bar, each written whole (a
    temporary name, then renamed), so a killed fill keeps what it finished and the next run
    generates only the rest. `make_generator()` (called only when images are missing) returns
    `generate(prompts, seed)` -> PIL images; `memory_failure` (the backend's) names what ran out
    when an error is a failed allocation, which ends the run in one line. Returns how many were
    missing."""
    folder = Path(cfg.class_data_dir)
    missing = cfg.num_class_images - len(image_files(folder))
    if missing > 0 and is_main:
        folder.mkdir(parents=True, exist_ok=True)
        names = _free_names(folder, missing)
        generate = make_generator()
        base_seed = cfg.seed or 0
        with tqdm(total=missing, desc="class images") as bar:
            for start in range(0, missing, cfg.sample_batch_size):
                batch = names[start : start + cfg.sample_batch_size]
                try:
                    images = generate([cfg.class_prompt] * len(batch), base_seed + start)
                except Exception as e:
                    what = memory_failure(e)
                    if what is None:
                        raise
                    raise out_of_memory(cfg, what) from None
                for path, image in zip(batch, images, strict=True):
                    tmp = path.with_name(f".{path.name}.tmp")
                    image.save(tmp, format="PNG")
                    tmp.rename(path)
                bar.update(len(batch))
    barrier()
    return max(missing, 0)
