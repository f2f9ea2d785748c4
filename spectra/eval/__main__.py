"""`python -m spectra.eval ...`: the lm-evaluation-harness command line with the "spectra" model registered.

lm-eval 0.4 discovers models only through its own registry (no plugin entry point), so this wrapper
imports spectra's adapter first and then hands the arguments to lm-eval unchanged, e.g.::

    python -m spectra.eval --model spectra --model_args pretrained=runs/demo/trilm --tasks arc_easy
"""

from __future__ import annotations

from lm_eval.__main__ import cli_evaluate

from . import harness  # noqa: F401  (registers the "spectra" model)

if __name__ == "__main__":
    cli_evaluate()
