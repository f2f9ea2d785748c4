"""Scaling laws L(N, D) = E + A / N^alpha + B / D^beta: fitting (Chinchilla approach 3), prediction, compute-optimal.

The fit follows Hoffmann et al. 2022 (approach 3): minimise the Huber loss (small delta) between
log L and LSE(a - alpha log N, b - beta log D, e), with A = e^a, B = e^b, E = e^e, by L-BFGS from a grid
of initialisations, keeping the best. Confidence intervals come from refitting bootstrap resamples of the
points. N and D are measured in units (`n_unit`, `d_unit`) recorded with the law, so coefficients are
comparable only between laws with the same units.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import re
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, SpectraWarning
from ..io import read_json
from ..progress import progress_bar

PARAM_NAMES = ("E", "A", "alpha", "B", "beta")


class ScalingFitWarning(SpectraWarning):
    """The scaling-law fit stopped at its iteration cap: its coefficients may not be the optimum."""


@dataclass(frozen=True)
class ScalingLaw:
    E: float
    A: float
    alpha: float
    B: float
    beta: float
    n_unit: float = 1e6   # N is counted in millions of parameters
    d_unit: float = 1e9   # D in billions of tokens
    name: str = "fit"

    def loss(self, n_params: float | np.ndarray, n_tokens: float | np.ndarray) -> np.ndarray:
        """Predicted loss for N parameters trained on D tokens (raw counts)."""
        n = np.asarray(n_params, dtype=np.float64) / self.n_unit
        d = np.asarray(n_tokens, dtype=np.float64) / self.d_unit
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def compute_optimal(self, flops: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) minimising L(N, D) subject to C = 6 N D (closed form, Hoffmann et al. 2022, eq. 4)."""
        flops = np.asarray(flops, dtype=np.float64)
        if np.any(flops <= 0):
            raise ConfigError("a compute budget must be positive")
        a, b = self.alpha, self.beta
        budget = flops / (6.0 * self.n_unit * self.d_unit)   # N*D in law units
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n = g * budget ** (b / (a + b))
        return n * self.n_unit, budget / n * self.d_unit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScalingLaw:
        try:
            law = cls(**{k: data[k] for k in PARAM_NAMES},
                      **{k: data[k] for k in ("n_unit", "d_unit", "name") if k in data})
        except (KeyError, TypeError) as err:
            raise DataError(f"a scaling law needs the keys {', '.join(PARAM_NAMES)} ({err})") from None
        # E may be any finite number; the rest must be positive (the compute-optimal split divides by them).
        for key in (*PARAM_NAMES, "n_unit", "d_unit"):
            value = getattr(law, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
                    math.isfinite(value) and (key == "E" or value > 0)):
                need = "finite number" if key == "E" else "finite positive number"
                raise DataError(f"a scaling law's {key} must be a {need}, got {value!r}")
        return law

    def formula(self) -> str:
        return (f"L(N, D) = {self.E:.4g} + {self.A:.4g} / N^{self.alpha:.4g} + {self.B:.4g} / D^{self.beta:.4g}"
                f"  (N in {_unit_name(self.n_unit)} parameters, D in {_unit_name(self.d_unit)} tokens)")


# Spectra 1.1 (arXiv 2506.23025, eq. 2), TriLMs. The summary we work from does not state the units of N and
# D; millions of parameters and billions of tokens is our assumption (see docs/evaluation.md, "Units").
LAW_PRESETS: dict[str, ScalingLaw] = {
    "spectra-1.1": ScalingLaw(E=2.19, A=4.73, alpha=0.32, B=5.18, beta=0.81, n_unit=1e6, d_unit=1e9,
                              name="spectra-1.1"),
}


def get_law(source: str | Path) -> ScalingLaw:
    """A named preset ("spectra-1.1") or a JSON file written by `spectra scaling fit --out`."""
    if str(source).lower() in LAW_PRESETS:
        return LAW_PRESETS[str(source).lower()]
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{source!r} is neither a scaling-law preset ({', '.join(LAW_PRESETS)}) nor a JSON file")
    data = read_json(path, DataError, "give a file written by `spectra scaling fit --out`")
    if not isinstance(data, dict) or not isinstance(data.get("law", data), dict):
        raise DataError(f"{path} holds no law object; give a file written by `spectra scaling fit --out`")
    return ScalingLaw.from_dict(data.get("law", data))


