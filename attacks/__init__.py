"""Attacks (``csgguard.attacks``): foolbox 3 attacks as small specs, and reusable adversarial sets.

::

    from csgguard.attacks import run, attack_run_split, save_adversarial_set, load_adversarial_set
    advset = run(model, x, y, method="pgd", eps=0.1)          # tensors in, AdversarialSet out
    advset = attack_run_split("runs/default", "test", "cw", preset="fast", limit=256)
    save_adversarial_set("runs/default/attacks/cw.npz", advset)
    adv_only = load_adversarial_set("runs/default/attacks/cw.npz").successful()

Only inputs the model classifies correctly are attacked; a row counts as a success
only when foolbox says so *and* re-predicting the returned image confirms it.
See docs/attacks.md for the attacks, presets, defaults and the file format.
"""

from __future__ import annotations

from .advset import AdversarialSet, load_adversarial_set, save_adversarial_set, sidecar_path
from .base import AttackSpec
from .defaults import DEFAULT_EPS, NORMS
from .images import save_adversarial_images
from .runner import ATTACKS, attack_run_split, default_output_path, make_attack, run
from .specs import BIM, CW_PRESETS, FGSM, PGD, CarliniWagnerL2, DeepFool

__all__ = [
    "ATTACKS", "AdversarialSet", "AttackSpec", "BIM", "CW_PRESETS", "CarliniWagnerL2", "DEFAULT_EPS", "DeepFool",
    "FGSM", "NORMS", "PGD", "attack_run_split", "default_output_path", "load_adversarial_set", "make_attack", "run",
    "save_adversarial_images", "save_adversarial_set", "sidecar_path",
]
