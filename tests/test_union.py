"""The ``union`` detector: parts on one clean scale, tables and threshold from disjoint halves,
saved as arrays, fitted and screened through the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from csgguard import CsgguardError, extract_features, load_dataset, load_model
from csgguard import scores as S
from csgguard.cli import main
from csgguard.detectors import build_detector
from csgguard.detectors.base import UNITS_SEED, stratified_folds
from csgguard.detectors.store import load_detector, save_detector


@pytest.fixture(scope="module")
def digits(digits_csg_run):
    loaded = load_model(digits_csg_run)
    ds = load_dataset("digits")
    model = loaded.model.eval()
    x_fit, x_val, x_test = ds.train.x(), ds.val.x(), ds.test.x()[:200]
    feats = {k: extract_features(model, x) for k, x in (("fit", x_fit), ("val", x_val), ("test", x_test))}
    return loaded, {"fit": x_fit, "val": x_val, "test": x_test}, feats


def test_union_sums_clean_surprises_from_disjoint_halves_and_roundtrips(digits, tmp_path):
    """Each part's raw score goes through a clean table measured on one half of the calibration images
    (stratified by predicted class), the threshold on the other half; the score is the parts' summed
    surprise; a part alone far off flags the union; save/load keeps every score and the threshold."""
    loaded, x, f = digits
    det = build_detector("union").bind_model(loaded.model)
    det.fit(f["fit"], inputs=x["fit"]).calibrate(f["val"], inputs=x["val"])
    folds = stratified_folds(f["val"].pred, 2, np.random.default_rng(UNITS_SEED))
    assert det.table_images_ == int(np.sum(folds == 0)) and det.calibration_size_ == int(np.sum(folds == 1))
    assert [p.name for p in det.parts_] == ["csg-clean", "feature-squeezing"]
    # the tables are the table half's quantiles of each part's own score
    table_half = f["val"].subset(np.flatnonzero(folds == 0))
    raw = np.stack([det.parts_[0].score_samples(table_half),
                    det.parts_[1].score_samples(table_half, inputs=x["val"][torch.as_tensor(np.flatnonzero(folds == 0))])], 1)
    q, levels = S.tail_table(raw)
    np.testing.assert_array_equal(det.tail_q_, q)
    np.testing.assert_array_equal(det.tail_s_, levels)
    s = det.part_surprises(f["test"], inputs=x["test"])
    assert s.shape == (len(f["test"]), 2) and np.all(s >= 0)
    np.testing.assert_allclose(det.score_samples(f["test"], inputs=x["test"]), s.sum(1))
    # a part's clean surprise rises with its raw score (the order of far-off inputs is kept)
    clean_only = det.parts_[0].score_samples(f["test"])
    order = np.argsort(clean_only)
    assert np.all(np.diff(s[order, 0]) >= -1e-9)
    # noise images, far from every clean class, are flagged at least as often as csg-clean alone flags them
    noise_x = torch.rand((40, *x["test"].shape[1:]), generator=torch.Generator().manual_seed(0))
    noise = extract_features(loaded.model, noise_x)
    alone = build_detector("csg-clean").fit(f["fit"]).calibrate(f["val"])
    assert det.predict(noise, inputs=noise_x).mean() >= alone.predict(noise).mean() - 0.05
    # max: the largest surprise
    mx = build_detector("union", combine="max").bind_model(loaded.model)
    mx.fit(f["fit"], inputs=x["fit"]).calibrate(f["val"], inputs=x["val"])
    np.testing.assert_allclose(mx.score_samples(f["test"], inputs=x["test"]), s.max(1))
    # arrays + JSON, no pickle; the loaded union needs the model again for its squeezing part
    path = save_detector(det, tmp_path, model_sha256=loaded.sha256)
    assert "pickle" not in json.loads(path.read_text())["arrays"]["file"]
    back = load_detector(tmp_path, model_sha256=loaded.sha256)
    assert back.threshold_ == det.threshold_ and back.get_params() == det.get_params()
    with pytest.raises(CsgguardError, match="needs the model"):
        back.score_samples(f["test"], inputs=x["test"])
    back.bind_model(loaded.model)
    np.testing.assert_array_equal(back.score_samples(f["test"], inputs=x["test"]),
                                  det.score_samples(f["test"], inputs=x["test"]))


@pytest.mark.parametrize("parts, message", [
    ("csg-clean", "at least two parts"),
    ("csg-clean,csg-clean", "named twice"),
    ("csg-clean,csg-supervised", "cannot be a part"),
    ("csg-clean,csg-robust", "cannot be a part"),
    ("csg-clean,union", "cannot be a part"),
    ("csg-clean,nonsense", "unknown detector 'nonsense'"),
])
def test_union_refuses_bad_parts_before_any_work(parts, message):
    with pytest.raises(CsgguardError, match=message):
        build_detector("union", parts=parts).validate_params()


def test_union_state_must_name_its_parts(digits):
    """A file whose parts list does not match its parameters, or whose tables are broken, is refused."""
    loaded, x, f = digits
    det = build_detector("union", parts="csg-clean,mahalanobis").fit(f["fit"]).calibrate(f["val"])
    arrays, extra = det.state()
    cls = type(det)
    with pytest.raises(CsgguardError, match="does not hold the parts"):
        cls.from_state({"parts": "csg-clean,feature-squeezing"}, arrays, extra)
    bad = {**arrays, "tail_q_": arrays["tail_q_"][:, ::-1].copy()}
    with pytest.raises(CsgguardError, match="no valid clean tables"):
        cls.from_state(det.get_params(), bad, extra)
    again = cls.from_state(det.get_params(), arrays, extra)
    np.testing.assert_array_equal(again.score_samples(f["test"]), det.score_samples(f["test"]))


def test_fit_and_screen_a_union_from_the_cli(digits_csg_run, tmp_path):
    """`csgguard fit --detector union` binds the model and the images for the squeezing part; `screen`
    scores files with it; the summary says half the val images set the parts' tables."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    r = CliRunner().invoke(main, ["fit", "--run", str(run), "--detector", "union", "--format", "json",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["detector"] == "union" and 0 < summary["realised_fpr_val"] <= 0.15
    manifest = json.loads((run / "detector.json").read_text())
    assert manifest["fitted_on"]["units_images"] + manifest["fitted_on"]["calibration"] == len(load_dataset("digits").val)
    folder = tmp_path / "png"
    folder.mkdir()
    for i, img in enumerate(load_dataset("digits").test.x()[:6].numpy()):
        Image.fromarray(np.clip(img[0] * 255 + 0.5, 0, 255).astype(np.uint8), "L").save(folder / f"{i}.png")
    r = CliRunner().invoke(main, ["screen", str(folder), "--run", str(run), "--format", "jsonl", "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 6 and all(row["error"] is None and np.isfinite(row["score"]) for row in rows)
    bad = CliRunner().invoke(main, ["fit", "--run", str(run), "--detector", "union", "--param", "parts=csg-clean"])
    assert bad.exit_code == 2 and "at least two parts" in bad.output


@pytest.mark.parametrize("detector, params", [("feature-squeezing", {}), ("mahalanobis", {"noise": 0.01})])
def test_fit_hands_the_images_to_detectors_that_run_the_model_again(digits_csg_run, tmp_path, detector, params):
    """`fit` binds the model and passes the [0, 1] images to a detector that needs them, judged on the
    instance (Mahalanobis needs them only with noise > 0), and the saved file screens."""
    import shutil

    from csgguard.fitting import fit_detector

    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    result = fit_detector(run, detector=detector, params=params, limit=400, progress=False)
    assert result.detector.needs_inputs and 0 < result.summary["realised_fpr_val"] <= 0.15
    back = load_detector(result.path, model_sha256=load_model(run).sha256)
    assert back.get_params()["fpr"] == 0.05


def test_part_params_set_a_lighter_squeezing_part(digits, tmp_path):
    """``part_params`` reaches the part (the 2x2 median alone, no bit depth: one extra forward pass) and
    survives a save/load; names outside the parts, non-dict values, an fpr or an unknown parameter are
    refused before any work; squeezing with no squeezer left is refused."""
    loaded, x, f = digits
    light = {"feature-squeezing": {"bits": 0, "median": [2]}}
    det = build_detector("union", part_params=light).bind_model(loaded.model)
    det.fit(f["fit"], inputs=x["fit"]).calibrate(f["val"], inputs=x["val"])
    assert [name for name, _ in det.parts_[1].squeezers(1)] == ["median2x2"]
    save_detector(det, tmp_path, model_sha256=loaded.sha256)
    back = load_detector(tmp_path, model_sha256=loaded.sha256).bind_model(loaded.model)
    assert back.get_params()["part_params"] == light
    np.testing.assert_array_equal(back.score_samples(f["test"], inputs=x["test"]),
                                  det.score_samples(f["test"], inputs=x["test"]))
    for bad, message in [({"lid": {}}, "not among the parts"), ({"feature-squeezing": 2}, "must be a dict"),
                         ({"feature-squeezing": {"fpr": 0.1}}, "must be a dict"),
                         ({"feature-squeezing": {"nonsense": 1}}, "nonsense")]:
        with pytest.raises(CsgguardError, match=message):
            build_detector("union", part_params=bad).validate_params()
    with pytest.raises(CsgguardError, match="needs a squeezer"):
        build_detector("feature-squeezing", bits=0, median=()).fit(f["fit"])
