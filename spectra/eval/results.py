"""Evaluation result files: one JSON per (model, evaluation), read back by `spectra compare`.

Schema ``spectra-eval/1``::

    {"format": "spectra-eval/1",
     "model": {"name", "path", "family", "weight_kind", "parameters", "size_bits", "config"},
     "metrics": {"perplexity": 12.3, "arc_easy/acc": 0.41, ...},
     "details": {...}}

`family` groups models into the papers' lines: "TriLM", "FloatLM", "QuantLM 4-bit", ...
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..io import check_output, json_recognizer, read_json, write_text_atomic
from ..size import count_parameters, model_size_breakdown

RESULTS_FORMAT = "spectra-eval/1"


def model_family(model: torch.nn.Module) -> str:
    """TriLM, FloatLM or "QuantLM k-bit", from the weight kind and its options."""
    kind = model.config.weight_kind.lower()
    bits = model.config.weight_options.get("bits")
    if bits is None:
        # QuantLM modules may carry their bit width themselves rather than in the config.
        bits = next((getattr(m, "bits", None) for m in model.linear_layers().values()), None)
    if kind == "float":
        return "FloatLM"
    if "ternary" in kind or kind in ("tq1", "tq2") or "pack" in kind:
        return "TriLM"
    if bits is not None:
        return f"QuantLM {int(bits)}-bit"
    return kind


def describe_model(model: torch.nn.Module, source: str | Path, family: str | None = None,
                   name: str | None = None) -> dict[str, Any]:
    """The "model" block of a result file: identity, family, parameters and size in bits."""
    size = model_size_breakdown(model)
    return {"name": name or Path(str(source)).name, "path": str(source), "family": family or model_family(model),
            "weight_kind": model.config.weight_kind, "parameters": count_parameters(model.config).total,
            "size_bits": size["total_bits"], "linear_bits": size["linear_bits"],
            "config": model.config.to_dict()}


def result_record(model_info: dict[str, Any], metrics: dict[str, float], details: dict[str, Any]) -> dict[str, Any]:
    return {"format": RESULTS_FORMAT, "model": model_info, "metrics": metrics, "details": details}


def write_json(record: dict[str, Any], path: str | Path, force: bool = False,
               recognize: Callable[[dict], bool] | None = None, sources: Iterable[str | Path] = (),
               flag: str = "--out") -> Path:
    """Write JSON atomically. An existing file is replaced only when it is a JSON object that passes
    `recognize` (default: a spectra result file), or with `force`; a path inside a source never."""
    check_output(path, "eval", force=force, kind="file", sources=sources, flag=flag,
                 recognize=json_recognizer(recognize or (lambda d: d.get("format") == RESULTS_FORMAT)))
    return write_text_atomic(path, json.dumps(record, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def load_results(path: str | Path) -> dict[str, Any]:
    """A result file, checked against the schema."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"result file {path} does not exist")
    record = read_json(path, DataError, "give a file written by `spectra eval --out`")
    if not isinstance(record, dict) or record.get("format") != RESULTS_FORMAT:
        raise DataError(f"{path} is not a spectra result file (format {RESULTS_FORMAT!r}); write one with "
                        f"`spectra eval ppl --out` or `spectra eval tasks --out`")
    model = record.get("model")
    if not isinstance(model, dict):
        raise DataError(f"{path}: the model block is missing or not an object; write the file with `spectra eval`")
    for key in ("parameters", "size_bits", "family"):
        if key not in model:
            raise DataError(f"{path}: the model block lacks {key!r}")
    for key in ("parameters", "size_bits"):  # a string here used to fail deep inside the plot (exit 1)
        if not _is_number(model[key]) or not model[key] > 0:
            raise DataError(f"{path}: the model's {key} must be a positive number, got {model[key]!r}")
    metrics = record.get("metrics", {})
    bad = [k for k, v in metrics.items() if not _is_number(v)] if isinstance(metrics, dict) else ["(not an object)"]
    if bad:
        raise DataError(f"{path}: metric {bad[0]} is not a number; write the file with `spectra eval`")
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
