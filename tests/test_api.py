"""The Python API checks what the CLI checks: a library caller gets one clear CsgguardError, never a
run written from NaN settings, a detector left half-calibrated, or a NaN image cleared."""

from __future__ import annotations

import numpy as np
import pytest

from csgguard import TrainConfig, extract_features, load_dataset, load_model
from csgguard.errors import CsgguardError


@pytest.mark.parametrize("field,value", [("lr", float("nan")), ("lr", -0.1), ("gate_lr", float("inf")),
                                         ("lam", float("nan")), ("weight_decay", -1.0), ("gamma", float("nan")),
                                         ("milestones", (2.0,)), ("val_fraction", 1.5), ("momentum", 1.0),
                                         ("period", 0)])
def test_train_config_refuses_settings_the_cli_would(field, value, tmp_path):
    from csgguard import train

    with pytest.raises(CsgguardError, match=field):
        train(TrainConfig(epochs=1, **{field: value}), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "model.json").exists()


@pytest.mark.parametrize("value", [1.5, 1.0, 0.0, -0.5, True])
def test_load_dataset_val_fraction_is_a_fraction(value):
    from csgguard.errors import DataError

    with pytest.raises(DataError, match="val_fraction"):
        load_dataset("digits", val_fraction=value)


def test_calibrate_that_fails_leaves_the_detector_as_it_was(fitted_run):
    from csgguard.detectors import build_detector

    loaded = load_model(fitted_run)
    ds = load_dataset("digits")
    det = build_detector("mahalanobis").fit(extract_features(loaded, ds.train.x()))
    same = extract_features(loaded, ds.val.x()[:1].repeat(200, 1, 1, 1))
    with pytest.raises(CsgguardError, match="same score"):
        det.calibrate(same)
    assert not hasattr(det, "threshold_")  # not calibrated: predict refuses rather than using a bad threshold
    det.calibrate(extract_features(loaded, ds.val.x()))
    good = det.threshold_
    with pytest.raises(CsgguardError, match="same score"):
        det.calibrate(same)
    assert det.threshold_ == good
    with pytest.raises(CsgguardError, match="fpr must be"):
        det.threshold_at(2.0)
    # a NaN score (damaged input or model) is flagged: it must never read as "clean"
    feats = extract_features(loaded, ds.test.x()[:4])
    feats.pooled[1] = np.nan
    assert det.predict(feats)[1] == 1


def test_extract_features_checks_its_inputs(fitted_run):
    loaded = load_model(fitted_run)
    x = load_dataset("digits").test.x()[:8]
    assert extract_features(loaded, x).logits.shape == (8, 10)  # a LoadedModel is accepted
    for bad, needle in ((x * 255, r"\[0, 1\]"), (x[0], "4-d"), (x.repeat(1, 3, 1, 1), "shape")):
        with pytest.raises(CsgguardError, match=needle):
            extract_features(loaded, bad)
    with pytest.raises(CsgguardError, match="batch_size"):
        extract_features(loaded, x, batch_size=0)


def test_attack_labels_must_be_the_models_classes(fitted_run):
    from csgguard.attacks import run

    loaded = load_model(fitted_run)
    x = load_dataset("digits").test.x()[:6]
    with pytest.raises(CsgguardError, match=r"class indices in \[0, 10\)"):
        run(loaded, x, np.full(6, 42), "fgsm", eps=0.1, progress=False)


def test_screen_checks_its_request_before_loading(fitted_run, tmp_path, monkeypatch):
    from PIL import Image

    import csgguard.screening as screening

    monkeypatch.setattr(screening, "load_model", lambda *a, **k: pytest.fail("loaded before the check"))
    for kw, needle in (({"shard": (0, 0)}, "0 <= I < N"), ({"shard": (3, 2)}, "0 <= I < N"),
                       ({"workers": -1}, "workers"), ({"compile": "bogus"}, "compile mode")):
        with pytest.raises(CsgguardError, match=needle):
            screening.screen([tmp_path], fitted_run, **kw)
    monkeypatch.undo()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "one.png")
    screener, rows = screening.screen(str(tmp_path / "one.png"), fitted_run, device="cpu")  # one path as text
    assert [r["path"] for r in rows] == [str(tmp_path / "one.png")]
