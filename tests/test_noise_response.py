"""The ``noise-response`` detector: the logit gaps' response to a fixed bank of noise, standardised per
(predicted class, other class) on clean images; batch-independent, saved as arrays, a union part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.base import clone

from csgguard import CsgguardError, extract_features, load_dataset, load_model
from csgguard.attacks import run as run_attack
from csgguard.detectors import build_detector
from csgguard.detectors.noise import noise_bank
from csgguard.detectors.store import load_detector, save_detector
from csgguard.metrics import auroc


@pytest.fixture(scope="module")
def digits(digits_csg_run):
    loaded = load_model(digits_csg_run)
    ds = load_dataset("digits")
    model = loaded.model.eval()
    x = {"fit": ds.train.x(), "val": ds.val.x(), "test": ds.test.x()[:200]}
    feats = {k: extract_features(model, v) for k, v in x.items()}
    return loaded, ds, x, feats


def test_score_is_the_largest_standardised_noise_response_of_a_logit_gap(digits):
    """Recomputed by hand from the model and the seeded bank: mean over noisy copies of f_z - f_y minus
    its clean value, standardised by the fit images' per-(y, z) mean and spread, largest over z != y."""
    loaded, _, x, f = digits
    det = build_detector("noise-response", sigma=0.1, copies=4, seed=3).bind_model(loaded.model)
    det.fit(f["fit"], inputs=x["fit"])
    bank = 0.1 * noise_bank(tuple(x["test"].shape[1:]), 4, 3)

    def response(xs):
        with torch.no_grad():
            z0 = loaded.model(xs).double()
            y = z0.argmax(1)
            zn = torch.stack([loaded.model((xs + b).clamp(0, 1)).double() for b in bank]).mean(0)
        gap = lambda z: z - z.gather(1, y[:, None])  # noqa: E731
        return (gap(zn) - gap(z0)).numpy(), y.numpy()

    d_fit, y_fit = response(x["fit"])
    d, y = response(x["test"])
    for c in np.unique(y):
        rows = d_fit[y_fit == c]
        np.testing.assert_allclose(det.mean_[c], rows.mean(0), atol=1e-4)
        np.testing.assert_allclose(det.spread_[c], np.maximum(rows.std(0, ddof=1), 1e-6), rtol=1e-3, atol=1e-5)
    t = (d - det.mean_[y]) / det.spread_[y]
    t[np.arange(len(t)), y] = -np.inf
    np.testing.assert_allclose(det.score_samples(f["test"], inputs=x["test"]), t.max(1), rtol=1e-4, atol=1e-4)


def test_an_image_scores_the_same_in_any_batch(digits):
    """The noise is a fixed bank, not a draw per batch: scoring alone, in another batch size or in
    another order gives the same score."""
    loaded, _, x, f = digits
    det = build_detector("noise-response", copies=3).bind_model(loaded.model).fit(f["fit"], inputs=x["fit"])
    whole = det.score_samples(f["test"], inputs=x["test"])
    small = clone(det).set_params(batch_size=7)
    small.__dict__.update({k: v for k, v in det.__dict__.items() if k.endswith("_")})
    small.bind_model(loaded.model)
    np.testing.assert_allclose(small.score_samples(f["test"], inputs=x["test"]), whole, rtol=1e-6, atol=1e-6)
    rev = np.arange(len(whole))[::-1].copy()
    np.testing.assert_allclose(det.score_samples(f["test"].subset(rev), inputs=x["test"][torch.as_tensor(rev)]),
                               whole[rev], rtol=1e-6, atol=1e-6)


def test_it_sees_pgd_on_digits_and_roundtrips_through_a_file(digits, tmp_path):
    """Successful PGD examples score above the clean test images (AUROC well above chance, on the digits
    fixture model), the calibrated threshold holds about its FPR on clean images, and the saved file
    (safetensors + JSON) scores the same."""
    loaded, _, x, f = digits
    det = build_detector("noise-response", sigma=0.05).bind_model(loaded.model)
    det.fit(f["fit"], inputs=x["fit"]).calibrate(f["val"], inputs=x["val"])
    y = torch.as_tensor(f["test"].pred)
    adv = run_attack(loaded, x["test"], y, "pgd", eps=0.1, seed=0, progress=False).successful()
    xa = torch.as_tensor(adv.x_adv)
    fa = extract_features(loaded.model, xa)
    s_clean = det.score_samples(f["test"], inputs=x["test"])
    s_adv = det.score_samples(fa, inputs=xa)
    assert len(s_adv) > 50
    print("digits PGD 0.1 AUROC", auroc(s_clean, s_adv))
    assert auroc(s_clean, s_adv) > 0.8
    path = save_detector(det, tmp_path / "run", model_sha256=loaded.sha256)
    back = load_detector(path, model_sha256=loaded.sha256).bind_model(loaded.model)
    np.testing.assert_allclose(back.score_samples(fa, inputs=xa), s_adv, rtol=1e-9)
    assert back.threshold_ == det.threshold_


