"""The attack-spec contract and the one loop every attack shares.

A spec (foolbox-3 style) is a small object: its keyword-only ``__init__`` stores
settings, :meth:`AttackSpec.foolbox_attack` builds the foolbox attack, and
:meth:`AttackSpec.run` carries everything else once: seeding, the clean
prediction (only correctly classified inputs are attacked), batching, restarts,
masking by foolbox's success flag *and* by re-predicting the returned images,
perturbation statistics and timing.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

import numpy as np
import torch

from ..errors import CsgguardError
from ..progress import make_progress
from .advset import FORMAT, FORMAT_VERSION, AdversarialSet
from .defaults import check_eps, check_norm, default_eps, norm_stats, perturbation_norms

# slack for float32 arithmetic when checking ||x_adv - x|| <= eps
EPS_RTOL, EPS_ATOL = 1e-4, 1e-5


class AttackSpec:
    """Base class: subclasses set ``name``/``norms`` and implement :meth:`foolbox_attack`."""

    name: ClassVar[str] = "base"
    norms: ClassVar[tuple[str, ...]] = ("linf",)
    #: minimisation attacks (C&W, DeepFool) search for the smallest perturbation and take no eps
    minimization: ClassVar[bool] = False
    #: tries per input in all (only PGD, whose random start makes a retry differ, sets it per instance)
    restarts: int = 1

    def __init__(self, *, norm: str | None = None) -> None:
        self.norm = check_norm(norm or self.norms[0], self.norms, self.name)

    # -- parameters ---------------------------------------------------------
    def get_params(self) -> dict[str, Any]:
        """The settings this instance holds (``__init__`` stores each one under its own name), for the sidecar."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def __repr__(self) -> str:  # as foolbox: from the instance's own attributes
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # -- what subclasses provide ---------------------------------------------
    def foolbox_attack(self):
        """The configured foolbox attack object."""
        raise NotImplementedError

    def for_data(self, dataset: str | None, shape: tuple[int, ...]) -> None:
        """Fix settings whose defaults depend on the images (C&W's presets), before :meth:`foolbox_attack`."""

    def effective_params(self) -> dict[str, Any]:
        """The settings the attack ran with, defaults resolved: what an adversarial set records."""
        return self.get_params()

    def resolve_eps(self, eps: float | None, *, dataset: str | None = None,
                    shape: tuple[int, ...] | None = None) -> float | None:
        """The budget to use: given, or the dataset default; None for minimisation attacks."""
        if self.minimization:
            if eps is not None:
                raise CsgguardError(f"{self.name} is a minimisation attack: it searches for the smallest "
                                    "perturbation and ignores eps; drop --eps")
            return None
        if eps is None:
            if shape is None:
                return None
            eps = default_eps(self.norm, dataset, shape)
        return check_eps(eps, self.norm, shape)

    # -- the shared loop -------------------------------------------------------
    def attack_batch(self, fmodel, attack, x: torch.Tensor, y: torch.Tensor, eps: float | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One foolbox call, plus ``restarts - 1`` retries of the inputs still not adversarial.

        foolbox's ``Repeated`` wrapper re-runs the whole batch every time and keeps the
        best; retrying only the failures gives the same success mask (a success is never
        replaced) for the cost of the failures alone, which after the first try are
        usually a small share of the batch. Returns (x_adv, foolbox success).
        """
        _, x_adv, ok = attack(fmodel, x, y, epsilons=eps)
        for _ in range(self.restarts - 1):
            todo = torch.nonzero(~ok).flatten()
            if len(todo) == 0:
                break
            _, retry, ok_retry = attack(fmodel, x[todo], y[todo], epsilons=eps)
            x_adv[todo] = torch.where(ok_retry.view(-1, *[1] * (x.dim() - 1)), retry, x_adv[todo])
            ok[todo] = ok_retry
        return x_adv, ok

    def run(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float | None = None,
            batch_size: int = 256, seed: int = 0, device: str | torch.device | None = None,
            progress: bool | None = None, index: np.ndarray | None = None, dataset: str | None = None,
            model_sha256: str | None = None, compile: bool = False) -> AdversarialSet:
        """Attack the correctly classified rows of ``x`` and return every row, masked.

        ``compile``: the attack's gradient steps run through ``torch.compile`` at one fixed batch
        size (:mod:`csgguard.compiling`): faster on long attacks, about a minute of compiling first.
        """
        import foolbox as fb

        from ..compiling import FixedBatch, compile_errors, compile_module
        from ..devices import select_device

        x, y = _check_inputs(x, y)
        if batch_size < 1:
            raise CsgguardError(f"batch size must be >= 1, got {batch_size}")
        eps = self.resolve_eps(eps, dataset=dataset, shape=tuple(x.shape))
        dev = select_device(device) if device is not None else _model_device(model)
        index = np.arange(len(y)) if index is None else np.asarray(index, dtype=np.int64)
        if len(index) != len(y):
            raise CsgguardError(f"index has {len(index)} entries for {len(y)} inputs")

        was_training = model.training
        model.eval()
        self.for_data(dataset, tuple(x.shape))
        attack = self.foolbox_attack()
        start = time.perf_counter()
        # an attack needs gradients for its inputs only, but foolbox (through eagerpy) calls
        # loss.backward(), which also computes every weight's gradient and adds it to .grad: the
        # weights stop asking while the attack runs (the same input gradients, less work, the
        # caller's .grad untouched; a compiled graph gains most, benchmarks/attack_compile.py)
        frozen = [p for p in model.parameters() if p.requires_grad]
        try:
            for param in frozen:
                param.requires_grad_(False)
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), \
                    compile_errors(f"the network {self.name} attacks"):
                torch.manual_seed(seed)
                pred, classes = _predict(model, x, batch_size, dev)
                if int(y.min()) < 0 or int(y.max()) >= classes:
                    raise CsgguardError(f"labels must be class indices in [0, {classes}), got "
                                        f"{int(y.min())}..{int(y.max())}")
                attacked = pred == y
                rows = torch.nonzero(attacked).flatten()
                attacked_net = model
                if compile and len(rows):  # every batch padded to the first one's size: one graph per grad mode
                    attacked_net = FixedBatch(compile_module(model, dev), min(batch_size, len(rows))).eval()
                fmodel = fb.PyTorchModel(attacked_net, bounds=(0, 1), device=dev)
                x_adv, pred_adv, success = x.clone(), pred.clone(), torch.zeros_like(attacked)
                with make_progress(progress) as bar:
                    task = bar.add_task(f"{self.name} {self.norm}", total=len(rows), info="")
                    for s in range(0, len(rows), batch_size):
                        r = rows[s:s + batch_size]
                        xb, yb = x[r].to(dev), y[r].to(dev)
                        adv, ok = self.attack_batch(fmodel, attack, xb, yb, eps)
                        adv, p, ok = self._mask(model, xb, yb, adv.detach(), ok, eps)
                        x_adv[r], pred_adv[r], success[r] = adv.cpu(), p.cpu(), ok.cpu()
                        bar.advance(task, len(r))
                        bar.update(task, info=f"success {int(success.sum())}/{s + len(r)}")
        finally:
            model.train(was_training)
            for param in frozen:
                param.requires_grad_(True)
        seconds = time.perf_counter() - start

        advset = AdversarialSet(x=x.numpy(), x_adv=x_adv.numpy(), y=y.numpy(), pred=pred.numpy(),
                                pred_adv=pred_adv.numpy(), success=success.numpy(), attacked=attacked.numpy(),
                                index=index)
        advset.meta = self._meta(advset, eps=eps, seed=seed, batch_size=batch_size, device=dev,
                                 seconds=seconds, model_sha256=model_sha256)
        return advset

    def _mask(self, model, x, y, adv, ok, eps):
        """Keep a foolbox success only if the returned image is valid, within eps and still fools."""
        valid = torch.isfinite(adv).flatten(1).all(1) & (adv.flatten(1).min(1).values >= 0) \
            & (adv.flatten(1).max(1).values <= 1)
        if eps is not None:
            d = (adv - x).flatten(1).double()
            size = d.abs().amax(1) if self.norm == "linf" else d.norm(dim=1)
            valid &= size <= eps * (1 + EPS_RTOL) + EPS_ATOL
        if self.minimization:
            # foolbox's C&W returns all-zero images where it found nothing
            valid &= ~((adv.flatten(1) == 0).all(1) & (x.flatten(1) != 0).any(1))
        ok = ok.to(torch.bool) & valid
        adv = torch.where(ok.view(-1, *[1] * (x.dim() - 1)), adv, x).clamp_(0, 1)
        with torch.no_grad():
            pred = model(adv).argmax(1)
        ok &= pred != y
        return adv, pred, ok

    def _meta(self, advset: AdversarialSet, *, eps, seed, batch_size, device, seconds, model_sha256):
        from ..artifacts import library_versions

        ok = advset.success
        norms = perturbation_norms(advset.x[ok], advset.x_adv[ok])
        attacked = int(advset.attacked.sum())
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "attack": self.name, "norm": self.norm, "eps": eps, "settings": self.effective_params(),
            "seed": seed, "batch_size": batch_size, "device": str(device), "model_sha256": model_sha256,
            "total": len(advset), "attacked": attacked, "succeeded": int(ok.sum()),
            "success_rate": advset.success_rate,
            "perturbation": norm_stats(norms, self.norm),
            "seconds": round(seconds, 4),
            "images_per_second": round(attacked / seconds, 2) if seconds > 0 else None,
            "versions": library_versions(),
        }


def _check_inputs(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if x.dim() != 4:
        raise CsgguardError(f"inputs must be a 4-d (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if len(x) == 0:
        raise CsgguardError("no inputs to attack (empty split or --limit 0)")
    if y.shape != (len(x),):
        raise CsgguardError(f"labels must have shape ({len(x)},), got {tuple(y.shape)}")
    x = x.detach().to("cpu", torch.float32).contiguous()
    if not torch.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise CsgguardError("inputs must be finite floats in [0, 1] (normalisation belongs inside the model)")
    return x, y.detach().to("cpu", torch.int64)


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _predict(model, x: torch.Tensor, batch_size: int, device: torch.device) -> tuple[torch.Tensor, int]:
    """The model's predictions for ``x`` and how many classes it scores."""
    logits = [model(x[s:s + batch_size].to(device)) for s in range(0, len(x), batch_size)]
    return torch.cat([z.argmax(1).cpu() for z in logits]), int(logits[0].shape[1])
