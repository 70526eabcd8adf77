"""Data-parallel training: ``torchrun --nproc_per_node 2 -m csgguard train`` on CPU (Gloo).

What "matches a single-process run" means here: the data order and the global batch
are the same by design (csgguard.distributed), and DDP averages the rank-scaled
gradients into the global-batch gradient. BatchNorm statistics are the one
difference (per rank over half the batch; PyTorch has no CPU SyncBatchNorm), so the
two runs agree within tolerance, not bit for bit: test accuracy within 3 points and
gate L1-density within 0.05. Between the two ranks, and between an uninterrupted and
a resumed DDP run, the agreement must be exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from csgguard.distributed import DistContext, shard

EPOCHS = 6        # digits schedule: 3 STD warm-up epochs, then CSG in 2 epochs of every 3
COPY_AT = 4       # the launcher keeps the checkpoint written after 4 epochs, for the resume test
TRAIN_ARGS = ["train", "--data", "digits", "--epochs", str(EPOCHS), "--seed", "0", "--device", "cpu",
              "--format", "json", "--no-progress"]

# One torchrun job, two trainings through the CLI entry point (`csgguard train`): a full
# run into run/, then `--resume` into resumed/ from the checkpoint the full run wrote
# after COPY_AT epochs. The launcher makes the Gloo group itself, so both trainings reuse
# it (one start-up instead of two), and instruments two things per rank: every
# run-directory write (all go through csgguard.artifacts.atomic_write_bytes) and the gate
# after every epoch (saved with safetensors directly, not through csgguard).
LAUNCHER = textwrap.dedent('''
    import gc, importlib, os, shutil, sys  # noqa: E401
    from pathlib import Path

    import torch.distributed as dist
    from safetensors.torch import save_file

    side, root = Path(os.environ["CSG_TEST_SIDE"]), Path(os.environ["CSG_TEST_ROOT"])
    rank, copy_at = int(os.environ["RANK"]), int(os.environ["CSG_TEST_COPY_AT"])
    phase = {"name": "run"}
    dist.init_process_group("gloo")

    artifacts = importlib.import_module("csgguard.artifacts")
    train = importlib.import_module("csgguard.train")  # the module; csgguard.train is the function
    write = artifacts.atomic_write_bytes
    def logged_write(path, data):
        with open(side / f"writes.rank{rank}.txt", "a") as f:
            f.write(f"{Path(path).resolve()}\\n")
        return write(path, data)
    artifacts.atomic_write_bytes = logged_write

    run_epoch = train.Trainer.run_epoch
    def instrumented(self, epoch, *args, **kwargs):
        if phase["name"] == "run" and epoch == copy_at and rank == 0:
            (side / "ckpt").mkdir()
            for name in ("checkpoint.safetensors",):  # one file (issue 11)
                shutil.copy(root / "run" / name, side / "ckpt" / name)
        row = run_epoch(self, epoch, *args, **kwargs)
        gate = self.model.gate.weight.detach().cpu().contiguous()
        save_file({"gate": gate}, str(side / f"gate.{phase['name']}.rank{rank}.epoch{epoch}.safetensors"))
        return row
    train.Trainer.run_epoch = instrumented

    from csgguard.cli import main
    main([*sys.argv[1:], "--out", str(root / "run")], prog_name="csgguard", standalone_mode=False)
    if rank == 0:
        shutil.copytree(side / "ckpt", root / "resumed")
    dist.barrier()
    phase["name"] = "resumed"
    main([*sys.argv[1:], "--out", str(root / "resumed"), "--resume"], prog_name="csgguard",
         standalone_mode=False)
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
''')

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with Gloo is not available")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """(stdout JSON summaries [full, resumed], run dir, resumed dir, side dir) of one torchrun job."""
    root = tmp_path_factory.mktemp("ddp")
    side = root / "side"
    side.mkdir()
    launcher = root / "launcher.py"
    launcher.write_text(LAUNCHER)
    env = dict(os.environ, OMP_NUM_THREADS="1", CSGGUARD_NO_PROGRESS="1", CSG_TEST_SIDE=str(side),
               CSG_TEST_ROOT=str(root), CSG_TEST_COPY_AT=str(COPY_AT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(launcher), *TRAIN_ARGS]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    (side / "stderr.txt").write_text(proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    decoder, text, summaries = json.JSONDecoder(), proc.stdout.strip(), []
    while text:  # rank 0's JSON summaries, one per training; a second rank printing adds more
        obj, end = decoder.raw_decode(text)
        summaries.append(obj)
        text = text[end:].strip()
    return summaries, root / "run", root / "resumed", side


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    from csgguard import TrainConfig, train

    out = tmp_path_factory.mktemp("single")
    return train(TrainConfig(data="digits", epochs=EPOCHS, seed=0, device="cpu"), out, progress=False)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_shards_partition_every_global_batch():
    for n in (1, 2, 5, 64, 65, 127):
        idx = torch.randperm(n)
        for world in (1, 2, 3, 4):
            if n < world:
                continue
            parts = [idx[shard(idx, DistContext(rank=r, world_size=world))] for r in range(world)]
            assert torch.equal(torch.cat(parts), idx)  # disjoint, in order, nothing lost
            sizes = [len(p) for p in parts]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_ddp_prints_once_and_only_rank0_writes(ddp_runs):
    summaries, out, resumed, side = ddp_runs
    assert len(summaries) == 2  # one per training, from rank 0 alone
    assert all(s["world_size"] == 2 and s["epochs"] == EPOCHS for s in summaries)
    assert not (side / "writes.rank1.txt").exists()
    written = set((side / "writes.rank0.txt").read_text().split())
    for run in (out, resumed):
        assert {str((run / f).resolve()) for f in ("model.safetensors", "model.json", "metrics.jsonl",
                                                   "summary.json")} <= written
        assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "model.json", "model.safetensors",
                                                         "summary.json"]
    assert {Path(p).parent for p in written} == {out.resolve(), resumed.resolve()}


def test_ddp_gate_identical_across_ranks(ddp_runs):
    from safetensors.torch import load_file

    _, out, resumed, side = ddp_runs
    gates = {}
    for phase, epochs in (("run", range(EPOCHS)), ("resumed", range(COPY_AT, EPOCHS))):
        for epoch in epochs:
            g0, g1 = (load_file(str(side / f"gate.{phase}.rank{r}.epoch{epoch}.safetensors"))["gate"]
                      for r in (0, 1))
            assert torch.equal(g0, g1), f"{phase} epoch {epoch}: gates differ by {(g0 - g1).abs().max():.3g}"
            gates[phase, epoch] = g0
    first, last = gates["run", 0], gates["run", EPOCHS - 1]
    assert torch.all(first == 0.5) and not torch.equal(first, last)  # the CSG epochs moved the gate
    assert float(last.amax(dim=1).min()) == 1.0  # row-max normalised: each filter open for some class
    for run in (out, resumed):
        rows = _metrics(run)
        assert len(rows) == EPOCHS and all(r["replica_max_diff"] == 0.0 for r in rows)


def test_ddp_matches_single_process(ddp_runs, single_run):
    summaries, out, _, _ = ddp_runs
    ddp, one = summaries[0], single_run.summary
    assert abs(ddp["test_accuracy"] - one["test_accuracy"]) <= 0.03, (ddp, one)
    assert abs(ddp["gate_density"] - one["gate_density"]) <= 0.05, (ddp, one)
    assert [r["path"] for r in _metrics(out)] == [h["path"] for h in single_run.history]
    assert ddp["test_accuracy"] > 0.9


def test_ddp_resume_reproduces_the_uninterrupted_run(ddp_runs):
    summaries, out, resumed, side = ddp_runs
    full, again = _metrics(out), _metrics(resumed)
    assert len(again) == EPOCHS
    for a, b in zip(full, again, strict=True):
        for key in ("path", "train_loss", "train_accuracy", "val_accuracy", "gate_density"):
            assert a[key] == b[key], (a["epoch"], key, a[key], b[key])
    from safetensors.torch import load_file

    last = f"rank0.epoch{EPOCHS - 1}.safetensors"
    assert torch.equal(load_file(str(side / f"gate.run.{last}"))["gate"],
                       load_file(str(side / f"gate.resumed.{last}"))["gate"])
    assert summaries[0]["test_accuracy"] == summaries[1]["test_accuracy"]
