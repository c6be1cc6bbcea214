"""Linear probe, CLIP's protocol (Radford et al. 2021, arXiv 2103.00020, appendix A.3):
image features before the joint projection; scikit-learn's L-BFGS logistic regression
(max_iter 1000); the L2 strength lambda = 1/C chosen on a validation split carved from
train by a parametric search that starts on a log grid over [1e-6, 1e6] and halves the
step around the best value down to 8 steps per decade; then a refit on train+val scored
on test. Fixed seed -> same choice. The validation score that picks lambda is the
cross-entropy (see search_lambda).

Two things make the result a property of the features rather than of the optimizer:
* the features are standardized with the statistics of the split being fitted (mean 0,
  variance 1 per dimension). Logistic regression's optimum does not care about a
  per-dimension scale, except through lambda, but L-BFGS's speed does: on raw features of
  a trained model (dimensions whose scales differ by orders of magnitude) weakly
  regularized fits stopped at max_iter far from their optimum, scored badly on
  validation, and the search ran to the strongest lambda (issue 23: 45% top-1 where
  zero-shot on the same model scored 85%). Standardizing also makes lambda comparable
  across models;
* a fit that stops at max_iter is not converged, so its validation score says nothing
  about its lambda: the search excludes it (and reports how many were excluded), and a
  final fit that does not converge is an error, not a number.

The paper does not give the starting grid; we use lambda in {1e-6, 1e-4, ..., 1e6}.
CLIP_benchmark's own probe (AdamW on a torch linear layer, a weight-decay search) is the
anchor: on the same features and splits ours reaches at least its accuracy
(tests/test_eval.py, python -m bench.bench_linear_probe).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from eval.data import ClassificationSet, image_loader
from eval.features import FeatureCache, cached, image_features, model_transform

LAMBDA_RANGE = (1e-6, 1e6)
START_GRID = [10.0 ** e for e in range(-6, 7, 2)]
MAX_ITER = 1000


class ProbeError(RuntimeError):
    pass


def standardize(x_fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every array standardized with x_fit's per-dimension mean and std; a constant
    dimension (std 0) is only centred, so it stays 0 instead of becoming NaN."""
    mean = x_fit.mean(axis=0, dtype=np.float64)
    std = x_fit.std(axis=0, dtype=np.float64)
    std[std == 0] = 1.0
    return [(x - mean) / std for x in (x_fit, *others)]


@dataclass
class Fit:
    model: LogisticRegression
    iterations: int

    @property
    def converged(self) -> bool:
        return self.iterations < MAX_ITER


def fit(x, y, lam: float, seed: int) -> Fit:
    # sklearn warns on every fit that reaches max_iter; we check convergence ourselves.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = LogisticRegression(C=1.0 / lam, max_iter=MAX_ITER, random_state=seed).fit(x, y)
    return Fit(model, int(np.max(model.n_iter_)))


def search_lambda(x_fit, y_fit, x_val, y_val, seed: int) -> tuple[float, dict[float, dict], int]:
    """Best lambda on the validation split among converged fits: a coarse log grid, then
    halving steps of 1, 0.5, 0.25, 0.125 decades around the best (8 per decade at the
    end). "Best" is the lowest validation cross-entropy, not the highest accuracy: on a
    validation split of a few hundred samples many lambdas tie on accuracy, and which of
    them the tie-break picked moved test top-1 by up to 3 points (CLIP's paper does not
    say which it used). Returns (lambda, {lambda: validation acc and log-loss} of the
    converged fits, number of fits excluded for not converging)."""
    scores: dict[float, dict] = {}
    unconverged: set[float] = set()

    def score(lam):
        if lam not in scores and lam not in unconverged:
            result = fit(x_fit, y_fit, lam, seed)
            if result.converged:
                probs = result.model.predict_proba(x_val)
                scores[lam] = {"acc": result.model.score(x_val, y_val),
                               "log_loss": log_loss(y_val, probs, labels=result.model.classes_)}
            else:
                unconverged.add(lam)
        return -scores[lam]["log_loss"] if lam in scores else -np.inf

    best = max(START_GRID, key=score)
    if best not in scores:
        raise ProbeError(f"linear probe: no fit on the lambda grid {START_GRID} converged in {MAX_ITER} "
                         f"L-BFGS iterations")
    low, high = LAMBDA_RANGE
    for step in (1.0, 0.5, 0.25, 0.125):
        candidates = [lam for lam in (best * 10 ** -step, best, best * 10 ** step) if low <= lam <= high]
        best = max(candidates, key=score)
    return best, scores, len(unconverged)


def validation_split(x_train, y_train, val_fraction: float, seed: int):
    """(x_fit, x_val, y_fit, y_val): a stratified split of train, fixed by the seed."""
    return train_test_split(x_train, y_train, test_size=val_fraction, random_state=seed, stratify=y_train)


def probe(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int = 0,
          val_fraction: float = 0.2, name: str = "") -> dict:
    """The protocol on fixed features: search lambda on a stratified validation split of
    train, refit on all of train, score on test."""
    x_fit, x_val, y_fit, y_val = validation_split(x_train, y_train, val_fraction, seed)
    # One BLAS thread: these problems are small, and multi-threaded BLAS made each L-BFGS
    # iteration ~17x slower here (thread start-up per small matmul), minutes per probe.
    with threadpool_limits(limits=1):
        x_fit, x_val = standardize(x_fit, x_val)
        lam, scores, unconverged = search_lambda(x_fit, y_fit, x_val, y_val, seed)
        x_all, x_held_out = standardize(x_train, x_test)
        final = fit(x_all, y_train, lam, seed)
        if not final.converged:
            raise ProbeError(f"linear probe{' on ' + name if name else ''}: the final fit (lambda={lam:.3g}) did "
                             f"not converge in {MAX_ITER} L-BFGS iterations")
        pred = final.model.predict(x_held_out)
        probs = torch.from_numpy(final.model.predict_proba(x_held_out))
    top5 = (probs.topk(min(5, probs.shape[1]), dim=1).indices == torch.from_numpy(y_test)[:, None]).any(1)
    return {"lp_acc1": float((pred == y_test).mean()), "lp_acc5": float(top5.float().mean()),
            "lp_mean_per_class_recall": float(balanced_accuracy_score(y_test, pred)),
            "lp_lambda": lam, "lp_C": 1.0 / lam, "lp_val_acc": scores[lam]["acc"],
            "lp_val_log_loss": scores[lam]["log_loss"], "lp_searched": len(scores) + unconverged,
            "lp_unconverged_fits": unconverged, "lp_final_iterations": final.iterations}


def evaluate(model, train: ClassificationSet, test: ClassificationSet, batch_size: int = 64, workers: int = 2,
             device: str = "cpu", seed: int = 0, val_fraction: float = 0.2, cache: FeatureCache | None = None) -> dict:
    transform = model_transform(model)

    def trunk_features(data: ClassificationSet, split: str):
        return cached(cache, data.key, "trunk", lambda: image_features(
            model, image_loader(data.images, transform, batch_size, workers, data.labels), device, projected=False,
            desc=f"probe {data.name} {split}"))

    x_tr, y_tr = trunk_features(train, "train")
    x_te, y_te = trunk_features(test, "test")
    return probe(x_tr.numpy(), y_tr.numpy(), x_te.numpy(), y_te.numpy(), seed, val_fraction, test.name)
