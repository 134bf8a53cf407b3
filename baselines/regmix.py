"""RegMix: proxy runs, a regression from mixture to loss, a simulated search (docs/design.md section 3.2).

Liu et al., 2024, "RegMix: Data Mixture as Regression for Language Model Pre-training".

Official code: ``sail-sg/regmix``. The proxy mixtures come from ``mixture_config/synthesize_mixture.py``
(the module constants, ``generate_weights_dirichlet``, ``sort_and_deduplicate``); the regression and the
search from ``regression_fitting/regression.ipynb`` (the "Fitting" cell and the "Simulate" cells).
Re-derived here as numpy functions (not copied); each constant names the file it comes from. The stage
plumbing (proxy runs, reading their losses) lives elsewhere: these functions are the math only.

**Proxy mixtures** (:func:`synthesize_mixtures`), with ``p`` the token distribution normalised to sum 1:

1. the usage cap ``u_i = min(15 p_i, 1)`` is computed on ``p`` *before* the temperature;
2. the Dirichlet prior is ``q = p ** 0.5 / sum(p ** 0.5)``;
3. ``count * 100`` attempts (rejected ones included); each draws from ``Dirichlet(q * s)`` with ``s``
   one of 15 strengths log-spaced over ``[0.1, 5]``, chosen uniformly (officially one draw per strength,
   then ``random.choice`` of the 15: the same distribution as choosing the strength first, as here);
4. an attempt is rejected when any weight exceeds its cap (``w_i > u_i``, on the raw draw);
5. weights below 2e-4 become 0, the row is renormalised, then rounded to the nearest multiple of 2e-4
   (``np.round``, half to even); the row is *not* renormalised after rounding, so it sums to 1 within
   ``D * 1e-4``;
6. rows within L1 distance 1e-5 of the previous kept row in lexicographic order are dropped
   (de-duplication), and ``count`` of the rest are chosen at random without replacement (``random.sample``:
   in random order); too few distinct rows is an error, as officially.

**Regression** (:func:`fit_regressor`): ``LGBMRegressor(boosting_type="gbdt", objective="regression",
metric=["l1", "l2"], num_iterations=1000, learning_rate=1e-2, seed=42)`` with ``early_stopping(3)``
on an evaluation set, every metric watched (LightGBM's default: the first metric to stall stops it).
The notebook fits one regressor per validation domain on 512 proxies and early-stops on the 256
held-out test mixtures, whose Spearman correlation it then reports (so the reported quality is
measured on the same rows that chose the iteration count; we do the same on our held-out rows).

**Search** (:func:`choose_mixture`): 100,000 draws from ``Dirichlet(p)`` with the *untempered* token
distribution, no cap, no rounding (``np.random.dirichlet(prior_dist * 1, 100000)``: ``prior_dist`` is a
Python list, so ``* 1`` leaves it as it is); the mixture is the mean of the 128 draws of lowest predicted
target loss (the notebook's target: the Pile-CC validation loss).

**Deviations (our choices).**

* The target defaults to the natural-mixture-weighted average of the per-domain validation losses
  (:func:`regression_target`); a domain name gives that domain's loss, as officially.
* The held-out split: the notebook had a separate test sweep of 256 proxies. Here 25% of the proxies
  (at least 2, drawn with the seed) are held out for early stopping and for the reported quality, and
  the final regressor is refit on *all* proxies with the early-stopped number of trees
  (``refit=True``): with 16 proxies, leaving a quarter of them out of the final model seemed the larger
  loss than reusing a tree count tuned on three quarters of the rows. ``refit=False`` keeps the split model.
* ``min_child_samples``: the notebook keeps LightGBM's default 20, which never splits a node with fewer
  than 40 fitting rows; a 16-proxy sweep would fit a constant. Default here: ``min(20, max(1, n_fit // 4))``
  (20, the official value, from 80 fitting rows on). ``n_jobs=1`` and ``verbose=-1`` (quiet, deterministic).
* ``num_iterations`` is passed as the scikit-learn alias ``n_estimators`` and ``seed`` as
  ``random_state`` (the same LightGBM parameters, without the alias warnings the notebook silences).
* A Spearman correlation or R^2 with no spread (constant predictions or constant held-out losses) is
  reported as 0.0, not NaN.
* A domain with zero token share gets weight 0 in every draw (its cap ``min(15 * 0, 1) = 0`` allows
  nothing else; a Dirichlet parameter of 0 is undefined, so the draw runs over the other domains).
* The temperature is applied for any value (officially only below 1: 1 is the identity, above 1 the
  official code ignores it).
* Randomness comes from one ``numpy.random.Generator`` seeded per call, not from the global NumPy and
  Python generators (seeded 42 officially), so the official draws are not reproduced bit for bit.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from scipy.stats import spearmanr

from baselines.sweep_fit import FitOutcome, SweepFitMixer
from dograph.errors import ConfigError, DataError
from dograph.settings import Settings

# ---- constants (official values) ---------------------------------------------------------------------------

# mixture_config/synthesize_mixture.py, module constants and generate_weights_dirichlet
TEMPERATURE = 0.5  # TEMP: prior ** 0.5, renormalised
MIN_STRENGTH = 0.1  # MIN_STRENGH
MAX_STRENGTH = 5.0  # MAX_STRENGH
NUM_STRENGTHS = 15  # np.logspace(log10(MIN_STRENGH), log10(MAX_STRENGH), 15) in generate_weights_dirichlet
SAMPLE_MULTIPLIER = 100  # SAMPLE_MULTIPLIER: num_samples * 100 attempts, rejected ones included
MAXIMUM_USAGE = 15.0  # MAXIMUM_USAGE: cap min(prior_i * 15, 1.0) on the normalised, untempered prior
MINIMUM = 2e-4  # MINIMUM: weights below it become 0; rows are rounded to its multiples
DEDUP_THRESHOLD = 1e-5  # sort_and_deduplicate(threshold=1e-5): L1 distance to the last kept row

# regression_fitting/regression.ipynb, "Fitting" cell (hyper_params and the fit call)
NUM_ITERATIONS = 1000  # "num_iterations": 1000
LEARNING_RATE = 1e-2  # 'learning_rate': 1e-2
LGBM_SEED = 42  # 'seed': 42 (and np.random.seed(42))
EARLY_STOPPING_ROUNDS = 3  # lgb.early_stopping(stopping_rounds=3)
LGBM_METRICS = ("l1", "l2")  # 'metric': ['l1', 'l2'], eval_metric='l2'
OFFICIAL_MIN_CHILD_SAMPLES = 20  # not set in the notebook: LightGBM's default min_data_in_leaf

# regression_fitting/regression.ipynb, "Simulate" cells
SIMULATION_SAMPLES = 100_000  # np.random.dirichlet(prior_dist * 1, 100000)
TOP_K = 128  # k = 128; the mean of samples[np.argsort(simulation)[0:k]]
SIMULATION_SEED = 42  # np.random.seed(42) before the draws

# our choices (module doc)
HELD_OUT_FRACTION = 0.25  # our choice: share of the proxies held out for early stopping and the quality
MIN_HELD_OUT = 2  # our choice: at least this many held-out proxies
MIN_FIT_ROWS = 2  # our choice: at least this many proxies to fit on besides the held-out ones


class Predictor(Protocol):
    def predict(self, X: np.ndarray) -> np.ndarray: ...


# ---- validation ---------------------------------------------------------------------------------------------


def normalise_shares(token_shares: Sequence[float] | np.ndarray, *, name: str = "token_shares") -> np.ndarray:
    """``token_shares`` as a float64 probability vector; a one-line ConfigError when it cannot be one."""
    shares = np.asarray(token_shares, dtype=np.float64)
    if shares.ndim != 1 or shares.size == 0:
        raise ConfigError(f"{name} must be a non-empty vector (got shape {shares.shape})")
    if not np.all(np.isfinite(shares)) or np.any(shares < 0):
        raise ConfigError(f"{name} must be finite and non-negative (got {shares.tolist()})")
    total = shares.sum()
    if total <= 0:
        raise ConfigError(f"{name} must have a positive sum (got {shares.tolist()})")
    return shares / total


def check_settings(*, proxies: int, min_proxies: int, held_out: float = HELD_OUT_FRACTION,
                   top_k: int = TOP_K, samples: int = SIMULATION_SAMPLES) -> None:
    """The RegMix settings, before any proxy trains; one-line ConfigErrors naming the key."""
    need = MIN_HELD_OUT + MIN_FIT_ROWS
    if proxies < need:
        raise ConfigError(f"mixer.proxies={proxies}: the regression needs at least {need} proxies "
                          f"({MIN_HELD_OUT} held out, {MIN_FIT_ROWS} to fit)")
    if not need <= min_proxies <= proxies:
        raise ConfigError(f"mixer.min_proxies={min_proxies} must be between {need} and mixer.proxies={proxies}")
    if not 0 < held_out < 1:
        raise ConfigError(f"mixer.held_out={held_out} must be a fraction in (0, 1)")
    if samples < 1:
        raise ConfigError(f"mixer.samples={samples} must be at least 1")
    if not 1 <= top_k <= samples:
        raise ConfigError(f"mixer.top_k={top_k} must be between 1 and mixer.samples={samples}")


def check_proxy_count(succeeded: int, total: int, min_proxies: int) -> None:
    """A one-line DataError when fewer proxies succeeded than the fit needs."""
    if succeeded < min_proxies:
        raise DataError(f"only {succeeded} of {total} proxies succeeded; the fit needs at least {min_proxies} "
                        "(mixer.min_proxies)")


def check_mixture_table(mixtures: np.ndarray, losses: np.ndarray, domains: Sequence[str]) -> None:
    """The proxies' mixtures ``[n, D]`` and per-domain losses ``[n, D]``: shapes, simplex rows; one-line DataErrors."""
    mixtures, losses, d = np.asarray(mixtures, dtype=np.float64), np.asarray(losses, dtype=np.float64), len(domains)
    if mixtures.ndim != 2 or mixtures.shape[1] != d:
        raise DataError(f"the mixture table has shape {mixtures.shape}; expected [proxies, {d}] "
                        f"({', '.join(domains)})")
    if losses.shape != mixtures.shape:
        raise DataError(f"the loss table has shape {losses.shape}; the mixture table {mixtures.shape}")
    for i, row in enumerate(mixtures):
        # rounded rows sum to 1 within D * MINIMUM / 2 (module doc); allow a little more
        if not np.all(np.isfinite(row)) or np.any(row < 0) or abs(row.sum() - 1) > d * MINIMUM:
            raise DataError(f"mixture table row {i} is not a mixture (non-negative, summing to 1): {row.tolist()}")


