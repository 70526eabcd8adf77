"""Reading image files safely: the one decoder for training data and for ``csgguard screen``.

:func:`decode_image` turns a file (or its bytes) into uint8 pixels; the image-folder
datasets of :mod:`csgguard.data` and the screening loader below both call it, so
a model is screened on exactly the pixels it would have been trained on.

Anything can sit in a folder that is screened: empty files, truncated PNGs, text
named ``.jpg``, decompression bombs, 16-bit or CMYK images, unreadable files,
broken symlinks, names that are not UTF-8. Each file becomes exactly one result,
either a [0, 1] tensor in the model's input format (with a note when it had to be
converted) or a one-line error; one bad file never stops the run.

File order is deterministic (:mod:`csgguard.listing` sorts by the raw bytes of the path), so ``--shard I/N``
can split a listing into contiguous blocks whose concatenation is the whole run.
Decoding runs in :class:`torch.utils.data.DataLoader` workers, one thread each,
with bounded prefetch: memory stays constant however large the folder.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import CsgguardError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm")


@dataclass(frozen=True)
class InputSpec:
    """What the model takes: from model.json's ``input`` section."""

    channels: int
    height: int
    width: int
    resize: str = "bilinear"

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    @classmethod
    def from_manifest(cls, spec: dict[str, Any]) -> InputSpec:
        try:
            return cls(int(spec["channels"]), int(spec["height"]), int(spec["width"]),
                       str(spec.get("resize", "bilinear")))
        except (KeyError, TypeError, ValueError) as exc:
            raise CsgguardError(f"model.json 'input' section is incomplete ({exc})") from None


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` (0 <= I < N) -> (I, N); None passes through."""
    if text is None:
        return None
    try:
        i, n = (int(v) for v in str(text).split("/", 1))
    except ValueError:
        raise CsgguardError(f"--shard {text!r} must look like I/N, e.g. 0/4 (I counts from 0)") from None
    return check_shard((i, n), f"--shard {text!r}")


def check_shard(shard, name: str | None = None) -> tuple[int, int]:
    """A shard ``(I, N)`` as integers with 0 <= I < N; errors name it as ``name`` (default the pair)."""
    name = name or f"shard {shard!r}"
    try:
        i, n = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise CsgguardError(f"{name} must be a pair (I, N) of integers") from None
    if n < 1 or not 0 <= i < n:
        raise CsgguardError(f"{name}: need 0 <= I < N")
    return i, n


def shard_files(files: Sequence[str], shard: tuple[int, int] | None, batch_size: int = 1) -> list[str]:
    """Contiguous block ``I`` of ``N``: shards 0..N-1 concatenated give back ``files`` in order.

    Blocks are cut on multiples of ``batch_size``, so every batch a shard forms is exactly a
    batch of the unsharded run: the forward pass sees the same tensors and the scores agree
    to the last bit (a different batch split can change float rounding in BLAS kernels).
    """
    if shard is None:
        return list(files)
    i, n = check_shard(shard)
    batches = -(-len(files) // batch_size)
    start, stop = i * batches // n * batch_size, (i + 1) * batches // n * batch_size
    return list(files[start:stop])


def _to_uint8(im) -> tuple[Any, str | None]:
    """16-bit / 32-bit / float greyscale -> 8-bit L by scaling (Pillow's convert would clip)."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():  # a float image with NaN / infinite pixels has no 8-bit reading
            raise ValueError(f"{im.mode} image holds NaN or infinite pixel values")
        top = 65535.0 if im.mode.startswith("I;16") or (im.mode == "I" and arr.max(initial=0) > 255) else 255.0
        if im.mode == "F":
            top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        from PIL import Image

        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L"), im.mode
    return im, None


DECODER_VERSION = 2  # part of the decoded-dataset cache key: bump when decode_image's output changes
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


def decode_image(source: str | os.PathLike | bytes, mode: str | None = None,
                 size: int | tuple[int, int] | None = None, *, resize: str = "bilinear"
                 ) -> tuple[np.ndarray, str | None]:
    """Decode one image (a file path or its bytes) into uint8 (C, H, W); return it and a conversion note.

    The one decoder of the project: training data (:mod:`csgguard.data`) and
    screening both call it, so a model is screened on exactly the pixels it was
    trained on. The rules, in order: EXIF orientation applied; 16-bit, 32-bit and
    float greyscale scaled (not clipped) to 8 bits; transparency composited on
    white; then converted to ``mode`` (``"L"`` or ``"RGB"``; ``None`` keeps grey
    sources grey and makes everything else RGB) and resized to ``size``
    (``(width, height)`` or a side length; ``None`` keeps the size) with
    ``resize`` (``"bilinear"`` or ``"nearest"``).

    Raises ``ValueError`` with a short reason for anything that is not a usable image.
    """
    import io

    from PIL import Image, ImageOps

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ValueError("empty file (0 bytes)")
        opener = io.BytesIO(bytes(source))
    else:
        path = os.fspath(source)
        if os.path.islink(path) and not os.path.exists(path):
            raise ValueError("broken symlink")
        if not os.path.isfile(path):
            raise ValueError("not a regular file")
        if os.path.getsize(path) == 0:
            raise ValueError("empty file (0 bytes)")
        opener = path
    if isinstance(size, int):
        size = (size, size)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(opener) as im:
                src_mode = im.mode
                src = f"{im.format or '?'} {im.mode} {im.width}x{im.height}"
                im.load()
                target = mode or ("L" if src_mode in GREY_MODES else "RGB")
                im = ImageOps.exif_transpose(im)
                im, deep = _to_uint8(im)
                if im.mode != target:
                    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                        im = im.convert("RGBA")
                        flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
                        im = Image.alpha_composite(flat, im)
                    try:
                        im = im.convert(target)
                    except ValueError:  # Pillow has no direct way for some modes (LAB -> L): through RGB
                        im = im.convert("RGB").convert(target)
                resized = size is not None and im.size != tuple(size)
                if resized:
                    resample = Image.Resampling.NEAREST if resize == "nearest" else Image.Resampling.BILINEAR
                    im = im.resize(tuple(size), resample)
                arr = np.asarray(im, dtype=np.uint8)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ValueError(f"decompression bomb refused ({exc})") from None
        except PermissionError:
            raise ValueError("permission denied") from None
        except Image.UnidentifiedImageError:
            raise ValueError("not an image Pillow can identify") from None
        except (OSError, SyntaxError, EOFError, ValueError, TypeError, IndexError, MemoryError) as exc:
            raise ValueError(f"cannot decode image ({exc.__class__.__name__}: {exc})") from None
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    converted = None
    if deep or resized or src_mode != target:
        converted = f"{src} -> {target} {arr.shape[2]}x{arr.shape[1]}"
    return np.array(arr, order="C"), converted  # a writable copy


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] -> uint8, rounding to the nearest level (what an 8-bit PNG holds)."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def encode_png(image: np.ndarray) -> bytes:
    """One (C, H, W) image as 8-bit PNG bytes (grey for C=1, else RGB); floats in [0, 1] are rounded first."""
    from PIL import Image

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = to_uint8(image)
    arr = image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), mode="L" if arr.ndim == 2 else "RGB").save(buf, format="PNG")
    return buf.getvalue()


class ImageFiles(torch.utils.data.Dataset):
    """Files -> (position, tensor, error, conversion); a failed decode yields a zero tensor and its error."""

    def __init__(self, files: Sequence[str], spec: InputSpec) -> None:
        self.files = list(files)
        self.spec = spec

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str | None, str | None]:
        try:
            arr, converted = decode_image(self.files[i], self.spec.mode, (self.spec.width, self.spec.height),
                                          resize=self.spec.resize)
            return i, torch.from_numpy(arr).float().div_(255.0), None, converted
        except ValueError as exc:
            return i, torch.zeros(self.spec.channels, self.spec.height, self.spec.width), str(exc), None
        except Exception as exc:  # one odd file must never stop a screening run
            return i, torch.zeros(self.spec.channels, self.spec.height, self.spec.width), \
                f"cannot read ({exc.__class__.__name__}: {exc})", None


def _collate(items):
    pos = [it[0] for it in items]
    return pos, torch.stack([it[1] for it in items]), [it[2] for it in items], [it[3] for it in items]


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)


def image_loader(files: Sequence[str], spec: InputSpec, *, batch_size: int = 64, workers: int = 0,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Batches of ``(positions, x, errors, conversions)`` in file order; ``workers`` decode in parallel."""
    if batch_size < 1:
        raise CsgguardError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise CsgguardError(f"--workers must be >= 0, got {workers}")
    return torch.utils.data.DataLoader(ImageFiles(files, spec), batch_size=batch_size, shuffle=False,
                                       num_workers=workers, collate_fn=_collate, pin_memory=pin_memory,
                                       worker_init_fn=_one_thread if workers else None,
                                       prefetch_factor=2 if workers else None,
                                       persistent_workers=False)
