"""The run directory: its metrics log, its run.json, the checks before a run writes into it, and resume checks.

    <run>/run.json            config, model config and schedule of the run (rewritten on every start)
    <run>/metrics.jsonl       one JSON record per log / evaluation / skipped step, and the run's end
    <run>/checkpoints/        resumable training checkpoints (spectra.train.state)
    <run>/.spectra-lock       held by the process writing the run (spectra.io)
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, DataError, OutputError, TrainingError
from ..io import check_output, entries, write_text_atomic
from ..model import SpectraLM
from .config import TrainConfig
from .state import list_checkpoints

METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".spectra-lock"  # in the run directory: held by the process writing the run (spectra.io)
RUN_FILE = "run.json"
EXPORT_OWNER = "train --export"
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_layers", "max_seq_len",
                "weight_kind", "model_parallel_size")


class MetricsLog:
    """Append-only JSONL of training records, written by the main process only."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int, keep_final: bool = False) -> None:
        """Drop records of steps after `step` (a resumed run writes them again) and the run's end record unless
        `keep_final` (a finished run resumed without more steps), atomically."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line torn by a killed process
            if record.get("step", 0) <= step and (record.get("split") != "final" or keep_final):
                kept.append(line)
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def has_final(self, step: int) -> bool:
        """Whether the log already ends the run at `step` (a finished run being resumed)."""
        if not (self.enabled and self.path.is_file()):
            return False
        return any(r.get("split") == "final" and r.get("step") == step for r in _records(self.path))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _records(file: Path) -> list[dict]:
    out = []
    for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict):
                out.append(record)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a run directory's metrics.jsonl (or of that file)."""
    path = Path(path)
    file = path / METRICS_FILE if path.is_dir() else path
    if not file.is_file():
        raise DataError(f"no {METRICS_FILE} at {path}; pass a run directory written by `spectra train`")
    records = []
    for lineno, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{file}:{lineno} is not a JSON record; is it a metrics.jsonl written by "
                            f"`spectra train`?") from None
        if not isinstance(record, dict):
            raise DataError(f"{file}:{lineno} is not a JSON object; is it a metrics.jsonl written by "
                            f"`spectra train`?")
        records.append(record)
    return records


def check_run_dir(run_dir: Path, resuming: bool, force: bool, data: str, model: str | None = None) -> None:
    """A new run goes to a missing or empty directory, or (with `force`) beside files that are not a run;
    never into its data directory nor into the checkpoint it starts from."""
    sources = [data] + ([model] if model and Path(model).is_dir() else [])
    check_output(run_dir / RUN_FILE, "train", force=True, kind="file", sources=sources)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file; the run directory must be a directory (or not exist yet)")
    if resuming or not run_dir.is_dir():
        return
    if list_checkpoints(run_dir):
        raise TrainingError(f"{run_dir} already holds a training run; continue it with --resume {run_dir} "
                            f"or choose another output directory")
    # A run killed before its first checkpoint (run.json, no checkpoints) starts over in place.
    own = (run_dir / RUN_FILE).is_file()
    if not own and any(p.name != LOCK_FILE for p in entries(run_dir)) and not force:
        raise OutputError(f"--out {run_dir} already exists, is not empty and is not a training run; choose "
                          f"another directory or pass --force to write the run beside its files")


def check_export(cfg: TrainConfig, run_dir: Path, force: bool) -> None:
    """The --export directory: new (or ours, or forced), and neither the run directory nor one above it."""
    if not cfg.export_dir:
        return
    sources = [cfg.data] + ([cfg.model] if Path(cfg.model).is_dir() else [])
    check_output(cfg.export_dir, EXPORT_OWNER, force=force, sources=sources, flag="--export")
    if run_dir.absolute() == Path(cfg.export_dir) or Path(cfg.export_dir) in run_dir.absolute().parents:
        raise OutputError(f"--export {cfg.export_dir} would replace the run directory {run_dir}; export "
                          f"to another path")


def absolute_paths(cfg: TrainConfig) -> dict[str, str]:
    """data, out_dir, export_dir and a checkpoint `model` as absolute paths, so a resume from another working
    directory finds the same files."""
    fields = {"data": cfg.data, "out_dir": cfg.out_dir, "export_dir": cfg.export_dir}
    if Path(cfg.model).is_dir():
        fields["model"] = cfg.model
    return {k: str(Path(v).absolute()) for k, v in fields.items() if v}


def check_resume(saved: dict, source: Path, model: SpectraLM, dataset: Any) -> None:
    """A resumed run builds the model it was saved from and reads the data it was trained on."""
    built, current = saved["model_config"], model.config.to_dict()
    for name in SHAPE_FIELDS:
        if built.get(name) != current[name]:
            raise CheckpointError(f"{source} was saved from a model with {name}={built.get(name)!r}, but this run "
                                  f"builds {name}={current[name]!r}; resume with the model it was saved with")
    if saved["dataset"] != dataset.fingerprint():
        raise DataError(f"{source} was trained on other data (tokenizer or token counts differ from "
                        f"{dataset.path}); resume with the dataset it was trained on")
