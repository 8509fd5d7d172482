"""Preprocessing equals the reference: transformers' PIL CLIP processor, the decoder crop+resize."""

import io
import json
import pickle
import threading
import time

import numpy as np
import pytest
import skimage.data
from PIL import Image

from kandinsky_common.errors import UserError
from kandinsky_common.model_configs import IMAGE_PROCESSOR
from kandinsky_common.prefetch import Prefetcher
from kandinsky_common.preprocess import (
    BatchBuilder,
    ImageMemo,
    caption_choice,
    choose_caption,
    clip_pixels,
    clip_spec,
    decode_image,
    decoder_pixels,
    load_image_processor_config,
    tokenize,
)


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest above 255.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    keep += list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return [chr(c) for c in keep + [256 + i for i in range(len(extra))]]


def tiny_clip_tokenizer():
    """A CLIPTokenizer over the byte alphabet plus two merges ("at", "cat"): same code paths."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["at</w>", "cat</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=[("a", "t</w>"), ("c", "at</w>")], model_max_length=77)
    assert len(tok) == len(tokens)
    return tok


def random_image(h, w, seed=0, mode="RGB"):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def photos():
    return [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.rocket())]


# Odd/even differences make the float crop boxes land on .5 (PIL rounds them), extreme aspect
# ratios stress the truncated long side, tiny images go through the upsampling path.
SHAPES = [(225, 1000), (1000, 225), (223, 223), (50, 100), (224, 300), (333, 501), (9, 300)]


def _pil_processor(**kwargs):
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil(**{**IMAGE_PROCESSOR, **kwargs})


def test_clip_pixels_match_transformers_pil_processor():
    proc = _pil_processor()
    images = photos() + [random_image(h, w, i) for i, (h, w) in enumerate(SHAPES)]
    for img in images:
        ref = proc(img, return_tensors="np")["pixel_values"][0]
        ours = clip_pixels(img)
        assert ours.shape == (3, 224, 224) and ours.dtype == np.float32
        # Same PIL resize, same float64 rescale and float32 normalize: bit-identical.
        assert np.abs(ours - ref).max() <= 1e-6, img.size


@pytest.mark.parametrize(
    "config",
    [
        {"size": 100, "crop_size": 128},  # crop larger than the image: transformers zero-pads
        {"size": {"height": 200, "width": 150}, "crop_size": {"height": 96, "width": 64}},
        {"do_normalize": False, "do_center_crop": False, "size": {"shortest_edge": 32}},
        {"resample": 2, "size": 64, "crop_size": 64},
    ],
)
def test_clip_pixels_other_configs_match(config):
    proc = _pil_processor(**config)
    for img in [random_image(90, 131, 1), random_image(131, 90, 2)]:
        ref = proc(img, return_tensors="np")["pixel_values"][0]
        ours = clip_pixels(img, config)
        assert ours.shape == ref.shape
        assert np.abs(ours - ref).max() <= 1e-6


def test_load_image_processor_config(tmp_path):
    assert clip_spec(load_image_processor_config(tmp_path)) == clip_spec(IMAGE_PROCESSOR)
    # The form kandinsky-2-2-prior ships: plain ints, old feature-extractor keys.
    legacy = {**IMAGE_PROCESSOR, "size": 224, "crop_size": 224}
    legacy["feature_extractor_type"] = "CLIPFeatureExtractor"
    (tmp_path / "image_processor").mkdir()
    (tmp_path / "image_processor" / "preprocessor_config.json").write_text(json.dumps(legacy))
    config = load_image_processor_config(tmp_path)
    assert clip_spec(config) == clip_spec(IMAGE_PROCESSOR)
    img = photos()[0]
    np.testing.assert_array_equal(clip_pixels(img, config), clip_pixels(img))
    (tmp_path / "image_processor" / "preprocessor_config.json").write_text(
        json.dumps({"size": {"longest_edge": 3}})
    )
    with pytest.raises(UserError, match="unsupported size"):
        load_image_processor_config(tmp_path)


def reference_decoder_transform(img, resolution):
    """train_text_to_image_decoder.py's center_crop + train_transforms, torch swapped for numpy."""
    img = img.convert("RGB")
    width, height = img.size
    new_size = min(width, height)
    left = (width - new_size) / 2
    top = (height - new_size) / 2
    right = (width + new_size) / 2
    bottom = (height + new_size) / 2
    img = img.crop((left, top, right, bottom))
    img = img.resize((resolution, resolution), resample=Image.BICUBIC, reducing_gap=1)
    img = np.array(img).astype(np.float32) / 127.5 - 1
    return np.transpose(img, [2, 0, 1])


@pytest.mark.parametrize("resolution", [64, 96])
def test_decoder_pixels_match_reference(resolution):
    images = photos() + [random_image(h, w, i) for i, (h, w) in enumerate(SHAPES[:5])]
    images.append(random_image(37, 52, 9, mode="RGBA"))
    for img in images:
        ours = decoder_pixels(img, resolution)
        assert ours.shape == (3, resolution, resolution) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, reference_decoder_transform(img, resolution))
        assert -1 <= ours.min() and ours.max() <= 1


