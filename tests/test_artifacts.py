"""Model files: hash-checked, never unpickled, never half-written."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest

from csgguard import load_model
from csgguard.artifacts import atomic_write_bytes, sha256_file
from csgguard.errors import ArtifactError


@pytest.fixture
def run_copy(digits_csg_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(digits_csg_run, dst)
    return dst


def test_round_trip(run_copy):
    loaded = load_model(run_copy)
    assert loaded.sha256 == sha256_file(run_copy / "model.safetensors")
    m = json.loads((run_copy / "model.json").read_text())
    for key in ("model", "classes", "input", "training", "versions", "metrics", "weights"):
        assert key in m


def test_tampered_weights_are_refused(run_copy):
    p = run_copy / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match the manifest"):
        load_model(run_copy)


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_renamed_to_safetensors_is_refused_even_with_matching_hash(run_copy, capsys):
    p = run_copy / "model.safetensors"
    p.write_bytes(pickle.dumps({"w": _Payload()}))
    m = json.loads((run_copy / "model.json").read_text())
    m["weights"]["sha256"] = sha256_file(p)  # an attacker who also edits the manifest
    (run_copy / "model.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        load_model(run_copy)
    assert "pwned" not in capsys.readouterr().out


def test_unknown_architecture_in_manifest(run_copy):
    m = json.loads((run_copy / "model.json").read_text())
    m["model"]["arch"] = "evilnet"
    (run_copy / "model.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="unknown architecture 'evilnet'"):
        load_model(run_copy)


def test_missing_and_non_json_manifest(tmp_path, run_copy):
    with pytest.raises(ArtifactError, match="no model.json"):
        load_model(tmp_path)
    (run_copy / "model.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_model(run_copy)


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "f.bin", b"abc")
    atomic_write_bytes(tmp_path / "f.bin", b"def")
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    assert (tmp_path / "f.bin").read_bytes() == b"def"


def test_a_write_the_system_refuses_is_one_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC, a read-only mount, /proc: an ArtifactError naming the file (exit 2), not an OSError
    naming a temporary file (exit 3); no temporary file is left behind."""
    import errno
    import os

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(ArtifactError, match=r"f\.bin: cannot write \(No space left on device\)"):
        atomic_write_bytes(tmp_path / "f.bin", b"abc")
    assert list(tmp_path.iterdir()) == []
