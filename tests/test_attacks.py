"""csgguard.attacks and ``csgguard attack`` on a small digits CSG model."""

from __future__ import annotations

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from csgguard import CsgguardError, load_dataset, load_model
from csgguard.attacks import (
    ATTACKS,
    CW_PRESETS,
    AdversarialSet,
    attack_run_split,
    load_adversarial_set,
    make_attack,
    run,
    save_adversarial_set,
    sidecar_path,
)
from csgguard.cli import main
from csgguard.errors import ArtifactError

N = 128
TOL = 1e-5


@pytest.fixture(scope="module")
def loaded(digits_csg_run):
    return load_model(digits_csg_run)


@pytest.fixture(scope="module")
def xy():
    test = load_dataset("digits").test
    return test.x()[:N], test.labels[:N]


@pytest.fixture(scope="module")
def sets(loaded, xy):
    """One run per attack, shared by the property tests below."""
    x, y = xy
    return {
        "fgsm": run(loaded, x, y, "fgsm", eps=0.1),
        "pgd": run(loaded, x, y, "pgd", eps=0.1, steps=20),
        "pgd-l2": run(loaded, x, y, "pgd", eps=1.0, norm="l2", steps=10),
        "bim": run(loaded, x, y, "bim", eps=0.1),
        "deepfool": run(loaded, x, y, "deepfool", steps=10, candidates=4),
        "cw": run(loaded, x, y, "cw", preset="fast"),
    }


def _predict(model, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x)).argmax(1).numpy()


def _norms(a: AdversarialSet) -> dict[str, np.ndarray]:
    d = (a.x_adv.astype(np.float64) - a.x).reshape(len(a), -1)
    return {"linf": np.abs(d).max(1), "l2": np.sqrt((d * d).sum(1))}


def test_registry_has_required_attacks():
    assert {"fgsm", "pgd", "bim", "cw", "deepfool"} <= set(ATTACKS)
    assert make_attack("pgd", norm="l2").norm == "l2"
    with pytest.raises(CsgguardError, match="unknown attack"):
        make_attack("nope")


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd-l2", "bim", "deepfool", "cw"])
def test_x_adv_in_bounds_and_budget(sets, name):
    a = sets[name]
    assert a.x_adv.dtype == np.float32 and a.x_adv.shape == a.x.shape
    assert a.x_adv.min() >= 0.0 and a.x_adv.max() <= 1.0
    eps, norm = a.meta["eps"], a.meta["norm"]
    if eps is not None:
        assert _norms(a)[norm].max() <= eps * (1 + 1e-4) + TOL
    assert a.meta["succeeded"] > 0


@pytest.mark.parametrize("name", ["fgsm", "pgd", "pgd-l2", "bim", "deepfool", "cw"])
def test_successes_are_misclassified_and_failures_are_clean(loaded, sets, name):
    a = sets[name]
    pred = _predict(loaded.model, a.x_adv)
    np.testing.assert_array_equal(pred, a.pred_adv)  # pred_adv is the model's verdict on x_adv
    assert (pred[a.success] != a.y[a.success]).all()
    failed = ~a.success
    np.testing.assert_array_equal(a.x_adv[failed], a.x[failed])  # never zeros, never a failed attempt
    assert not a.success[~a.attacked].any()
    assert a.meta["attacked"] == int(a.attacked.sum()) == int((a.pred == a.y).sum())
    assert a.meta["succeeded"] == int(a.success.sum())
    assert a.meta["success_rate"] == pytest.approx(a.success.sum() / a.attacked.sum())


def test_pgd_beats_fgsm_at_same_eps(sets):
    assert sets["pgd"].meta["success_rate"] > sets["fgsm"].meta["success_rate"]


def test_cw_fast_preset_succeeds(sets):
    assert sets["cw"].meta["success_rate"] >= 0.95
    assert sets["cw"].meta["settings"]["preset"] == "fast"
    # the set records the values the attack ran with, not the unresolved None of "use the preset"
    assert sets["cw"].meta["settings"]["family"] == "digits"
    assert sets["cw"].meta["settings"]["steps"] == CW_PRESETS["fast"]["digits"]["steps"]


