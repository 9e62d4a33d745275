"""Decode one medical image file (JPEG, PNG 8/16-bit, DICOM) to gray or RGB uint8."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medxfer.errors import MedxferError

RASTER_SUFFIXES = {".jpg", ".jpeg", ".png"}
DICOM_SUFFIXES = {".dcm", ".dicom"}
IMAGE_SUFFIXES = RASTER_SUFFIXES | DICOM_SUFFIXES


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def read_gray(path: str | Path) -> np.ndarray:
    """Return the image at ``path`` as a 2-D uint8 array at its native size.

    Colour images are converted to luminance; 16-bit and DICOM images are scaled to 0..255 by
    their own range after DICOM modality and VOI LUT (windowing); MONOCHROME1 is inverted so
    that bone is bright as in MONOCHROME2.
    """
    return read_image(path, "gray")


def read_image(path: str | Path, color: str = "gray") -> np.ndarray:
    """The image at ``path`` at its native size: ``(H, W)`` for ``gray``, ``(H, W, 3)`` for ``rgb``.

    ``rgb`` keeps colour images as they are and replicates gray ones into three channels.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in DICOM_SUFFIXES or _has_dicom_preamble(path):
            return as_color(_read_dicom(path), color)
        return _read_raster(path, color)
    except MedxferError:
        raise
    except FileNotFoundError:
        raise MedxferError(f"{path}: file not found") from None
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


def load_image(path: str | Path, size: int, color: str = "gray") -> np.ndarray:
    """Decoded and resized: ``(S, S)`` for ``gray``, channels first ``(3, S, S)`` for ``rgb``."""
    return to_model_layout(resize_square(read_image(path, color), size))


def to_model_layout(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` -> ``(3, H, W)``; gray ``(H, W)`` stays as it is."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)) if image.ndim == 3 else image


def _has_dicom_preamble(path: Path) -> bool:
    if path.suffix.lower() in RASTER_SUFFIXES:
        return False
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_raster(path: Path, color: str) -> np.ndarray:
    with Image.open(path) as img:
        img.load()  # raises OSError on truncated files
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return as_color(to_uint8(np.asarray(img, dtype=np.float64)), color)
        return np.asarray(img.convert("L" if color == "gray" else "RGB"), dtype=np.uint8)


def _read_dicom(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        raise MedxferError(f"{path}: not a valid DICOM file ({exc})") from None
    if "PixelData" not in ds:
        raise MedxferError(f"{path}: DICOM file has no pixel data")
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