_SUFFIX = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str | float) -> float:
    """'1.5B' -> 1.5e9, '300M', '1.2T', '6e20' -> floats (counts of parameters, tokens or FLOPs)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[+-]?\d+)?)\s*([kKmMbBgGtT]?)\s*", text)
    try:
        value = float(m.group(1)) * _SUFFIX[m.group(2).upper()] if m else math.nan
    except ValueError:  # "1.2.3"
        value = math.nan
    if not 0 < value < math.inf:  # 0 parameters or 1e400 FLOPs give inf or nan predictions
        raise ConfigError(f"cannot read {text!r} as a positive count; write e.g. 1.5B, 300M, 1.2T or 6e20")
    return value


def _unit_name(unit: float) -> str:
    return {1.0: "raw", 1e3: "thousands of", 1e6: "millions of", 1e9: "billions of", 1e12: "trillions of"}.get(
        unit, f"units of {unit:g}")


# --- data -----------------------------------------------------------------------------------------

_COLUMNS = {"N": ("n", "params", "parameters", "n_params", "model_size"),
            "D": ("d", "tokens", "n_tokens", "data", "train_tokens"),
            "L": ("l", "loss", "val_loss", "validation_loss")}


def read_points(path: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, D, L) arrays from a CSV with a header naming parameters, tokens and loss columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"points file {path} does not exist")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path} is not a UTF-8 CSV file ({err}); give a CSV with a header row") from None
    if not rows:
        raise DataError(f"{path} has no data rows")
    header = {h.strip().lower(): h for h in rows[0]}
    cols = {}
    for key, aliases in _COLUMNS.items():
        found = next((header[a] for a in aliases if a in header), None)
        if found is None:
            raise DataError(f"{path} lacks a {key} column (its header reads {list(rows[0])}, comma-separated); "
                            f"name it one of {', '.join(aliases)}")
        cols[key] = found
    try:
        arrays = [np.array([parse_count(r[cols[k]]) for r in rows]) for k in "NDL"]
    except ConfigError as err:
        raise DataError(f"{path}: {err}") from None
    n, d, loss = arrays
    if np.any(n <= 0) or np.any(d <= 0) or np.any(loss <= 0):
        raise DataError(f"{path}: parameters, tokens and losses must all be positive")
    return n, d, loss


# --- fitting --------------------------------------------------------------------------------------

def _objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
               delta: float) -> tuple[float, np.ndarray]:
    """Huber loss of log-loss residuals and its gradient in (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    pred = top + np.log(total)
    weights /= total
    r = pred - log_l
    small = np.abs(r) <= delta
    value = np.where(small, 0.5 * r ** 2, delta * (np.abs(r) - 0.5 * delta)).sum()
    dr = np.where(small, r, delta * np.sign(r))
    grad = np.array([(dr * weights[0]).sum(), (dr * weights[1]).sum(), (dr * weights[2]).sum(),
                     -(dr * weights[0] * log_n).sum(), -(dr * weights[1] * log_d).sum()])
    return float(value), grad


def chinchilla_grid() -> list[np.ndarray]:
    """Initialisations of Hoffmann et al. 2022: alpha, beta in 0..2, e in -1..1, a, b in 0..25."""
    exps, es, logs = (0.0, 0.5, 1.0, 1.5, 2.0), (-1.0, -0.5, 0.0, 0.5, 1.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0)
    return [np.array([a, b, e, al, be]) for a, b, e, al, be in itertools.product(logs, logs, es, exps, exps)]


def coarse_grid() -> list[np.ndarray]:
    exps, es, logs = (0.25, 0.75, 1.5), (-1.0, 0.5), (0.0, 3.0, 10.0)
    return [np.array([a, b, e, al, be]) for a, b, e, al, be in itertools.product(logs, logs, es, exps, exps)]


def _fit_theta(log_n, log_d, log_l, delta: float, inits: list[np.ndarray],
               starts: int | None = None) -> tuple[np.ndarray, float, bool]:
    """(best theta, its Huber objective, whether L-BFGS converged there) over L-BFGS runs from `inits`."""
    from scipy.optimize import minimize

    if starts is not None and starts < len(inits):
        inits = _ranked_starts(inits, log_n, log_d, log_l, delta, starts)
    # L-BFGS-B's stopping rules are absolute: ftol compares the change of f to max(|f|, 1) and gtol the
    # projected gradient to 1e-5. The raw objective is ~1e-4 with gradients ~delta per point, so every run
    # stopped while still creeping along the valley (objective 17-30% above the optimum on synthetic laws,
    # exponents off by 0.02-0.06). In units of delta^2 per point both are O(1) whatever delta and the
    # number of points, so the default tests mean what they say; the best run is then polished.
    scale = 1.0 / (delta * delta * log_n.size)

    def scaled(theta):
        value, grad = _objective(theta, log_n, log_d, log_l, delta)
        return value * scale, grad * scale

    best = None
    with _single_threaded_blas():
        for init in inits:
            res = minimize(scaled, init, jac=True, method="L-BFGS-B", options={"maxiter": 2000})
            if np.all(np.isfinite(res.x)) and np.isfinite(res.fun) and (best is None or res.fun < best.fun):
                best = res
        if best is None:
            raise DataError("the scaling-law fit diverged from every initialisation; check the points")
        polished = minimize(scaled, best.x, jac=True, method="L-BFGS-B",
                            options={"maxiter": 20000, "ftol": 1e-15, "gtol": 1e-10})
    if np.all(np.isfinite(polished.x)) and polished.fun <= best.fun:
        best = polished
    # Converged unless L-BFGS stopped at its iteration cap (status 1); a polish that ends in an "abnormal" line
    # search (status 2) has met machine precision, the best that floating point allows.
    converged = best.status != 1
    return best.x, float(best.fun) / scale, converged


def _ranked_starts(inits: list[np.ndarray], log_n, log_d, log_l, delta: float, starts: int) -> list[np.ndarray]:
    """`starts` grid points: the best (by starting objective) for each exponent pair, then the next best overall.

    Ranking alone picks starts that share a few exponent pairs (the ones whose a, b, e happen to fit well at
    the start), so every run could start in one basin; one start per (alpha, beta) keeps them spread out.
    """
    values = np.array([_objective(t, log_n, log_d, log_l, delta)[0] for t in inits])
    order = np.argsort(values, kind="stable")
    chosen, seen = [], set()
    for i in order:
        key = (float(inits[i][3]), float(inits[i][4]))
        if key not in seen:
            seen.add(key)
            chosen.append(i)
    taken = set(chosen)
    rest = [i for i in order if i not in taken]
    chosen = sorted(chosen, key=lambda i: values[i])[:starts] + rest
    return [inits[i] for i in chosen[:starts]]


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    # L-BFGS-B makes thousands of 5-element BLAS calls; a multi-threaded OpenBLAS spends 10-50x longer
    # waking its threads than computing, worst on a busy machine.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _law_from_theta(theta: np.ndarray, n_unit: float, d_unit: float, name: str) -> ScalingLaw:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return ScalingLaw(E=float(np.exp(e)), A=float(np.exp(a)), alpha=alpha, B=float(np.exp(b)), beta=beta,
                      n_unit=n_unit, d_unit=d_unit, name=name)