def test_tokenize_shapes_dtypes_and_truncation():
    tok = tiny_clip_tokenizer()
    ids, mask = tokenize(tok, ["a cat", "A CAT!", "cat " * 200])
    assert ids.shape == mask.shape == (3, 77)
    assert ids.dtype == np.int64 and mask.dtype == np.bool_
    assert (ids[:, 0] == tok.bos_token_id).all()
    np.testing.assert_array_equal(mask.sum(1), [4, 5, 77])  # bos, words..., first eos
    assert ids[2, -1] == tok.eos_token_id  # truncated but still closed by EOS
    assert (ids[0, 4:] == tok.pad_token_id).all()


def test_tokenizer_without_max_length_is_a_user_error():
    tok = tiny_clip_tokenizer()
    tok.model_max_length = int(1e30)
    with pytest.raises(UserError, match="model_max_length"):
        tokenize(tok, ["a cat"])


def test_choose_caption_is_deterministic():
    captions = ["one", "two", "three", "four"]
    picks = [choose_caption(captions, 0, 1, i) for i in range(40)]
    again = [choose_caption(captions, 0, 1, i) for i in range(40)]
    assert picks == again and set(picks) == set(captions)
    assert [choose_caption(captions, 0, 2, i) for i in range(40)] != picks  # a new draw per epoch
    assert picks == [captions[caption_choice(0, 1, i, 4)] for i in range(40)]
    assert choose_caption("just text", 0, 0, 0) == "just text"
    with pytest.raises(UserError, match="non-empty list"):
        choose_caption([], 0, 0, 0)
    with pytest.raises(UserError, match="non-empty list"):
        choose_caption(["fine", 3], 0, 0, 0)


def _jpeg_bytes(img):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def test_decode_image_accepts_every_cell_form(tmp_path):
    img = random_image(20, 30)
    path = tmp_path / "a.png"
    img.save(path)
    data = path.read_bytes()
    expected = np.asarray(img)
    cells = [img, str(path), path, data, {"bytes": data, "path": None}]
    for cell in cells + [{"bytes": None, "path": str(path)}]:
        np.testing.assert_array_equal(np.asarray(decode_image(cell, 0)), expected)
    assert decode_image(data, 0, mode="L").mode == "L"


def test_decode_image_applies_exif_orientation_like_datasets(tmp_path):
    import datasets

    img = random_image(20, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    cell = {"bytes": buf.getvalue(), "path": None}
    ours = decode_image(cell, 0)
    theirs = datasets.Image().decode_example(cell)
    assert ours.size == (20, 30)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))


