"""load_train_dataset: every accepted source, the reference's subset, and each user mistake."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from kandinsky_common.data import load_train_dataset
from kandinsky_common.errors import UserError
from tests.helpers import run_script, train_args


def _image(path, h=24, w=32, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def image_folder(root, n=5, meta="jsonl", captions=None):
    """An imagefolder like the diffusers guide's: images + metadata with file_name and text."""
    root.mkdir(parents=True, exist_ok=True)
    captions = captions or [f"a photo number {i}" for i in range(n)]
    rows = []
    for i in range(n):
        _image(root / f"img{i}.png", 20 + i, 30, seed=i)
        rows.append({"file_name": f"img{i}.png", "text": captions[i]})
    if meta == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif meta == "csv":
        lines = ["file_name,text"] + [f"{r['file_name']},{r['text']}" for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


def load(tmp_path, *, name=None, config=None, data_dir=None, image="image", caption="text", **kw):
    """load_train_dataset with the datasets cache inside tmp_path."""
    max_samples, seed = kw.pop("max_samples", None), kw.pop("seed", None)
    assert not kw, kw
    cache = str(tmp_path / "hf_cache")
    return load_train_dataset(name, config, data_dir, cache, image, caption, max_samples, seed)


def _frame(ds, caption="text"):
    return ds.select_columns([caption]).to_dict()[caption]


@pytest.mark.parametrize("meta", ["jsonl", "csv"])
def test_train_data_dir_imagefolder_with_metadata(tmp_path, meta):
    root = image_folder(tmp_path / "data", meta=meta)
    ds = load(tmp_path, data_dir=str(root))
    assert len(ds) == 5 and set(ds.column_names) == {"image", "text"}
    # Lazy: the column is still an Image feature backed by file paths, decoded on access.
    assert isinstance(ds.features["image"], datasets.Image)
    raw = ds.data.column("image")[0].as_py()
    assert raw["bytes"] is None and raw["path"].endswith(".png")
    number = int(Path(raw["path"]).stem.removeprefix("img"))
    assert ds[0]["image"].size == (30, 20 + number)


def test_dataset_name_local_folder_saved_folders_and_files(tmp_path):
    root = image_folder(tmp_path / "data")
    expected = sorted(_frame(load(tmp_path, data_dir=str(root))))
    dd = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=str(tmp_path / "c"))
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    dd["train"].save_to_disk(str(tmp_path / "saved_one"))
    (tmp_path / "pq").mkdir()
    dd["train"].to_parquet(str(tmp_path / "pq" / "train.parquet"))
    sources = ["data", "saved_dict", "saved_one", "pq", "pq/train.parquet"]
    for source in sources:
        ds = load(tmp_path, name=str(tmp_path / source))
        assert sorted(_frame(ds)) == expected, source
        assert isinstance(ds.features["image"], datasets.Image), source
        assert ds[0]["image"].mode == "RGB"


def test_max_train_samples_is_the_references_subset(tmp_path):
    root = image_folder(tmp_path / "data", n=8)
    full = load(tmp_path, data_dir=str(root))
    ds = load(tmp_path, data_dir=str(root), max_samples=3, seed=11)
    assert _frame(ds) == _frame(full.shuffle(seed=11).select(range(3)))
    assert _frame(load(tmp_path, data_dir=str(root), max_samples=3)) == _frame(
        full.shuffle(seed=0).select(range(3))
    )
    assert len(load(tmp_path, data_dir=str(root), max_samples=100, seed=1)) == 8
    with pytest.raises(UserError, match="max_train_samples"):
        load(tmp_path, data_dir=str(root), max_samples=0)
    # A save_to_disk folder is the user's: loading a subset writes nothing into it.
    full.save_to_disk(str(tmp_path / "saved"))
    before = sorted(p.name for p in (tmp_path / "saved").iterdir())
    load(tmp_path, name=str(tmp_path / "saved"), max_samples=3, seed=11)
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == before


def test_decoder_needs_no_caption_column(tmp_path):
    root = tmp_path / "plain"
    root.mkdir()
    for i in range(3):
        _image(root / f"{i}.jpg", seed=i)
    ds = load(tmp_path, data_dir=str(root), caption=None)
    assert len(ds) == 3 and "image" in ds.column_names


