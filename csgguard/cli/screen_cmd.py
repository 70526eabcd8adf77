"""``csgguard screen``: score and flag image files, one row each, streamed."""

from __future__ import annotations

import os
import sys

import click

from ..progress import log
from . import main
from .common import (
    EXIT_FLAGGED,
    POSITIVE_INT,
    FiniteFloat,
    compile_option,
    csv_header,
    csv_row,
    device_option,
    emit_rows,
    json_text,
    progress_option,
    run_option,
)

#: a cap on --workers: each is a process with its own interpreter and torch import (~300 MB)
MAX_WORKERS = 64


def _stream(rows, fmt: str) -> None:
    """jsonl / csv rows are written as they come: constant memory for any folder size."""
    from ..screening import ROW_FIELDS

    if fmt == "csv":
        click.echo(csv_header(ROW_FIELDS), nl=False)
    for r in rows:
        if fmt == "jsonl":
            click.echo(json_text(r))
        else:
            click.echo(csv_row(r, ROW_FIELDS), nl=False)


@main.command("screen")
@click.argument("paths", nargs=-1, required=True, type=click.Path())
@run_option
@click.option("--detector", "detector_path", type=click.Path(), default=None,
              help="Detector file (.json beside its .safetensors); default RUN/detector.json.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "jsonl", "csv"]), default="table",
              show_default=True, help="Output on stdout; jsonl and csv stream row by row.")
@click.option("--threshold", type=FiniteFloat(-1e12, 1e12), default=None,
              help="Flag when score > X (default: the detector's calibrated threshold); finite, |X| <= 1e12.")
@click.option("--recursive", "-r", is_flag=True, help="Descend into sub-folders.")
@click.option("--follow-symlinks", is_flag=True,
              help="Read symlinks that lead outside the folder given (default: an error row each, not read).")
@click.option("--batch-size", type=POSITIVE_INT, default=64, show_default=True)
@click.option("--workers", type=click.IntRange(0, MAX_WORKERS), default=0, show_default=True,
              help=f"Decode worker processes (one thread each, at most {MAX_WORKERS}); 0 decodes in the main "
                   "process. More workers than cores only adds processes.")
@click.option("--shard", default=None, metavar="I/N",
              help="Screen only block I (0-based) of N of the sorted file list; the shards' JSONL outputs "
                   "concatenated in order equal one unsharded run with the same --batch-size.")
@click.option("--fail-on-flag", is_flag=True,
              help="Exit 1 when any image is flagged or could not be screened (an error row): for pipelines, "
                   "which should pass only what was screened and cleared.")
@device_option
@compile_option("the forward pass and the detector's score",
                "1.32x on a 1-thread AVX2 CPU, CIFAR-10 ResNet-20: benchmarks/screen_speed.py --compile")
@progress_option
def screen_command(paths, run_dir, detector_path, fmt, threshold, recursive, follow_symlinks, batch_size, workers,
                   shard, fail_on_flag, device, torch_compile, progress):
    """Score image files and flag likely adversarial ones.

    \b
    Every file (PNG, JPEG, BMP, TIFF, WebP, GIF, PPM/PGM; grey or colour; any size)
    is converted to the model's input as model.json says (the `converted` column
    notes it) and gets one row: path, predicted_class, confidence, score, flagged,
    error. Unreadable files get an error row and the run goes on. Summary on stderr.

    \b
    Files and links: a file named here is read as named. Inside a folder, symlinks
    are followed only while they stay inside it; a link leading outside, a symlink
    loop, a broken link and a sub-folder that cannot be listed each get an error
    row (--follow-symlinks reads links leading outside). Without -r sub-folders
    are skipped (a folder whose images are all in sub-folders is an error).

    \b
    Paths print with control bytes, backslashes and non-UTF-8 bytes escaped
    (\\n, \\x1b, \\xff, \\\\), so no two files print alike; in CSV a cell starting
    with = + - @ (formula injection) gets a leading ' .

    \b
    Examples:
      csgguard screen images/                         # table
      csgguard screen -r images/ --format jsonl --workers 2 --batch-size 256
      csgguard screen images/ --shard 0/4 --format jsonl > part0.jsonl
      csgguard screen upload.png --fail-on-flag       # exit 1 if flagged or unreadable

    Exit status: 0 ran; 1 with --fail-on-flag and something flagged or not
    screenable (fail closed: an unreadable upload is not cleared); 2 usage error.
    Finding no image at all is not an error (an empty shard, an empty upload
    folder), but says so on stderr.
    """
    from ..images import IMAGE_SUFFIXES, parse_shard
    from ..screening import ROW_FIELDS, screen

    screener, rows = screen(paths, run_dir, detector=detector_path, threshold=threshold, recursive=recursive,
                            follow_symlinks=follow_symlinks, batch_size=batch_size, workers=workers,
                            shard=parse_shard(shard), device=device, progress=progress, compile=torch_compile)
    try:
        if fmt in ("jsonl", "csv"):
            _stream(rows, fmt)
        else:
            emit_rows(rows, ROW_FIELDS, fmt, title="screen")
    except BrokenPipeError:  # `csgguard screen ... | head`: the reader left; stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    s = screener.summary
    if s.get("skipped_subfolders"):
        log(f"note: skipped {s['skipped_subfolders']} sub-folder(s) (pass -r / --recursive to descend)")
    log(f"screened {s['images']} images: {s['flagged']} flagged, {s['errors']} errors, {s['converted']} converted "
        f"(threshold {s['threshold']:.4g}{', shard ' + s['shard'] if s.get('shard') else ''})")
    if not s["images"]:
        log("warning: no image files found in the given paths (suffixes: " + ", ".join(sorted(IMAGE_SUFFIXES)) + ")")
    if fail_on_flag and (s["flagged"] or s["errors"]):
        if s["errors"]:
            log(f"--fail-on-flag: {s['errors']} input(s) could not be screened; failing closed")
        sys.exit(EXIT_FLAGGED)
