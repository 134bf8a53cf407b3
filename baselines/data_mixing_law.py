"""Data Mixing Laws (Ye et al., 2024): the law, its fit, the optimal mixture and a proxy design (docs/design.md 3.2).

Official code: ``yegcjs/mixinglaws`` (fitting code and logged losses only, no training code). Re-derived here from
the formulas (not copied); each constant names the file (and function) it comes from.

**The law** (``pipeline/utils.py`` ``mixture_law_``, the same function in ``mix_5_domains.ipynb``): per validation
domain ``i`` and training mixture ``r`` (a point of the simplex over the ``D`` training domains)

    L_i(r) = exp(log_c_i) + exp(log_k_i + sum_j t_ij r_j) = c_i + k_i exp(t_i . r),

with the official parameter vector ``[log_c, log_k, t_1 .. t_D]`` per domain (:meth:`MixingLawParams.official_vector`).
On the simplex (``sum_j r_j = 1``) adding ``a`` to every ``t_ij`` and subtracting it from ``log_k_i`` changes nothing:
only ``c_i``, ``t_i - mean(t_i)`` and ``log_k_i + mean(t_i)`` are identifiable. Fits are reported normalised that way
(``mean_j t_ij = 0``, our choice) so two fits can be compared entry by entry (:meth:`MixingLawParams.normalised`).

**The fit** (``law.py`` ``fit_scaling_laws`` and ``ScalingLaw.fit``; the explicit multi-domain fit of
``mix_5_domains.ipynb``, cell "fit with mixture law", fits each validation domain separately):

* ``torch.optim.LBFGS`` with ``lr`` 0.01, ``history_size`` 10, ``max_iter`` 20, ``line_search_fn="strong_wolfe"``
  (torch's default tolerances), on the *summed* Huber loss of the fitting rows; ``max_step`` outer ``step()`` calls
  (``ScalingLaw.fit`` default 20; the notebook 50). After every outer step the parameters are scored by the *mean*
  Huber loss (on the fitting rows when there is no validation split; on the split's rows when it has more than one,
  the mean squared error when it has exactly one), and each start keeps its best-scoring step (ties: the later step).
  Across starts the lowest score wins.
* Huber ``delta``: 0.01 (``ScalingLaw.fit`` default); the 5-domain notebook uses 0.05.
* Starting points (``mix_5_domains.ipynb`` ``param_genertor``): ``log_c`` on ``linspace(-2, 1.5, 10)``, ``log_k`` on
  ``linspace(-10, 1, 20)`` and, for each pair, 30 draws of ``t`` with every ``t_j`` uniform on ``[0, 0.1)``: 6000
  starts. The generator has a branch drawing ``t_j`` uniform on ``(-1, 0]`` for one domain, but the notebook calls it
  with index -1, which never matches, so every ``t_j`` is in ``[0, 0.1)``.
* The notebook fits on ``float32`` (``ScalingLaw.fit`` casts the starts) with a process pool (``imap_unordered``, so
  ties between starts go to whichever finishes first).

Paper-scale settings: ``fit_mixing_law(..., huber_delta=PAPER_HUBER_DELTA, starts=PAPER_STARTS, scan_starts=0,
max_steps=PAPER_MAX_STEPS)`` (6000 L-BFGS runs per validation domain: the notebook's process pool took about 30 s
a domain; tens of minutes on one core). Defaults for a CPU stage of 16-32
proxy mixtures (our choices): 8 draws from the official generator plus 8 linearised starts (below), 20 outer steps,
``delta`` 0.01.

**Deviations (our choices).**

* *Linearised starts* (``scan_starts``): for a ``c`` below every observed loss, ``log(L - c) = log_k + t . r`` is
  linear in ``(log_k, t)``; we scan ``c`` over fractions of ``min L`` (as ``mix_2_domains.ipynb`` scans ``c`` over
  ``linspace(0, min(y), 1000)`` for the best correlation of ``log(y - c)`` with the mixture), solve the least squares
  for each and start L-BFGS from the ``scan_starts`` best (the smallest squared error of ``c + exp(...)`` against the
  losses). The official code offsets poor starts with thousands of them (a good share of its random starts stop in a
  worse local minimum where ``c`` and ``k`` trade off: 3 of 10 in one of our trials); a few linearised starts land in
  the best basin on a few dozen mixtures.
* ``float64``, and the gradient of the summed Huber loss written out (``_huber_sum_and_grad``, equal to autograd's,
  ``tests/test_mixing_law.py``) instead of autograd: the same iterates, four times faster. Starts run in order, one
  process; ties between starts go to the earlier one (deterministic for a seed).
* A start stops early once L-BFGS's first-order test holds at its parameters (its later ``step()`` calls would return
  at once without moving), which changes no result.
* Held-out rows (``held_out``: an int, the last rows, as the official ``valid_split``; or row indices) are left out of
  the fit and, by default, also out of the selection, so their quality is an honest leave-out estimate;
  ``select_on_held_out=True`` selects steps and starts on them as the official code does with ``valid_split``.
* At least ``D + 2`` fitting mixtures (one more than the ``D + 1`` identifiable parameters per domain) spanning all
  ``D`` domains (rank ``D``), non-negative rows summing to 1, finite positive losses: otherwise a one-line
  :class:`~dograph.errors.DataError`.

**The overall loss** is the natural-share-weighted sum ``sum_i w_i L_i(r)`` over the validation domains
(``pipeline/mixlaw.py`` with ``target="full"`` and the "calculate the errors" cell of ``mix_5_domains.ipynb`` weigh
each domain's loss by its share of the validation set, ``pipeline/valid_weight.json``); the weights are normalised to
sum to 1 here.

**The optimum.** ``pipeline/find_opt.py`` evaluates the fitted predictor on a grid and keeps the best point: per
domain the levels ``cap_j`` floored to a multiple of ``1/16`` and halved repeatedly (a level below ``1/16`` becomes 0),
the last domain taking the remainder, which must lie in ``[0, cap_last]``; the caps are
``(1, 1, 0.5857, 0.2588, 0.2254, 0.1779, 0.1727)`` for its 7 RedPajama domains (the code does not say where they come
from; they look like limits on how much of each domain the target run can draw). Here :func:`optimal_mixture` solves
the continuous problem instead: ``sum_i w_i k_i exp(t_i . r)`` is a non-negative sum of exponentials of affine
functions of ``r``, hence convex, and the (capped) simplex is convex, so any local minimum SLSQP finds is global (the
extra starts only guard against a numerical failure). Per-domain caps (``max_weight``) are an option, off by default.

**The design** (:func:`design_mixtures`). The release's proxy mixtures are hand lists:
``data/RedPajama/proportions.txt`` holds 20 mixtures over 7 domains, every one a point of ``find_opt.py``'s capped
power-of-two grid above (854 points), each putting 0.19-0.56 on its largest domain and 0 on up to 2 domains;
``data/5Mix/proportions.txt`` holds 26 mixtures over 5 domains on multiples of 1/32, at most 0.75 on one domain, zeros
common. We build the same kind for any ``D``: the natural mixture (if given), the uniform one, one mixture per
domain that puts half the mass on it (the other half as the natural or uniform mixture), then a space-filling set
(greedy max-min distance) drawn from rows whose entries are power-of-two levels (``0, 1, 2, 4, 8``, jittered within
half an octave), normalised, rounded to multiples of 1/128, with at most 0.75 on one domain and at least two domains
present.

**Not included.** The released pipeline (``pipeline/run.sh``) first extrapolates each proxy's losses in training
steps (``steplaw.py``, a power law in tokens per mixture and domain, the exponent tied across domains) and then in
model size (``sizelaw.py``) before fitting the mixture (``mixlaw.py``), whose predictor in the release is not this
closed form but an MLP with ``exp`` activations boosted by AdaBoost (best of 16 seeds, ``pipeline/utils.py``
``MixtureMLP``/``MLPEstimator``). Only the paper's closed form, its fit and its optimum are here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import spearmanr

from baselines.sweep_fit import FitOutcome, SweepFitMixer, check_sweep_counts
from dograph.errors import ConfigError, DataError
from dograph.settings import Settings

# ---- constants, with their official source -----------------------------------------------------------------------

LBFGS_LR = 0.01  # law.py fit_scaling_laws: torch.optim.LBFGS(lr=0.01, ...)
LBFGS_HISTORY = 10  # law.py fit_scaling_laws: history_size=10
LBFGS_MAX_ITER = 20  # law.py fit_scaling_laws: max_iter=20
LINE_SEARCH = "strong_wolfe"  # law.py fit_scaling_laws: line_search_fn="strong_wolfe"
TOLERANCE_GRAD = 1e-7  # torch.optim.LBFGS default (law.py leaves it): the first-order test of each step()
HUBER_DELTA = 0.01  # law.py ScalingLaw.fit default delta
MAX_STEPS = 20  # law.py ScalingLaw.fit default max_step (outer optimizer.step calls)
PAPER_HUBER_DELTA = 0.05  # mix_5_domains.ipynb, per-domain fit: delta=0.05
PAPER_MAX_STEPS = 50  # mix_5_domains.ipynb, per-domain fit: max_step=50
START_LOG_C = tuple(np.linspace(-2.0, 1.5, 10).tolist())  # mix_5_domains.ipynb param_genertor: log_c grid
START_LOG_K = tuple(np.linspace(-10.0, 1.0, 20).tolist())  # mix_5_domains.ipynb param_genertor: log_k grid
START_T_REPEATS = 30  # mix_5_domains.ipynb param_genertor: 30 draws of t per (log_c, log_k)
START_T_HIGH = 0.1  # mix_5_domains.ipynb param_genertor: t_j = rand() * 0.1
PAPER_STARTS = len(START_LOG_C) * len(START_LOG_K) * START_T_REPEATS  # 6000
FIND_OPT_GRID = 1 / 16  # pipeline/find_opt.py GRID_SZ
FIND_OPT_CAPS = (1.0, 1.0, 0.5857, 0.2588, 0.2254, 0.1779, 0.1727)  # pipeline/find_opt.py max_size (7 domains)

DEFAULT_STARTS = 8  # draws from the official generator (our choice: CPU scale)
DEFAULT_SCAN_STARTS = 8  # linearised starts (our choice)
SCAN_GRID = 64  # values of c scanned for the linearised starts (our choice)
SIMPLEX_TOL = 1e-6  # a mixture row must sum to 1 within this (our choice)
DESIGN_LEVELS = (0.0, 1.0, 2.0, 4.0, 8.0)  # power-of-two levels of a designed row (our choice, after find_opt.py)
DESIGN_JITTER = 0.35  # levels jittered by exp(U(-0.35, 0.35)), within half an octave (our choice)
DESIGN_QUANTUM = 128  # designed rows are multiples of 1/128 (our choice; the release's lists use 1/128 and 1/32)
DESIGN_MAX_SHARE = 0.75  # at most 3/4 on one domain (the largest share in data/5Mix/proportions.txt)
OPT_STARTS = 4  # SLSQP starts for the (convex) optimum (our choice)


# ---- parameters ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixingLawParams:
    """Per validation domain ``i``: ``L_i(r) = exp(log_c[i]) + exp(log_k[i] + t[i] . r)``; ``t`` is ``[V, D]``."""

    log_c: np.ndarray
    log_k: np.ndarray
    t: np.ndarray

    def __post_init__(self) -> None:
        log_c, log_k, t = (np.asarray(a, dtype=np.float64) for a in (self.log_c, self.log_k, self.t))
        if log_c.ndim != 1 or log_k.shape != log_c.shape or t.ndim != 2 or t.shape[0] != log_c.shape[0]:
            raise ConfigError(f"mixing-law parameters: log_c [V], log_k [V] and t [V, D] expected (got "
                              f"{log_c.shape}, {log_k.shape}, {t.shape})")
        if not (np.isfinite(log_c).all() and np.isfinite(log_k).all() and np.isfinite(t).all()):
            raise ConfigError("mixing-law parameters must be finite")
        object.__setattr__(self, "log_c", log_c)
        object.__setattr__(self, "log_k", log_k)
        object.__setattr__(self, "t", t)

    @property
    def num_domains(self) -> int:
        """``D``, the training domains (columns of a mixture)."""
        return self.t.shape[1]

    @property
    def num_targets(self) -> int:
        """``V``, the validation domains (columns of the losses)."""
        return self.t.shape[0]

    @property
    def c(self) -> np.ndarray:
        return np.exp(self.log_c)

    @property
    def k(self) -> np.ndarray:
        return np.exp(self.log_k)

    def normalised(self) -> MixingLawParams:
        """The identifiable form on the simplex: ``t - mean(t)`` and ``log_k + mean(t)`` per domain (our choice)."""
        shift = self.t.mean(axis=1)
        return MixingLawParams(self.log_c, self.log_k + shift, self.t - shift[:, None])

    def official_vector(self, target: int) -> np.ndarray:
        """Validation domain ``target``'s parameters in the official layout ``[log_c, log_k, t_1 .. t_D]``."""
        return np.concatenate([[self.log_c[target], self.log_k[target]], self.t[target]])

    @classmethod
    def from_official(cls, vectors: Sequence[Sequence[float]] | np.ndarray) -> MixingLawParams:
        """From one official vector ``[log_c, log_k, t_1 .. t_D]`` per validation domain."""
        rows = np.asarray(vectors, dtype=np.float64)
        if rows.ndim != 2 or rows.shape[1] < 3:
            raise ConfigError(f"official mixing-law vectors: [V, 2 + D] expected (got {rows.shape})")
        return cls(rows[:, 0], rows[:, 1], rows[:, 2:])

    def to_dict(self) -> dict[str, Any]:
        return {"log_c": self.log_c.tolist(), "log_k": self.log_k.tolist(), "t": self.t.tolist()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MixingLawParams:
        missing = [key for key in ("log_c", "log_k", "t") if key not in data]
        if missing:
            raise ConfigError(f"mixing-law parameters lack {', '.join(missing)}")
        return cls(np.asarray(data["log_c"], dtype=np.float64), np.asarray(data["log_k"], dtype=np.float64),
                   np.asarray(data["t"], dtype=np.float64))


def predict(params: MixingLawParams, mixtures: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """The law's losses ``[n, V]`` for mixtures ``[n, D]`` (a single mixture ``[D]`` gives ``[V]``).

    Rows are not checked to be mixtures; off the simplex, :meth:`MixingLawParams.normalised` changes the prediction.
    """
    r = np.asarray(mixtures, dtype=np.float64)
    single = r.ndim == 1
    r = np.atleast_2d(r)
    if r.ndim != 2 or r.shape[1] != params.num_domains:
        raise DataError(f"mixtures: [n, {params.num_domains}] expected (got {np.shape(mixtures)})")
    out = np.exp(params.log_c)[None, :] + np.exp(params.log_k[None, :] + r @ params.t.T)
    return out[0] if single else out


def _shares(weights: Sequence[float] | np.ndarray, count: int, key: str = "weights") -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (count,):
        raise ConfigError(f"{key}: {count} entries expected, one per validation domain (got shape {w.shape})")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"{key} must be finite, non-negative and not all zero (got {w.tolist()})")
    return w / w.sum()


def overall_loss(params: MixingLawParams, mixture: np.ndarray | Sequence[float],
                 weights: Sequence[float] | np.ndarray) -> float | np.ndarray:
    """``sum_i w_i L_i(r)`` with ``w`` the validation domains' natural shares (normalised to sum to 1).

    ``mixture`` ``[D]`` gives a float, ``[n, D]`` an array ``[n]``.
    """
    w = _shares(weights, params.num_targets)
    losses = predict(params, mixture)
    return float(losses @ w) if losses.ndim == 1 else losses @ w


# ---- input checks --------------------------------------------------------------------------------------------------


def _check_mixtures(mixtures: np.ndarray | Sequence[Sequence[float]], what: str = "mixtures") -> np.ndarray:
    r = np.asarray(mixtures, dtype=np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise DataError(f"{what}: a [n, D] array over at least 2 domains expected (got shape {r.shape})")
    if not np.isfinite(r).all():
        raise DataError(f"{what}: {int((~np.isfinite(r)).sum())} non-finite entries")
    bad = np.flatnonzero((r < 0).any(axis=1) | (np.abs(r.sum(axis=1) - 1) > SIMPLEX_TOL))
    if bad.size:
        raise DataError(f"{what}: rows {bad.tolist()[:5]} are not mixtures (non-negative, summing to 1)")
    return r


def _check_losses(losses: np.ndarray | Sequence[Sequence[float]], rows: int) -> np.ndarray:
    y = np.asarray(losses, dtype=np.float64)
    if y.ndim != 2 or y.shape[0] != rows or y.shape[1] < 1:
        raise DataError(f"losses: a [{rows}, V] array expected, one row per mixture (got shape {y.shape})")
    nonfinite = np.argwhere(~np.isfinite(y))
    if nonfinite.size:
        raise DataError(f"losses: {len(nonfinite)} NaN or infinite entries (first at row {nonfinite[0][0]}, "
                        f"domain {nonfinite[0][1]})")
    if (y <= 0).any():
        raise DataError("losses must be positive (the law c + k exp(t . r) is)")
    return y


def _split_rows(rows: int, held_out: int | Sequence[int] | np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    if held_out is None:
        return np.arange(rows), np.arange(0)
    if isinstance(held_out, int | np.integer):
        count = int(held_out)
        if not 0 <= count < rows:
            raise ConfigError(f"held_out={count}: between 0 and {rows - 1} rows expected")
        return np.arange(rows - count), np.arange(rows - count, rows)  # the last rows, as law.py's valid_split
    index = np.asarray(held_out)
    if index.dtype == bool:
        if index.shape != (rows,):
            raise ConfigError(f"held_out: a boolean mask of {rows} rows expected (got shape {index.shape})")
        index = np.flatnonzero(index)
    index = index.astype(np.int64).ravel()
    if index.size and (index.min() < 0 or index.max() >= rows or len(set(index.tolist())) != index.size):
        raise ConfigError(f"held_out: distinct row indices in [0, {rows}) expected (got {index.tolist()})")
    keep = np.setdiff1d(np.arange(rows), index)
    return keep, np.sort(index)


# ---- starting points -----------------------------------------------------------------------------------------------


def official_starts(num_domains: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` starts ``[log_c, log_k, t_1 .. t_D]`` distributed as ``mix_5_domains.ipynb``'s ``param_genertor``.

    Each of the 200 ``(log_c, log_k)`` grid pairs is used equally often (in a seeded order), with fresh ``t_j``
    uniform on ``[0, 0.1)``: ``count=6000`` is the notebook's set (up to its order and random draws).
    """
    if count <= 0:
        return np.zeros((0, num_domains + 2))
    pairs = np.array([(c, k) for c in START_LOG_C for k in START_LOG_K])
    order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-count // len(pairs)))])[:count]
    t = rng.random((count, num_domains)) * START_T_HIGH
    return np.concatenate([pairs[order], t], axis=1)


def linearised_starts(mixtures: np.ndarray, losses: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` best linearised starts for one validation domain (``losses`` ``[n]``), best first.

    For ``c = f * min(losses)`` on ``SCAN_GRID`` fractions ``f`` in ``(0, 1)``, the least squares of
    ``log(losses - c)`` on the mixture rows gives ``log_k + t``; the fits with the smallest residuals are kept.
    """
    if count <= 0:
        return np.zeros((0, mixtures.shape[1] + 2))
    fractions = (np.arange(SCAN_GRID) + 0.5) / SCAN_GRID
    scored = []
    for f in fractions:
        c = f * losses.min()
        z = np.log(losses - c)
        beta, *_ = np.linalg.lstsq(mixtures, z, rcond=None)
        sse = float(((c + np.exp(mixtures @ beta) - losses) ** 2).sum())
        shift = beta.mean()
        scored.append((sse, np.concatenate([[math.log(c), shift], beta - shift])))
    scored.sort(key=lambda item: item[0])
    return np.array([start for _, start in scored[:count]])


# ---- the fit -------------------------------------------------------------------------------------------------------


def _huber_sum_and_grad(p: torch.Tensor, x: torch.Tensor, y: torch.Tensor, delta: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``huber_loss(law(x, p), y, delta, reduction="sum")`` and its gradient in ``p = [log_c, log_k, t]``."""
    c = torch.exp(p[0])
    e = torch.exp(p[1] + x @ p[2:])
    residual = c + e - y
    size = residual.abs()
    loss = torch.where(size < delta, 0.5 * residual * residual, delta * (size - 0.5 * delta)).sum()
    slope = residual.clamp(-delta, delta)  # d huber / d residual, torch's huber_loss (quadratic where |r| < delta)
    weighted = slope * e
    grad = torch.cat([(slope.sum() * c).reshape(1), weighted.sum().reshape(1), x.T @ weighted])
    return loss, grad


def _selection_score(p: np.ndarray, x: np.ndarray, y: np.ndarray, delta: float) -> float:
    """law.py's score of a step: the mean Huber loss, or the mean squared error on a single row."""
    residual = np.exp(p[0]) + np.exp(p[1] + x @ p[2:]) - y
    if len(y) == 1:
        return float(np.mean(residual ** 2))
    size = np.abs(residual)
    return float(np.mean(np.where(size < delta, 0.5 * residual ** 2, delta * (size - 0.5 * delta))))


def _lbfgs_from(start: np.ndarray, x: torch.Tensor, y: torch.Tensor, x_sel: np.ndarray, y_sel: np.ndarray, *,
                delta: float, max_steps: int, lr: float, history_size: int, max_iter: int
                ) -> tuple[float, np.ndarray | None]:
    """One start of law.py's ``fit_scaling_laws``: its best score over the outer steps and the parameters there."""
    p = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([p], lr=lr, history_size=history_size, max_iter=max_iter,
                                  line_search_fn=LINE_SEARCH)

    def closure() -> torch.Tensor:
        with torch.no_grad():
            loss, grad = _huber_sum_and_grad(p, x, y, delta)
        p.grad = grad
        return loss

    best_score, best = math.inf, None
    for _ in range(max_steps):
        before = optimizer.state[p].get("func_evals", 0)
        optimizer.step(closure)
        current = p.detach().numpy().copy()
        if not np.isfinite(current).all():
            break
        score = _selection_score(current, x_sel, y_sel, delta)
        if math.isfinite(score) and score <= best_score:  # law.py: `if eval_loss <= min_loss`
            best_score, best = score, current
        if optimizer.state[p]["func_evals"] - before == 1:  # returned at the first-order test: later steps are no-ops
            break
    return best_score, best


@dataclass(frozen=True)
class HeldOutQuality:
    """Quality on the held-out mixtures; the overall loss's R^2 and Spearman need at least 3 rows (else None)."""

    rows: tuple[int, ...]
    rmse: np.ndarray
    overall_rmse: float
    overall_r2: float | None
    overall_spearman: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"rows": list(self.rows), "rmse": self.rmse.tolist(), "overall_rmse": self.overall_rmse,
                "overall_r2": self.overall_r2, "overall_spearman": self.overall_spearman}


@dataclass(frozen=True)
class FitQuality:
    """On the fitting mixtures: per validation domain R^2, RMSE and the winning score; the same for the overall loss.

    ``overall_*`` are for the weighted overall loss ``sum_i w_i L_i`` (the fit's ``weights``; equal if not given).
    An R^2 is NaN where the observed values do not vary.
    """

    r2: np.ndarray
    rmse: np.ndarray
    score: np.ndarray
    overall_r2: float
    overall_rmse: float
    held_out: HeldOutQuality | None

    def to_dict(self) -> dict[str, Any]:
        return {"r2": self.r2.tolist(), "rmse": self.rmse.tolist(), "score": self.score.tolist(),
                "overall_r2": self.overall_r2, "overall_rmse": self.overall_rmse,
                "held_out": None if self.held_out is None else self.held_out.to_dict()}


@dataclass(frozen=True)
class MixingLawFit:
    params: MixingLawParams  # normalised (mean_j t_ij = 0)
    quality: FitQuality
    starts: int  # L-BFGS starts per validation domain
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {"params": self.params.to_dict(), "quality": self.quality.to_dict(), "starts": self.starts,
                "seconds": self.seconds}


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    total = float(((observed - observed.mean()) ** 2).sum())
    return math.nan if total == 0 else 1.0 - float(((observed - predicted) ** 2).sum()) / total


def min_mixtures(num_domains: int) -> int:
    """The fewest fitting mixtures accepted: one more than the ``D + 1`` identifiable parameters per domain."""
    return num_domains + 2


def fit_mixing_law(mixtures: np.ndarray | Sequence[Sequence[float]], losses: np.ndarray | Sequence[Sequence[float]],
                   *, weights: Sequence[float] | np.ndarray | None = None,
                   held_out: int | Sequence[int] | np.ndarray | None = None, select_on_held_out: bool = False,
                   huber_delta: float = HUBER_DELTA, starts: int = DEFAULT_STARTS,
                   scan_starts: int = DEFAULT_SCAN_STARTS, max_steps: int = MAX_STEPS, lr: float = LBFGS_LR,
                   history_size: int = LBFGS_HISTORY, max_iter: int = LBFGS_MAX_ITER, seed: int = 0) -> MixingLawFit:
    """Fit ``L_i(r) = c_i + k_i exp(t_i . r)`` to ``losses`` ``[n, V]`` observed at ``mixtures`` ``[n, D]``.

    Per validation domain: L-BFGS on the summed Huber loss from ``starts`` draws of the official generator and the
    ``scan_starts`` best linearised starts, keeping the best by mean Huber loss (module docstring). ``weights``
    (the validation domains' natural shares) only enter the overall-loss quality. Deterministic for a seed.
    """
    r = _check_mixtures(mixtures)
    y = _check_losses(losses, r.shape[0])
    n, num_domains = r.shape
    num_targets = y.shape[1]
    w = np.full(num_targets, 1.0 / num_targets) if weights is None else _shares(weights, num_targets)
    if starts < 0 or scan_starts < 0 or starts + scan_starts < 1:
        raise ConfigError(f"starts={starts}, scan_starts={scan_starts}: at least one start expected")
    if max_steps < 1 or max_iter < 1 or history_size < 1 or not lr > 0 or not huber_delta > 0:
        raise ConfigError("max_steps, max_iter, history_size, lr and huber_delta must be positive")
    fit_rows, held_rows = _split_rows(n, held_out)
    if len(fit_rows) < min_mixtures(num_domains):
        raise DataError(f"{len(fit_rows)} fitting mixtures for {num_domains} domains: at least "
                        f"{min_mixtures(num_domains)} needed")
    rank = int(np.linalg.matrix_rank(r[fit_rows]))
    if rank < num_domains:
        raise DataError(f"the fitting mixtures span only {rank} of {num_domains} domains (a domain absent or "
                        "always in the same proportion to another): its exponent cannot be fitted")
    if select_on_held_out and not len(held_rows):
        raise ConfigError("select_on_held_out=True needs held-out rows (held_out)")
    sel_rows = held_rows if select_on_held_out else fit_rows

    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    random_starts = official_starts(num_domains, starts, rng)  # shared by all validation domains, as the notebook
    x = torch.tensor(r[fit_rows], dtype=torch.float64)
    rows = []
    scores = np.zeros(num_targets)
    for target in range(num_targets):
        yt = y[fit_rows, target]
        candidates = np.concatenate([linearised_starts(r[fit_rows], yt, scan_starts), random_starts], axis=0)
        best_score, best = math.inf, None
        for start in candidates:
            score, found = _lbfgs_from(start, x, torch.tensor(yt, dtype=torch.float64), r[sel_rows],
                                       y[sel_rows, target], delta=huber_delta, max_steps=max_steps, lr=lr,
                                       history_size=history_size, max_iter=max_iter)
            if found is not None and score < best_score:  # ties: the earlier start
                best_score, best = score, found
        if best is None:
            raise DataError(f"the mixing-law fit of validation domain {target} diverged from every start")
        rows.append(best)
        scores[target] = best_score
    params = MixingLawParams.from_official(rows).normalised()

    predicted = predict(params, r[fit_rows])
    observed = y[fit_rows]
    quality_held = None
    if len(held_rows):
        ph, oh = predict(params, r[held_rows]), y[held_rows]
        overall_p, overall_o = ph @ w, oh @ w
        enough = len(held_rows) >= 3
        rho = float(spearmanr(overall_p, overall_o).statistic) if enough else None
        quality_held = HeldOutQuality(
            rows=tuple(int(i) for i in held_rows), rmse=np.sqrt(((ph - oh) ** 2).mean(axis=0)),
            overall_rmse=float(np.sqrt(((overall_p - overall_o) ** 2).mean())),
            overall_r2=_r2(overall_o, overall_p) if enough else None,
            overall_spearman=rho)
    quality = FitQuality(
        r2=np.array([_r2(observed[:, i], predicted[:, i]) for i in range(num_targets)]),
        rmse=np.sqrt(((predicted - observed) ** 2).mean(axis=0)), score=scores,
        overall_r2=_r2(observed @ w, predicted @ w),
        overall_rmse=float(np.sqrt(((predicted @ w - observed @ w) ** 2).mean())), held_out=quality_held)
    return MixingLawFit(params=params, quality=quality, starts=len(random_starts) + min(scan_starts, SCAN_GRID),
                        seconds=time.perf_counter() - started)


# ---- the optimum ---------------------------------------------------------------------------------------------------


def _caps(max_weight: float | Sequence[float] | np.ndarray | None, num_domains: int) -> np.ndarray:
    if max_weight is None:
        return np.ones(num_domains)
    caps = np.asarray(max_weight, dtype=np.float64)
    if caps.ndim == 0:
        caps = np.full(num_domains, float(caps))
    if caps.shape != (num_domains,) or not np.isfinite(caps).all() or (caps <= 0).any():
        raise ConfigError(f"max_weight: one positive cap or {num_domains} positive caps expected (got "
                          f"{np.asarray(max_weight).tolist()})")
    caps = np.minimum(caps, 1.0)
    if caps.sum() < 1 - 1e-12:
        raise ConfigError(f"max_weight: the caps sum to {caps.sum():.4g} < 1, so no mixture satisfies them")
    return caps


def project_to_simplex(v: np.ndarray, caps: np.ndarray | None = None) -> np.ndarray:
    """The Euclidean projection of ``v`` onto ``{r : 0 <= r <= caps, sum r = 1}`` (bisection on the shift)."""
    v = np.asarray(v, dtype=np.float64)
    caps = np.ones_like(v) if caps is None else caps
    low, high = float(np.min(v - caps)), float(np.max(v))
    for _ in range(200):
        tau = 0.5 * (low + high)
        if np.clip(v - tau, 0.0, caps).sum() > 1:
            low = tau
        else:
            high = tau
    r = np.clip(v - 0.5 * (low + high), 0.0, caps)
    return r / r.sum()


def optimal_mixture(params: MixingLawParams, weights: Sequence[float] | np.ndarray, *, seed: int = 0,
                    starts: int = OPT_STARTS, max_weight: float | Sequence[float] | np.ndarray | None = None
                    ) -> tuple[np.ndarray, float]:
    """The mixture on the simplex minimising :func:`overall_loss`, and its predicted overall loss.

    The objective is convex (module docstring), so SLSQP's local optimum is the global one; ``starts`` (the uniform
    mixture, then seeded Dirichlet draws) only guard against a numerical failure. ``max_weight``: per-domain caps (one
    number or ``D``), as ``pipeline/find_opt.py``'s ``max_size``; off by default.
    """
    w = _shares(weights, params.num_targets)
    caps = _caps(max_weight, params.num_domains)
    if starts < 1:
        raise ConfigError(f"starts={starts}: at least 1 expected")
    base = float(w @ params.c)
    scale = w * params.k  # sum_i w_i k_i exp(t_i . r), the part that depends on r
    t = params.t

    def objective(r: np.ndarray) -> tuple[float, np.ndarray]:
        terms = scale * np.exp(t @ r)
        return base + float(terms.sum()), t.T @ terms

    rng = np.random.default_rng(seed)
    d = params.num_domains
    points = [project_to_simplex(np.full(d, 1.0 / d), caps)]
    points += [project_to_simplex(rng.dirichlet(np.ones(d)), caps) for _ in range(starts - 1)]
    constraint = {"type": "eq", "fun": lambda r: r.sum() - 1.0, "jac": lambda r: np.ones_like(r)}
    best, best_value = points[0], objective(points[0])[0]
    for point in points:
        result = minimize(objective, point, jac=True, method="SLSQP", bounds=list(zip(np.zeros(d), caps, strict=True)),
                          constraints=[constraint], options={"ftol": 1e-15, "maxiter": 1000})
        candidate = project_to_simplex(result.x, caps)
        value = objective(candidate)[0]
        if value < best_value:
            best, best_value = candidate, value
    return best, best_value


# ---- the design ----------------------------------------------------------------------------------------------------


def _round_rows(rows: np.ndarray, quantum: int) -> np.ndarray:
    """Each row (summing to 1) rounded to multiples of ``1/quantum`` by largest remainder, as integers."""
    scaled = rows * quantum
    base = np.floor(scaled).astype(np.int64)
    short = quantum - base.sum(axis=1)
    order = np.argsort(-(scaled - base), axis=1, kind="stable")
    for i, missing in enumerate(short):
        base[i, order[i, :missing]] += 1
    return base


def design_mixtures(num_domains: int, count: int, *, seed: int = 0,
                    natural: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
    """``count`` distinct proxy mixtures ``[count, D]`` (module docstring), deterministic for a seed.

    Rows in order: the natural mixture (if given), the uniform one, one per domain putting half the mass on it
    (the other half as the natural mixture, or uniform), then a greedy max-min (space-filling) pick from power-of-two
    rows on the 1/128 grid. Fewer rows than anchors: the first ``count`` of them (the per-domain ones in a seeded
    order).
    """
    if num_domains < 2:
        raise ConfigError(f"design_mixtures: at least 2 domains expected (got {num_domains})")
    if count < 1:
        raise ConfigError(f"design_mixtures: count must be at least 1 (got {count})")
    rng = np.random.default_rng(seed)
    uniform = np.full(num_domains, 1.0 / num_domains)
    anchors = []
    if natural is not None:
        base = np.asarray(natural, dtype=np.float64)
        if base.shape != (num_domains,) or not np.isfinite(base).all() or (base < 0).any() or base.sum() <= 0:
            raise ConfigError(f"natural: {num_domains} finite non-negative shares expected (got {np.asarray(natural)})")
        base = base / base.sum()
        anchors.append(base)
    else:
        base = uniform
    anchors.append(uniform)
    for j in rng.permutation(num_domains):
        anchors.append(0.5 * base + 0.5 * np.eye(num_domains)[j])
    chosen: list[np.ndarray] = []
    for row in anchors:
        if all(np.abs(row - other).max() > 1e-9 for other in chosen):
            chosen.append(row)
    if count <= len(chosen):
        return np.array(chosen[:count])

    draws = min(64 * count + 256, 20000)
    levels = rng.choice(np.array(DESIGN_LEVELS), size=(draws, num_domains))
    raw = levels * np.exp(rng.uniform(-DESIGN_JITTER, DESIGN_JITTER, size=levels.shape))
    keep = raw.sum(axis=1) > 0
    grid = _round_rows(raw[keep] / raw[keep].sum(axis=1, keepdims=True), DESIGN_QUANTUM)
    ok = (grid.max(axis=1) <= DESIGN_MAX_SHARE * DESIGN_QUANTUM) & ((grid > 0).sum(axis=1) >= 2)
    _, first = np.unique(grid[ok], axis=0, return_index=True)
    pool = grid[ok][np.sort(first)] / DESIGN_QUANTUM  # distinct, in the seeded draw order
    selected = np.array(chosen)
    gap = np.min(np.linalg.norm(pool[:, None, :] - selected[None, :, :], axis=2), axis=1)
    rows = list(chosen)
    while len(rows) < count:
        pick = int(np.argmax(gap))
        if not gap[pick] > 1e-9:
            raise ConfigError(f"design_mixtures: only {len(rows)} distinct mixtures found for {num_domains} domains "
                              f"(asked for {count})")
        rows.append(pool[pick])
        gap = np.minimum(gap, np.linalg.norm(pool - pool[pick], axis=1))
    return np.array(rows)


# ---- the method -----------------------------------------------------------------------------------------------


@dataclass
class DataMixingLawSettings(Settings):
    """``conf/mixer/data_mixing_law.yaml``; the fit's own arguments are checked by :func:`fit_mixing_law`."""

    _target_: str  # baselines.data_mixing_law.DataMixingLawMixer
    proxies: int  # proxy runs of the sweep, one per designed mixture (>= 2; the law needs D + 2)
    min_proxies: int  # the fit refuses fewer successful proxies (in [2, proxies])
    sweep_seed: int  # seed of the design (natural, uniform, one emphasis per domain, space-filling rest)
    huber_delta: float  # delta of the Huber loss of the fit
    starts: int  # draws of the official start generator
    scan_starts: int  # linearised starts from a scan of c
    lbfgs_steps: int  # L-BFGS outer steps per start
    held_out: float  # share of the proxies left out of the fit to report its quality
    fit_seed: int  # seed of the starts, the held-out proxies and the optimum
    max_weight: Any  # null, one cap for every domain, or one cap per domain (the optimum's upper bounds)
    launcher: str  # Hydra launcher of the proxies: basic (here, one after another), joblib, submitit_slurm, ...
    launcher_overrides: list[str]  # overrides for that launcher, e.g. [hydra.launcher.n_jobs=2]
    proxy: dict[str, Any]  # the proxies' stage: a conf/model name, a conf/trainer preset, seed, any trainer.* field

    def check(self) -> None:
        check_sweep_counts(self.proxies, self.min_proxies)


class DataMixingLawMixer(SweepFitMixer):
    """``mixer=data_mixing_law``: proxies on a designed set of mixtures, the per-domain law, its optimum.

    The validation domains are the training domains (every domain's held-out loss), and the overall loss
    weighs them by the corpus's natural shares (the issue's "natural-share-weighted sum"; the official
    ``mixlaw.py`` weighs by validation shares, ``valid_weight.json``). A quarter of the proxies (at least 3,
    when enough remain to fit) is held out of the fit to report an honest quality (our choice).
    """

    name = "data_mixing_law"  # registered name (dograph.mixing.MIXERS); its stage keys hash it: never change it
    settings_class = DataMixingLawSettings
    label = "Data Mixing Law"

    def __init__(self, *, huber_delta: float = HUBER_DELTA, starts: int = DEFAULT_STARTS,
                 scan_starts: int = DEFAULT_SCAN_STARTS, lbfgs_steps: int = MAX_STEPS, held_out: float = 0.25,
                 fit_seed: int = 0, max_weight: float | None = None, **rest: Any) -> None:
        self.fit_settings = {"huber_delta": huber_delta, "starts": starts, "scan_starts": scan_starts,
                             "max_steps": lbfgs_steps, "seed": fit_seed}
        self.held_out_share, self.max_weight, self.fit_seed = held_out, max_weight, fit_seed
        super().__init__(huber_delta=huber_delta, starts=starts, scan_starts=scan_starts, lbfgs_steps=lbfgs_steps,
                         held_out=held_out, fit_seed=fit_seed, max_weight=max_weight, **rest)

    @classmethod
    def design(cls, node: dict[str, Any], count: int, seed: int, domains: list[str],
               natural_mixture: list[float]) -> np.ndarray:
        if count < min_mixtures(len(domains)):
            raise ConfigError(f"mixer.proxies={count}: the law has {len(domains) + 1} identifiable parameters per "
                              f"domain, so it needs at least {min_mixtures(len(domains))} proxies for "
                              f"{len(domains)} domains")
        return design_mixtures(len(domains), count, seed=seed, natural=natural_mixture)

    def _held_out_rows(self, count: int) -> np.ndarray:
        """Seeded held-out proxies: a share of them, at least 3, never leaving fewer than the fit needs."""
        spare = count - min_mixtures(len(self.domains))
        wanted = max(3, math.ceil(self.held_out_share * count)) if self.held_out_share > 0 else 0
        n_held = min(wanted, max(spare, 0))
        return np.sort(np.random.default_rng(self.fit_seed).permutation(count)[:n_held])

    def fit(self, mixtures: np.ndarray, losses: np.ndarray) -> FitOutcome:
        held = self._held_out_rows(len(mixtures))
        fitted = fit_mixing_law(mixtures, losses, weights=self.natural_mixture, held_out=held if len(held) else None,
                                **self.fit_settings)
        mixture, predicted = optimal_mixture(fitted.params, self.natural_mixture, seed=self.fit_seed,
                                             max_weight=self.max_weight)
        weights = np.asarray(self.natural_mixture, dtype=np.float64)
        measured = losses @ (weights / weights.sum())
        quality = {**fitted.quality.to_dict(), "seconds": fitted.seconds, "params": fitted.params.to_dict()}
        return FitOutcome(mixture, float(predicted), "natural-mixture average validation loss", quality, measured,
                          np.asarray(overall_loss(fitted.params, mixtures, self.natural_mixture), dtype=np.float64),
                          held_out=held)
