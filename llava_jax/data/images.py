"""The one image loader and CLIP preprocessing.

`load_rgb` decodes any file or byte string into an 8-bit RGB `PIL.Image` (alpha is composited onto white,
16-bit and float modes are scaled to 8 bits, CMYK / palette / grey converted) and refuses decompression
bombs before any pixel is decoded. `preprocess` turns it into model input: optional LLaVA "pad" (paste onto a
square canvas filled with the mean colour), resize of the shortest edge (PIL bicubic on 8-bit pixels), centre
crop, rescale by 1/255 and per-channel normalisation. The arithmetic follows transformers'
`CLIPImageProcessor` (PIL backend) step for step, so outputs agree to float32 rounding; the output is NHWC.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_MAX_PIXELS = 1 << 25  # ~33.5 MP (5790 x 5790): far above any training image, far below a bomb

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
_RESAMPLE_BY_CODE = {int(v): k for k, v in _RESAMPLE.items()}


class ImageError(ValueError):
    """An image cannot be used; `reason` is a short machine-readable cause."""

    reason = "bad_image"


class ImageDecodeError(ImageError):
    """The bytes are not a decodable image (truncated, wrong format, not an image)."""

    reason = "undecodable_image"


class EmptyImageError(ImageError):
    """The file is empty or the image has zero width or height."""

    reason = "empty_image"


class UnreadableImageError(ImageError):
    """The image file exists but cannot be read (permissions, I/O error)."""

    reason = "unreadable_image_file"


class DecompressionBombError(ImageError):
    """The header declares more pixels than allowed; refused before decoding."""

    reason = "decompression_bomb"


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How raw images become model input.

    size: target of the shortest edge after resizing; crop_size: side of the square centre crop (the model's
    input side); mean / std: per-channel normalisation in 0-1 units; resample: PIL filter name;
    aspect: 'pad' (LLaVA-1.5: square canvas in the mean colour, then resize + crop) or 'crop' (plain CLIP);
    max_pixels: decompression-bomb guard.
    """

    size: int = 336
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = "bicubic"
    aspect: str = "pad"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self):
        if self.aspect not in ("pad", "crop"):
            raise ValueError(f"ImageConfig.aspect must be 'pad' or 'crop', got {self.aspect!r}")
        if self.resample not in _RESAMPLE:
            raise ValueError(f"ImageConfig.resample must be one of {sorted(_RESAMPLE)}, got {self.resample!r}")
        if self.size <= 0 or self.crop_size <= 0:
            raise ValueError(f"ImageConfig sizes must be positive, got size={self.size} crop={self.crop_size}")
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("ImageConfig.mean and .std need three values (R, G, B)")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """The canvas colour of 'pad' mode: the mean in 0-255 units, truncated as LLaVA does."""
        return tuple(int(m * 255) for m in self.mean)  # type: ignore[return-value]

    @classmethod
    def from_preprocessor_config(cls, cfg: Mapping[str, Any], aspect: str = "pad") -> ImageConfig:
        """Reads an HF `preprocessor_config.json` dict (CLIPImageProcessor layout)."""
        size = cfg.get("size", 336)
        if isinstance(size, Mapping):
            size = size.get("shortest_edge") or size.get("height")
        crop = cfg.get("crop_size", size)
        if isinstance(crop, Mapping):
            crop = crop.get("height") or crop.get("shortest_edge")
        resample = cfg.get("resample", int(Image.Resampling.BICUBIC))
        if isinstance(resample, int):
            resample = _RESAMPLE_BY_CODE.get(resample, "bicubic")
        return cls(
            size=int(size),
            crop_size=int(crop),
            mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
            std=tuple(cfg.get("image_std", CLIP_STD)),
            resample=resample,
            aspect=cfg.get("image_aspect_ratio", aspect) if cfg.get("image_aspect_ratio") in ("pad", "crop") else aspect,
        )

    def to_preprocessor_config(self) -> dict[str, Any]:
        """The HF `preprocessor_config.json` dict equivalent to this config (CLIPImageProcessor)."""
        return {
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": True,
            "size": {"shortest_edge": self.size},
            "resample": int(_RESAMPLE[self.resample]),
            "do_center_crop": True,
            "crop_size": {"height": self.crop_size, "width": self.crop_size},
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": True,
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "do_convert_rgb": True,
        }