def test_cw_presets_follow_the_image_family():
    # one Adam step moves every pixel by about `stepsize`, so the preset is chosen per image family
    spec = make_attack("cw")
    assert spec.settings() == {k: CW_PRESETS["fast"]["digits"][k] for k in spec.settings()}
    spec.for_data(None, (4, 3, 32, 32))  # an unnamed colour data set is read as the natural-image family
    assert spec.settings()["stepsize"] == CW_PRESETS["fast"]["cifar10"]["stepsize"]
    assert CW_PRESETS["fast"]["cifar10"]["stepsize"] < CW_PRESETS["fast"]["digits"]["stepsize"]
    spec.for_data("mnist", (4, 1, 28, 28))
    assert spec.settings()["initial_const"] == CW_PRESETS["fast"]["mnist"]["initial_const"]
    given = make_attack("cw", preset="thorough", stepsize=0.2)  # an explicit setting beats every family's
    given.for_data("cifar10", (4, 3, 32, 32))
    assert given.settings()["stepsize"] == 0.2
    assert given.settings()["steps"] == CW_PRESETS["thorough"]["cifar10"]["steps"]
    assert given.get_params()["steps"] is None  # the constructor keeps what it was given
    with pytest.raises(CsgguardError, match="stepsize"):
        make_attack("cw", stepsize=-1.0)


def test_misclassified_inputs_are_not_attacked(loaded, xy):
    x, y = xy
    y_wrong = y.clone()
    y_wrong[:10] = (y_wrong[:10] + 1) % 10  # the model now "misclassifies" these ten
    a = run(loaded, x[:32], y_wrong[:32], "fgsm", eps=0.1)
    assert not a.attacked[:10].any() and not a.success[:10].any()
    assert a.meta["total"] == 32 and a.meta["attacked"] == int(a.attacked.sum()) <= 22


def test_failed_cw_is_masked(loaded, xy):
    x, y = xy
    a = run(loaded, x[:64], y[:64], "cw", binary_search_steps=1, steps=2, initial_const=1e-3)
    assert a.meta["succeeded"] < a.meta["attacked"]  # a weak C&W fails on most inputs
    failed = a.attacked & ~a.success
    assert failed.any()
    assert (np.abs(a.x_adv[failed]).sum(axis=(1, 2, 3)) > 0).all()  # not foolbox's zeros
    sub = a.successful()
    assert len(sub) == a.meta["succeeded"] and sub.success.all()
    assert (np.abs(sub.x_adv).sum(axis=(1, 2, 3)) > 0).all()  # no zero image counted as a success


