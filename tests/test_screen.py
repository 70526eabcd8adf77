"""`csgguard fit` and `csgguard screen`: flag rates, bad input, sharding, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from csgguard import load_dataset, load_model
from csgguard.cli import main


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _save_png(x: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(x[0] * 255 + 0.5, 0, 255).astype(np.uint8), "L").save(path)


def _quantised_pred(model, x: np.ndarray) -> np.ndarray:
    q = torch.from_numpy(np.clip(x * 255 + 0.5, 0, 255).astype(np.uint8)).float() / 255
    with torch.no_grad():
        return model(q).argmax(1).numpy()


@pytest.fixture(scope="module")
def image_dirs(tmp_path_factory, fitted_run):
    """clean/: 100 test PNGs; pgd/, fgsm/: attacks that still fool the model after 8-bit PNG quantisation."""
    from csgguard.attacks import run as attack

    loaded = load_model(fitted_run)
    test = load_dataset("digits").test
    root = tmp_path_factory.mktemp("images")
    x, y = test.x()[:300], test.labels[:300]
    (root / "clean").mkdir()
    for i in range(100):
        _save_png(x[i].numpy(), root / "clean" / f"{i:04d}.png")
    for method in ("pgd", "fgsm"):
        adv = attack(loaded, x, y, method, progress=False).successful()  # the digits default eps
        still = _quantised_pred(loaded.model, adv.x_adv) != adv.y
        (root / method).mkdir()
        for j in np.flatnonzero(still):
            _save_png(adv.x_adv[j], root / method / f"{int(adv.index[j]):04d}.png")
        assert still.sum() >= 20, f"{method}: only {still.sum()} adversarial PNGs"
    return root


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def test_clean_not_all_flagged_and_attacks_flagged(fitted_run, image_dirs):
    rates = {}
    for name in ("clean", "pgd", "fgsm"):
        r = _cli("screen", image_dirs / name, "--run", fitted_run, "--format", "jsonl", "--no-progress")
        assert r.exit_code == 0, r.output
        rows = _rows(r)
        assert len(rows) == len(os.listdir(image_dirs / name)) and all(row["error"] is None for row in rows)
        rates[name] = np.mean([row["flagged"] for row in rows])
    assert rates["clean"] < 0.2, rates          # a demo that flags everything is useless
    assert rates["pgd"] > 0.6 and rates["fgsm"] > 0.6, rates


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims a huge size: Pillow's decompression-bomb check fires on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture()
def bad_folder(tmp_path, image_dirs):
    d = tmp_path / "mixed"
    d.mkdir()
    good = sorted((image_dirs / "clean").iterdir())[:3]
    for p in good:
        shutil.copy(p, d / p.name)
    digit = np.asarray(Image.open(good[0]))
    (d / "empty.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(good[1].read_bytes()[:40])
    (d / "text.jpg").write_text("not an image at all\n")
    (d / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    Image.fromarray(digit.astype(np.uint16) * 257).save(d / "deep16.png")
    Image.fromarray(digit).resize((40, 40)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(digit).resize((30, 20)).convert("RGB").save(d / "colour.webp")
    (d / "unreadable.png").write_bytes(good[2].read_bytes())
    os.symlink(d / "gone.png", d / "broken.png")
    with open(os.fsencode(d) + b"/caf\xe9.png", "wb") as f:
        f.write(good[0].read_bytes())
    return d


def test_bad_input_gets_error_rows_and_run_goes_on(fitted_run, bad_folder, monkeypatch):
    unreadable = str(bad_folder / "unreadable.png")
    if os.geteuid() == 0:  # root reads chmod-000 files: fake the permission error at open()
        real_open = Image.open

        def guarded(fp, *a, **k):
            if os.fspath(fp) == unreadable:
                raise PermissionError(13, "Permission denied", unreadable)
            return real_open(fp, *a, **k)
        monkeypatch.setattr(Image, "open", guarded)
    else:
        os.chmod(unreadable, 0)
    r = _cli("screen", bad_folder, "--run", fitted_run, "--format", "jsonl", "--no-progress", "--batch-size", "4")
    assert r.exit_code == 0, r.output
    rows = {row["path"].rsplit("/", 1)[1]: row for row in _rows(r)}
    errors = {"empty.png", "truncated.png", "text.jpg", "bomb.png", "unreadable.png", "broken.png"}
    scored = {"deep16.png", "cmyk.jpg", "colour.webp", "caf\\xe9.png"}
    assert len(rows) == 3 + len(errors) + len(scored)
    for name in errors:
        assert rows[name]["error"] and rows[name]["score"] is None and rows[name]["flagged"] is None, name
    assert "bomb" in rows["bomb.png"]["error"] and "permission" in rows["unreadable.png"]["error"]
    for name in scored | {p for p in rows if p[0].isdigit()}:
        assert rows[name]["error"] is None and isinstance(rows[name]["score"], float), name
    for name in ("deep16.png", "cmyk.jpg", "colour.webp"):
        assert rows[name]["converted"] and "-> L 8x8" in rows[name]["converted"], rows[name]
    # a 16-bit copy is scaled, not clipped: it scores like its 8-bit original (abs: the default score is a
    # z-score that can sit near 0, where float32 rounding of the two decodings exceeds any relative tolerance)
    original = rows[sorted(p for p in rows if p[0].isdigit())[0]]
    assert rows["deep16.png"]["score"] == pytest.approx(original["score"], rel=1e-6, abs=1e-4)
    assert "6 errors" in r.stderr


def test_shards_concatenate_to_one_run(fitted_run, image_dirs):
    args = ["screen", image_dirs, "--recursive", "--run", fitted_run, "--format", "jsonl", "--no-progress",
            "--batch-size", "16"]
    whole = _cli(*args)
    assert whole.exit_code == 0, whole.output
    parts = [_cli(*args, "--shard", f"{i}/3", *(["--workers", "2"] if i == 1 else [])) for i in range(3)]
    assert all(p.exit_code == 0 for p in parts), [p.output for p in parts]
    assert "".join(p.stdout for p in parts) == whole.stdout
    paths = [row["path"] for row in _rows(whole)]
    assert len(paths) == len(set(paths)) == sum(len(os.listdir(image_dirs / d)) for d in ("clean", "pgd", "fgsm"))
    assert paths == sorted(paths, key=os.fsencode)


def test_exit_codes(fitted_run, image_dirs, tmp_path, digits_std_run):
    adv = image_dirs / "pgd"
    table = _cli("screen", adv, "--run", fitted_run)  # the default table format
    assert table.exit_code == 0 and "score" in table.stdout, table.output
    assert _cli("screen", adv, "--run", fitted_run, "--format", "csv").exit_code == 0
    assert _cli("screen", adv, "--run", fitted_run, "--format", "csv", "--fail-on-flag").exit_code == 1
    high = _cli("screen", adv, "--run", fitted_run, "--fail-on-flag", "--threshold", "1e12", "--format", "json")
    assert high.exit_code == 0 and not any(r["flagged"] for r in json.loads(high.stdout))
    # fail closed: an input that could not be screened is not cleared under --fail-on-flag
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "upload.png").write_bytes(b"not a png")
    assert _cli("screen", broken, "--run", fitted_run).exit_code == 0
    closed = _cli("screen", broken, "--run", fitted_run, "--fail-on-flag", "--threshold", "1e12")
    assert closed.exit_code == 1 and "failing closed" in closed.stderr, closed.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = _cli("screen", empty, "--run", fitted_run, "--fail-on-flag")
    assert nothing.exit_code == 0 and "no image files found" in nothing.stderr, nothing.output
    assert _cli("screen", "--run", fitted_run).exit_code == 2                       # no PATH
    missing = _cli("screen", tmp_path / "nope", "--run", fitted_run)
    assert missing.exit_code == 2 and "no such file" in missing.stderr
    assert _cli("screen", adv, "--run", fitted_run, "--shard", "3/3").exit_code == 2
    # a detector that belongs to another model is refused, in one line
    foreign = _cli("screen", adv, "--run", digits_std_run, "--detector", fitted_run / "detector.json")
    assert foreign.exit_code == 2 and "belongs to model" in foreign.stderr
    assert len(foreign.stderr.strip().splitlines()) == 1 and "Traceback" not in foreign.output
    # a tampered detector is refused
    run2 = tmp_path / "run2"
    shutil.copytree(fitted_run, run2)
    data = bytearray((run2 / "detector.safetensors").read_bytes())
    data[-5] ^= 0x01
    (run2 / "detector.safetensors").write_bytes(bytes(data))
    tampered = _cli("screen", adv, "--run", run2)
    assert tampered.exit_code == 2 and "sha256" in tampered.stderr
    assert _cli("fit", "--run", fitted_run, "--fpr", "2", "--out", tmp_path / "x.json").exit_code == 2
    assert not (tmp_path / "x.json").exists()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 60), st.integers(1, 7), st.integers(1, 9))
def test_shards_partition_the_list_on_batch_boundaries(n_files, n_shards, batch_size):
    from csgguard.images import shard_files

    files = [f"{i:03d}.png" for i in range(n_files)]
    parts = [shard_files(files, (i, n_shards), batch_size) for i in range(n_shards)]
    assert sum(parts, []) == files  # nothing lost, nothing duplicated, order kept
    starts = [len(sum(parts[:i], [])) for i in range(n_shards)]
    assert all(s % batch_size == 0 for s in starts)  # every shard starts on a batch boundary


def test_device_scoring_equals_host_features(fitted_run, digits_std_run, tmp_path):
    """The screener's one-copy path (``Detector.score_signals``) gives score_samples' numbers exactly;
    a detector without one (mahalanobis) still goes through host features."""
    from csgguard.detectors import build_detector
    from csgguard.detectors.store import save_detector
    from csgguard.features import extract_features, features_from_outputs
    from csgguard.screening import Screener

    x = load_dataset("digits").test.x()[:97]
    screener = Screener(fitted_run, device="cpu")
    net = screener.loaded.model.eval()
    with torch.no_grad():
        out = net.forward_signals(x)
        direct = screener.detector.score_signals(out.logits, out.pooled, out.taps)
        host = screener.detector.score_samples(features_from_outputs(net, out.logits, out.pooled, out.taps))
    assert direct is not None and direct.dtype == torch.float32
    pred, conf, score = screener.score_batch(x)
    assert np.array_equal(score, host) and np.array_equal(direct.double().numpy(), host)
    probs = torch.softmax(out.logits.float(), 1)
    assert np.array_equal(pred, probs.argmax(1).numpy()) and np.array_equal(conf, probs.max(1).values.numpy())
    assert pred.dtype == np.int64 and conf.dtype == np.float32

    ds = load_dataset("digits")
    loaded = load_model(fitted_run)
    maha = build_detector("mahalanobis").fit(extract_features(loaded.model, ds.train.x()))
    maha.calibrate(extract_features(loaded.model, ds.val.x()))
    assert maha.score_signals(out.logits, out.pooled, out.taps) is None
    path = tmp_path / "maha.json"
    save_detector(maha, path, model_sha256=loaded.sha256)
    pred2, _, score2 = Screener(fitted_run, detector=path, device="cpu").score_batch(x)
    assert np.array_equal(pred2, pred)
    assert np.allclose(score2, maha.score_samples(extract_features(loaded.model, x)), rtol=1e-6, atol=1e-9)


def test_compiled_screening_matches_eager(fitted_run, image_dirs):
    """``screen --compile`` runs the forward pass and the default detector's score as one compiled graph
    (no graph breaks: a break would send the score's small operations back to one launch each), padded
    to one batch size; predictions, scores and flags are eager's up to float rounding."""
    from csgguard.screening import Screener

    screener = Screener(fitted_run, device="cpu", compile=True)
    x = load_dataset("digits").test.x()[:64]
    screener._compile_for(64)  # what compiling does before the first batch
    with torch.no_grad():
        explained = torch._dynamo.explain(screener.passes)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons

    eager = _cli("screen", image_dirs, "-r", "--run", fitted_run, "--format", "jsonl", "--batch-size", 64)
    compiled = _cli("screen", image_dirs, "-r", "--run", fitted_run, "--format", "jsonl", "--batch-size", 64,
                    "--compile")
    assert eager.exit_code == 0 and compiled.exit_code == 0, compiled.output
    a, b = _rows(eager), _rows(compiled)
    assert len(a) == len(b) > 64 and len(a) % 64  # a short last batch, padded to 64 when compiled
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["predicted_class"] for r in a] == [r["predicted_class"] for r in b]
    np.testing.assert_allclose([r["score"] for r in b], [r["score"] for r in a], rtol=1e-4, atol=1e-4)
    threshold = Screener(fitted_run, device="cpu").threshold
    clear = [abs(r["score"] - threshold) > 1e-3 for r in a]
    assert [r["flagged"] for r, c in zip(a, clear, strict=True) if c] == \
        [r["flagged"] for r, c in zip(b, clear, strict=True) if c]