def _open(source: str | os.PathLike | bytes, max_pixels: int) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        name = "<bytes>"
    else:
        from llava_jax.io import as_path

        name = os.fspath(source)
        try:
            with as_path(name).open("rb") as f:  # a local path or gs://
                data = f.read()
        except FileNotFoundError:
            raise
        except IsADirectoryError as e:
            raise ImageDecodeError(f"{name}: is a directory, not an image") from e
        except OSError as e:
            raise UnreadableImageError(f"{name}: cannot be read ({e.strerror or e})") from e
    if not data:
        raise EmptyImageError(f"{name}: empty file")
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise DecompressionBombError(f"{name}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError,
            TypeError) as e:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24 and (data[16:20] == b"\0" * 4 or data[20:24] == b"\0" * 4):
            raise EmptyImageError(f"{name}: zero-size image (PNG header)") from e
        raise ImageDecodeError(f"{name}: not a decodable image ({type(e).__name__}: {e})") from e
    w, h = img.size
    if w <= 0 or h <= 0:
        raise EmptyImageError(f"{name}: zero-size image {w}x{h}")
    if w * h > max_pixels:
        raise DecompressionBombError(f"{name}: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    try:
        img.load()
    except Image.DecompressionBombError as e:
        raise DecompressionBombError(f"{name}: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError) as e:
        raise ImageDecodeError(f"{name}: truncated or corrupt image ({type(e).__name__}: {e})") from e
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency is composited onto white (as CLIPImageProcessor does)."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if img.mode != "F" or arr.max(initial=0.0) > 255.0:
            arr = arr / 257.0  # 16-bit range onto 8 bits
        img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_rgb(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decodes a path or bytes into an 8-bit RGB PIL image.

    Raises FileNotFoundError (missing path), EmptyImageError, ImageDecodeError or DecompressionBombError.
    """
    img = _open(source, max_pixels)
    try:
        return _to_rgb(img)
    except (ValueError, OSError) as e:
        raise ImageDecodeError(f"cannot convert image mode {img.mode!r} to RGB ({e})") from e


def expand_to_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Pastes `img` centred onto a square canvas of side max(w, h) filled with `fill` (LLaVA 'pad')."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def resize_shortest_edge(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Resizes so the shorter side is `size`; the longer side is int(size * long / short) (as HF does)."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), resample=_RESAMPLE[resample])


def center_crop(arr: np.ndarray, side: int) -> np.ndarray:
    """Centre crop of an [H, W, C] array to [side, side, C], zero-padding (centred) when smaller."""
    h, w = arr.shape[:2]
    top, left = (h - side) // 2, (w - side) // 2
    if top >= 0 and left >= 0:
        return arr[top : top + side, left : left + side]
    out = np.zeros((max(side, h), max(side, w), arr.shape[2]), arr.dtype)
    pad_top, pad_left = -(-(out.shape[0] - h) // 2), -(-(out.shape[1] - w) // 2)
    out[pad_top : pad_top + h, pad_left : pad_left + w] = arr
    top, left = (out.shape[0] - side) // 2, (out.shape[1] - side) // 2
    return out[top : top + side, left : left + side]


@functools.lru_cache(maxsize=16)
def normalization_affine(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(scale [3], shift [3]) float32 with normalised = level * scale - shift for 8-bit levels.

    Equals CLIPImageProcessor's (level / 255 - mean) / std to within a few float32 ulps (< 1e-6).
    """
    mean64, std64 = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1.0 / (255.0 * std64)).astype(np.float32), (mean64 / std64).astype(np.float32)


def normalize_uint8(arr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[H, W, 3] uint8 -> [H, W, 3] float32 normalised ((level / 255 - mean) / std)."""
    scale, shift = normalization_affine(tuple(mean), tuple(std))
    h, w, c = arr.shape
    rows = np.ascontiguousarray(arr).reshape(h, w * c)  # long inner loops: per-channel factors tiled per row
    out = np.multiply(rows, np.tile(scale, w), dtype=np.float32)
    out -= np.tile(shift, w)
    return out.reshape(h, w, c)


def preprocess(img: Image.Image, config: ImageConfig) -> np.ndarray:
    """An RGB PIL image -> model input [crop_size, crop_size, 3] float32 (NHWC without the batch axis)."""
    if img.mode != "RGB":
        img = _to_rgb(img)
    if config.aspect == "pad":
        img = expand_to_square(img, config.pad_color)
    img = resize_shortest_edge(img, config.size, config.resample)
    arr = center_crop(np.asarray(img, dtype=np.uint8), config.crop_size)
    return normalize_uint8(arr, config.mean, config.std)


def load_and_preprocess(source: str | os.PathLike | bytes, config: ImageConfig) -> np.ndarray:
    """load_rgb + preprocess: [crop_size, crop_size, 3] float32."""
    return preprocess(load_rgb(source, config.max_pixels), config)


def blank_image(config: ImageConfig) -> np.ndarray:
    """The stand-in for samples without an image: zeros [crop_size, crop_size, 3] float32."""
    return np.zeros((config.crop_size, config.crop_size, 3), np.float32)