def test_truncated_and_corrupt_images_are_user_errors(tmp_path):
    data = _jpeg_bytes(Image.fromarray(skimage.data.chelsea()))
    for cut in (len(data) // 2, len(data) - 10):
        with pytest.raises(UserError, match=r"row 7 .*truncated.*remove or replace"):
            decode_image({"bytes": data[:cut], "path": None}, 7)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(UserError, match=r"broken\.jpg.*remove or replace"):
        decode_image(str(broken), 3)
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    with pytest.raises(UserError, match=r"junk\.png.*cannot be decoded"):
        decode_image({"bytes": None, "path": str(junk)}, 1)
    with pytest.raises(UserError, match="missing.png"):
        decode_image(str(tmp_path / "missing.png"), 2)
    with pytest.raises(UserError, match="holds a int, not an image"):
        decode_image(5, 4)


def _dataset(tmp_path, n=6, captions=True):
    import datasets

    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        random_image(40 + 7 * i, 64 - 5 * i, seed=i).save(path)
        paths.append(str(path))
    data = {"image": paths}
    if captions:
        data["text"] = [[f"cat {i}", f"a cat {i}", "cat"] if i % 2 else f"at {i}" for i in range(n)]
        data["text"] = [c if isinstance(c, list) else [c] for c in data["text"]]
    ds = datasets.Dataset.from_dict(data)
    return ds.cast_column("image", datasets.Image()), paths


def test_batch_builder_prior_batch(tmp_path):
    ds, paths = _dataset(tmp_path)
    tok = tiny_clip_tokenizer()
    builder = BatchBuilder(ds, image_column="image", caption_column="text", tokenizer=tok, seed=3)
    idx = np.array([4, 1, 1, 5])
    batch = builder(idx, epoch=2)
    assert set(batch) == {"clip_pixel_values", "text_input_ids", "text_mask"}
    assert batch["clip_pixel_values"].shape == (4, 3, 224, 224)
    assert batch["clip_pixel_values"].dtype == np.float32
    assert batch["text_input_ids"].shape == (4, 77) and batch["text_input_ids"].dtype == np.int64
    assert batch["text_mask"].shape == (4, 77) and batch["text_mask"].dtype == np.bool_
    for row, i in enumerate(idx):
        expected = clip_pixels(Image.open(paths[i]))
        np.testing.assert_array_equal(batch["clip_pixel_values"][row], expected)
    # A pure function of (indices, epoch), also for a fresh builder (a resumed process).
    fresh = BatchBuilder(ds, image_column="image", caption_column="text", tokenizer=tok, seed=3)
    for a, b in ((builder(idx, 2), batch), (fresh(idx, 2), batch)):
        for key in batch:
            np.testing.assert_array_equal(a[key], b[key])
    # The caption draw depends on the epoch: across epochs every caption of row 1 shows up.
    drawn = {tuple(builder(np.array([1]), e)["text_input_ids"][0]) for e in range(12)}
    assert len(drawn) == 3


def test_batch_builder_decoder_batch_and_threads(tmp_path):
    ds, _ = _dataset(tmp_path, captions=False)
    ds = ds.shuffle(seed=0).select(range(5))  # an index mapping, as --max_train_samples makes
    one = BatchBuilder(ds, image_column="image", resolution=32)
    two = BatchBuilder(ds, image_column="image", resolution=32, num_threads=2)
    idx = np.array([0, 4, 2])
    batch = one(idx, epoch=0)
    assert set(batch) == {"clip_pixel_values", "pixel_values"}
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert batch["pixel_values"].dtype == np.float32
    for row, i in enumerate(idx):
        decoded = ds[int(i)]["image"]  # what the reference's transform receives
        np.testing.assert_array_equal(batch["pixel_values"][row], decoder_pixels(decoded, 32))
    threaded = two(idx, epoch=0)
    two.close()
    for key in batch:
        np.testing.assert_array_equal(batch[key], threaded[key])


def test_image_memo_keeps_the_batches_bit_identical_and_skips_decoding(tmp_path, monkeypatch):
    from kandinsky_common import preprocess

    ds, _ = _dataset(tmp_path, captions=False)
    decoded = []
    real_decode = preprocess.decode_image
    monkeypatch.setattr(
        preprocess,
        "decode_image",
        lambda v, i=None, m=None: decoded.append(i) or real_decode(v, i, m),
    )
    plain = BatchBuilder(ds, image_column="image", resolution=64)
    memo = ImageMemo(1 << 30)
    kept = BatchBuilder(ds, image_column="image", resolution=64, memo=memo, num_threads=2)
    idx = np.array([3, 0, 5, 1])
    first = kept(idx, epoch=0)
    assert sorted(decoded) == [0, 1, 3, 5] and len(memo) == 4
    decoded.clear()
    again = kept(idx[::-1], epoch=1)
    assert decoded == []  # every row came from the memo
    expected = plain(idx, epoch=0)
    for key in expected:
        np.testing.assert_array_equal(first[key], expected[key])
        np.testing.assert_array_equal(again[key][::-1], expected[key])
    # 224x224x3 CLIP plus 64x64x3 decoder bytes per row: a budget of two rows keeps two.
    row_bytes = 224 * 224 * 3 + 64 * 64 * 3
    small = ImageMemo(2 * row_bytes)
    other = BatchBuilder(ds, image_column="image", resolution=64, memo=small)
    shared = BatchBuilder(ds, image_column="image", resolution=64, memo=small)
    other(np.array([0, 1, 2]), epoch=0)
    assert len(small) == 2 and small.used == 2 * row_bytes
    decoded.clear()
    batch = shared(np.array([0, 1]), epoch=0)  # another builder's rows are not its own
    assert decoded == [0, 1]
    np.testing.assert_array_equal(batch["pixel_values"], expected["pixel_values"][[1, 3]])
    kept.close()
    # A DataLoader worker started by spawn receives a pickled builder: its memo starts empty.
    copy = pickle.loads(pickle.dumps(memo))
    assert (copy.max_bytes, len(copy), copy.used) == (memo.max_bytes, 0, 0)


def test_batch_builder_names_a_corrupt_file(tmp_path):
    ds, paths = _dataset(tmp_path, n=3, captions=False)
    with open(paths[1], "r+b") as f:
        f.truncate(100)
    builder = BatchBuilder(ds, image_column="image")
    builder(np.array([0, 2]), 0)
    with pytest.raises(UserError, match=r"img1\.png.*row 1.*remove or replace"):
        builder(np.array([0, 1]), 0)


def test_prefetcher_order_errors_and_close():
    assert list(Prefetcher(iter(range(10)), depth=3)) == list(range(10))

    def failing():
        yield 1
        raise RuntimeError("boom")

    it = Prefetcher(failing())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="boom"):
        next(it)

    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    with Prefetcher(endless(), depth=2) as it:
        assert [next(it) for _ in range(5)] == list(range(5))
    assert closed.wait(5)
    with pytest.raises(StopIteration):
        next(it)


def test_prefetcher_overlaps_work():
    def slow():
        for i in range(4):
            time.sleep(0.05)
            yield i

    start = time.perf_counter()
    with Prefetcher(slow(), depth=2) as it:
        for _ in it:
            time.sleep(0.05)  # the "step"
    # Serial would be 0.4 s; overlapped about 0.25 s.
    assert time.perf_counter() - start < 0.36
