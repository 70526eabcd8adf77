"""One scaler + logistic-regression pipeline for the supervised detectors, persisted as arrays.

scikit-learn fits it (``make_pipeline(StandardScaler(), LogisticRegression())``);
:func:`pipeline_arrays` exports the four fitted arrays and :func:`pipeline_from_arrays`
rebuilds an equivalent fitted pipeline from them, so a detector file holds numbers
only (safetensors), never a pickle. The score is the pipeline's ``decision_function``:
the log-odds of "adversarial".
"""

from __future__ import annotations

import numpy as np

ARRAY_KEYS = ("lr_mean", "lr_scale", "lr_coef", "lr_intercept")


def fit_logistic_pipeline(x: np.ndarray, y: np.ndarray, *, C: float = 1.0, seed: int = 0,
                          class_weight: str | None = None) -> dict[str, np.ndarray]:
    """Fit standardise -> logistic regression on (x, y in {0, 1}); return its arrays."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed,
                                                              class_weight=class_weight))
    return pipeline_arrays(pipe.fit(np.asarray(x, np.float64), np.asarray(y)))


def pipeline_arrays(pipe) -> dict[str, np.ndarray]:
    scaler, lr = pipe[0], pipe[-1]
    return {"lr_mean": scaler.mean_.astype(np.float64), "lr_scale": scaler.scale_.astype(np.float64),
            "lr_coef": lr.coef_[0].astype(np.float64), "lr_intercept": lr.intercept_.astype(np.float64)}


def pipeline_from_arrays(arrays: dict[str, np.ndarray]):
    """A fitted pipeline equivalent to the one :func:`pipeline_arrays` exported."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    scaler, lr = StandardScaler(), LogisticRegression()
    scaler.mean_ = np.asarray(arrays["lr_mean"], np.float64)
    scaler.scale_ = np.asarray(arrays["lr_scale"], np.float64)
    scaler.var_ = scaler.scale_ ** 2
    scaler.n_features_in_ = len(scaler.mean_)
    lr.coef_ = np.asarray(arrays["lr_coef"], np.float64).reshape(1, -1)
    lr.intercept_ = np.asarray(arrays["lr_intercept"], np.float64).reshape(1)
    lr.classes_ = np.array([0.0, 1.0])
    lr.n_features_in_ = lr.coef_.shape[1]
    return make_pipeline(scaler, lr)


def load_pipeline_arrays(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.asarray(arrays[k], np.float64) for k in ARRAY_KEYS}


def logistic_decision(arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The pipeline's log-odds of "adversarial" for each row of ``x``."""
    return pipeline_from_arrays(arrays).decision_function(np.asarray(x, np.float64))