@dataclass
class FitResult:
    law: ScalingLaw
    r2: float
    huber: float
    points: int
    delta: float
    bootstrap: int
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)   # 95% percentile intervals
    converged: bool = True

    def to_dict(self) -> dict:
        return {"law": self.law.to_dict(), "r2": self.r2, "huber": self.huber, "points": self.points,
                "delta": self.delta, "converged": self.converged, "bootstrap": self.bootstrap,
                "ci95": {k: list(v) for k, v in self.ci.items()}}


def r_squared(law: ScalingLaw, n: np.ndarray, d: np.ndarray, loss: np.ndarray) -> float:
    residual = loss - law.loss(n, d)
    spread = ((loss - loss.mean()) ** 2).sum()
    return float(1.0 - (residual ** 2).sum() / spread) if spread > 0 else float("nan")


def fit_scaling_law(n: np.ndarray, d: np.ndarray, loss: np.ndarray, delta: float = 1e-3, bootstrap: int = 100,
                    seed: int = 0, n_unit: float = 1e6, d_unit: float = 1e9, grid: str = "chinchilla",
                    starts: int | None = 64, progress: bool = False) -> FitResult:
    """Fit L(N, D) to points (raw parameter and token counts, losses in nats).

    L-BFGS runs from the `starts` grid initialisations with the lowest starting objective (all of them
    when `starts` is None); `bootstrap` resamples give 95% percentile intervals of the coefficients.
    """
    n, d, loss = (np.asarray(x, dtype=np.float64).reshape(-1) for x in (n, d, loss))
    if not (n.size == d.size == loss.size):
        raise DataError("N, D and L must have the same number of points")
    if n.size < 5:
        raise DataError(f"fitting 5 coefficients needs at least 5 points, got {n.size}")
    if np.unique(n).size < 2 or np.unique(d).size < 2:
        raise DataError("the points need at least two distinct model sizes and two distinct token counts")
    if not 0 < delta < math.inf:
        raise ConfigError(f"the Huber delta must be a finite positive number, got {delta}")
    if bootstrap < 0 or (starts is not None and starts < 0):
        raise ConfigError(f"bootstrap and starts must be >= 0, got {bootstrap} and {starts}")
    if not (0 < n_unit < math.inf and 0 < d_unit < math.inf):
        raise ConfigError(f"the units of N and D must be finite positive counts, got {n_unit:g} and {d_unit:g}")
    grids = {"chinchilla": chinchilla_grid, "coarse": coarse_grid}
    if grid not in grids:
        raise ConfigError(f"unknown initialisation grid {grid!r}; use {' or '.join(grids)}")
    log_n, log_d, log_l = np.log(n / n_unit), np.log(d / d_unit), np.log(loss)
    theta, value, converged = _fit_theta(log_n, log_d, log_l, delta, grids[grid](), starts)
    law = _law_from_theta(theta, n_unit, d_unit, "fit")
    result = FitResult(law=law, r2=r_squared(law, n, d, loss), huber=value, points=n.size, delta=delta,
                       bootstrap=bootstrap, converged=converged)
    if not converged:
        warnings.warn(f"the scaling-law fit did not converge (L-BFGS hit its iteration cap at Huber objective "
                      f"{value:.4g}); the coefficients may be off — check the points, or try --starts 0",
                      ScalingFitWarning, stacklevel=2)
    if bootstrap > 0:
        result.ci = _bootstrap(log_n, log_d, log_l, delta, theta, bootstrap, seed, progress)
    return result


def _bootstrap(log_n, log_d, log_l, delta, theta, rounds: int, seed: int, progress: bool) -> dict:
    rng = np.random.default_rng(seed)
    # Resamples start from the full fit and two far-off points: the full grid per resample buys nothing.
    inits = [theta, np.array([0.0, 3.0, -1.0, 0.25, 0.75]), np.array([3.0, 0.0, 0.5, 0.75, 0.25])]
    samples = []
    for _ in progress_bar(range(rounds), desc="bootstrap", disable=not progress):
        idx = rng.integers(0, log_n.size, log_n.size)
        t, _, _ = _fit_theta(log_n[idx], log_d[idx], log_l[idx], delta, inits)
        samples.append([np.exp(t[2]), np.exp(t[0]), t[3], np.exp(t[1]), t[4]])
    arr = np.array(samples)
    lo, hi = np.percentile(arr, [2.5, 97.5], axis=0)
    return {name: (float(lo[i]), float(hi[i])) for i, name in enumerate(PARAM_NAMES)}
