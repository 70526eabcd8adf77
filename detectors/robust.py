"""``csg-robust``: class-conditional gate detectors trained against attacks on themselves.

Asymmetrical adversarial training (Yin, Kolouri & Rohde, ICLR 2020), on the features of
the one forward pass that classifies the input. For every predicted class ``k`` a
small binary detector ``D_k`` (one hidden ReLU layer) reads the standardised pooled
gated-layer activations (the gate pattern), the taps (channel means of earlier
layers) and the logits, and answers: is this a clean class-``k`` input, or an input of
another class pushed into ``k``? Its training data:

* clean side -- clean fit images the model predicts as ``k`` (never perturbed: the
  asymmetry of the paper);
* adversarial side -- fit images of other classes moved into ``k`` inside the Linf ball,
  first by plain PGD (the non-adaptive attacks of the sweep), then, for ``rounds``
  rounds, by the adaptive attack of :mod:`csgguard.adaptive` against the *current*
  detector (targeted margin + hinged detector score, per-image weight schedule, best
  iterate): each round's examples join the pool and the detector is refitted on all
  of them, so it learns to flag what evaded its previous self.

The clean guard (``guard="csg-clean"``, the default): the class detectors learn what the
attacks they were trained on look like, and on attacks unlike those (C&W, budgets
outside the training range) they can see less than the clean-only ``csg-clean``
does. So the score is the union of both: a soft maximum (log-sum-exp) of the heads'
log-odds and a ``csg-clean`` score fitted on the same clean images, each put in units
of its own clean spread (its ``1 - fpr`` clean quantile subtracted, divided by its clean
standard deviation). With ``units="cross-fit"`` (the default) those clean figures are
out-of-fold: a head scores its own training images far lower than images it has not seen,
and units taken on them (``"in-sample"``, the default until a rule judged on MNIST and the
shipped CIFAR-10 pair chose cross-fit: docs/adaptive.md) let the heads' part swamp the
union on new clean images. An input is flagged when either part finds it atypical, and every
adaptive round -- and any adaptive attacker -- differentiates the union, so an
example must evade both to pass. ``guard="none"`` keeps the heads alone (files saved
before the guard existed load that way).

Screening reads only the :class:`~csgguard.features.Features` of the classifying pass
(``needs_inputs`` is false): the cost is one small matrix product per predicted class.
Fitting needs the model (``bind_model``) and the fit images (``inputs=``) to generate
the attacks, as :func:`csgguard.evaluate.evaluate` provides. The threshold is chosen
on clean held-out images by :meth:`Detector.calibrate`, as everywhere else; the
detectors are saved as arrays (no pickle). The score is ``D_k``'s log-odds of
"adversarial", differentiable (:meth:`torch_score`, in float64, which the adaptive
attack differentiates; :meth:`score_samples` computes the very same function in float32,
the features' own precision, as the csg-clean score does: csgguard/scores.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch
from sklearn.utils._param_validation import Interval

from .. import scores as S
from ..errors import CsgguardError
from ..features import Features
from ..scores import as_tensors
from .base import Detector, stratified_folds

BLOCKS = ("pooled", "taps", "logits")
GUARDS = ("csg-clean", "none")
UNITS = ("cross-fit", "in-sample")
#: folds of the cross-fitted clean units
UNIT_FOLDS = 5
_HEAD_ARRAYS = ("mu_", "sd_", "w1_", "b1_", "w2_", "b2_")
#: prefix of the guard's arrays inside the detector file
_GUARD_PREFIX = "guard."


def _parse_blocks(value: str | Sequence[str]) -> tuple[str, ...]:
    return S.parse_choices(value, BLOCKS, "csg-robust: inputs", "csg-robust input block")


def _budgets(value, shape: tuple[int, ...]) -> tuple[float, ...]:
    from ..attacks.defaults import default_sweep

    if value is None:
        return tuple(default_sweep("linf", None, shape))
    try:
        vals = [float(v) for v in (value.split(",") if isinstance(value, str) else np.atleast_1d(value))]
    except (TypeError, ValueError):
        vals = []
    if not vals or any(not 0 < v <= 1 for v in vals):
        raise CsgguardError(f"csg-robust: train_eps must be Linf budgets in (0, 1], got {value!r}")
    return tuple(vals)


class GateRobustDetector(Detector):
    """Per-predicted-class detectors on the gate pattern, adversarially trained against themselves.

    Parameters
    ----------
    inputs : comma-separated blocks of the forward pass it reads: ``pooled`` (the gated
        layer), ``taps`` (earlier layers' channel means), ``logits``.
    hidden : hidden units of each class's detector.
    rounds : adaptive rounds after the plain-PGD round (0 = plain PGD only, like csg-supervised).
    train_eps : Linf budgets the training attacks draw from (default: the dataset's sweep).
    steps : PGD steps of the training attacks.
    limit : at most this many fit images are attacked per round (all are used as clean).
    epochs, lr, weight_decay : full-batch Adam on the pool, per (re)fit.
    guard : ``csg-clean`` (flag what either the heads or a clean-only ``csg-clean`` finds atypical;
        see the module docstring) or ``none`` (the heads alone).
    units : where each part's clean units (and the fit-time operating point the adaptive rounds
        attack) come from: ``cross-fit`` (out-of-fold scores: each clean fit image scored by
        heads and guard fitted without it, 5 folds; the default) or ``in-sample`` (the fit
        images' own scores; files saved before the parameter existed load so).
    head_fpr : where the heads' clean units put their zero: their ``1 - head_fpr`` clean quantile
        (default ``None``: ``fpr``, the guard's own). Below ``fpr`` the heads' part of the union
        reaches the threshold only further out, so more of the false-positive budget stays with
        the guard (csg-clean) and less with the heads; the union's threshold is calibrated on
        clean images as always. No effect with ``guard="none"``. Judged for the default and
        rejected on digits (docs/adaptive.md, "Sharing the false-positive budget").
    seed : attack starts, budgets, targets and initialisation.
    fpr : target false-positive rate for :meth:`calibrate`.
    """

    name = "csg-robust"
    supervised = False
    needs_inputs = False
    #: fitting needs the model (``bind_model``) and the fit images (``inputs=``); screening does not
    needs_model_to_fit = True
    _parameter_constraints = {**Detector._parameter_constraints,
                              "head_fpr": [None, Interval(Real, 0, 1, closed="neither")]}

    def __init__(self, *, inputs: str = "pooled,taps,logits", hidden: int = 64, rounds: int = 3,
                 train_eps: str | Sequence[float] | None = None, steps: int = 20, limit: int = 2000,
                 epochs: int = 300, lr: float = 0.01, weight_decay: float = 1e-4, guard: str = "csg-clean",
                 units: str = "cross-fit", head_fpr: float | None = None, seed: int = 0, batch_size: int = 256,
                 fpr: float = 0.05) -> None:
        super().__init__(fpr=fpr)
        self.inputs = inputs
        self.hidden = hidden
        self.rounds = rounds
        self.train_eps = train_eps
        self.steps = steps
        self.limit = limit
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.guard = guard
        self.units = units
        self.head_fpr = head_fpr
        self.seed = seed
        self.batch_size = batch_size
        self._model = None

    def bind_model(self, model: torch.nn.Module) -> GateRobustDetector:
        """The model the training attacks differentiate through (fit only; screening never uses it)."""
        self._model = model
        return self

    # -- the score (one implementation; float64 to differentiate, float32 to screen) --
    def _tensors(self, device, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
        key = (str(device), dtype)
        cache = self.__dict__.setdefault("_torch", {})
        if key not in cache:
            cache[key] = {k: torch.as_tensor(np.asarray(getattr(self, k), dtype=np.float64), device=device).to(dtype)
                          for k in ("mu_", "sd_", "w1_", "b1_", "w2_", "b2_")}
        return cache[key]

    def _vector(self, logits, pooled, taps, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        parts = []
        for b in self.blocks_:
            if b == "pooled":
                parts.append(pooled.to(dtype))
            elif b == "taps":
                if len(taps) < self.n_taps_:
                    raise CsgguardError(f"csg-robust reads {self.n_taps_} taps but the features carry {len(taps)}")
                parts += [t.to(dtype) for t in taps[:self.n_taps_]]
            else:
                parts.append(logits.to(dtype))
        return torch.cat(parts, 1)

    def _check_guard(self) -> None:
        if self.guard not in GUARDS:
            raise CsgguardError(f"csg-robust: unknown guard {self.guard!r}; choose from {', '.join(GUARDS)}")
        if self.units not in UNITS:
            raise CsgguardError(f"csg-robust: unknown units {self.units!r}; choose from {', '.join(UNITS)}")

    @classmethod
    def from_state(cls, params, arrays, extra):
        # files written before ``guard`` existed hold the heads alone; before ``units``, in-sample units
        return super().from_state({"guard": "none", "units": "in-sample", **params}, arrays, extra)

    def torch_score(self, logits: torch.Tensor, pooled: torch.Tensor, taps=(), *,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The score: the predicted class's head log-odds of "adversarial", in union with the clean
        guard when there is one (module docstring); differentiable, float64 unless ``dtype`` says
        otherwise (screening computes it in ``scores.SCREEN_DTYPE``)."""
        self._check_fitted()
        heads = self._head_score(logits, pooled, taps, dtype)
        if self.guard_ is None:
            return heads
        hq, hs, gq, gs = self.union_
        guard = self.guard_.torch_score(logits, pooled, taps, dtype=dtype)
        return torch.logaddexp((heads - hq) / hs, (guard - gq) / gs)

    def _head_score(self, logits: torch.Tensor, pooled: torch.Tensor, taps=(),
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
        a = self._tensors(logits.device, dtype)
        v = self._vector(logits, pooled, taps, dtype)
        if v.shape[1] != a["mu_"].shape[0]:
            raise CsgguardError(f"features give {v.shape[1]} inputs but the detector was fitted on "
                                f"{a['mu_'].shape[0]} (another model?)")
        return _heads(a, (v - a["mu_"]) / a["sd_"], logits.argmax(1))

    def _score(self, features: Features, *, inputs=None) -> np.ndarray:
        with torch.no_grad():
            logits, pooled, taps = as_tensors(features, S.SCREEN_DTYPE)
            return self.torch_score(logits, pooled, taps, dtype=S.SCREEN_DTYPE).double().numpy()

    # -- fit ------------------------------------------------------------------
    def validate_params(self) -> None:
        """Every parameter, checked by ``fit`` and by ``csgguard fit`` before any work."""
        super().validate_params()
        _parse_blocks(self.inputs)
        for k in ("hidden", "steps", "limit", "epochs", "batch_size"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise CsgguardError(f"csg-robust: {k} must be a positive integer, got {v!r}")
        for k in ("rounds", "seed"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise CsgguardError(f"csg-robust: {k} must be an integer >= 0, got {v!r}")
        for k in ("lr", "weight_decay"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0 or (
                    k == "lr" and v == 0):
                raise CsgguardError(f"csg-robust: {k} must be a finite number {'> 0' if k == 'lr' else '>= 0'}, "
                                    f"got {v!r}")
        if self.train_eps is not None:
            _budgets(self.train_eps, ())
        self._check_guard()

    def _fit(self, clean: Features, adversarial=None, *, inputs=None, adversarial_inputs=None) -> None:
        self.blocks_ = list(_parse_blocks(self.inputs))
        if self._model is None or inputs is None:
            raise CsgguardError("csg-robust trains against attacks on itself: it needs the model (bind_model) and "
                                "the fit images (inputs=); fit it through `csgguard evaluate` or the Python API")
        x = torch.as_tensor(inputs, dtype=torch.float32)
        if len(x) != len(clean):
            raise CsgguardError(f"csg-robust: {len(x)} fit images for {len(clean)} feature rows")
        if "taps" in self.blocks_ and not clean.taps:
            raise CsgguardError("csg-robust: input block 'taps' needs features with taps")
        self.n_taps_ = len(clean.taps) if "taps" in self.blocks_ else 0
        self.num_classes_ = clean.num_classes
        budgets = _budgets(self.train_eps, tuple(x.shape[1:]))
        t0 = time.perf_counter()
        rng = np.random.default_rng(self.seed)
        torch.manual_seed(self.seed)

        clean_rows = as_tensors(clean)
        v_clean = self._vector(*clean_rows)
        self.mu_ = v_clean.mean(0).numpy()
        self.sd_ = np.maximum(v_clean.std(0).numpy(), 1e-6)
        pred = torch.from_numpy(clean.pred)
        # cross-fit: every clean fit image's fold; its units come from parts fitted without its fold
        self._folds = stratified_folds(clean.pred, UNIT_FOLDS, np.random.default_rng(self.seed + 1)) \
            if self.units == "cross-fit" else None
        self.guard_, self._guard_clean = None, None
        if self.guard == "csg-clean":
            from .gate import GateCleanDetector

            self.guard_ = GateCleanDetector(fpr=self.fpr).fit(clean)
            if self._folds is None:
                self._guard_clean = self.guard_.score_samples(clean)
            else:
                self._guard_clean = np.empty(len(clean))
                for k in range(UNIT_FOLDS):
                    out = self._folds == k
                    part = GateCleanDetector(fpr=self.fpr).fit(clean.subset(np.flatnonzero(~out)))
                    self._guard_clean[out] = part.score_samples(clean.subset(np.flatnonzero(out)))
            self._guard_units = self._clean_units(self._guard_clean)
        pool_v, pool_p = [], []
        if adversarial is not None and len(adversarial):  # attacks a caller already made (evaluate's fit split)
            pool_v.append(self._vector(*as_tensors(adversarial)))
            pool_p.append(torch.from_numpy(adversarial.pred))
        attack_rows = rng.permutation(len(x))[:self.limit]
        self.history_ = []
        for r in range(self.rounds + 1):
            ta = time.perf_counter()
            v_adv, p_adv, s_adv = self._attack_round(x[attack_rows], pred[attack_rows], budgets, adaptive=r > 0,
                                              seed=self.seed + 1000 * r, rng=rng)
            pool_v.append(v_adv)
            pool_p.append(p_adv)
            seconds_attack = time.perf_counter() - ta
            evaded = None
            if r > 0 and len(s_adv):  # the new examples against the detector they were made for
                evaded = float(np.mean(s_adv <= self.fit_threshold_))
            self._train(v_clean, pred, torch.cat(pool_v), torch.cat(pool_p), clean_rows)
            self.history_.append({"round": r, "adaptive": r > 0, "new_adversarial": int(len(v_adv)),
                                  "pool": int(sum(len(p) for p in pool_p)), "evaded_previous_detector": evaded,
                                  "attack_seconds": round(seconds_attack, 3)})
        self.train_seconds_ = time.perf_counter() - t0
        self.budgets_ = list(budgets)
        del self._folds, self._guard_clean  # fit-time scratch

    def _attack_round(self, x: torch.Tensor, y: torch.Tensor, budgets, *, adaptive: bool, seed: int, rng):
        """Fit images moved into other classes, at budgets drawn from ``budgets``.

        Plain round: untargeted PGD on the margin alone (the sweep's attack), keeping the
        most confidently misclassified iterate. Adaptive round: the adaptive attack on the
        current detector (hinged margin + hinged detector score, per-image weight schedule,
        best iterate = lowest detector score), half of the images untargeted, half pushed
        into a random other class so every class's detector sees examples pushed into it.
        """
        from ..adaptive import (
            Context,
            MarginDetectorLoss,
            MultiTargetedLoss,
            attack_loss,
            detector_surrogate,
        )

        model = self._model
        dev = next(model.parameters()).device
        was_training = model.training
        model.eval()
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        gen = torch.Generator().manual_seed(seed)
        c_num = self.num_classes_
        target = (y + torch.as_tensor(rng.integers(1, c_num, len(y)))) % c_num
        targeted = torch.as_tensor(rng.random(len(y)) < 0.5) if adaptive else torch.zeros(len(y), dtype=torch.bool)
        eps = torch.as_tensor(rng.choice(budgets, len(y)), dtype=torch.float32)
        if adaptive:
            ctx, w0 = Context(detector_surrogate(self), self.fit_threshold_, self.fit_scale_, [], []), 1.0
            losses = {False: MarginDetectorLoss(), True: MultiTargetedLoss()}
        else:
            ctx, w0 = Context(_unconfidence, float("inf"), 1.0, [], []), 0.0
            losses = {False: MarginDetectorLoss(kappa=1e3)}
        out_v, out_p, out_s = [], [], []
        try:
            for e in sorted(set(eps.tolist())):
                for tg, loss in losses.items():
                    rows = torch.nonzero((eps == e) & (targeted == tg)).flatten()
                    for s in range(0, len(rows), self.batch_size):
                        r = rows[s:s + self.batch_size]
                        xb, yb = x[r].to(dev), y[r].to(dev)
                        xa, sa = attack_loss(model, xb, yb, loss, ctx, eps=float(e), steps=self.steps, weight=w0,
                                             target=target[r].to(dev) if tg else None, random_start=True,
                                             generator=gen)
                        ok = torch.isfinite(sa)
                        if ok.any():
                            with torch.no_grad():
                                o = model.forward_signals(xa[ok])
                                taps = [t.cpu() for t in o.taps]
                                out_v.append(self._vector(o.logits.cpu(), o.pooled.cpu(), taps))
                                out_p.append(o.logits.argmax(1).cpu())
                                if adaptive:  # scored by the detector they were made against
                                    out_s.append(self.torch_score(o.logits.cpu(), o.pooled.cpu(), taps).numpy())
        finally:
            for p, f in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(f)
            model.train(was_training)
        if not out_v:
            return (torch.zeros((0, len(self.mu_)), dtype=torch.float64), torch.zeros(0, dtype=torch.int64),
                    np.zeros(0))
        return torch.cat(out_v), torch.cat(out_p), np.concatenate(out_s) if out_s else np.zeros(0)

    def _train(self, v_clean, p_clean, v_adv, p_adv, clean_rows) -> None:
        """Fit the heads on the whole pool, then the clean units: of the union's parts and of the
        union itself (the operating point and scale the next adaptive round attacks)."""
        for k, t in self._fit_heads(v_clean, p_clean, v_adv, p_adv).items():
            setattr(self, k, t.numpy().copy())
        self._torch = {}
        self.fitted_ = True
        mu, sd = torch.from_numpy(self.mu_), torch.from_numpy(self.sd_)
        with torch.no_grad():
            if self._folds is None:
                h = self._head_score(*clean_rows).numpy()
            else:  # each clean row through heads fitted without its fold (adversarial pool kept whole)
                h = np.empty(len(v_clean))
                for k in range(UNIT_FOLDS):
                    out = torch.from_numpy(self._folds == k)
                    part = self._fit_heads(v_clean[~out], p_clean[~out], v_adv, p_adv)
                    h[out.numpy()] = _heads(part, (v_clean[out] - mu) / sd, p_clean[out]).numpy()
        if self.guard_ is None:
            union = h
        else:
            self.union_ = (*self._clean_units(h, self.head_fpr), *self._guard_units)
            hq, hs, gq, gs = self.union_
            union = np.logaddexp((h - hq) / hs, (self._guard_clean - gq) / gs)
        self.fit_threshold_, self.fit_scale_ = self._clean_units(union)

    def _fit_heads(self, v_clean, p_clean, v_adv, p_adv) -> dict[str, torch.Tensor]:
        """Full-batch Adam on clean (0) vs pooled adversarial (1), each row through its predicted class's head,
        classes and sides balanced."""
        mu, sd = torch.from_numpy(self.mu_), torch.from_numpy(self.sd_)
        u = torch.cat([(v_clean - mu) / sd, (v_adv - mu) / sd]).double()
        p = torch.cat([p_clean, p_adv])
        lab = torch.cat([torch.zeros(len(v_clean)), torch.ones(len(v_adv))]).double()
        weight = torch.zeros(len(u), dtype=torch.float64)
        for c in range(self.num_classes_):
            for side in (0, 1):
                m = (p == c) & (lab == side)
                if m.any():
                    weight[m] = 1.0 / m.sum()
        weight /= weight.sum()
        d, h, c_num = u.shape[1], self.hidden, self.num_classes_
        g = torch.Generator().manual_seed(self.seed)
        params = {"w1_": torch.randn(c_num, d, h, generator=g, dtype=torch.float64) / np.sqrt(d),
                  "b1_": torch.zeros(c_num, h, dtype=torch.float64),
                  "w2_": torch.randn(c_num, h, generator=g, dtype=torch.float64) / np.sqrt(h),
                  "b2_": torch.zeros(c_num, dtype=torch.float64)}
        for t in params.values():
            t.requires_grad_(True)
        opt = torch.optim.Adam(params.values(), lr=self.lr, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.epochs):
                opt.zero_grad()
                z = _heads(params, u, p)
                loss = (torch.nn.functional.binary_cross_entropy_with_logits(z, lab, reduction="none") * weight).sum()
                loss.backward()
                opt.step()
        return {k: t.detach() for k, t in params.items()}

    def _clean_units(self, clean_scores: np.ndarray, fpr: float | None = None) -> tuple[float, float]:
        """(``1 - fpr`` quantile, standard deviation) of clean fit scores: the union's units, and the
        operating point and scale the adaptive rounds attack (``fpr``: the detector's unless given)."""
        q = 1 - (self.fpr if fpr is None else fpr)
        return float(np.quantile(clean_scores, q)), float(np.std(clean_scores)) or 1.0

    # -- persistence ----------------------------------------------------------
    def _state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        arrays = {k: np.asarray(getattr(self, k), dtype=np.float64) for k in _HEAD_ARRAYS}
        extra = {"blocks_": self.blocks_, "n_taps_": int(self.n_taps_), "num_classes_": int(self.num_classes_),
                 "history_": getattr(self, "history_", []), "budgets_": getattr(self, "budgets_", []),
                 "train_seconds_": float(getattr(self, "train_seconds_", 0.0))}
        if self.guard_ is not None:
            g_arrays, g_extra = self.guard_.state()
            arrays.update({_GUARD_PREFIX + k: v for k, v in g_arrays.items()})
            extra.update({"guard_params_": self.guard_.get_params(), "guard_state_": g_extra,
                          "union_": list(self.union_)})
        return arrays, extra

    def _load_state(self, arrays: dict[str, np.ndarray], extra: dict[str, Any]) -> None:
        missing = [k for k in _HEAD_ARRAYS if k not in arrays]
        if missing:
            raise CsgguardError(f"detector state lacks arrays {', '.join(missing)}")
        self._check_guard()
        self.blocks_ = list(_parse_blocks(extra.get("blocks_", [])))
        self.n_taps_ = int(extra.get("n_taps_", 0))
        self.num_classes_ = int(extra.get("num_classes_", 0))
        for k in _HEAD_ARRAYS:
            setattr(self, k, np.asarray(arrays[k], dtype=np.float64))
        d = self.mu_.shape[0]
        c, h = self.num_classes_, self.w1_.shape[-1] if self.w1_.ndim == 3 else -1
        shapes = {"sd_": (d,), "w1_": (c, d, h), "b1_": (c, h), "w2_": (c, h), "b2_": (c,)}
        for k, shape in shapes.items():
            if getattr(self, k).shape != shape:
                raise CsgguardError(f"detector array {k} has shape {getattr(self, k).shape}, expected {shape}")
        self.history_ = extra.get("history_", [])
        self.budgets_ = extra.get("budgets_", [])
        self.train_seconds_ = float(extra.get("train_seconds_", 0.0))
        self._torch = {}
        self.guard_ = None
        if self.guard == "csg-clean":
            from .gate import GateCleanDetector

            union = extra.get("union_")
            if not (isinstance(union, list) and len(union) == 4 and all(isinstance(u, (int, float)) for u in union)
                    and union[1] > 0 and union[3] > 0):
                raise CsgguardError("csg-robust state lacks a valid union_ (four numbers, positive scales)")
            g_arrays = {k[len(_GUARD_PREFIX):]: v for k, v in arrays.items() if k.startswith(_GUARD_PREFIX)}
            params = extra.get("guard_params_")
            if not isinstance(params, dict):
                raise CsgguardError("csg-robust state lacks its guard's parameters")
            self.guard_ = GateCleanDetector.from_state(params, g_arrays, dict(extra.get("guard_state_") or {}))
            self.union_ = tuple(float(u) for u in union)


def _heads(a: dict[str, torch.Tensor], u: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """Each row through its predicted class's detector: ``w2_k . relu(W1_k^T u + b1_k) + b2_k``.

    Rows are grouped by class once (one gather, one scatter back) rather than masked per class:
    at screening sizes the per-class masks cost as much as the products."""
    order = torch.argsort(pred, stable=True)
    counts = torch.bincount(pred, minlength=a["w1_"].shape[0]).tolist()
    grouped, parts, start = u[order], [], 0
    for c, n in enumerate(counts):
        if n:
            hid = torch.relu(torch.addmm(a["b1_"][c], grouped[start:start + n], a["w1_"][c]))
            parts.append(torch.addmv(a["b2_"][c], hid, a["w2_"][c]))
            start += n
    if not parts:
        return u.new_zeros(0)
    return torch.empty(len(u), dtype=u.dtype, device=u.device).index_put((order,), torch.cat(parts))


def _unconfidence(logits, pooled, taps=(), *, inputs=None) -> torch.Tensor:
    """``-(top1 - top2)`` logit: the plain round keeps the most confidently misclassified iterate."""
    top2 = logits.detach().double().topk(2, dim=1).values
    return top2[:, 1] - top2[:, 0]