def test_parameters_are_checked_and_the_model_is_required(digits):
    loaded, _, x, f = digits
    for bad in ({"sigma": 0.0}, {"sigma": 2.0}, {"copies": 0}, {"seed": -1}, {"batch_size": 0}):
        det = build_detector("noise-response", **bad)
        assert det.get_params()[next(iter(bad))] == next(iter(bad.values()))  # stored untouched
        with pytest.raises(CsgguardError, match="noise-response"):
            det.bind_model(loaded.model).fit(f["fit"], inputs=x["fit"])
    with pytest.raises(CsgguardError, match="needs the model"):
        build_detector("noise-response").fit(f["fit"])
    det = build_detector("noise-response", copies=2).bind_model(loaded.model)
    with pytest.raises(CsgguardError, match="input images for"):
        det.fit(f["fit"], inputs=x["fit"][:10])


def test_a_union_part(digits, tmp_path):
    """csg-clean + noise-response as a union: both parts fitted, saved and loaded with their arrays."""
    loaded, _, x, f = digits
    det = build_detector("union", parts="csg-clean,noise-response",
                         part_params={"noise-response": {"copies": 2}}).bind_model(loaded.model)
    det.fit(f["fit"], inputs=x["fit"]).calibrate(f["val"], inputs=x["val"])
    assert [p.name for p in det.parts_] == ["csg-clean", "noise-response"]
    s = det.score_samples(f["test"], inputs=x["test"])
    path = save_detector(det, tmp_path / "u", model_sha256=loaded.sha256)
    back = load_detector(path, model_sha256=loaded.sha256).bind_model(loaded.model)
    np.testing.assert_allclose(back.score_samples(f["test"], inputs=x["test"]), s, rtol=1e-9)


