"""Decode one medical image file (JPEG, PNG 8/16-bit, DICOM) to gray or RGB uint8.

Images with more than ``max_pixels`` pixels are refused from their header, before any pixel is
decoded: a 48 KB PNG may declare 20000 x 20000 pixels (a decompression bomb) and would need
gigabytes. The default, 50 megapixels, is twice the largest digital mammograms (about
4700 x 5900) and many times a chest X-ray (about 3000 x 3000); it keeps one 16-bit image's
float64 working copy under 400 MB, while decoding runs on several threads at once.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medxfer.data.options import MAX_PIXELS
from medxfer.errors import MedxferError

# Our header check against ``max_pixels`` decides; PIL's warning (above 89 MP) would only repeat
# it. PIL's own refusal (DecompressionBombError, above 179 MP) still applies and is reported.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

RASTER_SUFFIXES = {".jpg", ".jpeg", ".png"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES
# A JPEG at least twice the working size is decoded at a reduced scale that keeps at least
# DRAFT_FACTOR x the working size, then resized as any image. Measured on 100 Kermany images
# upscaled to 2048 px JPEGs (benchmarks/decode_draft.py): 2.7x faster at 224 px, and the
# pixels differ from a full decode by 0.14 gray levels on average, at most 5 of 255.
DRAFT_FACTOR = 2


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_gray(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Return the image at ``path`` as a 2-D uint8 array at its native size.

    Colour images are converted to luminance; 16-bit and DICOM images are scaled to 0..255 by
    their own range after DICOM modality and VOI LUT (windowing); MONOCHROME1 is inverted so
    that bone is bright as in MONOCHROME2. More than ``max_pixels`` pixels is an error.
    """
    return read_image(path, "gray", max_pixels=max_pixels)


def read_image(
    path: str | Path, color: str = "gray", *, max_pixels: int = MAX_PIXELS, draft: int = 0
) -> np.ndarray:
    """The image at ``path`` at its native size: ``(H, W)`` for ``gray``, ``(H, W, 3)`` for ``rgb``.

    ``rgb`` keeps colour images as they are and replicates gray ones into three channels.
    ``draft`` > 0: a JPEG may be decoded at a reduced size no smaller than ``draft`` pixels a
    side (libjpeg's DCT scaling, 1/2 to 1/8); see ``DRAFT_FACTOR``.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
            return as_color(_read_dicom(path, max_pixels), color)
        return _read_raster(path, color, max_pixels, draft)
    except MedxferError:
        raise
    except FileNotFoundError:
        raise MedxferError(f"{path}: file not found") from None
    except Image.DecompressionBombError as exc:
        raise MedxferError(f"{path}: unreadable image (decompression bomb: {exc})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise MedxferError(f"{path}: unreadable image ({exc})") from None


def as_color(image: np.ndarray, color: str) -> np.ndarray:
    """A uint8 ``(H, W)`` or ``(H, W, 3)`` image as ``gray`` (luminance) or ``rgb`` (replicated)."""
    if color == "gray":
        return rgb_to_gray(image) if image.ndim == 3 else image
    return image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)


def is_gray(image: np.ndarray) -> bool:
    """True when an image has one channel, or three with R = G = B at every pixel."""
    return image.ndim == 2 or bool(
        (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    )


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``(H, W)`` or ``(H, W, 3)`` to ``size`` x ``size`` (aspect not kept:
    the usual 'resize to 224')."""
    if image.shape[:2] == (size, size):
        return np.ascontiguousarray(image)
    img = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def load_image(
    path: str | Path, size: int, color: str = "gray", *, max_pixels: int = MAX_PIXELS
) -> np.ndarray:
    """Decoded and resized: ``(S, S)`` for ``gray``, channels first ``(3, S, S)`` for ``rgb``.
    A large JPEG is decoded at no less than ``DRAFT_FACTOR`` times ``size`` first."""
    image = read_image(path, color, max_pixels=max_pixels, draft=DRAFT_FACTOR * size)
    return to_model_layout(resize_square(image, size))


def to_model_layout(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(3, H, W)``; gray ``(H, W)`` stays as it is."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)) if image.ndim == 3 else image


def check_pixels(path: Path, dims: tuple[int, ...], max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels."""
    count = int(np.prod(dims, dtype=np.int64))
    if count > max_pixels:
        shape = " x ".join(str(d) for d in dims)
        raise MedxferError(
            f"{path}: unreadable image (too many pixels: {shape} = {count:,}, limit {max_pixels:,})"
        )


def _has_dicom_preamble(path: Path) -> bool:
    if path.suffix.lower() in RASTER_SUFFIXES:
        return False
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_raster(path: Path, color: str, max_pixels: int, draft: int = 0) -> np.ndarray:
    with Image.open(path) as img:  # reads the header only
        check_pixels(path, img.size, max_pixels)
        if draft and img.format == "JPEG":
            img.draft(img.mode, (draft, draft))  # scale only: the colour path stays as it was
        img.load()  # raises OSError on truncated files
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return as_color(to_uint8(np.asarray(img, dtype=np.float64)), color)
        return np.asarray(img.convert("L" if color == "gray" else "RGB"), dtype=np.uint8)


def _read_dicom(path: Path, max_pixels: int) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise MedxferError(f"{path}: not a valid DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise MedxferError(f"{path}: DICOM file has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    dims = (int(ds.Columns), int(ds.Rows)) + ((frames,) if frames > 1 else ())
    check_pixels(path, dims, max_pixels)
    arr = ds.pixel_array
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour DICOM
        return arr[..., :3] if arr.dtype == np.uint8 else to_uint8(arr[..., :3])
    if arr.ndim != 2:
        raise MedxferError(
            f"{path}: expected a single 2-D frame, got pixel array shape {arr.shape}"
        )
    arr = apply_voi_lut(apply_modality_lut(arr, ds), ds).astype(np.float64)
    gray = to_uint8(arr)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return gray


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luminance of a uint8 (..., 3) array, as PIL's ``convert("L")``."""
    gray = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.round(gray), 0, 255).astype(np.uint8)


def to_uint8(arr: np.ndarray) -> np.ndarray:
    """Scale an array linearly from its own min..max to 0..255."""
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)
