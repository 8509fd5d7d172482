"""The real CLIP BPE vocabulary and a CLIPTokenizer folder built from it (framework-free).

The hub is out of reach here, so the tokenizer of kandinsky-2-2-prior cannot be downloaded. The
same vocabulary (OpenAI CLIP's, 49,408 tokens) ships inside the open-clip-torch wheel as
`open_clip/bpe_simple_vocab_16e6.txt.gz`; pip may fetch that wheel from the package registry. We
read the file out of the wheel with zipfile: importing open_clip would pull in torch and
torchvision.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from kandinsky_common.errors import UserError

OPEN_CLIP_VERSION = "3.2.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of the decompressed merges file: the same bytes in every open_clip release and in
# openai/CLIP, so a user-provided copy is checked against it too.
BPE_TEXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
ENV_BPE = "KANDINSKY_CLIP_BPE"
ENV_CACHE = "KANDINSKY_FINETUNE_CACHE"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary budget: 49,152 minus bytes and specials
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2
MODEL_MAX_LENGTH = 77


def cache_dir() -> Path:
    """Where downloaded artefacts live: $KANDINSKY_FINETUNE_CACHE or ~/.cache/kandinsky_finetune."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kandinsky_finetune"


def _wheel_name() -> str:
    return f"open_clip_torch-{OPEN_CLIP_VERSION}-py3-none-any.whl"


def _provide_hint() -> str:
    return (
        f"download open_clip_torch-{OPEN_CLIP_VERSION} elsewhere (`pip download --no-deps "
        f"open-clip-torch=={OPEN_CLIP_VERSION}`) and set {ENV_BPE} to the wheel or to the "
        f"bpe_simple_vocab_16e6.txt.gz inside it"
    )


def fetch_open_clip_wheel(cache: Path | None = None) -> Path:
    """The open-clip-torch wheel in the cache, downloaded with pip (no deps) the first time."""
    cache = cache or cache_dir()
    wheel = cache / _wheel_name()
    if wheel.is_file():
        return wheel
    cache.mkdir(parents=True, exist_ok=True)
    # Download into a private temp dir and move atomically: test sessions of several engineers may
    # race on the same cache, and a half-written wheel must never be visible under the final name.
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
            "--dest",
            tmp,
            f"open-clip-torch=={OPEN_CLIP_VERSION}",
        ]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(
                f"could not run pip to fetch the CLIP vocabulary ({e}); {_provide_hint()}"
            ) from e
        got = Path(tmp) / _wheel_name()
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(
                f"pip could not download open-clip-torch=={OPEN_CLIP_VERSION} for the CLIP "
                f"vocabulary ({last}); {_provide_hint()}"
            )
        os.replace(got, wheel)
    return wheel


def _read_bpe_gz(path: Path) -> bytes:
    """The gzipped merges file from a wheel (zip) or a plain .txt.gz path."""
    if not path.is_file():
        raise UserError(f"{ENV_BPE}={path} does not exist; {_provide_hint()}")
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                return z.read(BPE_MEMBER)
        except KeyError as e:
            raise UserError(f"{path} has no {BPE_MEMBER}; {_provide_hint()}") from e
    return path.read_bytes()


def bpe_source() -> Path:
    """$KANDINSKY_CLIP_BPE (a wheel or the .txt.gz) if set, else the cached open-clip wheel."""
    env = os.environ.get(ENV_BPE)
    return Path(env).expanduser() if env else fetch_open_clip_wheel()


def bpe_text() -> str:
    """The decompressed `bpe_simple_vocab_16e6.txt` (header line + merges, one per line)."""
    return _bpe_text_from(bpe_source())


@functools.cache
def _bpe_text_from(source: Path) -> str:
    raw = _read_bpe_gz(source)
    try:
        data = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        raise UserError(f"{source} is not a valid gzip BPE file ({e}); {_provide_hint()}") from e
    if hashlib.sha256(data).hexdigest() != BPE_TEXT_SHA256:
        raise UserError(
            f"{source} does not hold the CLIP BPE vocabulary (checksum mismatch); {_provide_hint()}"
        )
    return data.decode("utf-8")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's byte -> printable unicode map; printable bytes map to themselves."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges in rank order), laid out exactly as OpenAI CLIP's SimpleTokenizer."""
    lines = bpe_text().split("\n")
    # Line 0 is the "#version" header; only the first NUM_MERGES merges are used by CLIP.
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE or any(len(m) != 2 for m in merges):
        raise UserError(f"the CLIP BPE file is malformed ({len(vocab)} tokens); {_provide_hint()}")
    return vocab, merges


def make_clip_tokenizer():
    """A transformers CLIPTokenizer: real vocabulary, the K2.2 prior tokenizer's settings."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5 takes the vocabulary as objects; vocab_file=/merges_file= are silently
    # swallowed by **kwargs and leave a 3-token tokenizer, hence the size check.
    tok = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        do_lower_case=True,
    )
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"CLIPTokenizer built with {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok


def check_clip_tokenizer(tok) -> None:
    """Raise if `tok` is not a real CLIP tokenizer padded to 77 with EOS, as K2.2's prior has."""
    vocab, _ = clip_vocab_and_merges()
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    ids = tok("a photo of a cat", padding="max_length", max_length=MODEL_MAX_LENGTH).input_ids
    words = [vocab[w + "</w>"] for w in ("a", "photo", "of", "a", "cat")]
    expected = [vocab[BOS_TOKEN], *words, vocab[EOS_TOKEN]]
    expected += [vocab[EOS_TOKEN]] * (MODEL_MAX_LENGTH - len(expected))
    if list(ids) != expected:
        raise RuntimeError(f"tokenizer encodes 'a photo of a cat' as {list(ids)[:8]}...")


def build_clip_tokenizer(out_dir: str | os.PathLike) -> Path:
    """Write a CLIPTokenizer folder (the tokenizer/ subfolder of a prior folder) and verify it.

    Besides transformers 5's tokenizer.json, vocab.json and merges.txt are written as in the
    kandinsky-2-2-prior repo, so older transformers and other tools read the folder too.
    """
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    make_clip_tokenizer().save_pretrained(out)
    write_vocab_files(out)
    check_clip_tokenizer(CLIPTokenizer.from_pretrained(out))
    return out


def write_vocab_files(folder: str | os.PathLike) -> None:
    """vocab.json and merges.txt in the format of the hub's CLIP tokenizer folders."""
    vocab, merges = clip_vocab_and_merges()
    folder = Path(folder)
    text = json.dumps(vocab, ensure_ascii=False) + "\n"
    (folder / "vocab.json").write_text(text, encoding="utf-8")
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text(merges_txt, encoding="utf-8")
