"""How long ``csgguard --help`` takes, and which heavy modules ``import csgguard.cli`` loads.

    python benchmarks/cli_startup.py [--repeats 5]

Prints the best-of wall time of ``python -m csgguard --help`` in a fresh process
(target: under 0.5 s) and the heavy libraries the CLI import pulled in (target: none;
torch, numpy, scikit-learn and matplotlib load inside the commands that use them).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from _common import best_of, command_line

HEAVY = ("torch", "numpy", "sklearn", "scipy", "matplotlib", "foolbox", "PIL", "safetensors")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    cmd = [sys.executable, "-m", "csgguard", "--help"]
    seconds = best_of(lambda: subprocess.run(cmd, check=True, capture_output=True), args.repeats)
    probe = "import sys, json, csgguard.cli; print(json.dumps(sorted(m for m in sys.modules if '.' not in m)))"
    loaded = set(json.loads(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                           text=True).stdout))
    print(f"$ {command_line()}")
    print(f"csgguard --help: {seconds:.3f} s (best of {args.repeats}; target < 0.5 s)")
    print(f"heavy modules loaded by `import csgguard.cli`: {', '.join(m for m in HEAVY if m in loaded) or 'none'}")


if __name__ == "__main__":
    main()