def test_seeded_runs_are_reproducible(loaded, xy):
    x, y = xy[0][:48], xy[1][:48]
    state = torch.get_rng_state()
    a = run(loaded, x, y, "pgd", eps=0.1, steps=5, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
    b = run(loaded, x, y, "pgd", eps=0.1, steps=5, seed=3)
    c = run(loaded, x, y, "pgd", eps=0.1, steps=5, seed=4)
    np.testing.assert_array_equal(a.x_adv, b.x_adv)
    np.testing.assert_array_equal(a.success, b.success)
    assert not np.array_equal(a.x_adv, c.x_adv)


def test_pgd_restarts_retry_exactly_the_failures(loaded):
    # whether a retry finds one more success depends on the CPU the fixture model was trained on
    # (bf16 kernels differ): on 48 images at eps 0.06, AMD AVX512-BF16 vs Intel AMX gave 5 -> 6 vs
    # 5 -> 5, and on 240 images one AMD host gave 32 -> 32; at eps 0.08 on 240 images the retries
    # add 7 (72 -> 79), a margin no kernel difference has come near
    test = load_dataset("digits").test
    x, y = test.x()[:240], test.labels[:240]
    spec = make_attack("pgd", eps=None, steps=5, restarts=3)
    assert spec.restarts == 3 and "restarts=3" in repr(spec)  # the setting as given, in its own name
    build, calls = spec.foolbox_attack, []

    def counting_attack():
        attack = build()

        def call(fmodel, xb, yb, epsilons):
            out = attack(fmodel, xb, yb, epsilons=epsilons)
            calls.append((len(xb), int((~out[2]).sum())))  # (inputs tried, still failing)
            return out
        return call

    spec.foolbox_attack = counting_attack
    one = run(loaded, x, y, "pgd", eps=0.08, steps=5, seed=0)
    three = run(loaded, x, y, spec, eps=0.08, seed=0)
    assert calls[0][1] > 0, "eps too large for this check: nothing left to retry"
    assert len(calls) == 3 or calls[-1][1] == 0           # up to restarts tries in all
    for (_, failing), (tried, _) in zip(calls, calls[1:], strict=False):
        assert tried == failing                             # each retry takes exactly the failures
    assert three.meta["succeeded"] > one.meta["succeeded"]
    assert three.meta["settings"]["restarts"] == 3


@pytest.mark.parametrize("method, kwargs, message", [
    ("cw", {"eps": 0.1}, "minimisation"),
    ("deepfool", {"eps": 0.1}, "minimisation"),
    ("pgd", {"eps": 0.0}, "> 0"),
    ("pgd", {"eps": 1.5}, r"outside \(0, 1\]"),
    ("pgd", {"eps": 9.0, "norm": "l2"}, "exceeds"),
    ("fgsm", {"steps": 3}, "no setting"),
    ("cw", {"preset": "slow"}, "preset"),
])
def test_bad_requests_raise(loaded, xy, method, kwargs, message):
    with pytest.raises(CsgguardError, match=message):
        run(loaded, xy[0][:4], xy[1][:4], method, **kwargs)


def test_save_load_round_trip_and_tamper(tmp_path, sets):
    a = sets["pgd"]
    path = save_adversarial_set(tmp_path / "pgd.npz", a)
    assert sidecar_path(path).is_file()
    with np.load(path, allow_pickle=False) as raw:  # plain numpy can read it
        assert {"x", "x_adv", "y", "pred_adv", "success", "index"} <= set(raw.files)
    b = load_adversarial_set(path)
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(v, getattr(b, k))
    assert b.meta["attack"] == "pgd" and b.meta["succeeded"] == a.meta["succeeded"]

    side = json.loads(sidecar_path(path).read_text())
    side["success_rate"] = 1.0
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(ArtifactError, match="metadata differs"):
        load_adversarial_set(path)

    path2 = save_adversarial_set(tmp_path / "pgd2.npz", a)
    data = bytearray(path2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path2.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        load_adversarial_set(path2)
    sidecar_path(path2).unlink()
    with pytest.raises(ArtifactError, match="sidecar"):
        load_adversarial_set(path2)


@pytest.mark.parametrize("edit,needle", [
    (lambda a: a["x_adv"].__setitem__(0, np.nan), "x_adv must hold finite floats"),
    (lambda a: a.update(x_adv=a["x_adv"][:, :, :4]), "one shape"),
    (lambda a: a.update(x_adv=np.zeros((), np.float32)), "one shape"),  # was a TypeError
    (lambda a: a.update(y=a["y"].astype(np.float32) + 0.5), "y must be one integer per row"),
    (lambda a: a.update(success=a["success"][:, None]), "success must be one boolean per row"),
])
def test_load_refuses_bad_arrays_even_with_a_matching_hash(tmp_path, sets, edit, needle):
    """The sidecar's hash is no signature: a rewritten npz with its hash rewritten too must still hold
    N x C x H x W finite images and one label per row."""
    import io

    from csgguard.artifacts import sha256_bytes

    path = save_adversarial_set(tmp_path / "pgd.npz", sets["pgd"])
    with np.load(path, allow_pickle=False) as raw:
        arrays = {k: raw[k] for k in raw.files}
    edit(arrays)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())
    side = json.loads(sidecar_path(path).read_text())
    side["npz_sha256"] = sha256_bytes(buf.getvalue())
    sidecar_path(path).write_text(json.dumps(side))
    with pytest.raises(ArtifactError, match=needle):
        load_adversarial_set(path)


def test_attack_run_split_records_model_and_indices(digits_csg_run, loaded):
    a = attack_run_split(digits_csg_run, "val", "fgsm", limit=20, eps=0.1, device="cpu")
    val = load_dataset("digits").val
    np.testing.assert_array_equal(a.index, val.indices[:20])
    assert a.meta["model_sha256"] == loaded.sha256
    assert a.meta["dataset"] == "digits" and a.meta["split"] == "val" and a.meta["total"] == 20


def test_cli_attack_writes_set_and_pngs(digits_csg_run, tmp_path):
    out, png = tmp_path / "fgsm.npz", tmp_path / "png"
    result = CliRunner().invoke(main, ["attack", "--run", str(digits_csg_run), "--method", "fgsm", "--eps", "8/80",
                                       "--limit", "40", "--out", str(out), "--save-images", str(png),
                                       "--format", "json", "--no-progress"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    a = load_adversarial_set(out)
    assert summary["eps"] == pytest.approx(0.1) and summary["succeeded"] == a.meta["succeeded"]
    files = sorted(png.glob("*.png"))
    assert len(files) == summary["png_written"] == int(a.success.sum()) - summary["png_dropped"]
    assert files, "fgsm at 0.1 should leave some PNGs that still fool the model"
    # issue 11 item 13: every PNG written still fools the model, as the name says. Recount independently:
    # decode each PNG, predict, compare with the true label and the prediction in its name
    from csgguard.images import decode_image

    model = load_model(digits_csg_run).model
    xq = torch.stack([torch.from_numpy(decode_image(f, "L")[0]).float() / 255 for f in files])
    with torch.no_grad():
        pred = model(xq).argmax(1).numpy()
    named = np.array([[int(g) for g in re.fullmatch(r"\d+_true(\d+)_adv(\d+)\.png", f.name).groups()] for f in files])
    assert (pred != named[:, 0]).all() and (pred == named[:, 1]).all()
    for f in files:
        index, true, adv = map(int, re.fullmatch(r"(\d+)_true(\d+)_adv(\d+)\.png", f.name).groups())
        row = int(np.flatnonzero(a.index == index)[0])
        assert a.success[row] and a.y[row] == true and adv != true


def test_cli_default_out_is_inside_run(digits_csg_run, tmp_path):
    run_dir = shutil.copytree(digits_csg_run, tmp_path / "run")  # leave the shared run untouched
    result = CliRunner().invoke(main, ["attack", "--run", str(run_dir), "--method", "deepfool",
                                       "--steps", "5", "--limit", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    path = run_dir / "attacks" / "deepfool-l2-min-test.npz"
    assert path.is_file() and sidecar_path(path).is_file()


@pytest.mark.parametrize("args", [
    ["--method", "nope"],
    ["--eps", "0"],
    ["--eps", "1.5"],
    ["--eps", "eight"],
    ["--method", "cw", "--eps", "0.1"],
    ["--method", "deepfool", "--eps", "8/255"],
    ["--limit", "0"],
    ["--method", "pgd", "--preset", "fast"],
    ["--split", "val", "--limit", "-3"],
])
def test_cli_bad_input(digits_csg_run, tmp_path, args):
    out = tmp_path / "bad.npz"
    result = CliRunner().invoke(main, ["attack", "--run", str(digits_csg_run), "--out", str(out), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [x for x in result.output.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    assert not list(tmp_path.iterdir())


def test_cli_run_dir_without_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["attack", "--run", str(empty), "--out", str(tmp_path / "x.npz")])
    assert result.exit_code == 2 and "model.json" in result.output
    assert not (tmp_path / "x.npz").exists()


def test_fixed_batch_gives_the_networks_outputs_and_gradients():
    """FixedBatch pads short batches and cuts long ones; the padding takes no part in any result."""
    from csgguard.compiling import FixedBatch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).eval()
    reference = copy.deepcopy(net)
    seen = []
    net.register_forward_pre_hook(lambda _m, args: seen.append(len(args[0])))
    fixed = FixedBatch(net, 8)
    for n in (1, 3, 8, 19):
        x = torch.randn(n, 5, requires_grad=True)
        out = fixed(x)
        (g,) = torch.autograd.grad(out.square().sum(), x)
        x2 = x.detach().clone().requires_grad_(True)
        ref = reference(x2)
        (g2,) = torch.autograd.grad(ref.square().sum(), x2)
        assert out.shape == (n, 3)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(g, g2)  # the padded copies of row 0 add nothing to its gradient
    assert set(seen) == {8}  # every call the network saw had the one batch size
    with pytest.raises(CsgguardError, match="size must be >= 1"):
        FixedBatch(net, 0)

    # a network with several outputs (a screener's forward pass): each output cut and joined alike
    pair = FixedBatch(lambda x: (net(x), x.sum(1)), 8)
    for n in (3, 8, 19):
        x = torch.randn(n, 5)
        out, total = pair(x)
        torch.testing.assert_close(out, reference(x))
        torch.testing.assert_close(total, x.sum(1))


def test_attack_with_compile_calls_the_compiled_network_at_one_batch_size(loaded, xy, monkeypatch):
    """compile=True hands foolbox torch.compile's network (stubbed here: the real one is timed in
    benchmarks/attack_compile.py), always at one batch size, and attacks the same images."""
    x, y = xy[0][:40], xy[1][:40]
    sizes = []

    class Recorder(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, z):
            sizes.append(len(z))
            return self.net(z)

    monkeypatch.setattr(torch, "compile", lambda net, **kw: Recorder(net))
    plain = run(loaded, x, y, "pgd", eps=0.1, steps=5, seed=3, batch_size=16)
    compiled = run(loaded, x, y, "pgd", eps=0.1, steps=5, seed=3, batch_size=16, compile=True)
    assert sizes and set(sizes) == {16}  # the last batch (40 = 16 + 16 + 8) was padded, not recompiled
    np.testing.assert_array_equal(compiled.attacked, plain.attacked)
    assert abs(int(compiled.success.sum()) - int(plain.success.sum())) <= 1


def test_an_attack_leaves_the_models_weights_and_gradients_as_they_were(loaded, xy):
    """Only the inputs' gradients are needed: the weights stop asking for theirs during the attack
    (foolbox's loss.backward() would compute and accumulate them) and ask again afterwards."""
    model = loaded.model
    model.train()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(p.grad is None for p in model.parameters())
    run(loaded, xy[0][:16], xy[1][:16], "pgd", eps=0.1, steps=3)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())  # no weight gradient computed or kept
    assert model.training  # the mode is restored too
    model.eval()
