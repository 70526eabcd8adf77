"""One decoder: training data and screening see the same pixels for every awkward file kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from csgguard.data import load_imagefolder_dataset
from csgguard.images import IMAGE_SUFFIXES, ImageFiles, InputSpec, decode_image, encode_png

SIZE = 8
rng = np.random.default_rng(0)
BASE_RGB = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
BASE_L = rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)


def _sixteen_bit(path: Path) -> None:
    arr = (np.arange(SIZE * SIZE, dtype=np.uint32).reshape(SIZE, SIZE) * 1024).astype(np.uint16)
    Image.fromarray(arr).save(path)  # uint16 -> mode I;16


def _rgba(path: Path) -> None:
    a = np.dstack([BASE_RGB, np.where(np.arange(SIZE)[None, :] < SIZE // 2, 0, 255).repeat(SIZE, 0)])
    Image.fromarray(a.astype(np.uint8), "RGBA").save(path)


def _palette(path: Path) -> None:
    im = Image.fromarray(BASE_RGB).quantize(8)
    im.info["transparency"] = 0
    im.save(path, transparency=0)


def _cmyk(path: Path) -> None:
    Image.fromarray(BASE_RGB).convert("CMYK").save(path)


def _exif_rotated(path: Path) -> None:
    im = Image.fromarray(BASE_RGB[:, : SIZE // 2])  # 4 wide, 8 high: rotation changes the shape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    im.save(path, exif=exif)


def _grey(path: Path) -> None:
    Image.fromarray(BASE_L, "L").save(path)


def _rgb(path: Path) -> None:
    Image.fromarray(BASE_RGB).save(path)


CASES = {  # name -> (writer, file name, model mode)
    "16-bit": (_sixteen_bit, "a.png", "L"),
    "rgba": (_rgba, "a.png", "RGB"),
    "rgba-to-grey": (_rgba, "a.png", "L"),
    "palette-transparent": (_palette, "a.png", "RGB"),
    "cmyk": (_cmyk, "a.tif", "RGB"),
    "exif-rotated": (_exif_rotated, "a.png", "RGB"),
    "grey-into-rgb-model": (_grey, "a.png", "RGB"),
    "rgb-into-grey-model": (_rgb, "a.png", "L"),
}


def _training_and_screening(tmp_path: Path, case: str) -> tuple[np.ndarray, np.ndarray]:
    writer, fname, mode = CASES[case]
    for split in ("train", "test"):
        for cls in ("c", "d"):  # two classes (a one-class folder is refused); the same image in each
            (tmp_path / split / cls).mkdir(parents=True)
            writer(tmp_path / split / cls / fname)
    ds = load_imagefolder_dataset(tmp_path, image_size=SIZE, mode=mode)
    trained_on = ds.test.x()[0].numpy()
    channels = 1 if mode == "L" else 3
    _, screened, err, _ = ImageFiles([str(tmp_path / "test" / "c" / fname)], InputSpec(channels, SIZE, SIZE))[0]
    assert err is None
    return trained_on, screened.numpy()


@pytest.mark.parametrize("case", sorted(CASES))
def test_training_and_screening_decode_identically(tmp_path, case):
    trained_on, screened = _training_and_screening(tmp_path, case)
    assert trained_on.shape == screened.shape
    assert np.array_equal(trained_on, screened)


def test_sixteen_bit_is_scaled_not_clipped(tmp_path):
    x, _ = _training_and_screening(tmp_path, "16-bit")
    assert 0.45 < x.mean() < 0.55  # 0..65535 ramp; clipping at 255 would give ~0.98


def test_transparency_is_composited_on_white(tmp_path):
    x, _ = _training_and_screening(tmp_path, "rgba")
    assert np.all(x[:, :, : SIZE // 2] == 1.0)  # the transparent left half
    assert np.array_equal(np.rint(x[:, :, SIZE // 2:] * 255).astype(np.uint8),
                          BASE_RGB[:, SIZE // 2:].transpose(2, 0, 1))


def test_exif_orientation_is_applied(tmp_path):
    _exif_rotated(tmp_path / "r.png")
    arr, _ = decode_image((tmp_path / "r.png").read_bytes())
    expected = np.rot90(BASE_RGB[:, : SIZE // 2], k=-1)  # 90 degrees clockwise
    assert arr.shape == (3, SIZE // 2, SIZE)
    assert np.array_equal(arr.transpose(1, 2, 0), expected)


def test_first_image_fixes_the_mode_of_a_mixed_folder(tmp_path):
    """A grey first image makes the dataset grey; a later RGB file is converted as screening would."""
    for split in ("train", "test"):
        for cls in ("c", "d"):  # two classes (a one-class folder is refused), the same two files in each
            (tmp_path / split / cls).mkdir(parents=True)
            _grey(tmp_path / split / cls / "a.png")
            _rgb(tmp_path / split / cls / "b.png")
    ds = load_imagefolder_dataset(tmp_path)
    assert ds.in_channels == 1
    order = np.argsort(ds.test.indices)
    _, screened, _, _ = ImageFiles([str(tmp_path / "test" / "c" / "b.png")], InputSpec(1, SIZE, SIZE))[0]
    assert np.array_equal(ds.test.x()[order[1]].numpy(), screened.numpy())


def test_one_suffix_list_and_one_png_encoder():
    from csgguard import data
    from csgguard.attacks import images as attack_images

    assert data.IMAGE_SUFFIXES is IMAGE_SUFFIXES
    assert attack_images.encode_png is encode_png
    img = rng.random((3, 4, 5))
    back, _ = decode_image(encode_png(img))
    assert np.array_equal(back, np.rint(img * 255).astype(np.uint8))


def test_nan_float_images_are_refused_and_lab_reaches_grey(tmp_path):
    """A float image with NaN pixels has no 8-bit reading: a decode error (an error row when screened),
    not a black image and a numpy warning; a LAB image reaches a grey model through RGB."""
    import warnings

    from csgguard.images import decode_image

    a = np.zeros((8, 8), np.float32)
    a[0, 0] = np.nan
    Image.fromarray(a, "F").save(tmp_path / "nan.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="NaN or infinite"):
            decode_image(tmp_path / "nan.tif")
    Image.new("LAB", (8, 8), (50, 10, 10)).save(tmp_path / "lab.tif")
    grey, note = decode_image(tmp_path / "lab.tif", "L")
    assert grey.shape == (1, 8, 8) and note.startswith("TIFF LAB")
    rgb, _ = decode_image(tmp_path / "lab.tif", "RGB")
    assert np.abs(grey[0].astype(int) - np.asarray(Image.fromarray(rgb.transpose(1, 2, 0)).convert("L"))).max() == 0
