"""Image decoding and CLIP preprocessing against transformers' CLIPImageProcessor."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import images as I


def _hf(size, crop):
    from transformers import CLIPImageProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": crop, "width": crop})


def _encoded(img, fmt):
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _random_image(rng, w, h, mode):
    rgba = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return rgba.convert("RGB").quantize(64)
    return rgba.convert(mode)


@pytest.mark.parametrize("w,h", [(57, 31), (31, 57), (33, 33), (101, 40), (17, 13), (5, 300)])
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "CMYK"])
def test_crop_mode_matches_clip_image_processor(w, h, mode):
    rng = np.random.default_rng(w * 1000 + h)
    img = _random_image(rng, w, h, mode)
    cfg = I.ImageConfig(size=33, crop_size=31, aspect="crop")
    ref = _hf(33, 31)(img, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    # through bytes, as in training (PNG keeps every mode losslessly, JPEG for the colour modes)
    ours = I.preprocess(I.load_rgb(_encoded(img, "PNG" if mode != "CMYK" else "TIFF")), cfg)
    assert ours.shape == (31, 31, 3) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 1e-5


def test_jpeg_file_matches_clip_image_processor(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "a.jpg"
    _random_image(rng, 70, 45, "RGB").save(path, quality=90)
    cfg = I.ImageConfig(size=24, crop_size=24, aspect="crop")
    ref = _hf(24, 24)(Image.open(path), return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(I.load_and_preprocess(path, cfg) - ref).max() <= 1e-5


def test_transparency_composited_on_white():
    img = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert np.all(np.asarray(I.load_rgb(_encoded(img, "PNG"))) == 255)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0] * 256)
    p.info["transparency"] = 0
    assert np.all(np.asarray(I.load_rgb(_encoded(p, "PNG"))) == 255)


def test_pad_mode_expands_to_square_with_mean_colour():
    cfg = I.ImageConfig(size=20, crop_size=20, aspect="pad")
    assert cfg.pad_color == (122, 116, 104)
    img = Image.new("RGB", (40, 10), (200, 10, 10))
    out = I.preprocess(img, cfg)
    # a 40x10 strip pasted in the middle of a 40x40 canvas -> rows 0..3 and 16..19 of the 20x20 result are canvas
    canvas = I.normalize_uint8(np.array([[cfg.pad_color]], np.uint8), cfg.mean, cfg.std)[0, 0]
    np.testing.assert_allclose(out[0, 0], canvas, atol=1e-6)
    np.testing.assert_allclose(out[19, 10], canvas, atol=1e-6)
    red = I.normalize_uint8(np.array([[[200, 10, 10]]], np.uint8), cfg.mean, cfg.std)[0, 0]
    np.testing.assert_allclose(out[10, 10], red, atol=1e-6)
    # equals HF's processor on the square we built (what LLaVA does before calling it)
    square = I.expand_to_square(img, cfg.pad_color)
    assert square.size == (40, 40)
    ref = _hf(20, 20)(square, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(out - ref).max() <= 1e-5
    tall = I.expand_to_square(Image.new("RGB", (3, 8), (0, 0, 0)), cfg.pad_color)
    assert tall.size == (8, 8) and tall.getpixel((0, 0)) == cfg.pad_color and tall.getpixel((3, 4)) == (0, 0, 0)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.array([[0, 257 * 100, 65535]], np.uint16)
    rgb = np.asarray(I.load_rgb(_encoded(Image.fromarray(arr), "PNG")))
    assert rgb.shape == (1, 3, 3)
    assert rgb[0, :, 0].tolist() == [0, 100, 255]


def test_bad_images_raise_named_errors(tmp_path):
    with pytest.raises(I.EmptyImageError):
        I.load_rgb(b"")
    with pytest.raises(I.ImageDecodeError):
        I.load_rgb(b"this is not an image at all")
    good = _encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    with pytest.raises(I.ImageDecodeError):
        I.load_rgb(good[: len(good) // 2])
    with pytest.raises(FileNotFoundError):
        I.load_rgb(tmp_path / "missing.jpg")
    with pytest.raises(I.DecompressionBombError):
        I.load_rgb(_encoded(Image.new("L", (300, 300)), "PNG"), max_pixels=10_000)


def test_png_header_bomb_refused_before_decoding():
    # a 1-pixel PNG whose header claims 100000 x 100000 pixels
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(b"\x00\x00")) + chunk(b"IEND", b"")
    with pytest.raises(I.DecompressionBombError):
        I.load_rgb(png)


def test_preprocessor_config_round_trip():
    cfg = I.ImageConfig(size=48, crop_size=40, aspect="crop")
    d = cfg.to_preprocessor_config()
    back = I.ImageConfig.from_preprocessor_config(d, aspect="crop")
    assert back == cfg
    with pytest.raises(ValueError, match="aspect"):
        I.ImageConfig(aspect="stretch")