# ---- proxy mixtures -----------------------------------------------------------------------------------------


def strength_grid(min_strength: float = MIN_STRENGTH, max_strength: float = MAX_STRENGTH,
                  num_strengths: int = NUM_STRENGTHS) -> np.ndarray:
    """The Dirichlet strengths: ``num_strengths`` values log-spaced over ``[min_strength, max_strength]``."""
    if not 0 < min_strength <= max_strength or num_strengths < 1:
        raise ConfigError(f"strengths need 0 < min_strength <= max_strength and num_strengths >= 1 "
                          f"(got {min_strength}, {max_strength}, {num_strengths})")
    return np.logspace(math.log10(min_strength), math.log10(max_strength), num_strengths)


def deduplicate(rows: np.ndarray, threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """Rows in lexicographic order (last column first), dropping each within L1 ``threshold`` of the last kept."""
    if len(rows) == 0:
        return rows
    ordered = rows[np.lexsort(rows.T)]
    kept = [ordered[0]]
    for row in ordered[1:]:
        if np.abs(row - kept[-1]).sum() > threshold:
            kept.append(row)
    return np.stack(kept)


def synthesize_mixtures(token_shares: Sequence[float] | np.ndarray, count: int, *, seed: int,
                        temperature: float = TEMPERATURE, min_strength: float = MIN_STRENGTH,
                        max_strength: float = MAX_STRENGTH, num_strengths: int = NUM_STRENGTHS,
                        sample_multiplier: int = SAMPLE_MULTIPLIER, maximum_usage: float | None = MAXIMUM_USAGE,
                        minimum: float = MINIMUM, dedup_threshold: float = DEDUP_THRESHOLD) -> np.ndarray:
    """``[count, D]`` proxy mixtures, as ``generate_weights_dirichlet`` draws them (module doc, steps 1-6).

    ``maximum_usage=None`` disables the cap (the official ``enable_bound=False``). Rows are non-negative
    multiples of ``minimum`` summing to 1 within ``D * minimum / 2``; deterministic for a seed.
    """
    prior = normalise_shares(token_shares)
    d = prior.size
    if count < 1 or sample_multiplier < 1:
        raise ConfigError(f"count ({count}) and sample_multiplier ({sample_multiplier}) must be at least 1")
    if temperature <= 0:
        raise ConfigError(f"temperature must be positive (got {temperature})")
    if not (minimum > 0 and minimum * d < 1):
        raise ConfigError(f"minimum={minimum} must be positive and below 1 / {d} domains")
    if maximum_usage is not None and maximum_usage <= 0:
        raise ConfigError(f"maximum_usage must be positive or None (got {maximum_usage})")
    strengths = strength_grid(min_strength, max_strength, num_strengths)

    live = np.flatnonzero(prior > 0)  # zero-share domains stay 0 (module doc)
    cap = np.ones(d) if maximum_usage is None else np.minimum(prior * maximum_usage, 1.0)  # untempered prior
    tempered = prior[live] ** temperature
    tempered /= tempered.sum()

    rng = np.random.default_rng(seed)
    attempts = count * sample_multiplier
    strength_of = rng.integers(len(strengths), size=attempts)  # uniform over the 15 strengths
    draws = np.zeros((attempts, d))
    for k, strength in enumerate(strengths):
        rows = np.flatnonzero(strength_of == k)
        if rows.size:
            draws[np.ix_(rows, live)] = rng.dirichlet(tempered * strength, size=rows.size)

    accepted = draws[np.all(draws <= cap, axis=1)]  # reject on the raw draw
    kept = np.where(accepted < minimum, 0.0, accepted)
    kept /= kept.sum(axis=1, keepdims=True)
    rounded = np.round(kept / minimum) * minimum  # not renormalised after rounding (official)

    distinct = deduplicate(rounded, dedup_threshold)
    if len(distinct) < count:
        raise ConfigError(f"only {len(distinct)} distinct mixtures among {attempts} draws ({len(accepted)} within "
                          f"the usage cap), fewer than the {count} requested: request fewer proxies or raise "
                          "sample_multiplier")
    return distinct[rng.choice(len(distinct), size=count, replace=False)]


# ---- the regression target ----------------------------------------------------------------------------------


def regression_target(per_domain_losses: np.ndarray, target: str, domains: Sequence[str],
                      natural_mixture: Sequence[float] | np.ndarray) -> np.ndarray:
    """``[n]`` regression targets from the proxies' ``[n, D]`` per-domain validation losses.

    ``target="average"`` (our default): ``sum_j natural_j * loss_j``, the natural-mixture-weighted
    average; a domain name: that domain's loss (officially one target per domain, Pile-CC the one used).
    """
    domains = list(domains)
    losses = np.asarray(per_domain_losses, dtype=np.float64)
    if losses.ndim != 2 or losses.shape[1] != len(domains):
        raise DataError(f"the loss table has shape {losses.shape}; expected [proxies, {len(domains)}] "
                        f"({', '.join(domains)})")
    if target == "average":
        weights = normalise_shares(natural_mixture, name="natural_mixture")
        if weights.size != len(domains):
            raise ConfigError(f"natural_mixture has {weights.size} entries; there are {len(domains)} domains")
        used = weights > 0
    elif target in domains:
        weights = np.zeros(len(domains))
        weights[domains.index(target)] = 1.0
        used = weights > 0
    else:
        raise ConfigError(f"mixer.target={target!r} is not 'average' or a domain ({', '.join(domains)})")
    for i, row in enumerate(losses):
        bad = used & ~np.isfinite(row)
        if bad.any():
            names = ", ".join(d for d, b in zip(domains, bad, strict=True) if b)
            kind = "NaN" if np.isnan(row[bad]).all() else "non-finite"
            raise DataError(f"mixture table row {i} has {kind} losses ({names}): drop or rerun that proxy")
    return losses[:, used] @ weights[used]


# ---- the regressor ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitQuality:
    """How well the regressor ranks held-out proxies (module doc: the split, the refit)."""

    spearman: float  # held-out Spearman correlation of predicted and true target
    r2: float  # held-out R^2
    best_iteration: int  # trees kept by early stopping
    min_child_samples: int
    fit_rows: int  # rows the split model was fitted on
    held_out_rows: np.ndarray = field(repr=False)  # indices of the held-out proxies
    held_out_predictions: np.ndarray = field(repr=False)
    train_residuals: np.ndarray = field(repr=False)  # target - prediction on the final model's fitting rows
    refit: bool = True

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (no arrays but the held-out indices)."""
        return {"spearman": self.spearman, "r2": self.r2, "best_iteration": self.best_iteration,
                "min_child_samples": self.min_child_samples, "fit_rows": self.fit_rows,
                "held_out_rows": [int(i) for i in self.held_out_rows], "refit": self.refit,
                "train_rmse": float(np.sqrt(np.mean(self.train_residuals ** 2)))}


class RegressionFit(NamedTuple):
    regressor: Any  # a fitted lightgbm.LGBMRegressor
    quality: FitQuality


def default_min_child_samples(fit_rows: int) -> int:
    """Our choice: the official 20, lowered to a quarter of the fitting rows (at least 1) so small sweeps split."""
    return min(OFFICIAL_MIN_CHILD_SAMPLES, max(1, fit_rows // 4))


def _rank_correlation(predicted: np.ndarray, actual: np.ndarray) -> float:
    if np.ptp(predicted) == 0 or np.ptp(actual) == 0:
        return 0.0  # no ranking information (module doc)
    return float(spearmanr(predicted, actual).statistic)


def _r2(predicted: np.ndarray, actual: np.ndarray) -> float:
    total = float(np.sum((actual - actual.mean()) ** 2))
    return 0.0 if total == 0 else 1.0 - float(np.sum((actual - predicted) ** 2)) / total


def _lgbm(n_estimators: int, learning_rate: float, seed: int, min_child_samples: int) -> Any:
    import lightgbm as lgb

    return lgb.LGBMRegressor(boosting_type="gbdt", objective="regression", metric=list(LGBM_METRICS),
                             n_estimators=n_estimators, learning_rate=learning_rate, random_state=seed,
                             min_child_samples=min_child_samples, n_jobs=1, verbose=-1)


def fit_regressor(mixtures: np.ndarray, targets: np.ndarray, *, seed: int = LGBM_SEED,
                  held_out: float = HELD_OUT_FRACTION, min_held_out: int = MIN_HELD_OUT,
                  num_iterations: int = NUM_ITERATIONS, learning_rate: float = LEARNING_RATE,
                  early_stopping_rounds: int = EARLY_STOPPING_ROUNDS, min_child_samples: int | None = None,
                  refit: bool = True) -> RegressionFit:
    """The LightGBM regressor from ``[n, D]`` mixtures to ``[n]`` targets, and its held-out quality.

    ``ceil(held_out * n)`` proxies (at least ``min_held_out``, drawn with ``seed``) are the early-stopping
    set and the quality's rows; ``refit=True`` then fits all ``n`` with the early-stopped tree count.
    """
    import lightgbm as lgb

    X, y = np.asarray(mixtures, dtype=np.float64), np.asarray(targets, dtype=np.float64)
    if X.ndim != 2 or y.shape != (X.shape[0],):
        raise DataError(f"fit_regressor needs mixtures [n, D] and targets [n] (got {X.shape} and {y.shape})")
    if not np.all(np.isfinite(X)) or not np.all(np.isfinite(y)):
        raise DataError("fit_regressor: the mixtures or targets are not all finite")
    n = len(y)
    n_held = max(min_held_out, math.ceil(held_out * n))
    if n - n_held < MIN_FIT_ROWS:
        raise DataError(f"fit_regressor needs at least {n_held + MIN_FIT_ROWS} proxies ({n_held} held out, "
                        f"{MIN_FIT_ROWS} to fit); got {n}")
    order = np.random.default_rng(seed).permutation(n)
    held, fit = np.sort(order[:n_held]), np.sort(order[n_held:])
    leaf = default_min_child_samples(len(fit)) if min_child_samples is None else int(min_child_samples)

    split_model = _lgbm(num_iterations, learning_rate, seed, leaf)
    # the held-out rows as the evaluation set (LightGBM 4.7 renamed eval_set to eval_X / eval_y)
    evaluation = ({"eval_X": (X[held],), "eval_y": (y[held],)}
                  if "eval_X" in inspect.signature(split_model.fit).parameters else {"eval_set": [(X[held], y[held])]})
    split_model.fit(X[fit], y[fit], eval_metric="l2", **evaluation,
                    callbacks=[lgb.early_stopping(stopping_rounds=early_stopping_rounds, verbose=False)])
    best = int(split_model.best_iteration_ or num_iterations)
    predicted = split_model.predict(X[held])

    if refit:
        model = _lgbm(best, learning_rate, seed, leaf)
        model.fit(X, y)
        residuals = y - model.predict(X)
    else:
        model = split_model
        residuals = y[fit] - model.predict(X[fit])
    quality = FitQuality(spearman=_rank_correlation(predicted, y[held]), r2=_r2(predicted, y[held]),
                         best_iteration=best, min_child_samples=leaf, fit_rows=len(fit), held_out_rows=held,
                         held_out_predictions=predicted, train_residuals=residuals, refit=refit)
    return RegressionFit(model, quality)


# ---- the search ---------------------------------------------------------------------------------------------


class MixtureChoice(NamedTuple):
    mixture: np.ndarray  # [D], the mean of the top-k draws
    predicted_loss: float  # the regressor's prediction for ``mixture`` itself
    top_k_predictions: np.ndarray  # [top_k] predicted losses of the averaged draws, ascending


def choose_mixture(regressor: Predictor, token_shares: Sequence[float] | np.ndarray, *,
                   samples: int = SIMULATION_SAMPLES, top_k: int = TOP_K, seed: int = SIMULATION_SEED) -> MixtureChoice:
    """The mean of the ``top_k`` of ``samples`` draws from ``Dirichlet(token distribution)`` with lowest prediction."""
    prior = normalise_shares(token_shares)
    if samples < 1 or not 1 <= top_k <= samples:
        raise ConfigError(f"choose_mixture needs 1 <= top_k ({top_k}) <= samples ({samples})")
    live = np.flatnonzero(prior > 0)  # zero-share domains stay 0 (module doc)
    draws = np.zeros((samples, prior.size))
    draws[:, live] = np.random.default_rng(seed).dirichlet(prior[live], size=samples)
    predictions = np.asarray(regressor.predict(draws), dtype=np.float64)
    best = np.argsort(predictions, kind="stable")[:top_k]
    mixture = draws[best].mean(axis=0)
    mixture /= mixture.sum()  # a mean of simplex rows: only float round-off to remove
    predicted = float(np.asarray(regressor.predict(mixture[None, :]), dtype=np.float64)[0])
    return MixtureChoice(mixture, predicted, predictions[best])


# ---- the method -----------------------------------------------------------------------------------------------


@dataclass
class RegMixSettings(Settings):
    """``conf/mixer/regmix.yaml`` (paper scale: ``conf/model_mixer/gpt2_*_regmix.yaml``); see the module doc."""

    _target_: str  # baselines.regmix.RegMixMixer
    proxies: int  # proxy runs of the sweep, one per synthesized mixture (>= 4: 2 held out, 2 to fit)
    min_proxies: int  # the fit refuses fewer successful proxies (in [4, proxies])
    sweep_seed: int  # seed of the proxies' mixtures
    target: str  # what the regressor predicts: average (natural-mixture average loss) or a domain's name
    held_out: float  # share of the proxies held out for early stopping and the reported quality, in (0, 1)
    top_k: int  # the mixture is the mean of the top_k best simulated ones (in [1, samples])
    samples: int  # simulated mixtures drawn from Dirichlet(token distribution) (>= 1)
    fit_seed: int  # LightGBM's seed and the simulation's
    launcher: str  # Hydra launcher of the proxies: basic (here, one after another), joblib, submitit_slurm, ...
    launcher_overrides: list[str]  # overrides for that launcher, e.g. [hydra.launcher.n_jobs=2]
    proxy: dict[str, Any]  # the proxies' stage: a conf/model name, a conf/trainer preset, seed, any trainer.* field

    def check(self) -> None:
        check_settings(proxies=self.proxies, min_proxies=self.min_proxies, held_out=self.held_out, top_k=self.top_k,
                       samples=self.samples)


class RegMixMixer(SweepFitMixer):
    """``mixer=regmix``: proxies on synthesized mixtures, a LightGBM regressor, the top-k of a simulated search.

    The token distribution of the formulas is the corpus's natural mixture (our choice: byte shares
    for the embedded and local corpora, the published shares for SlimPajama; tokens per byte differ
    little between the domains of a corpus, and this keeps the sweep independent of the tokenizer).
    """

    name = "regmix"  # registered name (dograph.mixing.MIXERS); its stage keys hash it: never change it
    settings_class = RegMixSettings
    label = "RegMix"

    def __init__(self, *, target: str = "average", held_out: float = HELD_OUT_FRACTION, top_k: int = TOP_K,
                 samples: int = SIMULATION_SAMPLES, fit_seed: int = LGBM_SEED, **rest: Any) -> None:
        self.target, self.held_out, self.top_k, self.samples = target, held_out, top_k, samples
        self.fit_seed = fit_seed
        super().__init__(target=target, held_out=held_out, top_k=top_k, samples=samples, fit_seed=fit_seed, **rest)

    @classmethod
    def design(cls, node: dict[str, Any], count: int, seed: int, domains: list[str],
               natural_mixture: list[float]) -> np.ndarray:
        target = node.get("target", "average")
        if target != "average" and target not in domains:
            raise ConfigError(f"mixer.target={target!r} is not a domain of the dataset: choose average or one of "
                              f"{', '.join(domains)}")
        return synthesize_mixtures(natural_mixture, count, seed=seed)

    def fit(self, mixtures: np.ndarray, losses: np.ndarray) -> FitOutcome:
        check_mixture_table(mixtures, losses, self.domains)
        targets = regression_target(losses, self.target, self.domains, self.natural_mixture)
        fitted = fit_regressor(mixtures, targets, seed=self.fit_seed, held_out=self.held_out)
        choice = choose_mixture(fitted.regressor, self.natural_mixture, samples=self.samples, top_k=self.top_k,
                                seed=self.fit_seed)
        label = ("natural-mixture average validation loss" if self.target == "average"
                 else f"validation loss of {self.target}")
        held = np.asarray(fitted.quality.held_out_rows, dtype=np.int64)
        predicted = np.asarray(fitted.regressor.predict(mixtures), dtype=np.float64)
        predicted[held] = fitted.quality.held_out_predictions  # as the split model saw them (the reported quality)
        return FitOutcome(choice.mixture, choice.predicted_loss, label, fitted.quality.summary(), targets, predicted,
                          held_out=held)
