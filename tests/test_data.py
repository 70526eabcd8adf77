"""Datasets by name: splits, formats, verification and clear errors."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csgguard import DataError, load_dataset
from csgguard.data import load_cifar10_dataset, load_imagefolder_dataset, load_mnist_dataset


def test_digits_splits_are_disjoint_deterministic_and_in_range():
    a, b = load_dataset("digits"), load_dataset("digits")
    assert np.array_equal(a.test.indices, b.test.indices)
    assert np.array_equal(a.val.indices, b.val.indices)
    ids = [set(a.train.indices), set(a.val.indices), set(a.test.indices)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert len(ids[0]) + len(ids[1]) + len(ids[2]) == 1797
    x = a.test.x()
    assert x.shape[1:] == (1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert a.num_classes == 10 and len(a.mean) == 1


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()


def _fake_mnist(root: Path, n_train=60, n_test=20, gz=True, layout="."):
    rng = np.random.default_rng(0)
    d = root / layout
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, arr in files.items():
        data = _idx(arr)
        if gz:
            (d / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return files


@pytest.mark.parametrize("gz,layout", [(True, "."), (False, "MNIST/raw")])
def test_mnist_idx_reader_and_layouts(tmp_path, gz, layout):
    files = _fake_mnist(tmp_path, gz=gz, layout=layout)
    ds = load_mnist_dataset(tmp_path, verify=False)
    assert len(ds.test) == 20 and len(ds.train) + len(ds.val) == 60
    assert np.array_equal(ds.test.images[:, 0].numpy(), files["t10k-images-idx3-ubyte"])


def test_mnist_md5_mismatch_is_a_clear_error(tmp_path):
    _fake_mnist(tmp_path)
    with pytest.raises(DataError, match="MD5 of decompressed bytes"):
        load_mnist_dataset(tmp_path)


def test_mnist_gzip_bomb_stops_at_the_files_known_size(tmp_path):
    """A .gz named like an MNIST file that expands past the real file's size is refused after
    reading one byte more than that size, never decompressed whole."""
    _fake_mnist(tmp_path)
    bomb = gzip.compress(bytes(64 << 20))  # 64 MiB of zeros in about 64 KiB
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    with pytest.raises(DataError, match="more than 47,040,016 bytes once decompressed"):
        load_mnist_dataset(tmp_path)


def test_mnist_missing_root_and_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_mnist_dataset(tmp_path)


def test_real_mnist_verifies(shared_data):
    root = shared_data / "mnist"
    if not root.is_dir():
        pytest.skip(f"{root} absent")
    ds = load_dataset("mnist", root)
    assert len(ds.test) == 10000 and len(ds.train) + len(ds.val) == 60000
    assert ds.in_channels == 1 and ds.image_size == 28


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _tree(root: Path, n=6, size=12, classes=("cat", "dog")):
    rng = np.random.default_rng(1)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / c / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)))


def test_imagefolder_tree(tmp_path):
    _tree(tmp_path / "imgs")
    ds = load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert ds.classes == ["cat", "dog"] and ds.in_channels == 3 and ds.image_size == 12
    assert len(ds.train) + len(ds.val) + len(ds.test) == 12


def test_class_sorted_sources_are_mixed_so_first_n_samples_every_class(tmp_path):
    for split in ("train", "test"):
        _tree(tmp_path / split, n=20, size=8, classes=("a", "b", "c"))
    ds = load_imagefolder_dataset(tmp_path)
    for s in (ds.train, ds.test):
        assert set(s.labels[:15].tolist()) == {0, 1, 2}
        # indices still point at the sorted file order: label of sorted position i is i // 20
        assert (s.labels.numpy() == s.indices // 20).all()


def test_imagefolder_train_test_tarballs(tmp_path):
    for split in ("train", "test"):
        _tree(tmp_path / "src" / split, n=4, size=32)
        with tarfile.open(tmp_path / f"{split}.tar.gz", "w:gz") as tar:
            tar.add(tmp_path / "src" / split, arcname=split)
    ds = load_imagefolder_dataset(tmp_path, image_size=16)
    assert len(ds.test) == 8 and ds.image_size == 16 and ds.classes == ["cat", "dog"]


def test_empty_and_corrupt_image_folders(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_imagefolder_dataset(tmp_path / "empty")
    _tree(tmp_path / "bad")
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
    with pytest.raises(DataError, match="broken.png: cannot decode image"):
        load_imagefolder_dataset(tmp_path / "bad")
    # every bad file is named in the one error (a user fixes the folder in one pass), then a count
    for i in range(5):
        (tmp_path / "bad" / "dog" / f"b{i}.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"^6 of \d+ images cannot be decoded .*b0\.jpg.*b1\.jpg.*and 3 more$"):
        load_imagefolder_dataset(tmp_path / "bad")


def test_imagefolder_links_stay_inside_the_dataset_folder(tmp_path):
    """Training lists files through the same walker as screening, bounded by the dataset root:
    a link into a sibling class is read, links that leave, loops and a FIFO are never read."""
    _tree(tmp_path / "imgs")
    _tree(tmp_path / "foreign", classes=("x",))
    os.symlink(tmp_path / "imgs" / "dog" / "0.png", tmp_path / "imgs" / "cat" / "alias.png")
    os.mkfifo(tmp_path / "imgs" / "cat" / "pipe.png")  # reading it would block forever
    ds = load_imagefolder_dataset(tmp_path / "imgs")
    assert len(ds.train) + len(ds.val) + len(ds.test) == 13
    os.symlink(tmp_path / "foreign" / "x" / "0.png", tmp_path / "imgs" / "cat" / "out1.png")
    os.symlink(tmp_path / "foreign" / "x", tmp_path / "imgs" / "dog" / "outdir")
    os.symlink("loop.png", tmp_path / "imgs" / "dog" / "loop.png")
    with pytest.raises(DataError) as err:
        load_imagefolder_dataset(tmp_path / "imgs")
    line = str(err.value)
    assert "\n" not in line and "out1.png: symlink leads outside" in line and "outdir: symlinked folder" in line
    assert "loop.png: symlink loop" in line and "--follow-symlinks" not in line  # training has no such option


def test_unknown_dataset_name():
    with pytest.raises(DataError, match="unknown dataset 'svhn'"):
        load_dataset("svhn")


def _cifar_py_root(root: Path, payload=None):
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = payload if payload is not None else {
            "data": rng.integers(0, 256, (10, 3072), dtype=np.uint8), "labels": list(range(10))}
        (d / name).write_bytes(pickle.dumps(batch))
    return d


def test_cifar10_torchvision_py_layout(tmp_path):
    _cifar_py_root(tmp_path)
    ds = load_cifar10_dataset(tmp_path)
    assert len(ds.test) == 10 and ds.image_size == 32 and ds.in_channels == 3


class _Evil:
    def __reduce__(self):
        return (eval, ("1+1",))


def test_cifar10_batch_with_foreign_global_is_refused(tmp_path):
    _cifar_py_root(tmp_path, payload={"data": _Evil(), "labels": [0]})
    with pytest.raises(DataError, match="refuses global builtins.eval"):
        load_cifar10_dataset(tmp_path)


def test_cifar10_binary_layout(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        rec = rng.integers(0, 256, (7, 3073), dtype=np.uint8)
        rec[:, 0] = np.arange(7)
        rec.tofile(d / name)
    ds = load_cifar10_dataset(tmp_path)
    assert len(ds.test) == 7 and ds.test.labels.tolist() == list(range(7))


@pytest.mark.slow
def test_real_cifar10_jpeg_copy(shared_data):
    root = shared_data / "cifar10-jpeg"
    if not (root / "test.tar.gz").is_file():
        pytest.skip(f"{root} absent")
    pytest.importorskip("PIL")
    ds = load_dataset("cifar10", root)
    assert len(ds.test) == 10000 and ds.classes[0] == "airplane"


def test_decode_cache_round_trip_keeps_pixels(tmp_path, monkeypatch):
    """The decode cache must give back the very pixels it was built from (a non-contiguous array
    written raw by safetensors once came back scrambled: CIFAR-10 trained to 0.65 on noise)."""
    import io
    import tarfile

    from PIL import Image

    from csgguard.data import load_imagefolder_dataset

    monkeypatch.setenv("CSGGUARD_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    pixels = {}
    for split in ("train", "test"):
        with tarfile.open(tmp_path / f"{split}.tar.gz", "w:gz") as tar:
            for cls in ("a", "b"):
                for i in range(6):
                    arr = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
                    buf = io.BytesIO()
                    Image.fromarray(arr).save(buf, format="PNG")
                    info = tarfile.TarInfo(f"{split}/{cls}/{i}.png")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
                    pixels[(split, cls, i)] = arr.transpose(2, 0, 1)
    first = load_imagefolder_dataset(tmp_path, val_fraction=0.25)
    second = load_imagefolder_dataset(tmp_path, val_fraction=0.25)  # from the cache
    assert any((tmp_path / "cache").iterdir())
    np.testing.assert_array_equal(first.test.images.numpy(), second.test.images.numpy())
    np.testing.assert_array_equal(first.train.images.numpy(), second.train.images.numpy())
    expected = {arr.tobytes() for (split, _, _), arr in pixels.items() if split == "test"}
    assert {img.tobytes() for img in second.test.images.numpy()} == expected


def test_decode_cache_stores_non_contiguous_arrays_faithfully(tmp_path, monkeypatch):
    """_cached_decode itself: an array that is a transposed view must come back equal from the cache."""
    from csgguard.data import _cached_decode

    monkeypatch.setenv("CSGGUARD_CACHE", str(tmp_path / "cache"))
    key = tmp_path / "key.bin"
    key.write_bytes(b"x")
    view = np.stack([np.arange(48, dtype=np.uint8).reshape(4, 4, 3).transpose(2, 0, 1)] * 2)
    assert not view.flags["C_CONTIGUOUS"]
    built = _cached_decode([key], lambda: (["a", "b"], {"xtr": view}), "t")
    cached = _cached_decode([key], lambda: pytest.fail("the cache was not used"), "t")
    assert built[0] == cached[0] == ["a", "b"]
    np.testing.assert_array_equal(cached[1]["xtr"], view)


def test_decode_cache_replaces_a_stale_entry_of_the_same_source(tmp_path, monkeypatch):
    """A data set copied again (same paths, new mtime) must replace its cache entry, not add one:
    re-extracted copies used to pile up full-size entries without bound."""
    import os

    from csgguard.data import _cached_decode

    cache = tmp_path / "cache"
    monkeypatch.setenv("CSGGUARD_CACHE", str(cache))
    cache.mkdir()
    legacy = cache / ("ab" * 12 + ".safetensors")  # an entry under the old one-hash naming
    legacy.write_bytes(b"old")
    other = cache / "notes.safetensors"  # not ours by its name: left alone
    other.write_bytes(b"keep")
    key = tmp_path / "key.bin"
    key.write_bytes(b"x")
    arrays = {"xtr": np.zeros((2, 3), dtype=np.uint8)}
    _cached_decode([key], lambda: (["a"], arrays), "t")
    _cached_decode([key], lambda: (["a"], arrays), "u")  # another source: its own entry
    first = sorted(p.name for p in cache.glob("*-*.safetensors"))
    assert len(first) == 2 and not legacy.exists() and other.exists()
    os.utime(key, ns=(1, 1))  # same path, new version
    _cached_decode([key], lambda: (["a"], arrays), "t")
    second = sorted(p.name for p in cache.glob("*-*.safetensors"))
    assert len(second) == 2 and second != first
    rebuilt = []
    _cached_decode([key], lambda: rebuilt.append(1) or (["a"], arrays), "t")
    assert not rebuilt  # the new entry is the one read
