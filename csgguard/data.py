"""Datasets by name -> train / validation / test splits of [0, 1] images.

One way to name data everywhere (CLI and API):

* ``digits``            scikit-learn's 8x8 handwritten digits (embedded, no download)
* ``mnist``             the four IDX files (.gz or raw) under ``root`` (also torchvision's
                        ``MNIST/raw`` layout); MD5 of the decompressed bytes is checked
* ``cifar10``           torchvision's ``cifar-10-batches-py`` / ``-bin`` root, or an
                        image-folder tree (``train/<class>/*``, ``test/<class>/*``) or its
                        ``train.tar.gz`` / ``test.tar.gz``
* ``imagefolder:PATH``  any class-per-folder tree of PNG/JPEG images

Images are held in memory as uint8 (or float for digits) and reach the model as
float32 in [0, 1]; normalisation lives inside the model. The validation split is
carved from the training split with a fixed seed, so it is the same for every run.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import struct
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CsgguardError, DataError
from .images import DECODER_VERSION, IMAGE_SUFFIXES

MNIST_FILES = {
    "train_images": ("train-images-idx3-ubyte", "6bbc9ace898e44ae57da46a324031adb"),
    "train_labels": ("train-labels-idx1-ubyte", "a25bea736e30d166cdddb491f175f624"),
    "test_images": ("t10k-images-idx3-ubyte", "2646ac647ad5339dbf082846283269ea"),
    "test_labels": ("t10k-labels-idx1-ubyte", "27ae3e4e09519cfbb04c329615203637"),
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DATASET_NAMES = ("digits", "mnist", "cifar10", "imagefolder:PATH")


@dataclass
class Split:
    """Images (N, C, H, W) and labels of one split; ``indices`` point into the source split."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: np.ndarray

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def to_float(images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            return images.float().div_(255.0)
        return images.float()

    def x(self) -> torch.Tensor:
        """All images as float32 in [0, 1]."""
        return self.to_float(self.images)

    def subset(self, positions: np.ndarray | list[int], name: str | None = None) -> Split:
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        return Split(name or self.name, self.images[pos], self.labels[pos], self.indices[pos.numpy()])

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                drop_last: bool = False, positions: torch.Tensor | None = None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (x float [0,1], y) batches; ``positions`` restricts to a subset (e.g. a DDP shard)."""
        n = len(self)
        order = positions if positions is not None else (
            torch.randperm(n, generator=generator) if shuffle else torch.arange(n))
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for start in range(0, stop, batch_size):
            idx = order[start:start + batch_size]
            yield self.to_float(self.images[idx]), self.labels[idx]


@dataclass
class Dataset:
    """A named dataset: its three splits plus what the model needs to know about inputs."""

    name: str
    classes: list[str]
    train: Split
    val: Split
    test: Split
    source: str = ""
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    spec: str = ""                       # the name it was opened by (imagefolder: with its absolute path)
    root: str | None = None              # the absolute data root it was read from (mnist, cifar10)
    val_fraction: float | None = None    # the share of train carved out as val (the effective value)
    split_seed: int = 0                  # the seed of that carving (and of any train/test split)

    def recipe(self) -> dict[str, object]:
        """What reopens exactly these splits: ``load_dataset(spec, data_root, seed=, val_fraction=)``."""
        return {"spec": self.spec or self.name, "data_root": self.root, "val_fraction": self.val_fraction,
                "split_seed": self.split_seed}

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; choose train, val or test")
        return getattr(self, name)


# ----------------------------------------------------------------------------- helpers

def _channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    x = Split.to_float(images[: min(len(images), 20000)])
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def _carve_val(images: torch.Tensor, labels: torch.Tensor, val_fraction: float, seed: int
               ) -> tuple[Split, Split]:
    n = len(labels)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_val = int(round(n * val_fraction))
    val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    train = Split("train", images[train_idx], labels[train_idx], train_idx)
    val = Split("val", images[val_idx], labels[val_idx], val_idx)
    return train, val


def _make(name: str, classes: list[str], train_images, train_labels, test_images, test_labels,
          val_fraction: float, seed: int, source: str, class_sorted: bool = False) -> Dataset:
    """Assemble the three splits.

    ``class_sorted`` sources (image folders, tarballs: files listed class by class)
    are put in a fixed random order first, so that "the first N images" of any split
    (``--limit``) is a sample of every class rather than of the first class alone;
    ``indices`` still point at the source's own (sorted) order.
    """
    train_images = torch.as_tensor(train_images)
    test_images = torch.as_tensor(test_images)
    train_labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.int64)
    test_labels = torch.as_tensor(np.asarray(test_labels), dtype=torch.int64)
    if len(train_labels) == 0 or len(test_labels) == 0:
        raise DataError(f"{source}: a split is empty (train {len(train_labels)}, test {len(test_labels)} images)")
    order_tr, order_te = np.arange(len(train_labels)), np.arange(len(test_labels))
    if class_sorted:
        rng = np.random.default_rng(seed + 12345)
        order_tr, order_te = rng.permutation(len(train_labels)), rng.permutation(len(test_labels))
        train_images, train_labels = train_images[order_tr], train_labels[order_tr]
        test_images, test_labels = test_images[order_te], test_labels[order_te]
    train, val = _carve_val(train_images, train_labels, val_fraction, seed)
    train.indices, val.indices = order_tr[train.indices], order_tr[val.indices]
    test = Split("test", test_images, test_labels, order_te)
    mean, std = _channel_stats(train.images)
    return Dataset(name, classes, train, val, test, source, mean, std, val_fraction=val_fraction, split_seed=seed)


# ----------------------------------------------------------------------------- digits

def load_digits_dataset(val_fraction: float = 0.1, seed: int = 0, test_fraction: float = 0.4) -> Dataset:
    """scikit-learn's digits (1,797 8x8 images, 17 grey levels), a fixed stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    idx = np.arange(len(d.target))
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=d.target)
    tr, te = np.sort(tr), np.sort(te)
    ds = _make("digits", [str(i) for i in range(10)], x[tr], d.target[tr], x[te], d.target[te],
               val_fraction, seed, "sklearn.datasets.load_digits")
    # keep indices into the original 1,797 images, so reports can name them
    ds.train.indices = tr[ds.train.indices]
    ds.val.indices = tr[ds.val.indices]
    ds.test.indices = te
    return ds


