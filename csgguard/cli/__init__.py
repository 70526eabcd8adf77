"""The ``csgguard`` command line: a thin layer over the Python API.

Each command lives in its own module and registers itself on :data:`main`.
"""

from __future__ import annotations

import click

from .. import __version__
from .common import CsgguardGroup

HELP = """Flag adversarial images before an image classifier acts on them.

\b
The main job, in order:
  csgguard train                 train a CSG CNN (or --no-gate for the STD baseline)
  csgguard attack --method pgd   make adversarial examples with foolbox
  csgguard fit                   fit a detector on gate-activation patterns
  csgguard screen images/        score and flag images at a calibrated FPR
  csgguard evaluate              the honest benchmark: CSG vs STD vs baselines
  csgguard inspect               accuracy, gate density, MIS, filter-class map

\b
Exit codes: 0 ok; 1 screen --fail-on-flag found a flagged or unreadable image; 2 usage error
or bad input (one line on stderr naming the file and the problem); 3 internal
error (CSGGUARD_DEBUG=1 shows the traceback); 130 interrupted.
"""


@click.group(cls=CsgguardGroup, help=HELP, context_settings={"help_option_names": ["-h", "--help"],
                                                             "max_content_width": 100})
@click.version_option(__version__, prog_name="csgguard")
def main() -> None:
    pass


# each command module registers itself on `main` when imported
from . import (  # noqa: E402,F401
    attack_cmd,
    evaluate_cmd,
    fit_cmd,
    inspect_cmd,
    screen_cmd,
    train_cmd,
)
