"""Accuracy of `spectra scaling fit` on synthetic laws: how far the fitted coefficients land from the truth, and
whether the fit reaches the optimum of its objective (a tight L-BFGS-B polish started from the true law).

    PYTHONPATH=. python benchmarks/scaling_fit_accuracy.py [--seeds 20]

Prints one row per (law, design, noise): the seeds whose fit ends above the optimum, and the worst and median
|error| of alpha, beta and E over the seeds. Errors at the optimum come from the noise and the design (the
range of N and D), not from the fitter.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import minimize

from spectra.eval.scaling import ScalingLaw, _objective, fit_scaling_law

CHINCHILLA = ScalingLaw(E=1.69, A=406.4, alpha=0.34, B=410.7, beta=0.28, n_unit=1, d_unit=1, name="chinchilla")
SPECTRA = ScalingLaw(E=2.19, A=4.73, alpha=0.32, B=5.18, beta=0.81, n_unit=1e6, d_unit=1e9, name="spectra-1.1")
STEEP = ScalingLaw(E=1.2, A=0.9, alpha=0.52, B=1.4, beta=0.41, n_unit=1e9, d_unit=1e9, name="steep")
# (law, (N from, to, count), (D from, to, count)); the first is the design of issue #17.
DESIGNS = [(CHINCHILLA, (2e7, 1.6e9, 7), (1e9, 1e11, 5)),
           (CHINCHILLA, (2e7, 1.6e10, 7), (1e9, 1e12, 6)),
           (SPECTRA, (5e7, 4e9, 7), (2e9, 5e11, 6)),
           (STEEP, (3e7, 7e9, 7), (1e9, 2e12, 6))]


def optimum(n, d, loss, law: ScalingLaw) -> float:
    args = (np.log(n / law.n_unit), np.log(d / law.d_unit), np.log(loss), 1e-3)
    truth = np.array([np.log(law.A), np.log(law.B), np.log(law.E), law.alpha, law.beta])
    return minimize(lambda t: _objective(t, *args), truth, jac=True, method="L-BFGS-B",
                    options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 20000}).fun


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--noise", default="0.004,0.001", help="multiplicative noise levels (comma-separated)")
    args = parser.parse_args()
    print(f"{'law':<12}{'N range':>16}{'D range':>16}{'pts':>5}{'noise':>7}{'short':>7}"
          f"{'|da| max/med':>15}{'|db| max/med':>15}{'|dE| max/med':>15}{'s/fit':>7}")
    for law, (n_lo, n_hi, n_count), (d_lo, d_hi, d_count) in DESIGNS:
        n, d = (x.ravel() for x in np.meshgrid(np.geomspace(n_lo, n_hi, n_count), np.geomspace(d_lo, d_hi, d_count)))
        for noise in (float(x) for x in args.noise.split(",")):
            errors, short, seconds = [], 0, 0.0
            for seed in range(args.seeds):
                loss = law.loss(n, d) * np.exp(np.random.default_rng(seed).normal(0.0, noise, n.size))
                start = time.perf_counter()
                result = fit_scaling_law(n, d, loss, bootstrap=0, n_unit=law.n_unit, d_unit=law.d_unit)
                seconds += time.perf_counter() - start
                short += result.huber > optimum(n, d, loss, law) * (1 + 1e-6)
                fit = result.law
                errors.append((abs(fit.alpha - law.alpha), abs(fit.beta - law.beta), abs(fit.E - law.E)))
            e = np.array(errors)
            cols = "".join(f"{f'{e[:, i].max():.3f}/{np.median(e[:, i]):.3f}':>15}" for i in range(3))
            print(f"{law.name:<12}{f'{n_lo:.2g}-{n_hi:.2g}':>16}{f'{d_lo:.2g}-{d_hi:.2g}':>16}{n.size:>5}"
                  f"{noise:>7.3f}{f'{short}/{args.seeds}':>7}{cols}{seconds / args.seeds:>7.2f}")


if __name__ == "__main__":
    main()
