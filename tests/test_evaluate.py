"""The evaluation protocol (docs/method.md section 4): splits, fixed thresholds, counts, report, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import csgguard.evaluate as E
from csgguard import load_model
from csgguard.cli import main

DETECTORS = ("csg-clean", "csg-supervised", "mahalanobis", "lid", "kd-bu", "feature-squeezing", "noise-response")
ATTACKS = ("fgsm", "pgd")
FIELDS = ("auroc", "tpr_at_5pct_fpr", "tpr_at_1pct_fpr", "tpr_at_target_fpr", "realised_fpr", "threshold",
          "attack_success_rate", "n_adv_eval", "n_clean_eval", "n_attacked", "seen", "roc")


@pytest.fixture(scope="module")
def report(digits_csg_run, digits_std_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    return E.evaluate(digits_csg_run, compare_run=digits_std_run, attacks=ATTACKS, detectors=DETECTORS,
                      limit=420, device="cpu", out=out, eps=0.1, supervised_on="fgsm", adaptive_steps=10,
                      adaptive_weights=(2.0,),
                      detector_params={"kd-bu": {"passes": 10}}, attack_settings={"pgd": {"steps": 10}},
                      progress=False)


def test_report_has_every_detector_attack_model(report):
    cells = {(r["model"], r["detector"], r["attack"]) for r in report["results"]}
    assert cells == {(m, d, a) for m in ("csg", "std") for d in DETECTORS for a in ATTACKS}
    for r in report["results"]:
        for f in FIELDS:
            assert f in r, f
        assert r["n_clean_eval"] == report["split_sizes"]["evaluation"]
        assert 0.5 < r["auroc"] <= 1.0 or r["detector"] == "feature-squeezing"
    assert {r["detector"] for r in report["adaptive"]} == set(DETECTORS)
    on_disk = json.loads((report_path := __import__("pathlib").Path(report["out"]) / "report.json").read_text())
    assert on_disk["splits"] == report["splits"]
    for name in ("report.md", "roc_fgsm.png", "roc_pgd.png", "roc_adaptive-pgd.png", "gate_heatmap.png"):
        assert (report_path.parent / name).stat().st_size > 0
    md = (report_path.parent / "report.md").read_text()
    assert "Seen vs unseen" in md and "Adaptive attack" in md


def test_splits_disjoint_and_fixed_by_seed(report):
    parts = [set(report["splits"][k]) for k in ("fit", "calibration", "evaluation")]
    assert all(len(p) >= 100 for p in parts)
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(map(len, parts)) == 420
    a, b = E.make_splits(719, seed=0, limit=420), E.make_splits(719, seed=1, limit=420)
    assert not np.array_equal(a["evaluation"], b["evaluation"])
    np.testing.assert_array_equal(a["fit"], E.make_splits(719, seed=0, limit=420)["fit"])


def test_threshold_fixed_across_attacks(report):
    for m in ("csg", "std"):
        for d in DETECTORS:
            thr = {r["threshold"] for r in report["results"] if r["model"] == m and r["detector"] == d}
            thr |= {r["threshold"] for r in report["adaptive"] if r["model"] == m and r["detector"] == d}
            assert len(thr) == 1, (m, d, thr)
            assert thr == {report["thresholds"][m][d]["target"]}


def test_supervised_seen_only_on_fit_attack(report):
    for r in report["results"]:
        assert r["seen"] == (r["supervised"] and r["attack"] == "fgsm")
    assert report["seen_unseen"]["csg"]["csg-supervised"]["pgd@0.1"]["seen"] is False


def test_realised_fpr_recomputed_on_evaluation_split(report, digits_csg_run):
    """Refit csg-clean on the reported split indices: same threshold, same FPR on the evaluation part."""
    from csgguard import extract_features, load_dataset, load_model
    from csgguard.detectors import build_detector

    ds = load_dataset("digits")
    pos = {int(i): p for p, i in enumerate(ds.test.indices)}
    model = load_model(digits_csg_run).model
    feats = {k: extract_features(model, ds.test.x()[[pos[i] for i in report["splits"][k]]])
             for k in ("fit", "calibration", "evaluation")}
    det = build_detector("csg-clean").fit(feats["fit"]).calibrate(feats["calibration"])
    row = next(r for r in report["results"] if r["model"] == "csg" and r["detector"] == "csg-clean")
    assert det.threshold_ == pytest.approx(row["threshold"])
    assert row["realised_fpr"] == pytest.approx((det.score_samples(feats["evaluation"]) > det.threshold_).mean())


def test_failed_attacks_excluded(digits_csg_run, monkeypatch, tmp_path):
    """Half of the successes are turned into failures with all-zero images (as foolbox's C&W returns)."""
    real = E.run_attack
    seen = {}

    def half_failing(model, x, y, method, **kw):
        adv = real(model, x, y, method, **kw)
        ok = np.flatnonzero(adv.success)
        drop = ok[::2]
        adv.success[drop] = False
        adv.x_adv[drop] = 0.0
        seen[method] = int(adv.success.sum()), int(adv.attacked.sum())
        return adv

    monkeypatch.setattr(E, "run_attack", half_failing)
    rep = E.evaluate(digits_csg_run, attacks=("pgd",), detectors=("csg-clean",), limit=300, device="cpu",
                     eps=0.1, adaptive=False, out=tmp_path, progress=False)
    row = rep["results"][0]
    assert row["n_adv_eval"] == seen["pgd"][0] == rep["attacks"]["csg"]["pgd@0.1"]["succeeded"]
    assert row["attack_success_rate"] == pytest.approx(seen["pgd"][0] / seen["pgd"][1])


def _cli(args):
    res = CliRunner().invoke(main, args)
    return res.exit_code, res.output


@pytest.mark.parametrize("extra,msg", [
    (["--detectors", "csg-clean,nope"], "unknown detector 'nope'"),
    (["--attacks", "fgsm,zap"], "unknown attack 'zap'"),
    (["--limit", "30"], "too few"),
    (["--fpr", "0.7"], "--fpr"),
    (["--adaptive-eps", "2"], "--adaptive-eps 2 is outside (0, 1]"),
])
def test_cli_bad_input(digits_csg_run, tmp_path, extra, msg):
    out = tmp_path / "rep"
    code, text = _cli(["evaluate", "--run", str(digits_csg_run), "--out", str(out), "--device", "cpu", *extra])
    assert code == 2, text
    assert msg in text and "Traceback" not in text
    assert not out.exists()


def test_cli_unknown_detector_suggests_no_option_the_cli_lacks(digits_csg_run, tmp_path):
    """--detector-params is the sweep script's option, not `csgguard evaluate`'s."""
    code, text = _cli(["evaluate", "--run", str(digits_csg_run), "--out", str(tmp_path / "rep"), "--detectors",
                       "nope"])
    assert code == 2 and "unknown detector 'nope'" in text and "--detector-params" not in text, text


def test_report_md_escapes_the_run_path(report):
    """A run path with a non-UTF-8 byte crashed report.md after the figures were written (exit 3, a
    half-written report); an ESC in it reached the file raw."""
    import copy

    from csgguard.report import markdown

    r = copy.deepcopy(report)
    r["models"]["csg"]["run"] = "run\udcff\x1b[31m"  # os.fsdecode(b"run\xff\x1b[31m")
    md = markdown(r).encode("utf-8").decode()
    assert "run\\xff\\x1b[31m" in md and "\x1b" not in md


def test_cli_compare_run_mismatch(digits_csg_run, digits_std_run, tmp_path):
    from csgguard.models.store import save_model

    other = tmp_path / "other"
    std = load_model(digits_std_run)  # the same network saved under other class names (model.json alone
    save_model(std.model, other, classes=[f"c{i}" for i in range(len(std.classes))],  # cannot be edited)
               dataset=std.manifest["dataset"], training=std.manifest["training"])
    code, text = _cli(["evaluate", "--run", str(digits_csg_run), "--compare-run", str(other),
                       "--out", str(tmp_path / "rep"), "--device", "cpu"])
    assert code == 2 and "same classes" in text and "Traceback" not in text
    assert not (tmp_path / "rep").exists()


def test_cli_runs_and_prints_table(digits_csg_run, tmp_path):
    code, text = _cli(["evaluate", "--run", str(digits_csg_run), "--attacks", "fgsm", "--detectors",
                       "csg-clean,mahalanobis", "--no-adaptive", "--limit", "300", "--out", str(tmp_path / "r"),
                       "--device", "cpu", "--format", "json"])
    assert code == 0, text
    rep = json.loads(text[text.index("{"):])
    assert {r["detector"] for r in rep["results"]} == {"csg-clean", "mahalanobis"}
    assert (tmp_path / "r" / "report.md").is_file()


def test_adaptive_attack_aimed_at_each_target(digits_csg_run, tmp_path):
    """--adaptive-targets: each target is attacked through its own score (its row is no transfer and its
    evasion is judged on that attack); a detector without a differentiable score gets a transfer row."""
    rep = E.evaluate(digits_csg_run, attacks=("fgsm",), detectors=("csg-clean", "mahalanobis", "lid"), limit=300,
                     device="cpu", eps=0.1, supervised_on="fgsm", adaptive_steps=5, adaptive_weights=(2.0,),
                     adaptive_targets="all", progress=False, write=False)
    rows = {r["detector"]: r for r in rep["adaptive"]}
    assert rows["csg-clean"]["target"] == "csg-clean" and not rows["csg-clean"]["transfer"]
    assert rows["mahalanobis"]["target"] == "mahalanobis" and not rows["mahalanobis"]["transfer"]
    assert rows["lid"]["target"] == "csg-clean" and rows["lid"]["transfer"]  # LID has no torch score
    per = rep["attacks"]["csg"]["adaptive-pgd@0.1"]["per_target"]
    assert set(per) == {"csg-clean", "mahalanobis"}
    # the two attacks differ (each optimised against another score)
    assert rows["csg-clean"]["n_adv_eval"] == per["csg-clean"]["succeeded"]
    assert rows["mahalanobis"]["n_adv_eval"] == per["mahalanobis"]["succeeded"]
    with pytest.raises(E.CsgguardError, match="adaptive target 'kd-bu' is not among"):
        E.evaluate(digits_csg_run, attacks=("fgsm",), detectors=("csg-clean",), limit=300, device="cpu", eps=0.1,
                   adaptive_targets="kd-bu", progress=False, write=False)


def test_adaptive_eps_runs_the_adaptive_attack_only_there(digits_csg_run):
    """--adaptive-eps: the sweep keeps its budgets, the adaptive attack runs at the budgets asked for only."""
    rep = E.evaluate(digits_csg_run, attacks=("fgsm",), detectors=("csg-clean",), limit=300, device="cpu",
                     eps="0.05,0.1", adaptive_eps="0.1", adaptive_steps=5, adaptive_weights=(2.0,),
                     progress=False, write=False)
    assert {r["cell"] for r in rep["results"]} == {"fgsm@0.05", "fgsm@0.1"}
    assert {r["cell"] for r in rep["adaptive"]} == {"adaptive-pgd@0.1"}
    assert rep["settings"]["adaptive_eps"] == [0.1]


def test_saved_detector_measured_as_fit_left_it(digits_csg_run, tmp_path):
    """``saved`` scores the run's own detector file: not refitted, its own threshold, its fit's seen cells."""
    import shutil

    from csgguard import extract_features, load_dataset
    from csgguard.detectors.store import load_detector
    from csgguard.fitting import fit_detector

    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    fit_detector(run, detector="csg-clean", device="cpu")
    saved = load_detector(run, model_sha256=load_model(run).sha256)
    rep = E.evaluate(run, attacks=("pgd",), detectors=("saved", "csg-clean"), limit=360, device="cpu", eps=0.1,
                     adaptive=False, attack_settings={"pgd": {"steps": 10}}, progress=False, write=False)
    thr = rep["thresholds"]["csg"]
    assert thr["saved"]["target"] == saved.threshold_
    assert thr["saved"]["saved"]["detector"] == "csg-clean"
    assert thr["saved"]["calibration_images"] == saved.calibration_size_  # the run's val split, not the harness's
    assert thr["saved"]["target"] != thr["csg-clean"]["target"]          # the harness refits csg-clean; not saved
    row = next(r for r in rep["results"] if r["detector"] == "saved")
    assert row["threshold"] == saved.threshold_ and row["seen"] is False and row["auroc"] > 0.5
    ds = load_dataset("digits")
    pos = {int(i): p for p, i in enumerate(ds.test.indices)}
    ev = extract_features(load_model(run).model, ds.test.x()[[pos[i] for i in rep["splits"]["evaluation"]]])
    assert row["realised_fpr"] == pytest.approx((saved.score_samples(ev) > saved.threshold_).mean())


def test_saved_detector_missing_is_reported_not_fatal(digits_csg_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(digits_csg_run, run)
    for f in run.glob("detector.*"):
        f.unlink()
    rep = E.evaluate(run, attacks=("fgsm",), detectors=("saved", "csg-clean"), limit=300, device="cpu", eps=0.1,
                     adaptive=False, progress=False, write=False)
    assert {r["detector"] for r in rep["results"]} == {"csg-clean"}
    assert any("saved" in e and "detector not found" in e for e in rep["errors"])