# ----------------------------------------------------------------------------- MNIST

def _find_file(root: Path, stem: str, subdirs: tuple[str, ...]) -> Path | None:
    for sub in subdirs:
        for suffix in ("", ".gz"):
            p = root / sub / (stem + suffix)
            if p.is_file():
                return p
    return None


# The canonical files' decompressed sizes: reading stops one byte past them, so a gzip bomb named
# like an MNIST file costs that much memory, not whatever it expands to
MNIST_SIZES = {"train_images": 47_040_016, "train_labels": 60_008, "test_images": 7_840_016, "test_labels": 10_008}
_UNVERIFIED_LIMIT = 1 << 30  # --no-verify (IDX files of another data set): still bounded


def _read_maybe_gz(path: Path, limit: int) -> bytes:
    try:
        with path.open("rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            if gz:
                with gzip.GzipFile(fileobj=f) as g:
                    data = g.read(limit + 1)
            else:
                data = f.read(limit + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(data) > limit:
        raise DataError(f"{path}: holds more than {limit:,} bytes{' once decompressed' if gz else ''}, more than "
                        "this MNIST file can (corrupt, or not MNIST)")
    return data


def read_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({body.size} bytes for shape {dims})")
    return body.reshape(dims).copy()  # writable, detached from the file bytes


def load_mnist_dataset(root: str | os.PathLike, val_fraction: float = 1 / 12, seed: int = 0,
                       verify: bool = True) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MNIST root directory not found (pass --data-root)")
    subdirs = (".", "mnist", "MNIST/raw", "raw")
    arrays = {}
    for key, (stem, md5) in MNIST_FILES.items():
        path = _find_file(root, stem, subdirs)
        if path is None:
            raise DataError(f"{root}: MNIST file {stem}[.gz] not found (looked in {', '.join(subdirs)})")
        data = _read_maybe_gz(path, MNIST_SIZES[key] if verify else _UNVERIFIED_LIMIT)
        if verify:
            got = hashlib.md5(data).hexdigest()
            if got != md5:
                raise DataError(f"{path}: MD5 of decompressed bytes is {got}, expected {md5} (corrupt or not MNIST)")
        arrays[key] = read_idx(data, path)
    return _make("mnist", [str(i) for i in range(10)],
                 arrays["train_images"][:, None], arrays["train_labels"],
                 arrays["test_images"][:, None], arrays["test_labels"], val_fraction, seed, str(root))


# ----------------------------------------------------------------------------- image folders

def _decode(data: bytes, name: str, mode: str | None, size: int | None) -> np.ndarray:
    """One image file's bytes -> uint8 (C, H, W), by the decoder screening uses too."""
    from .images import decode_image

    try:
        arr = decode_image(data, mode, size)[0]
    except ValueError as exc:
        reason = str(exc) if str(exc).startswith("cannot decode image") else f"cannot decode image: {exc}"
        raise DataError(f"{name}: {reason}") from None
    # contiguous CHW: np.stack keeps a transposed view's memory order, and raw-buffer writers
    # (the safetensors cache) would then store the pixels scrambled
    return np.ascontiguousarray(arr)


def _decode_many(items: list[tuple[str, bytes, int]], mode: str | None, size: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Decode every image; the bad ones are all named in one error (the first few by name, then a
    count), so a user fixes a folder in one pass rather than one file per run."""
    if not items:
        raise DataError("no images found")
    failures: list[str] = []
    decoded: list[np.ndarray] = []
    for name, data, _ in items:
        try:
            arr = _decode(data, name, mode, size)
        except DataError as exc:
            failures.append(str(exc))
            continue
        if mode is None or size is None:  # the first good image sets the colour mode and the size
            mode = mode or ("L" if arr.shape[0] == 1 else "RGB")
            size = size or arr.shape[1]
            arr = _decode(data, name, mode, size)  # as every later image will be
        decoded.append(arr)
    if failures:
        more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
        raise DataError(f"{len(failures)} of {len(items)} images cannot be decoded (fix or remove them): "
                        + "; ".join(failures[:3]) + more)
    images = np.stack(decoded)
    labels = np.array([label for _, _, label in items], dtype=np.int64)
    return images, labels


def _check_class_name(name: str, where: str) -> str:
    """A class name becomes a label in model.json and in every report: printable UTF-8 text only."""
    from .safetext import visible

    if not name or not name.isprintable():  # control characters, surrogates (non-UTF-8 bytes), separators
        raise DataError(f"{where}: class folder {visible(name)!r} has a name with control characters or bytes "
                        "that are not UTF-8; rename it")
    return name


def _class_files(root: Path, classes: list[str]) -> list[tuple[Path, int]]:
    """``(image file, label)`` for every class folder, sorted per class, through the one walker
    (:mod:`csgguard.listing`).

    Links may lead anywhere inside the dataset ``root`` (a class folder may link into a
    sibling), nowhere outside it; a link that leaves, a loop, a broken link or a folder
    that cannot be listed refuses the whole dataset, every such entry named in the one
    error: a model must not silently learn from fewer files than the folder shows, nor
    from files outside it.
    """
    from .listing import list_inputs

    real_root = os.path.realpath(root)
    found, errors = [], []
    for label, cls in enumerate(classes):
        folder = root / cls
        if not folder.is_dir():
            continue
        real = os.path.realpath(folder)
        if not real.startswith(real_root.rstrip(os.sep) + os.sep):
            errors.append((str(folder), f"class folder is a symlink that leads outside {root} (-> {real})"))
            continue
        listing = list_inputs([folder], recursive=True, within=root, follow_hint=False)
        errors += listing.errors
        found += [(Path(path), label) for path in listing.files if os.path.isfile(path)]  # no FIFOs or devices
    if errors:
        shown = "; ".join(f"{path}: {error}" for path, error in errors[:3])
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        raise DataError(f"{shown}{more} (training data must live inside the dataset folder {root}: "
                        "copy the files in, or fix or remove these)")
    return found


def _scan_folder(root: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, bytes, int]]]:
    """Class-per-folder images under ``root``. Symlinks may not leave ``root`` (nor loop); a class
    folder name must be printable UTF-8; at least two classes must hold images."""
    if not root.is_dir():
        raise DataError(f"{root}: image folder not found")
    try:
        listed = [e for e in os.scandir(root) if not e.name.startswith(".")]
    except OSError as exc:
        raise DataError(f"{root}: cannot list folder ({exc.strerror or exc.__class__.__name__})") from None
    found = sorted(e.name for e in listed if e.is_dir())
    classes = classes or [_check_class_name(c, str(root)) for c in found]
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class>/<image>)")
    items = []
    for p, label in _class_files(root, classes):
        try:
            items.append((str(p), p.read_bytes(), label))
        except OSError as exc:
            raise DataError(f"{p}: cannot read ({exc.strerror or exc.__class__.__name__})") from None
    if not items:
        raise DataError(f"{root}: image folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return classes, items


def _require_classes(classes: list[str], items: list[tuple[str, bytes, int]], where: str) -> None:
    """Two classes with images at least: one class trains to a meaningless 'accuracy 1.0'."""
    used = sorted({label for _, _, label in items})
    if len(used) < 2:
        names = ", ".join(classes[i] for i in used) or "none"
        raise DataError(f"{where}: images of only {len(used)} class ({names}); a classifier needs at least two "
                        "class sub-folders holding images")


def _scan_tar(path: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[str, bytes, int]]]:
    """Read ``<split>/<class>/<file>`` members from an image-folder tarball."""
    try:
        with tarfile.open(path, "r:*") as tar:
            raw = []
            for m in tar:
                if not m.isfile() or Path(m.name).suffix.lower() not in IMAGE_SUFFIXES:
                    continue
                parts = Path(m.name).parts
                if len(parts) < 2:
                    continue
                _check_class_name(parts[-2], str(path))
                f = tar.extractfile(m)
                if f is not None:
                    raw.append((parts[-2], f"{path}:{m.name}", f.read()))
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read tarball ({exc})") from None
    classes = classes or sorted({c for c, _, _ in raw})
    index = {c: i for i, c in enumerate(classes)}
    items = sorted((name, data, index[c]) for c, name, data in raw if c in index)
    if not items:
        raise DataError(f"{path}: tarball holds no images")
    return classes, items


_LEGACY_CACHE_NAME = re.compile(r"[0-9a-f]{24}\.safetensors")


def _cache_dir() -> Path:
    base = os.environ.get("CSGGUARD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "csgguard")
    return Path(base)


def _cached_decode(key_paths: list[Path], build, tag: str):
    """Decode once and keep uint8 arrays in a safetensors cache keyed by path, size and mtime."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save as st_save_np

    from .artifacts import atomic_write_bytes

    # An entry's name is <source>-<version>: the source is what was decoded (the files' paths and the
    # decoding settings), the version is their size and mtime. A new version of a source replaces the old
    # entry instead of sitting beside it: a copied or re-extracted data set (new mtimes, same paths) used
    # to add another full-size entry every time, without bound.
    # "v3": entries written before arrays were made contiguous ("v1") hold scrambled pixels, and those of
    # the old per-module PIL decoder ("v2") other pixels than decode_image's; never reuse either
    source = hashlib.sha256(f"v3|{tag}".encode())
    version = hashlib.sha256(b"v3")
    for p in key_paths:
        st = p.stat()
        source.update(f"{p.resolve()}|".encode())
        version.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    prefix = source.hexdigest()[:16]
    cache = _cache_dir() / f"{prefix}-{version.hexdigest()[:16]}.safetensors"
    if cache.is_file():
        try:
            d = load_file(str(cache))
            classes = bytes(d.pop("classes")).decode().split("\n")
            return classes, d
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            cache.unlink(missing_ok=True)
    classes, arrays = build()
    payload = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    payload["classes"] = np.frombuffer("\n".join(classes).encode(), dtype=np.uint8).copy()
    try:
        atomic_write_bytes(cache, st_save_np(payload))
    except (OSError, CsgguardError):
        return classes, arrays  # a read-only (or full) cache is fine: we decode again next time
    for stale in cache.parent.glob(f"{prefix}-*.safetensors"):
        if stale != cache:
            stale.unlink(missing_ok=True)
    for legacy in cache.parent.glob("*.safetensors"):  # the one-hash names of before; never read again
        if _LEGACY_CACHE_NAME.fullmatch(legacy.name):
            legacy.unlink(missing_ok=True)
    return classes, arrays


def load_imagefolder_dataset(path: str | os.PathLike, *, name: str = "imagefolder", val_fraction: float = 0.1,
                             seed: int = 0, test_fraction: float = 0.2, image_size: int | None = None,
                             mode: str | None = None, classes: list[str] | None = None) -> Dataset:
    """A class-per-folder tree; uses ``train/`` and ``test/`` sub-trees when both exist.

    Also accepts a directory holding ``train.tar.gz`` and ``test.tar.gz`` (each an
    image-folder tree), as the CIFAR-10 JPEG copy is shipped.
    """
    root = Path(path)
    if not root.exists():
        raise DataError(f"{root}: image folder not found")
    tars = [root / "train.tar.gz", root / "test.tar.gz"]
    if all(t.is_file() for t in tars):
        def build():
            cls, tr = _scan_tar(tars[0], classes)
            _require_classes(cls, tr, str(tars[0]))
            _, te = _scan_tar(tars[1], cls)
            xtr, ytr = _decode_many(tr, mode, image_size)
            xte, yte = _decode_many(te, "L" if xtr.shape[1] == 1 else "RGB", xtr.shape[2])
            return cls, {"xtr": xtr, "ytr": ytr, "xte": xte, "yte": yte}
        cls, a = _cached_decode(tars, build, f"tar|{image_size}|{mode}|{classes}|{DECODER_VERSION}")
        return _make(name, cls, a["xtr"], a["ytr"], a["xte"], a["yte"], val_fraction, seed, str(root),
                     class_sorted=True)
    if (root / "train").is_dir() and (root / "test").is_dir():
        cls, tr = _scan_folder(root / "train", classes)
        _require_classes(cls, tr, str(root / "train"))
        _, te = _scan_folder(root / "test", cls)
        xtr, ytr = _decode_many(tr, mode, image_size)
        xte, yte = _decode_many(te, "L" if xtr.shape[1] == 1 else "RGB", xtr.shape[2])
        return _make(name, cls, xtr, ytr, xte, yte, val_fraction, seed, str(root), class_sorted=True)
    cls, items = _scan_folder(root, classes)
    _require_classes(cls, items, str(root))
    x, y = _decode_many(items, mode, image_size)
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    strat = y if np.bincount(y).min() >= 2 else None
    tr, te = train_test_split(idx, test_size=test_fraction, random_state=seed, stratify=strat)
    tr, te = np.sort(tr), np.sort(te)
    ds = _make(name, cls, x[tr], y[tr], x[te], y[te], val_fraction, seed, str(root), class_sorted=True)
    ds.train.indices, ds.val.indices, ds.test.indices = tr[ds.train.indices], tr[ds.val.indices], te[ds.test.indices]
    return ds


# ----------------------------------------------------------------------------- CIFAR-10

class _CifarUnpickler:
    """Read torchvision's ``cifar-10-batches-py`` files without executing code.

    Those files are Python pickles of a dict of numpy arrays. A restricted
    unpickler admits only the few numpy reconstruction globals such a file needs
    and refuses any other global, so a tampered batch cannot run code.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    @classmethod
    def load(cls, path: Path) -> dict:
        import pickle

        allowed = cls.ALLOWED

        class Restricted(pickle.Unpickler):
            def find_class(self, module: str, name: str):
                if (module, name) in allowed:
                    return super().find_class(module, name)
                raise DataError(f"{path}: refuses global {module}.{name} (not a CIFAR-10 batch)")

        try:
            with open(path, "rb") as f:
                return Restricted(f, encoding="latin1").load()
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"{path}: cannot read CIFAR-10 batch ({exc.__class__.__name__})") from None


def _cifar_arrays(data, labels, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Check one batch's arrays: (N, 3072) uint8 images, N integer labels in 0..9."""
    try:
        x = np.asarray(data)
        y = np.asarray(labels)
    except Exception:
        raise DataError(f"{path}: 'data' / 'labels' are not arrays (not a CIFAR-10 batch)") from None
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or x.shape[0] == 0:
        raise DataError(f"{path}: 'data' must be N x 3072 uint8, got {x.dtype} {tuple(x.shape)}")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x):
        raise DataError(f"{path}: {len(x)} images but labels of shape {tuple(y.shape)} ({y.dtype}); "
                        "need one integer label per image")
    if len(y) and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: labels outside 0..9 ({int(y.min())}..{int(y.max())})")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _cifar_py(folder: Path) -> tuple[np.ndarray, ...]:
    parts = []
    for fname in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        p = folder / fname
        if not p.is_file():
            raise DataError(f"{p}: CIFAR-10 batch not found")
        d = _CifarUnpickler.load(p)
        if not isinstance(d, dict) or "data" not in d or "labels" not in d:
            raise DataError(f"{p}: not a CIFAR-10 batch (expected a dict with 'data' and 'labels')")
        parts.append(_cifar_arrays(d["data"], d["labels"], p))
    xtr = np.concatenate([p[0] for p in parts[:5]])
    ytr = np.concatenate([p[1] for p in parts[:5]])
    return xtr, ytr, parts[5][0], parts[5][1]


def _cifar_bin(folder: Path) -> tuple[np.ndarray, ...]:
    def read(name: str):
        p = folder / name
        if not p.is_file():
            raise DataError(f"{p}: CIFAR-10 binary batch not found")
        raw = np.fromfile(p, dtype=np.uint8)
        if raw.size == 0 or raw.size % 3073:
            raise DataError(f"{p}: size {raw.size} is not a positive multiple of 3073 (truncated?)")
        rec = raw.reshape(-1, 3073)
        return _cifar_arrays(rec[:, 1:], rec[:, 0], p)

    tr = [read(f"data_batch_{i}.bin") for i in range(1, 6)]
    xte, yte = read("test_batch.bin")
    return np.concatenate([t[0] for t in tr]), np.concatenate([t[1] for t in tr]), xte, yte


def load_cifar10_dataset(root: str | os.PathLike, val_fraction: float = 0.1, seed: int = 0) -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: CIFAR-10 root directory not found (pass --data-root)")
    for sub in (root / "cifar-10-batches-py", root / "cifar10" / "cifar-10-batches-py"):
        if sub.is_dir():
            xtr, ytr, xte, yte = _cifar_py(sub)
            return _make("cifar10", CIFAR10_CLASSES, xtr, ytr, xte, yte, val_fraction, seed, str(sub))
    for sub in (root / "cifar-10-batches-bin",):
        if sub.is_dir():
            xtr, ytr, xte, yte = _cifar_bin(sub)
            return _make("cifar10", CIFAR10_CLASSES, xtr, ytr, xte, yte, val_fraction, seed, str(sub))
    for sub in (root, root / "cifar10-jpeg"):
        if (sub / "train.tar.gz").is_file() or ((sub / "train").is_dir() and (sub / "test").is_dir()):
            ds = load_imagefolder_dataset(sub, name="cifar10", val_fraction=val_fraction, seed=seed,
                                          image_size=32, mode="RGB", classes=CIFAR10_CLASSES)
            return ds
    raise DataError(f"{root}: no CIFAR-10 found (expected cifar-10-batches-py/, cifar-10-batches-bin/, "
                    "train.tar.gz + test.tar.gz, or train/ + test/ image folders)")


# ----------------------------------------------------------------------------- by name

def check_val_fraction(value: Any) -> float:
    """The share of train carved out as validation: a finite number in (0, 1)."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0 < value < 1):
        raise DataError(f"val_fraction must be a number in (0, 1), got {value!r}")
    return value


def load_dataset(spec: str = "digits", root: str | os.PathLike | None = None, *, seed: int = 0,
                 val_fraction: float | None = None) -> Dataset:
    """Resolve a dataset name (see module docstring) into its splits."""
    spec = (spec or "digits").strip()
    kw = {"seed": seed}
    if val_fraction is not None:
        kw["val_fraction"] = check_val_fraction(val_fraction)
    if spec == "digits":
        ds = load_digits_dataset(**kw)
        ds.spec = "digits"
        return ds
    root = root if root is not None else os.environ.get("CSGGUARD_DATA_ROOT")
    if spec in ("mnist", "cifar10"):
        if root is None:
            what = "the IDX files" if spec == "mnist" else "CIFAR-10"
            raise DataError(f"{spec} needs --data-root DIR holding {what} (or CSGGUARD_DATA_ROOT)")
        load = load_mnist_dataset if spec == "mnist" else load_cifar10_dataset
        ds = load(root, **kw)
        ds.spec, ds.root = spec, os.path.abspath(root)
        return ds
    if spec.startswith("imagefolder:"):
        path = spec.split(":", 1)[1]
        if not path:
            raise DataError("imagefolder needs a path: --data imagefolder:PATH")
        ds = load_imagefolder_dataset(path, **kw)
        ds.spec = "imagefolder:" + os.path.abspath(path)
        return ds
    raise DataError(f"unknown dataset {spec!r}; choose one of {', '.join(DATASET_NAMES)}")