def test_hub_name_fails_fast_with_a_clear_message(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        load(tmp_path, name="lambdalabs/naruto-blip-captions")
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "hub is not reachable" in message and "--train_data_dir" in message
    assert "local folder" in message


def test_hub_name_in_a_fresh_process_goes_offline(tmp_path):
    # The CLI case: nothing imported datasets yet, so offline mode is set before its import and
    # the datasets cache is consulted without any network wait.
    code = (
        "from kandinsky_common.data import load_train_dataset\n"
        "from kandinsky_common.errors import UserError\n"
        "try:\n"
        f"    load_train_dataset('someone/some-data', None, None, {str(tmp_path)!r},"
        " 'image', 'text', None, None)\n"
        "except UserError as e:\n"
        "    print('USERERROR', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if "OFFLINE" not in k}
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert time.perf_counter() - start < 30
    assert "USERERROR" in out.stdout and "hub is not reachable" in out.stdout, out.stderr


def test_path_and_source_errors(tmp_path):
    cases = [
        (dict(), "pass --dataset_name"),
        (dict(name=str(tmp_path / "nope")), "does not exist"),
        (dict(name="imagefolder"), "file format, not a dataset"),
        (dict(data_dir=str(tmp_path / "missing")), "missing.*does not exist"),
    ]
    (tmp_path / "empty").mkdir()
    cases.append((dict(data_dir=str(tmp_path / "empty")), "empty.*is empty"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "notes.txt").write_text("no images here")
    cases.append((dict(data_dir=str(tmp_path / "texts")), "texts.*holds no image files"))
    (tmp_path / "afile.txt").write_text("x")
    cases.append((dict(data_dir=str(tmp_path / "afile.txt")), "afile.txt.*is a file"))
    cases.append((dict(name=str(tmp_path / "afile.txt")), "unknown kind"))
    for kwargs, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            load(tmp_path, **kwargs)


def test_saved_folder_split_and_config_errors(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [None], "text": ["x"]})
    datasets.DatasetDict({"validation": ds}).save_to_disk(str(tmp_path / "val_only"))
    with pytest.raises(UserError, match="no 'train' split.*validation"):
        load(tmp_path, name=str(tmp_path / "val_only"))
    with pytest.raises(UserError, match="dataset_config_name.*drop the flag"):
        load(tmp_path, name=str(tmp_path / "val_only"), config="default")


def test_missing_columns_list_what_exists(tmp_path):
    root = image_folder(tmp_path / "data")
    with pytest.raises(UserError, match=r"no image column 'img'.*image, text.*--image_column"):
        load(tmp_path, data_dir=str(root), image="img")
    with pytest.raises(UserError, match=r"no caption column 'caption'.*image, text.*--caption_col"):
        load(tmp_path, data_dir=str(root), caption="caption")


def _saved(tmp_path, name, data, features=None):
    ds = datasets.Dataset.from_dict(data, features=features)
    ds.save_to_disk(str(tmp_path / name))
    return str(tmp_path / name)


def test_column_content_errors(tmp_path):
    png = tmp_path / "ok.png"
    _image(png)
    image_feature = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    cases = [
        (
            {"image": [1, 2], "text": ["a", "b"]},
            None,
            r"image column 'image' holds Value\('int64'\)",
        ),
        ({"image": [str(png)] * 2, "text": [1, 2]}, None, r"caption column 'text' holds Value"),
        ({"image": [str(png)] * 3, "text": ["a", None, "c"]}, None, "row 1 .*has no caption"),
        ({"image": [str(png)] * 2, "text": [["a"], []]}, None, "row 1 .*empty list"),
        ({"image": [str(png)] * 3, "text": [["a"], ["b"], ["c", None]]}, None, "row 2 .*missing"),
        (
            {"image": [str(png), str(tmp_path / "gone.png")], "text": ["a", "b"]},
            None,
            "row 1 .*gone.png.*not a file",
        ),
        ({"image": [str(png), None], "text": ["a", "b"]}, image_feature, "row 1 .*has no image"),
    ]
    for i, (data, features, pattern) in enumerate(cases):
        with pytest.raises(UserError, match=pattern):
            load(tmp_path, name=_saved(tmp_path, f"case{i}", data, features))


def test_path_and_bytes_image_columns_are_accepted(tmp_path):
    png = tmp_path / "ok.png"
    _image(png)
    by_path = load(tmp_path, name=_saved(tmp_path, "paths", {"image": [str(png)], "text": ["a"]}))
    assert by_path.features["image"] == datasets.Value("string")
    blob = png.read_bytes()
    by_bytes = load(tmp_path, name=_saved(tmp_path, "bytes", {"image": [blob], "text": [["a"]]}))
    assert by_bytes.features["image"] == datasets.Value("binary")


def test_pipeline_end_to_end_without_torch_or_jax(tmp_path):
    # The flax backend's data path: dataset -> sampler -> batches, in a process that must never
    # import torch or jax (a fresh interpreter, since other tests import torch).
    root = image_folder(tmp_path / "data", n=5)
    code = f"""
import sys
from kandinsky_common.data import load_train_dataset
from kandinsky_common.preprocess import BatchBuilder
from kandinsky_common.prefetch import Prefetcher
from kandinsky_common.row_order import EpochSampler
ds = load_train_dataset(None, None, {str(root)!r}, {str(tmp_path / "c")!r}, "image", None, 4, 0)
sampler = EpochSampler(len(ds), 3, seed=0)
build = BatchBuilder(ds, image_column="image", resolution=32)
batches = ((e, s, build(i, e)) for e, s, i in sampler.iterate(num_batches=3))
with Prefetcher(batches) as it:
    for e, s, b in it:
        print(e, s, b["pixel_values"].shape, b["clip_pixel_values"].shape)
print("torch" in sys.modules, "jax" in sys.modules)
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:4] == [
        "0 0 (3, 3, 32, 32) (3, 3, 224, 224)",
        "0 1 (3, 3, 32, 32) (3, 3, 224, 224)",
        "1 0 (3, 3, 32, 32) (3, 3, 224, 224)",
        "False False",
    ]


def test_a_dataset_passed_as_train_data_dir_points_to_dataset_name(tmp_path):
    ds = datasets.Dataset.from_dict({"image": [None], "text": ["x"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    for name in ("saved", "pq"):
        with pytest.raises(
            UserError, match=f"holds a dataset .*pass it as --dataset_name .*{name}"
        ):
            load(tmp_path, data_dir=str(tmp_path / name))


def test_train_data_dir_on_a_dataset_through_the_script(tmp_path, tiny_folders):
    datasets.Dataset.from_dict({"image": [None], "text": ["x"]}).save_to_disk(str(tmp_path / "ds"))
    prior, decoder = tiny_folders
    proc = run_script(
        "train_text_to_image_prior.py",
        *train_args(prior, decoder, "ds", "out", report_to="none"),
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    ds = str(tmp_path / "ds")  # paths are absolute from the flag parse on
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: --train_data_dir '{ds}' holds a dataset (parquet/arrow/json files or a "
        f"save_to_disk folder), not image files; pass it as --dataset_name '{ds}'"
    )
    assert not (tmp_path / "out").exists()