def test_fit_and_screen_from_the_cli_with_a_fraction_parameter(digits_csg_run, tmp_path):
    """`csgguard fit --detector noise-response --param sigma=4/255` reads the fraction, binds the model and
    the images, and `screen` scores image files with the saved detector; a bad sigma is one line, exit 2."""
    import json
    import shutil

    from click.testing import CliRunner

    from csgguard.cli import main
    from csgguard.images import encode_png

    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    r = CliRunner().invoke(main, ["fit", "--run", str(run), "--detector", "noise-response", "--param",
                                  "sigma=4/255", "--param", "copies=2", "--format", "json", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["detector"] == "noise-response"
    manifest = json.loads((run / "detector.json").read_text())
    assert abs(manifest["params"]["sigma"] - 4 / 255) < 1e-12 and manifest["params"]["copies"] == 2
    folder = tmp_path / "png"
    folder.mkdir()
    for i, img in enumerate(load_dataset("digits").test.x()[:5].numpy()):
        (folder / f"{i}.png").write_bytes(encode_png(img))
    r = CliRunner().invoke(main, ["screen", str(folder), "--run", str(run), "--format", "jsonl", "--no-progress"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    assert len(rows) == 5 and all(row["error"] is None and np.isfinite(row["score"]) for row in rows)
    bad = CliRunner().invoke(main, ["fit", "--run", str(run), "--detector", "noise-response", "--param", "sigma=4/0"])
    assert bad.exit_code == 2 and "sigma" in bad.output and "Traceback" not in bad.output


def test_the_adaptive_attack_differentiates_the_score_and_evades_it(digits):
    """The score is one torch function: with gradients it equals the screened score and has a gradient in
    the input; the adaptive attack aimed at it (margin form, digits Linf 0.3) leaves most successful
    examples under the calibrated threshold, where plain PGD at the same budget is mostly flagged."""
    from csgguard.adaptive import adaptive_attack

    loaded, _, x, f = digits
    det = build_detector("noise-response", sigma=0.05).bind_model(loaded.model)
    det.fit(f["fit"], inputs=x["fit"]).calibrate(f["val"], inputs=x["val"])
    xs = x["test"][:60].clone().requires_grad_(True)
    s = det.torch_score(loaded.model(xs), inputs=xs)
    np.testing.assert_allclose(s.detach().numpy(), det.score_samples(f["test"].subset(np.arange(60)),
                                                                       inputs=x["test"][:60]), rtol=1e-4, atol=1e-4)
    (grad,) = torch.autograd.grad(s.sum(), xs)
    assert grad.abs().sum() > 0
    y = torch.as_tensor(f["test"].pred[:120])
    thr = float(det.threshold_)
    plain = run_attack(loaded, x["test"][:120], y, "pgd", eps=0.3, seed=0, progress=False).successful()
    flagged_plain = (det.score_samples(extract_features(loaded.model, torch.as_tensor(plain.x_adv)),
                                       inputs=torch.as_tensor(plain.x_adv)) > thr).mean()
    adv = adaptive_attack(loaded.model, x["test"][:120], y, det, eps=0.3, threshold=thr,
                          scale=float(np.std(det.calibration_scores_)), steps=20, weights=(2.0,), forms="margin")
    xa = torch.as_tensor(adv.x_adv[adv.success])
    flagged = (det.score_samples(extract_features(loaded.model, xa), inputs=xa) > thr).mean()
    assert adv.success.mean() > 0.5
    assert flagged < 0.5 < flagged_plain, (flagged, flagged_plain)


def test_cli_attack_adaptive_against_a_saved_noise_response_detector(digits_csg_run, tmp_path):
    """`csgguard attack --method adaptive-margin` on a run whose detector file is noise-response: the
    loaded detector is given the model and the images, and the saved set counts its evasions."""
    import shutil

    from click.testing import CliRunner

    from csgguard.attacks import load_adversarial_set
    from csgguard.cli import main

    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    r = CliRunner().invoke(main, ["fit", "--run", str(run), "--detector", "noise-response", "--param", "sigma=0.05",
                                  "--format", "json", "--no-progress"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "adaptive.npz"
    r = CliRunner().invoke(main, ["attack", "--method", "adaptive-margin", "--run", str(run), "--eps", "0.3",
                                  "--limit", "40", "--steps", "10", "--out", str(out), "--format", "json",
                                  "--no-progress"])
    assert r.exit_code == 0, r.output
    adv = load_adversarial_set(out)
    assert adv.meta["target_detector"] == "noise-response"
    assert adv.meta["succeeded"] >= 20 and adv.meta["evaded"] >= 0.5 * adv.meta["succeeded"], adv.meta


def test_two_sided_score_counts_both_tails_in_clean_units(digits, tmp_path):
    """``sides="two"``: the one-sided score r mapped to max((r - m_y) / u_y, (m_y - r) / l_y) with the clean
    fit images' per-class median and tail distances (recomputed here with numpy); an input that noise
    moves less than any clean image scores high; the file keeps the units; a damaged unit is refused."""
    loaded, _, x, f = digits
    one = build_detector("noise-response", sigma=0.1, copies=4).bind_model(loaded.model).fit(f["fit"], inputs=x["fit"])
    two = build_detector("noise-response", sigma=0.1, copies=4, sides="two").bind_model(loaded.model)
    two.fit(f["fit"], inputs=x["fit"])
    np.testing.assert_array_equal(two.mean_, one.mean_)
    r_fit = one.score_samples(f["fit"], inputs=x["fit"])
    pred = np.asarray(f["fit"].pred)
    for c in range(10):
        rows = r_fit[pred == c] if np.sum(pred == c) >= 40 else r_fit
        lo, mid, hi = np.quantile(rows, [0.025, 0.5, 0.975])
        np.testing.assert_allclose([two.center_[c], two.upper_[c], two.lower_[c]], [mid, hi - mid, mid - lo],
                                   rtol=1e-6, atol=1e-9)
    r = one.score_samples(f["test"], inputs=x["test"])
    y = np.asarray(f["test"].pred)
    expect = np.maximum((r - two.center_[y]) / two.upper_[y], (two.center_[y] - r) / two.lower_[y])
    got = two.score_samples(f["test"], inputs=x["test"])
    np.testing.assert_allclose(got, expect, rtol=1e-6, atol=1e-9)
    low = np.argmin(r - two.center_[y])  # the test image noise moves least, relative to its class
    assert r[low] < two.center_[y[low]] and got[low] > 0
    two.calibrate(f["val"], inputs=x["val"])
    path = save_detector(two, tmp_path / "two.json", model_sha256=loaded.sha256)
    back = load_detector(path, model_sha256=loaded.sha256)
    assert back.sides == "two"
    back.bind_model(loaded.model)
    np.testing.assert_allclose(back.score_samples(f["test"], inputs=x["test"]), got, rtol=1e-9)
    arrays, extra = two.state()
    bad = dict(arrays, lower_=np.zeros(10))
    with pytest.raises(CsgguardError, match="two-sided"):
        type(two).from_state(two.get_params(), bad, extra)
    with pytest.raises(Exception, match="sides"):
        build_detector("noise-response", sides="three").bind_model(loaded.model).fit(f["fit"], inputs=x["fit"])
