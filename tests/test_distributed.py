"""Distributed pretraining on CPU (gloo, 2 processes): DP and TP equal the single-process run.

One torchrun launch (this file run as a script) trains every 2-rank scenario and writes its losses,
per-shard scales, logits and checkpoints to a directory; the tests compare them with single-process runs
computed here. Same seed, same global batches, same model-parallel size: only fp32 reduction order differs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spectra import SpectraLM, get_config, ternarize
from spectra.checkpoint import load_checkpoint
from spectra.distributed import (
    ParallelContext,
    check_tensor_parallel,
    clip_grad_norm_,
    config_for_tensor_parallel,
    init_parallel,
    load_training_checkpoint,
    local_batch,
    mean_over_data_parallel,
    parallelize,
    save_training_checkpoint,
)
from spectra.errors import CheckpointError, ConfigError

STEPS, SAVE_AT, BATCH, SEQ = 6, 3, 4, 24
LOSS_TOL = 2e-5  # fp32 reduction order (sharded matmuls, all-reduce of gradients) over a few steps
CORPUS = torch.randint(0, 1024, (97,), generator=torch.Generator().manual_seed(7)).repeat(8)


def global_batch(step: int) -> torch.Tensor:
    """The same global batch on every rank and mesh: windows of a repeating sequence the model can learn."""
    gen = torch.Generator().manual_seed(1000 + step)
    starts = torch.randint(0, CORPUS.numel() - SEQ - 1, (BATCH,), generator=gen)
    return torch.stack([CORPUS[s:s + SEQ + 1] for s in starts.tolist()])


def build(ctx: ParallelContext, mp: int, dp_mode: str = "fsdp") -> tuple[SpectraLM, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = SpectraLM(get_config("tiny", weight_kind="ternary", model_parallel_size=mp)).to(ctx.device)
    parallelize(model, ctx, dp_mode)
    # eps 1e-6 rather than 1e-8: with 1e-8 Adam turns the reduction-order noise of near-zero gradients
    # into lr-sized steps of random sign, and the runs drift apart for reasons unrelated to parallelism.
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-6, weight_decay=0.1)


def train(ctx: ParallelContext, mp: int, dp_mode: str = "fsdp", resume: Path | None = None,
          save_dir: Path | None = None) -> tuple[SpectraLM, list[float]]:
    """A minimal loop: AdamW, global-norm clipping (active at 0.5), loss averaged over data parallel."""
    model, opt = build(ctx, mp, dp_mode)
    start = load_training_checkpoint(resume, model, opt, ctx)["step"] if resume else 0
    losses = []
    for step in range(start, STEPS):
        batch = local_batch(global_batch(step), ctx)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        loss.backward()
        clip_grad_norm_(model, 0.5, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(mean_over_data_parallel(loss, ctx).item())
        if save_dir is not None and step + 1 == SAVE_AT:
            save_training_checkpoint(save_dir, model, opt, ctx, meta={"step": step + 1})
    return model, losses


SINGLE = ParallelContext(0, 1, 0, torch.device("cpu"), 1, 1, None)


# --- the 2-process worker (run by torchrun) -------------------------------------------------------

def _record_weight_seen(model: SpectraLM, seen: dict) -> None:
    """Forward pre-hooks noting what weight each ternary layer of block 0 ternarizes."""
    for name in ("self_attn.q_proj", "mlp.down_proj"):
        module = model.model.layers[0].get_submodule(name)

        def hook(mod, args, name=name):
            seen.setdefault(name, [type(mod.weight).__name__, list(mod.weight.shape)])
        module.register_forward_pre_hook(hook)


def worker(out: Path) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    results: dict = {}
    ctx = init_parallel(dp=2, tp=1)
    model, _ = build(ctx, mp=2)
    seen: dict = {}
    _record_weight_seen(model, seen)
    model(local_batch(global_batch(0), ctx)[:, :-1])
    results["fsdp_weight_seen"] = seen
    _, results["fsdp"] = train(ctx, mp=2)
    _, results["ddp"] = train(ctx, mp=2, dp_mode="ddp")

    ctx = init_parallel(dp=1, tp=2)
    model, results["tp"] = train(ctx, mp=2, save_dir=out / "tp_step3")
    scales = {}
    for name in ("self_attn.q_proj", "self_attn.o_proj"):
        layer = model.model.layers[0].get_submodule(name)
        scales[name] = ternarize(layer.weight.to_local(), 1, layer.shard_axis)[1].tolist()
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, scales)
    results["tp_local_scales"] = everyone
    with torch.no_grad():
        results["tp_logits"] = model.eval()(global_batch(99)[:, :-1]).tolist()
    save_training_checkpoint(out / "tp_final", model, None, ctx, meta={"step": STEPS})
    _, results["tp_resumed_tp"] = train(ctx, mp=2, resume=out / "tp_step3")

    ctx = init_parallel(dp=2, tp=1)
    _, results["tp_resumed_dp"] = train(ctx, mp=2, resume=out / "tp_step3")
    if ctx.is_main:
        (out / "results.json").write_text(json.dumps(results))
    dist.destroy_process_group()
    # Skip the interpreter's teardown: there a gloo thread sometimes aborts a rank whose work is done and saved
    # ("terminate called without an active exception", SIGABRT), twice in a row in one CI run of the ninth
    # session, results.json already written both times.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# --- tests ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[dict, Path]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", __file__, "OUT"]

    def fresh_out() -> Path:
        cmd[-1] = str(tmp_path_factory.mktemp("dist"))
        return Path(cmd[-1])

    out = _launch_two_ranks(cmd, env, fresh_out)
    return json.loads((out / "results.json").read_text()), out


def _launch_two_ranks(cmd: list[str], env: dict, fresh_out) -> Path:
    """Run a 2-rank torchrun command writing into `fresh_out()`; returns that directory.

    A gloo rank sometimes aborts in C++ with no Python error ("terminate called without an active exception",
    SIGABRT; seen in 3 of ~16 full-suite runs on 2 cores, then twice in a row in one, always in the teardown
    after the results were written: init_parallel ends its process group at exit, and the worker now exits
    without the interpreter's teardown): launch once more then, into a fresh directory. Any Python error fails
    at once."""
    for attempt in range(2):
        out = fresh_out()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0 or attempt or "terminate called without an active exception" not in proc.stderr:
            break
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


@pytest.fixture(scope="module")
def single_runs() -> dict[str, list[float]]:
    return {"mp2": train(SINGLE, mp=2)[1], "mp1": train(SINGLE, mp=1)[1]}


def test_data_parallel_fsdp_and_ddp_match_single_process(two_ranks, single_runs):
    results, _ = two_ranks
    reference = single_runs["mp2"]
    assert reference[-1] < reference[0] - 0.3  # the run learns, so the comparison covers moving weights
    for mode in ("fsdp", "ddp"):
        assert results[mode] == pytest.approx(reference, abs=LOSS_TOL), mode


def test_fsdp_ternarizes_the_gathered_matrix_not_a_shard(two_ranks):
    # Each rank stores half of every matrix; the forward must see the all-gathered plain tensor.
    seen = two_ranks[0]["fsdp_weight_seen"]
    config = get_config("tiny")
    d, h = config.hidden_size, config.intermediate_size
    assert seen == {"self_attn.q_proj": ["Parameter", [d, d]], "mlp.down_proj": ["Parameter", [d, h]]}


def test_tensor_parallel_matches_model_parallel_size_and_not_a_global_scale(two_ranks, single_runs):
    results, _ = two_ranks
    assert results["tp"] == pytest.approx(single_runs["mp2"], abs=LOSS_TOL)
    # One scale over the whole matrix (an all-reduced scale) would follow the mp=1 run instead.
    assert max(abs(a - b) for a, b in zip(results["tp"], single_runs["mp1"])) > 50 * LOSS_TOL


def test_tensor_parallel_scale_is_each_shards_own_mean(two_ranks):
    results, out = two_ranks
    model = _fresh(mp=2)
    assert load_training_checkpoint(out / "tp_final", model, None, SINGLE) == {"step": STEPS}
    for name in ("self_attn.q_proj", "self_attn.o_proj"):
        layer = model.model.layers[0].get_submodule(name)
        expected = ternarize(layer.weight, 2, layer.shard_axis)[1]
        got = torch.tensor([rank[name][0] for rank in results["tp_local_scales"]])
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        assert not torch.allclose(got[0], got[1])


def test_tensor_parallel_checkpoint_loads_in_one_process_with_identical_logits(two_ranks):
    results, out = two_ranks
    tp_logits = torch.tensor(results["tp_logits"])
    frozen = load_checkpoint(out / "tp_final")
    assert frozen.config.model_parallel_size == 2
    assert frozen.model.layers[0].self_attn.q_proj.scales.numel() == 2
    tokens = global_batch(99)[:, :-1]
    with torch.no_grad():
        torch.testing.assert_close(frozen(tokens), tp_logits, rtol=1e-5, atol=1e-5)
        latent = _fresh(mp=2)
        load_training_checkpoint(out / "tp_final", latent, None, SINGLE)
        torch.testing.assert_close(latent.eval()(tokens), tp_logits, rtol=1e-5, atol=1e-5)


def test_resume_continues_exactly_on_the_same_another_and_one_process(two_ranks, single_runs):
    results, out = two_ranks
    tail = results["tp"][SAVE_AT:]
    assert results["tp_resumed_tp"] == tail  # same mesh: bit-identical
    assert results["tp_resumed_dp"] == pytest.approx(tail, abs=LOSS_TOL)
    _, resumed_single = train(SINGLE, mp=2, resume=out / "tp_step3")
    assert resumed_single == pytest.approx(single_runs["mp2"][SAVE_AT:], abs=LOSS_TOL)


def _fresh(mp: int) -> SpectraLM:
    return SpectraLM(get_config("tiny", weight_kind="ternary", model_parallel_size=mp))


# --- `torchrun -m spectra train --dp/--tp` against the single-process loop -------------------------

TRAIN_ARGS = dict(model="tiny", steps=4, batch_size=4, seq_len=32, eval_every=0, save_every=2, log_every=1,
                  lr=1e-2, threads=1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from spectra.data import prepare_data

    root = tmp_path_factory.mktemp("train_data")
    words = "the king queen lord lady sword crown castle night day love war peace honour death life".split()
    gen = torch.Generator().manual_seed(3)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=gen).tolist()) + "."
             for _ in range(1500)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    prepare_data(root / "corpus.txt", root / "data", vocab_size=300, progress=False)
    return root


def _train_losses(run: Path) -> list[float]:
    from spectra.train import read_metrics

    return [r["loss"] for r in read_metrics(run) if r.get("split") == "train"]


def _torchrun_train(root: Path, name: str, *flags: str) -> Path:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN_ARGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "spectra", "train", "--data", str(root / "data"),
           "--out", str(root / name), "--vocab-size", "300", "--no-progress", *args, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out_flag = cmd.index("--out") + 1
    tries = iter((name, f"{name}-retry"))

    def fresh_out() -> Path:
        cmd[out_flag] = str(root / next(tries))
        return Path(cmd[out_flag])

    return _launch_two_ranks(cmd, env, fresh_out)


def test_spectra_train_cli_dp_and_tp_match_the_single_process_loop(prepared):
    import shutil

    import spectra.train as training

    root = prepared
    single = {mp: _train_losses(training.train(data=str(root / "data"), out_dir=str(root / f"single_mp{mp}"),
                                               model_overrides={"vocab_size": 300, "model_parallel_size": mp},
                                               progress=False, **TRAIN_ARGS).run_dir)
              for mp in (1, 2)}
    dp_run = _torchrun_train(root, "dp2", "--dp=2")
    tp_run = _torchrun_train(root, "tp2", "--tp=2")
    assert _train_losses(dp_run) == pytest.approx(single[1], abs=LOSS_TOL)
    assert _train_losses(tp_run) == pytest.approx(single[2], abs=LOSS_TOL)
    # The tensor-parallel checkpoint resumes in one process, keeping its 2 scales per matrix.
    copy = shutil.copytree(tp_run, root / "tp2_resumed")
    resumed = training.train(resume=copy / "checkpoints" / "step-0000002", out_dir=str(copy), tp=1)
    assert resumed.model.config.model_parallel_size == 2
    assert _train_losses(copy) == pytest.approx(_train_losses(tp_run), abs=LOSS_TOL)


def test_a_run_directory_locked_by_another_process_stops_every_rank(prepared):
    """Only rank 0 takes the run directory's lock; when it is refused the other ranks must stop too (they used
    to wait in their first collective until the process group timed out)."""
    import socket
    import time

    from spectra.train.rundir import LOCK_FILE

    root = prepared
    run = root / "locked"
    run.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "what": "a test", "since": "now"}
    (run / LOCK_FILE).write_text(json.dumps(holder) + "\n")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TRAIN_ARGS.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", "-m", "spectra", "train", "--data", str(root / "data"),
           "--out", str(run), "--vocab-size", "300", "--no-progress", "--dp=2", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    begin = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("is locked by process") == 2, proc.stderr[-3000:]  # each rank's one line
    assert time.monotonic() - begin < 100
    assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE]  # nothing written, the holder's lock kept
    assert json.loads((run / LOCK_FILE).read_text()) == holder


# --- single-process checks of the API's bad input -------------------------------------------------

def test_tensor_parallel_config_checks():
    tiny = get_config("tiny", weight_kind="ternary")
    assert config_for_tensor_parallel(tiny, 2).model_parallel_size == 2
    assert config_for_tensor_parallel(tiny.replace(model_parallel_size=4), 2).model_parallel_size == 4
    with pytest.raises(ConfigError, match="multiple of 2"):
        check_tensor_parallel(tiny.replace(model_parallel_size=3), 2)
    with pytest.raises(ConfigError, match="num_heads"):
        check_tensor_parallel(tiny, 3)
    with pytest.raises(ConfigError, match="intermediate_size"):
        check_tensor_parallel(tiny.replace(intermediate_size=174, model_parallel_size=4), 2)
    floatlm = get_config("tiny", weight_kind="float")
    assert config_for_tensor_parallel(floatlm, 2).model_parallel_size == 1
    with pytest.raises(ConfigError, match="intermediate_size"):
        check_tensor_parallel(floatlm.replace(intermediate_size=175), 2)
    with pytest.raises(ConfigError, match="kinds"):
        check_tensor_parallel(tiny.replace(weight_kind="ternary_frozen"), 2)


def test_launch_and_batch_errors(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node 4"):
        init_parallel(dp=2, tp=2)
    with pytest.raises(ConfigError, match="positive"):
        init_parallel(dp=0)
    with pytest.raises(ConfigError, match="fsdp"):
        parallelize(_fresh(1), SINGLE, dp_mode="zero3")
    ctx = ParallelContext(0, 2, 0, torch.device("cpu"), 2, 1, object())
    with pytest.raises(ConfigError, match="divisible by 2"):
        local_batch(torch.zeros(3, 5), ctx)
    assert local_batch(torch.arange(8).view(4, 2), ParallelContext(1, 2, 1, torch.device("cpu"), 2, 1,
                                                                     object())).tolist() == [[4, 5], [6, 7]]
    assert mean_over_data_parallel(torch.tensor(2.5), SINGLE).item() == 2.5


def test_single_process_training_checkpoint_round_trip(tmp_path):
    model, losses = train(SINGLE, mp=2, save_dir=tmp_path / "ckpt")
    assert len(losses) == STEPS
    assert load_checkpoint(tmp_path / "ckpt").config.model_parallel_size == 2
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        load_training_checkpoint(tmp_path, _fresh(2), None, SINGLE)
    with pytest.raises(CheckpointError, match="shape"):
        load_training_checkpoint(tmp_path / "ckpt", SpectraLM(get_config("tiny", hidden_size=32)), None, SINGLE)
    (tmp_path / "ckpt" / "train_state.safetensors").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_training_checkpoint(tmp_path / "ckpt", _fresh(2), None, SINGLE)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
