"""Budget sweeps (issue 9): cells, the swept report, one calibration, the fit-on-each matrix, bad input."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import csgguard.evaluate as E
from csgguard.cli import main
from csgguard.errors import CsgguardError
from csgguard.metrics import monotonicity_violations
from csgguard.sweep import build_cells, check_budgets, format_eps, parse_budget_list

ROOT = Path(__file__).resolve().parents[1]
DETECTORS = ("csg-clean", "csg-supervised", "mahalanobis")
CELLS = ["fgsm@0.1", "fgsm@0.3", "pgd@0.1", "pgd@0.3", "pgd-l2@1", "deepfool"]
FIT_CELLS = ["fgsm@0.1", "fgsm@0.3", "pgd@0.1"]


# ----------------------------------------------------------------------------- pure helpers

def test_cells_from_names_and_budgets():
    cells = build_cells(["pgd", "pgd-l2", "cw", "fgsm@8/255"], (0.1, 0.3), (0.5, 1.0))
    assert [c.id for c in cells] == ["pgd@0.1", "pgd@0.3", "pgd-l2@0.5", "pgd-l2@1", "cw", "fgsm@8/255"]
    assert [(c.method, c.norm) for c in cells[1:4]] == [("pgd", "linf"), ("pgd", "l2"), ("pgd", "l2")]
    assert cells[4].eps is None and cells[4].norm is None
    assert cells[5].eps == pytest.approx(8 / 255)
    assert parse_budget_list("0.3, 8/255,0.1", "--eps") == pytest.approx((0.3, 8 / 255, 0.1))
    assert check_budgets((0.3, 0.1, 0.3), "linf") == (0.1, 0.3)
    assert [format_eps(e) for e in (0.1, 0.2, 8 / 255, 2 / 255, 1.5)] == ["0.1", "0.2", "8/255", "2/255", "1.5"]
    assert format_eps(1.5 / 255) == "1.5/255" and format_eps(1 / 300) == "0.003333"
    assert parse_budget_list(format_eps(1.5 / 255), "--eps") == (1.5 / 255,)


def test_default_sweep_per_dataset():
    from csgguard.attacks.defaults import default_sweep

    assert default_sweep("linf", "digits", (1, 8, 8)) == (0.05, 0.1, 0.2, 0.3)
    assert max(default_sweep("l2", "digits", (1, 8, 8))) < max(default_sweep("l2", "mnist", (1, 28, 28)))
    assert default_sweep("linf", None, (3, 32, 32)) == pytest.approx((2 / 255, 4 / 255, 8 / 255, 16 / 255))


@pytest.mark.parametrize("values,norm,msg", [
    ((0.1, 1.5), "linf", "outside (0, 1]"), ((0.0,), "linf", "outside (0, 1]"), ((-0.1,), "linf", "outside"),
    ((-1.0,), "l2", "must be > 0"), ((0.0,), "l2", "must be > 0"), ((float("nan"),), "l2", "must be > 0"),
])
def test_budget_ranges(values, norm, msg):
    with pytest.raises(CsgguardError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        check_budgets(values, norm)


def test_monotonicity_violations_every_pair():
    curve = [(0.3, 0.5), (0.1, 0.9), (0.2, 0.86), (0.05, None)]
    pairs = {(v["smaller"], v["larger"]) for v in monotonicity_violations(curve, 0.03)}
    assert pairs == {(0.1, 0.2), (0.1, 0.3), (0.2, 0.3)}
    assert monotonicity_violations([(0.1, 0.9), (0.2, 0.88), (0.3, 0.95)], 0.03) == []


def test_metrics_row_has_one_home():
    """evaluate and adaptive share metrics.metrics_row; importing adaptive pulls in no evaluate (no cycle)."""
    import csgguard.metrics as M

    assert E.metrics_row is M.metrics_row
    code = ("import sys, csgguard.adaptive as A, inspect; assert 'csgguard.evaluate' not in sys.modules; "
            "assert 'from .evaluate' not in inspect.getsource(A)")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- one swept report

@pytest.fixture(scope="module")
def swept(digits_csg_run, digits_std_run, tmp_path_factory):
    calls = []
    real = E.run_attack

    def spy(model, x, y, method, **kw):
        calls.append((method, kw.get("norm"), kw.get("eps"), len(x)))
        return real(model, x, y, method, **kw)

    out = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(E, "run_attack", spy)
        rep = E.evaluate(digits_csg_run, compare_run=digits_std_run, attacks=("fgsm", "pgd", "pgd-l2", "deepfool"),
                         detectors=DETECTORS, limit=302, device="cpu", out=out, eps="0.3,0.1", l2_eps=(1.0,),
                         supervised_on="fgsm,pgd@0.1", adaptive_steps=5, adaptive_weights=(2.0,),
                         attack_settings={"pgd": {"steps": 10}}, progress=False)
    return rep, calls


def test_sweep_has_every_cell(swept):
    rep, calls = swept
    assert rep["settings"]["cells"] == CELLS and rep["settings"]["eps"] == [0.1, 0.3]
    cells = {(r["model"], r["detector"], r["cell"]) for r in rep["results"]}
    assert cells == {(m, d, c) for m in ("csg", "std") for d in DETECTORS for c in CELLS}
    for r in rep["results"]:
        assert r["eps"] == (None if r["cell"] == "deepfool" else float(r["cell"].split("@")[1]))
        assert r["norm"] == {"fgsm": "linf", "pgd": "linf", "pgd-l2": "l2", "deepfool": None}[r["attack"]]
        for k in ("auroc", "tpr_at_5pct_fpr", "tpr_at_1pct_fpr", "realised_fpr", "attack_success_rate", "n_attacked"):
            assert k in r
    evaluated = rep["split_sizes"]["evaluation"]
    assert evaluated != rep["split_sizes"]["fit"]  # limit=302: calls on either split tell apart by size
    # the attacks really ran with those norms and budgets (L2 through norm="l2"); deepfool without a budget
    assert ("pgd", "l2", 1.0, evaluated) in calls and ("fgsm", "linf", 0.3, evaluated) in calls
    assert ("deepfool", None, None, evaluated) in calls
    assert sorted((m, e) for m, _, e, n in calls if n == rep["split_sizes"]["fit"]) == sorted(
        [("fgsm", 0.1), ("fgsm", 0.3), ("pgd", 0.1)] * 2)
    assert rep["attacks"]["csg"]["pgd-l2@1"]["norm"] == "l2"


def test_adaptive_swept_over_linf_budgets(swept):
    rep, _ = swept
    got = {(r["model"], r["detector"], r["eps"]) for r in rep["adaptive"]}
    assert got == {(m, d, e) for m in ("csg", "std") for d in DETECTORS for e in (0.1, 0.3)}
    for r in rep["adaptive"]:
        assert r["attack"] == "adaptive-pgd" and r["target"] == "csg-clean"
        att = rep["attacks"][r["model"]][r["cell"]]
        assert r["n_adv_eval"] == att["succeeded"] and r["n_attacked"] == att["attacked"]
        flagged = round(r["tpr_at_target_fpr"] * r["n_adv_eval"]) if r["n_adv_eval"] else 0
        assert r["evasion_rate"] == pytest.approx((r["n_adv_eval"] - flagged) / r["n_attacked"])


def test_one_calibration_like_fit(swept, digits_csg_run):
    """Thresholds come from Detector.calibrate on every clean calibration image (misclassified included)."""
    from csgguard import extract_features, load_dataset, load_model
    from csgguard.detectors import build_detector

    rep, _ = swept
    ds = load_dataset("digits")
    pos = {int(i): p for p, i in enumerate(ds.test.indices)}
    model = load_model(digits_csg_run).model
    idx = {k: [pos[i] for i in rep["splits"][k]] for k in ("fit", "calibration", "evaluation")}
    feats = {k: extract_features(model, ds.test.x()[v]) for k, v in idx.items()}
    det = build_detector("csg-clean").fit(feats["fit"]).calibrate(feats["calibration"])
    thr = rep["thresholds"]["csg"]["csg-clean"]
    assert thr["calibration_images"] == len(idx["calibration"]) == len(det.calibration_scores_)
    assert thr["target"] == pytest.approx(det.threshold_)
    assert thr["0.01"] == pytest.approx(det.threshold_at(0.01))
    realised = (det.score_samples(feats["evaluation"]) > det.threshold_).mean()
    assert thr["realised_fpr_evaluation"] == pytest.approx(realised)
    md = (Path(rep["out"]) / "report.md").read_text()
    assert "## Thresholds" in md and "Detector.calibrate" in md and f"{det.threshold_:.4g}" in md


def test_seen_cells_and_fit_on_each_matrix(swept):
    rep, _ = swept
    for r in rep["results"]:
        assert r["seen"] == (r["supervised"] and r["cell"] in FIT_CELLS), r["cell"]
    assert rep["settings"]["supervised_on"] == FIT_CELLS
    for m in ("csg", "std"):
        rows = [r for r in rep["cross_fit"] if r["model"] == m]
        assert {(r["fit_on"], r["test_on"]) for r in rows} == {(f, t) for f in FIT_CELLS for t in CELLS}
        for r in rows:
            assert r["detector"] == "csg-supervised" and r["seen"] == (r["fit_on"] == r["test_on"])
            assert r["n_fit_adv"] == rep["attacks_fit"][m][r["fit_on"]]["succeeded"]
        # each fit is its own: the matrix rows differ from each other and from the all-cells fit
        by_fit = {f: [r["auroc"] for r in rows if r["fit_on"] == f] for f in FIT_CELLS}
        assert len({tuple(v) for v in by_fit.values()}) == len(FIT_CELLS)
    md = (Path(rep["out"]) / "report.md").read_text()
    assert "## Fit on each, test on each" in md and "| all |" in md
    on_disk = json.loads((Path(rep["out"]) / "report.json").read_text())
    assert len(on_disk["cross_fit"]) == len(rep["cross_fit"]) == 2 * len(FIT_CELLS) * len(CELLS)


def test_sweep_tables_and_curves(swept):
    rep, _ = swept
    out = Path(rep["out"])
    md = (out / "report.md").read_text()
    assert "## Budget sweep" in md and "### pgd (Linf)" in md and "### pgd-l2 (L2)" in md
    assert "| detector | model | 0.1 | 0.3 | worst | drops |" in md
    curve = next(c for c in rep["sweep"] if (c["model"], c["detector"], c["attack"]) == ("csg", "csg-clean", "pgd"))
    rows = {r["eps"]: r for r in rep["results"] if (r["model"], r["detector"], r["attack"]) == ("csg", "csg-clean", "pgd")}
    assert curve["eps"] == [0.1, 0.3]
    assert curve["detection_rate"] == [rows[0.1]["tpr_at_target_fpr"], rows[0.3]["tpr_at_target_fpr"]]
    assert curve["worst_auroc"] == min(rows[0.1]["auroc"], rows[0.3]["auroc"])
    for a in ("fgsm", "pgd", "pgd-l2", "adaptive-pgd"):
        assert (out / f"curve_{a}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "roc_deepfool.png").stat().st_size > 0 and not (out / "curve_deepfool.png").exists()


def test_curve_lines_csg_solid_std_dashed(swept):
    from csgguard.report import curve_figure

    rep, _ = swept
    lines = curve_figure(rep, "pgd").axes[0].get_lines()
    assert len(lines) == 2 * len(DETECTORS)
    for line in lines:
        model, det = line.get_label().split(" ", 1)
        assert line.get_linestyle() == ("-" if model == "CSG" else "--"), line.get_label()
        c = next(c for c in rep["sweep"] if (c["model"], c["detector"], c["attack"]) == (model.lower(), det, "pgd"))
        np.testing.assert_allclose(line.get_ydata(), c["detection_rate"])


def test_benchmark_tables(swept):
    spec = importlib.util.spec_from_file_location("detection_sweep", ROOT / "benchmarks" / "detection_sweep.py")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    rep, _ = swept
    text = mod.format_tables(rep)
    for title in ("## AUROC", "## Detection rate at the fitted threshold", "## CSG - STD", "## Worst case",
                  "## Monotonicity", "## Realised FPR", "## Adaptive attack"):
        assert title in text
    bad = [c for c in rep["sweep"] if c["violations"]]
    assert text.count("FAILS") == len(bad)
    saved = mod.json_rows(rep, "cmd")
    assert len(saved["rows"]) == len(rep["results"]) + len(rep["adaptive"]) and "roc" not in saved["rows"][0]


def test_benchmark_smoke_run(digits_csg_run, tmp_path):
    """The script end to end with a small --limit, a detector variant and --json."""
    out = tmp_path / "rows.json"
    params = json.dumps({"csg-maha": {"detector": "csg-clean", "components": "pattern"}})
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "detection_sweep.py"), "--run", str(digits_csg_run),
                          "--limit", "240", "--attacks", "fgsm", "--eps", "0.1,0.3", "--detectors", "csg-clean,csg-maha",
                          "--detector-params", params, "--no-adaptive", "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                           "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert "## Monotonicity" in res.stdout and "csg-maha" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["detector"], r["cell"]) for r in rows} == {(d, c) for d in ("csg-clean", "csg-maha")
                                                          for c in ("fgsm@0.1", "fgsm@0.3")}


# ----------------------------------------------------------------------------- fit over a sweep

def test_fit_supervised_over_budgets_and_all_val(digits_csg_run, tmp_path):
    from csgguard import extract_features, load_dataset, load_model
    from csgguard.fitting import fit_detector

    res = fit_detector(digits_csg_run, detector="csg-supervised", attacks=("fgsm", "pgd-l2"), eps="0.1,0.3",
                       l2_eps=1.0, limit=150, device="cpu", out=tmp_path / "sup.json", progress=False)
    meta = json.loads((tmp_path / "sup.json").read_text())
    got = meta["fitted_on"]["attacks"]
    assert list(got) == ["fgsm@0.1", "fgsm@0.3", "pgd-l2@1"]
    assert [(v["norm"], v["eps"]) for v in got.values()] == [("linf", 0.1), ("linf", 0.3), ("l2", 1.0)]
    assert res.summary["adversarial_fit"] == sum(v["successful"] for v in got.values())
    ds = load_dataset("digits")
    val_pred = extract_features(load_model(digits_csg_run).model, ds.val.x()).pred
    assert (val_pred != ds.val.labels.numpy()).any()  # else the next line could not tell the populations apart
    assert res.summary["calibration"] == len(ds.val) == len(res.detector.calibration_scores_)
    assert res.summary["threshold"] == pytest.approx(res.detector.threshold_at(0.05))


# ----------------------------------------------------------------------------- bad input: one line, exit 2, no work

@pytest.fixture
def no_work(monkeypatch):
    """Loading a model fails the test: a bad request must be refused before any work."""
    def boom(*a, **k):
        raise AssertionError("work started before the request was checked")

    monkeypatch.setattr(E, "load_model", boom)
    monkeypatch.setattr("csgguard.fitting.load_model", boom)


@pytest.mark.parametrize("args,msg", [
    (["--eps", "1.5"], "--eps 1.5 is outside (0, 1]"),
    (["--eps", "0,0.1"], "--eps 0 is outside (0, 1]"),
    (["--eps=-0.1"], "--eps -0.1 is outside (0, 1]"),
    (["--eps", "8"], "write 8/255"),
    (["--eps", "0.1,abc"], "--eps 'abc' is not a number"),
    (["--l2-eps=-1"], "--l2-eps -1 must be > 0"),
    (["--l2-eps", "0"], "--l2-eps 0 must be > 0"),
    (["--attacks", "pgd,zap"], "unknown attack 'zap'"),
    (["--attacks", "pgd@2"], "outside (0, 1]"),
    (["--attacks", "cw@0.1"], "takes no budget"),
    (["--supervised-on", "fgsm,zap"], "unknown --supervised-on attack 'zap'"),
])
def test_evaluate_bad_sweep(digits_csg_run, tmp_path, no_work, args, msg):
    res = CliRunner().invoke(main, ["evaluate", "--run", str(digits_csg_run), "--out", str(tmp_path / "r"),
                                    "--device", "cpu", *args])
    assert res.exit_code == 2, res.output
    assert msg in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,msg", [
    (["--eps", "2"], "--eps 2 is outside (0, 1]"),
    (["--detector", "csg-clean", "--eps", "2"], "--eps 2 is outside (0, 1]"),
    (["--l2-eps=-0.5"], "--l2-eps -0.5 must be > 0"),
    (["--attacks", "fgsm,zap"], "unknown attack 'zap'"),
])
def test_fit_bad_sweep(digits_csg_run, tmp_path, no_work, args, msg):
    res = CliRunner().invoke(main, ["fit", "--run", str(digits_csg_run), "--detector", "csg-supervised",
                                    "--out", str(tmp_path / "d.json"), "--device", "cpu", *args])
    assert res.exit_code == 2, res.output
    assert msg in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_l2_budget_beyond_the_image(digits_csg_run, tmp_path):
    res = CliRunner().invoke(main, ["evaluate", "--run", str(digits_csg_run), "--attacks", "pgd-l2", "--l2-eps", "9",
                                    "--out", str(tmp_path / "r"), "--device", "cpu"])
    assert res.exit_code == 2 and "exceeds the largest possible L2 perturbation" in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_variant_study_regret_rule():
    """The second rule of docs/detectors.md on a made-up grid whose answer is known: the candidate
    that is never far from the best wins over one that is best on average but collapses in one cell."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("detector_variants", ROOT / "benchmarks" / "detector_variants.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def row(variant, dataset, attack, auroc, comps="a,b"):
        return {"dataset": dataset, "model": "CSG", "variant": variant, "components": comps, "attack": attack,
                "auroc": auroc, "tpr": 0.5}

    rows = [row("steady", "d1", "pgd", 0.95), row("steady", "d2", "pgd", 0.90), row("steady", "d2", "cw", 0.55),
            row("spiky", "d1", "pgd", 1.00), row("spiky", "d2", "pgd", 0.80), row("spiky", "d2", "cw", 0.99),
            row("twin", "d1", "pgd", 0.95, "a"), row("twin", "d2", "pgd", 0.895, "a"),
            row("twin", "d2", "cw", 0.55, "a"), row("component a", "d1", "pgd", 0.1)]
    ranked = mod.apply_regret_rule(rows)
    names = [o["variant"] for o in ranked]
    assert "component a" not in names
    # steady: largest regret 0.44 (cw); spiky: 0.10 (d2 pgd); twin: 0.44 too
    assert names[0] == "spiky" and ranked[0]["max_regret"] == pytest.approx(0.10)
    assert ranked[0]["at"] == "d2 CSG pgd"
    assert {o["variant"]: round(o["max_regret"], 3) for o in ranked[1:]} == {"steady": 0.44, "twin": 0.44}
    # without spiky, steady and twin tie within 0.01 of regret: the higher mean AUROC (steady) goes first
    ranked = mod.apply_regret_rule([r for r in rows if r["variant"] != "spiky"])
    assert [o["variant"] for o in ranked] == ["steady", "twin"]
    assert ranked[1]["max_regret"] == pytest.approx(0.005)


@pytest.mark.parametrize("args,msg", [
    (["--fpr", "1e-9"], "too few for a 1e-09 false-positive rate"),
    (["--detector", "csg-supervised", "--l2-eps", "1e9"], "exceeds the largest possible L2 perturbation"),
])
def test_fit_refuses_what_the_data_decides_before_extracting_features(digits_csg_run, tmp_path, monkeypatch,
                                                                      args, msg):
    """A --fpr the val split cannot realise and an L2 budget larger than the images are refused once the
    data is loaded, before the clean features are extracted (minutes on CIFAR-10)."""
    import importlib

    def no_work(*a, **k):
        raise AssertionError("features were extracted before the request was checked")
    monkeypatch.setattr(importlib.import_module("csgguard.fitting"), "_clean_features", no_work)
    res = CliRunner().invoke(main, ["fit", "--run", str(digits_csg_run), "--out", str(tmp_path / "d.json"),
                                    "--device", "cpu", *args])
    assert res.exit_code == 2 and msg in res.output, res.output
    assert not (tmp_path / "d.json").exists()
