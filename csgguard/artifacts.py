"""Run directories and the files in them: safetensors + JSON, hashes, atomic writes.

Nothing here unpickles. A tensor file is only ever read by ``safetensors`` after
its sha256 matched the one recorded in the JSON manifest beside it, so a file
from a stranger can at worst be refused, never executed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import ArtifactError, CsgguardError

DEFAULT_RUN = Path("runs/default")
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see either the old file or the new one.

    An existing ``path`` that is not a regular file (``/dev/null``, a FIFO) is refused, never
    replaced; a write the system refuses raises :class:`ArtifactError` naming ``path``.
    """
    path = Path(path)
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ArtifactError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    return path


def _write_temp(path: Path, data: bytes) -> Path:
    """``data`` in a new temporary file beside ``path`` (flushed to disk), ready to be renamed onto it."""
    _check_replaceable(path, "output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise ArtifactError(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise
    return Path(tmp)


class StagedWrites:
    """Many files written all or none: :meth:`add` writes each to a temporary file beside its target
    at once (where a full disk or a refused folder shows), and only leaving the ``with`` block without
    an error renames them all into place; an error anywhere inside the block (in a write, or in other
    work done meanwhile, such as the file the staged ones go with) removes every temporary file and
    leaves every target as it was."""

    def __enter__(self) -> StagedWrites:
        self._staged: list[tuple[Path, Path]] = []
        return self

    def add(self, path: str | os.PathLike, data: bytes) -> Path:
        path = Path(path)
        if path.is_dir():
            raise ArtifactError(f"{path}: cannot write (a folder is in the way)")
        self._staged.append((_write_temp(path, data), path))
        return path

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                for tmp, path in self._staged:
                    os.replace(tmp, path)
            except OSError as err:
                self._discard()
                raise ArtifactError(f"{path}: cannot write ({err.strerror or err})") from None
        else:
            self._discard()

    def _discard(self) -> None:
        for tmp, _ in self._staged:
            tmp.unlink(missing_ok=True)


def _check_replaceable(path: Path, what: str) -> None:
    """Refuse an existing ``path`` that a rename would destroy: a device, FIFO or socket (``/dev/null``)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode) or stat.S_ISDIR(mode)):
        raise CsgguardError(f"{what} {path}: is not a regular file (a device, FIFO or socket); give a file name")


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def check_output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be created or written.

    ``path`` may not exist yet: its nearest existing ancestor must be a writable folder
    (not a file). Nothing is created here.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CsgguardError(f"{what} {path}: is a file, not a folder")
    probe = path
    while not probe.exists():
        if probe.is_symlink():  # a dangling link in the way
            raise CsgguardError(f"{what} {path}: {probe} is a broken symlink")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise CsgguardError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise CsgguardError(f"{what} {path}: folder {probe} is not writable")
    return path


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """:func:`check_output_dir` for the folder of an output file; the file itself must not be a folder."""
    path = Path(path)
    if path.is_dir():
        raise CsgguardError(f"{what} {path}: is a folder; give a file name")
    _check_replaceable(path, what)
    check_output_dir(path.parent, what=what)
    return path


LOCK_FILE = ".csgguard.lock"
METADATA_KEY = "csgguard"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str):
    """Hold an exclusive lock on ``folder`` while a command writes into it; refuse a second holder.

    The lock is ``flock`` on ``FOLDER/.csgguard.lock``, which also records the holder's
    pid and command. The kernel drops the lock when its process dies, so a lock file
    left by a killed process is stale by construction and simply taken over; there is
    nothing to clean by hand. The file is removed on release (re-checked by inode, so a
    process that raced the removal retries instead of locking a deleted file), and so
    are the folders made for it if the command failed before writing anything there.
    """
    import fcntl

    folder = Path(folder)
    created = []  # folders made for the lock: removed again on release if the command left them empty
    probe = folder
    while not probe.exists() and probe.parent != probe:
        created.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CsgguardError(f"{folder}: cannot create the folder ({exc.strerror or exc})") from None
    lock = folder / LOCK_FILE
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise CsgguardError(f"{folder}: cannot write a lock file there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise CsgguardError(f"{folder}: in use by another csgguard process ({holder}); wait for it to "
                                "finish or choose another folder") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed (or replaced) between open and flock: try again
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, csgguard {command}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        for d in created:  # deepest first; a folder the command wrote into is not empty and stays
            try:
                d.rmdir()
            except OSError:
                break


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.NAME.<random>.tmp`` files :func:`atomic_write_bytes` leaves when killed mid-write.

    Only call it while holding :func:`folder_lock` on ``folder`` (no live writer then).
    """
    removed = []
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() and not p.is_symlink():
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def to_jsonable(obj: Any) -> Any:
    """Convert numpy / torch scalars and arrays, paths and tuples into JSON types."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


class _NotFinite(ValueError):
    pass


def _refuse_constant(name: str):
    raise _NotFinite(f"{name} is not a finite number")


def _finite_float(text: str) -> float:
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise _NotFinite(f"{text} is not a finite number")
    return value


def parse_json(text: str) -> Any:
    """``json.loads`` that refuses NaN, Infinity and numbers that overflow a float (1e400)."""
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)


MAX_JSON_BYTES = 256 << 20  # a manifest is kilobytes; a history of a long run a few megabytes


def read_json(path: str | os.PathLike, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from ``path``; every number in it finite (NaN, Infinity, 1e400 are refused)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: {what} not found")
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ArtifactError(f"{path}: {what} is {path.stat().st_size} bytes; refusing more than {MAX_JSON_BYTES}")
    try:
        data = parse_json(path.read_text(encoding="utf-8"))
    except _NotFinite as exc:
        raise ArtifactError(f"{path}: {exc} (every number in a {what} must be finite)") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object at the top level")
    return data


def canonical_json(obj: Any) -> str:
    """One spelling of a JSON value (sorted keys, no spaces): what a hash or a comparison covers."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> str:
    """Atomically write a safetensors file; return its sha256 (to record in the manifest)."""
    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # safetensors keeps metadata in a hash map whose order varies from run to run: several keys
    # travel as one canonical JSON string, so the same content always gives the same bytes (and hash)
    packed = {METADATA_KEY: canonical_json(dict(metadata))} if metadata and len(metadata) > 1 else metadata
    data = st_save(clean, metadata=dict(packed) if packed else None)
    atomic_write_bytes(path, data)
    return sha256_bytes(data)


def safetensors_metadata(data: bytes, path: str | os.PathLike = "") -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors blob (its JSON header), without reading tensors."""
    import struct

    if len(data) < 8:
        raise ArtifactError(f"{path}: not a valid safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise ArtifactError(f"{path}: not a valid safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: not a valid safetensors file (header is not JSON)") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    out = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
    if METADATA_KEY in out:  # several keys packed by save_tensors
        try:
            packed = json.loads(out.pop(METADATA_KEY))
        except json.JSONDecodeError:
            raise ArtifactError(f"{path}: damaged metadata in the safetensors header") from None
        if not isinstance(packed, dict):
            raise ArtifactError(f"{path}: damaged metadata in the safetensors header")
        out.update({str(k): str(v) for k, v in packed.items()})
    return out


def load_tensors(path: str | os.PathLike, expected_sha256: str | None, *,
                 with_metadata: bool = False):
    """Read a safetensors file after checking its hash; never unpickles anything.

    ``with_metadata=True`` returns ``(tensors, metadata)``: the metadata strings are
    covered by the same hash, so a manifest copy kept there cannot be edited alone.
    """
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: tensor file not found (its manifest names it; copy the pair together)")
    data = path.read_bytes()
    if expected_sha256 is not None:
        actual = sha256_bytes(data)
        if actual != expected_sha256:
            raise ArtifactError(
                f"{path}: sha256 {actual[:12]}... does not match the manifest's "
                f"{expected_sha256[:12]}... (file altered or from another run); refusing to load"
            )
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path}: not a valid safetensors file ({exc})") from None
    return (tensors, safetensors_metadata(data, path)) if with_metadata else tensors


def check_format_version(manifest: Mapping[str, Any], path: str | os.PathLike, newest: int) -> int:
    """The manifest's ``format_version`` (1 when absent, as the first files were written): an integer
    this csgguard knows. A newer file is refused in one line rather than misread field by field."""
    v = manifest.get("format_version", 1)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ArtifactError(f"{path}: format_version must be a positive integer, got {v!r}")
    if v > newest:
        raise ArtifactError(f"{path}: written in format version {v} by a newer csgguard; this one reads up to "
                            f"version {newest} (upgrade csgguard)")
    return v


def check_finite(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, *, allow_inf: bool = False) -> None:
    """Refuse float tensors holding NaN (and inf unless ``allow_inf``): a damaged or tampered file
    whose hash was recomputed would otherwise give NaN scores, and a NaN score flags nothing."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            continue
        if bool(torch.isnan(t).any()) or (not allow_inf and bool(torch.isinf(t).any())):
            what = "NaN" if allow_inf else "NaN or inf"
            raise ArtifactError(f"{path}: tensor {key!r} holds {what} (damaged file?); refusing to load")


def library_versions() -> dict[str, str]:
    import platform

    import numpy
    import sklearn

    from . import __version__

    versions = {
        "csgguard": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }
    try:
        import foolbox

        versions["foolbox"] = foolbox.__version__
    except Exception:  # foolbox is optional for loading a model
        pass
    return versions
