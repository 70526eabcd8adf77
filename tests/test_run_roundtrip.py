"""One run, every command: train -> fit -> attack -> evaluate -> inspect, per dataset kind.

Each run is trained with a non-default ``val_fraction`` and a ``train_limit``, so a
command that reopens the data any other way than the run was trained (the
loader's default fraction, the whole train split, the dataset name without its
imagefolder path) sees other splits and the assertions below catch it.

The mnist and cifar10 variants read real files from ``CSGGUARD_SHARED_DATA``
(default ``../shared/data`` beside the checkout) and skip when they are absent.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from csgguard import TrainConfig, load_dataset, train
from csgguard.cli import main
from csgguard.runs import load_run_dataset

REPO = Path(__file__).resolve().parents[1]


def _shared(sub: str) -> Path:
    base = Path(os.environ.get("CSGGUARD_SHARED_DATA") or REPO.parent / "shared" / "data")
    path = base / sub
    if not path.is_dir():
        pytest.skip(f"real {sub} data not found at {path} (set CSGGUARD_SHARED_DATA to the folder holding {sub}/)")
    return path


def _cifar_subset(tmp: Path, per_class_train: int = 40, per_class_test: int = 8) -> Path:
    """A small image-folder copy of the real CIFAR-10 JPEGs (train/<class>/, test/<class>/)."""
    src = _shared("cifar10-jpeg")
    out = tmp / "cifar10"
    for split, keep in (("train", per_class_train), ("test", per_class_test)):
        counts: dict[str, int] = {}
        with tarfile.open(src / f"{split}.tar.gz", "r:*") as tar:
            for m in tar:
                parts = Path(m.name).parts
                if not m.isfile() or len(parts) < 2 or counts.get(parts[-2], 0) >= keep:
                    continue
                counts[parts[-2]] = counts.get(parts[-2], 0) + 1
                dest = out / split / parts[-2] / parts[-1]
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tar.extractfile(m).read())
    return out


def _imagefolder(tmp: Path) -> Path:
    """Three easy classes of 8x8 grey images (dark, bright, striped)."""
    rng = np.random.default_rng(0)
    root = tmp / "shapes"
    for c, (name, make) in enumerate({
        "dark": lambda: rng.integers(0, 60, (8, 8)),
        "bright": lambda: rng.integers(190, 256, (8, 8)),
        "striped": lambda: np.tile([[0], [255]], (4, 8)) ^ rng.integers(0, 30, (8, 8)),
    }.items()):
        (root / name).mkdir(parents=True)
        for i in range(60):
            Image.fromarray(make().astype(np.uint8), "L").save(root / name / f"{c}_{i}.png")
    return root


def _cli(*args: str) -> str:
    res = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def _json(output: str):
    return json.loads(output[output.index("{"):])


KINDS = {
    # kind -> (data spec, data root, TrainConfig extras); K=16 filters keep the MIS computations cheap
    "digits": lambda tmp: ("digits", None, dict(width=16, epochs=3, train_limit=500, val_fraction=0.25)),
    "mnist": lambda tmp: ("mnist", str(_shared("mnist")), dict(width=16, epochs=1, train_limit=600, val_fraction=0.02)),
    "cifar10": lambda tmp: ("cifar10", str(_cifar_subset(tmp)),
                            dict(arch="small_cnn", width=16, epochs=3, train_limit=300, val_fraction=0.25,
                                 augment=False, optimizer="adam", lr=2e-3, csg_lr=2e-3, warmup=1,
                                 lr_schedule="step", swa_epochs=0)),  # not the 30 averaging epochs of the recipe
    # a relative path, trained in tmp and reopened from elsewhere: the run must record where it was
    "imagefolder": lambda tmp: (f"imagefolder:{_imagefolder(tmp).relative_to(tmp)}", None,
                                dict(width=16, epochs=4, train_limit=100, val_fraction=0.2)),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_run_through_every_command(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec, root, extra = KINDS[kind](tmp_path)
    fpr = "0.4" if kind == "cifar10" else "0.2"  # a 3-epoch CIFAR model classifies few val images correctly
    run = tmp_path / "run"
    train(TrainConfig(data=spec, data_root=root, seed=0, **extra), run, progress=False)
    vf, limit = extra["val_fraction"], extra["train_limit"]
    direct = load_dataset(spec, root, val_fraction=vf)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    # the resolver returns exactly the splits training used
    ds = load_run_dataset(run)
    assert np.array_equal(ds.train.indices, direct.train.indices[:limit])
    assert np.array_equal(ds.val.indices, direct.val.indices)
    assert np.array_equal(ds.test.indices, direct.test.indices)
    manifest = json.loads((run / "model.json").read_text())
    assert manifest["dataset"]["sizes"] == {"train": len(ds.train), "val": len(ds.val), "test": len(ds.test)}

    fit = _json(_cli("fit", "--run", str(run), "--fpr", fpr, "--format", "json"))
    fitted_on = json.loads((run / "detector.json").read_text())["fitted_on"]
    assert fitted_on["train_images"] == len(ds.train)          # the train_limit, not the whole split
    assert 0 < fit["calibration"] <= len(ds.val)                 # the run's own val split

    att = _json(_cli("attack", "--run", str(run), "--method", "fgsm", "--eps", "0.3", "--limit", "20",
                     "--format", "json"))
    assert att["total"] == min(20, len(ds.test))
    adv = np.load(att["out"])
    assert set(adv["index"].tolist()) <= set(ds.test.indices[:20].tolist())

    n_eval = min(60, len(ds.test))
    rep = _json(_cli("evaluate", "--run", str(run), "--attacks", "fgsm", "--detectors", "csg-clean",
                     "--no-adaptive", "--limit", str(n_eval), "--fpr", fpr, "--eps", "0.3", "--format", "json"))
    assert rep["data"]["test_images"] == len(ds.test)
    assert set(sum(rep["splits"].values(), [])) <= set(ds.test.indices.tolist())

    ins = _json(_cli("inspect", "--run", str(run), "--format", "json", "--split", "val"))
    assert ins["images"] == len(ds.val)
    assert ins["dataset"] == ds.name


def test_moved_data_is_refused_with_a_clear_message(tmp_path):
    from csgguard.errors import DataError

    root = _imagefolder(tmp_path)
    run = tmp_path / "run"
    train(TrainConfig(data=f"imagefolder:{root}", epochs=1, val_fraction=0.2), run, progress=False)
    for p in sorted((root / "dark").iterdir())[:10]:
        p.unlink()
    with pytest.raises(DataError, match="no longer splits as it did in training"):
        load_run_dataset(run)
