"""Make a trained run a shipped one: copy it into ``csgguard/pretrained/NAME`` with the default
detector fitted and the gate heatmap drawn, local paths scrubbed from its manifest.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/ship_run.py benchmarks/cpu-runs/cifar10-resnet20-csg \\
        cifar10-resnet20-csg --data-root ../shared/data/cifar10-jpeg [--source "CIFAR-10 (JPEG q75 copy) ..."]

The copy goes to a temporary folder next to the destination and replaces it in one rename,
so a failure leaves the shipped run as it was. The manifest keeps every training setting;
only where the data lived on this machine (``data_root``, the dataset ``source``) is
replaced, by ``--source``. Weights are copied byte for byte (their hash in the manifest
still holds); ``csgguard fit`` and ``csgguard inspect`` run through the public API.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

RUN_FILES = ("model.json", "model.safetensors", "summary.json", "metrics.jsonl")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a finished run directory")
    ap.add_argument("name", help="the shipped name (folder under csgguard/pretrained)")
    ap.add_argument("--data-root", required=True, help="the data the detector is fitted on (the run's dataset)")
    ap.add_argument("--source", default="CIFAR-10 (JPEG q75 copy): train.tar.gz + test.tar.gz",
                    help="what the manifest says the data was, in place of this machine's path")
    ap.add_argument("--dest", default=str(Path(__file__).resolve().parents[1] / "csgguard" / "pretrained"))
    args = ap.parse_args()

    from click.testing import CliRunner

    from csgguard.cli import main as cli

    src, dest = Path(args.run), Path(args.dest) / args.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{args.name}.", dir=dest.parent))
    try:
        for f in RUN_FILES:
            shutil.copy2(src / f, work / f)
        manifest = json.loads((work / "model.json").read_text())
        manifest["dataset"].update(source=args.source, data_root=None)
        manifest["training"]["data_root"] = None
        (work / "model.json").write_text(json.dumps(manifest, indent=2) + "\n")
        work.chmod(0o755)
        for cmd in (["fit", "--run", str(work), "--data-root", args.data_root, "--no-progress", "--format", "json"],
                    ["inspect", "--run", str(work), "--data-root", args.data_root, "--format", "json"]):
            r = CliRunner().invoke(cli, cmd)
            if r.exit_code != 0:
                raise SystemExit(f"csgguard {cmd[0]} failed: {r.output.strip()}")
            print(cmd[0], {k: v for k, v in json.loads(r.stdout).items()
                           if not isinstance(v, (list, dict)) and k not in ("run", "path", "heatmap")})
        old = dest.with_name(f".{args.name}.old")
        if dest.exists():
            dest.rename(old)
        work.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        print(f"shipped {src} as {dest}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
