"""Helpers shared by the benchmark scripts (importable because a script's folder is on sys.path)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path


def command_line() -> str:
    """The command that produced this output, as it can be pasted back into a shell."""
    exe = Path(sys.executable)
    try:
        exe = exe.relative_to(Path.cwd())
    except ValueError:
        pass
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return env + shlex.join([str(exe), *sys.argv])


def best_of(fn, repeats: int) -> float:
    """Fastest of ``repeats`` wall-clock timings of ``fn()`` (least disturbed by other load)."""
    import time

    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
