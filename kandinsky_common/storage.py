"""Where a run's outputs live: a local folder or an object-store URL (`gs://bucket/run`).

TPU pods are several hosts with their own disks, so a run that must restore on another pod keeps
its checkpoints, cache and logs in a bucket. Every writer of the run goes through `location`
(an `etils.epath.Path`: pathlib's API for local paths and, through fsspec/gcsfs, for `gs://`);
orbax and tensorstore take such paths natively. Writers that only know local files (the
diffusers-style pipeline folder, PIL) write into `staged_folder` / `staged_file`, which upload on
success.

`STORAGE_EMULATOR_HOST` (gcsfs, google clients) and `TENSORSTORE_GCS_HTTP_URL` (orbax's arrays)
point both at a GCS emulator, as the tests do.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import fsspec
import fsspec.config
from etils import epath

from kandinsky_common.errors import UserError

# Other hosts (and orbax, through tensorstore) write to the bucket behind gcsfs's back: a cached
# listing would hide their checkpoints, cache blocks and markers.
fsspec.config.conf.setdefault("gs", {})["use_listings_cache"] = False

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
# Schemes whose objects every host of a pod sees (fsspec implementations that epath routes).
SCHEMES = ("gs",)


def is_url(path: str | os.PathLike | None) -> bool:
    return path is not None and bool(_URL.match(str(path)))


def check_url(path: str, flag: str) -> None:
    """A URL flag value must use a scheme this project writes to."""
    scheme = str(path).split("://", 1)[0]
    if scheme not in SCHEMES:
        raise UserError(
            f"{flag} {path}: {scheme}:// is not supported; pass a local folder or a gs:// URL"
        )
    if not str(path).split("://", 1)[1].strip("/"):
        raise UserError(f"{flag} {path}: name a bucket, e.g. gs://my-bucket/run")


def location(path: str | os.PathLike) -> epath.Path:
    """A local path or a URL as one Path type (`/`, exists, iterdir, read_text, rmtree, ...)."""
    return epath.Path(str(path).rstrip("/") if is_url(path) else path)


def bucket_reachable(url: str, flag: str) -> None:
    """The bucket of `url` exists and answers; else one line naming the cause."""
    scheme, rest = str(url).split("://", 1)
    bucket = f"{scheme}://{rest.split('/', 1)[0]}"
    try:
        found = location(bucket).exists()
    except Exception as e:  # credentials, network, permissions: the library's own words
        text = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{flag} {url}: cannot reach {bucket} ({text})") from e
    if not found:
        raise UserError(f"{flag} {url}: bucket {bucket} does not exist; create it first")


@contextlib.contextmanager
def staged_folder(dest: str | os.PathLike) -> Iterator[Path]:
    """A local folder to write `dest` into: `dest` itself when local; for a URL a temporary
    folder whose files are uploaded under `dest` once the block ends without error."""
    if not is_url(dest):
        Path(dest).mkdir(parents=True, exist_ok=True)
        yield Path(dest)
        return
    with tempfile.TemporaryDirectory(prefix="kandinsky-upload-") as tmp:
        yield Path(tmp)
        upload_folder(Path(tmp), dest)


def upload_folder(local: Path, dest: str | os.PathLike) -> None:
    """Copy every file under `local` to the same relative path under `dest`."""
    root = location(dest)
    for p in sorted(local.rglob("*")):
        if p.is_file():
            target = root / p.relative_to(local).as_posix()
            target.parent.mkdir(parents=True, exist_ok=True)
            with p.open("rb") as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 24)


@contextlib.contextmanager
def staged_file(dest: str | os.PathLike) -> Iterator[Path]:
    """A local file path to write `dest` through (see `staged_folder`)."""
    dest_path = location(dest)
    with staged_folder(dest_path.parent) as folder:
        yield folder / dest_path.name


@contextlib.contextmanager
def fetched_folder(path: str | os.PathLike) -> Iterator[Path]:
    """A local folder holding what `path` holds: `path` itself when local; for a URL a temporary
    download of every file under it (for loaders that read local files only)."""
    if not is_url(path):
        yield Path(path)
        return
    root = location(path)
    if not root.is_dir():
        raise UserError(f"{path} is not a folder in the bucket")
    with tempfile.TemporaryDirectory(prefix="kandinsky-download-") as tmp:
        for rel in files_under(path):
            target = Path(tmp, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            with (root / rel).open("rb") as src, target.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 24)
        yield Path(tmp)


def files_under(path: str | os.PathLike) -> list[str]:
    """Every file below a folder or bucket prefix, as sorted relative POSIX paths (epath's
    rglob refuses `**` on buckets)."""
    if not is_url(path):
        root = Path(path)
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    fs, prefix = fsspec.core.url_to_fs(str(path).rstrip("/"))
    return sorted(posixpath.relpath(f, prefix) for f in fs.find(prefix))
