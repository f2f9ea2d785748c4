"""The training-step memory estimate and the check that refuses a run the device cannot hold, before anything
is allocated or written (spectra.train.memory)."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import spectra.train.loop as loop
import spectra.train.memory as memory
from spectra import SpectraLM, get_config
from spectra.checkpoint import save_checkpoint
from spectra.cli.main import main
from spectra.data import TokenDataset, prepare_data
from spectra.distributed import ParallelContext, first_refusal
from spectra.errors import DeviceError
from spectra.finetune import FinetuneConfig, finetune
from spectra.size import count_parameters
from spectra.tokenizer import train_tokenizer
from spectra.train import TrainConfig, train
from spectra.train.memory import estimate_step_memory, training_memory_refusal
from spectra.train.step import build_loaders

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 60
TINY = dict(model="tiny", model_overrides={"vocab_size": 300}, seq_len=16, batch_size=2, eval_batches=1,
            progress=False, device="cpu", threads=1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    tok = train_tokenizer(TEXT, vocab_size=300)
    (root / "corpus.txt").write_text("\n".join(TEXT))
    data = prepare_data(root / "corpus.txt", root / "data", tokenizer=tok, progress=False).path
    torch.manual_seed(0)
    ckpt = save_checkpoint(SpectraLM(get_config("tiny", vocab_size=300)), root / "ckpt", tokenizer=tok)
    examples = root / "ex.jsonl"
    examples.write_text("".join(json.dumps({"prompt": t, "response": t[::-1]}) + "\n" for t in TEXT[:40]))
    return {"root": root, "data": str(data), "ckpt": str(ckpt), "examples": str(examples)}


def _no_model_built(*args, **kwargs):
    raise AssertionError("the model was built before the memory check refused the run")


def test_an_absurd_batch_is_one_line_exit_2_and_nothing_is_written(world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "build_model", _no_model_built)  # without the check: the kernel's OOM killer
    out = tmp_path / "new" / "run"
    code = main(["train", "--data", world["data"], "--out", str(out), "--model", "tiny", "--vocab-size", "300",
                 "--batch-size", "10000000", "--seq-len", "200", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "10000000 x 200 tokens needs about" in err[0] and "of memory available" in err[0]
    assert "lower --batch-size" in err[0] and "--grad-accum" in err[0] and "--skip-memory-check" in err[0]
    assert not (tmp_path / "new").exists()  # no run directory, run.json or lock


def test_a_step_larger_than_the_free_memory_is_refused_and_the_override_runs_it(world, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(DeviceError, match=r"2 x 16 tokens needs about .* but cpu has 1\.0 MB"):
        train(data=world["data"], out_dir=str(tmp_path / "r"), steps=1, **TINY)
    assert not (tmp_path / "r").exists()
    result = train(data=world["data"], out_dir=str(tmp_path / "r"), steps=1, skip_memory_check=True, **TINY)
    assert result.step == 1 and json.loads((tmp_path / "r" / "run.json").read_text())["config"]["skip_memory_check"]
    # the override was for that start on this machine: resuming checks again unless it is given again
    with pytest.raises(DeviceError, match="needs about"):
        train(resume=str(tmp_path / "r"), steps=2)
    assert train(resume=str(tmp_path / "r"), steps=2, skip_memory_check=True).step == 2


@pytest.mark.parametrize("dp", [1, 2, 4])
def test_the_suggested_batch_fits_and_suits_the_ranks(dp):
    config = get_config("mini")
    estimate = estimate_step_memory(config, 4096, 512, dp=dp)
    available = estimate.total // 7
    line = memory.memory_refusal(estimate, available, torch.device("cpu"), 4096, 512, grad_accum=2, dp=dp)
    fits = int(line.split("--batch-size ")[2].split()[0])
    accum = int(line.split("--grad-accum ")[1].split()[0])
    assert fits % dp == 0 and fits * accum >= 4096 * 2
    assert estimate_step_memory(config, fits, 512, dp=dp).total <= available
    assert memory.memory_refusal(estimate, estimate.total, torch.device("cpu"), 4096, 512, 1) is None
    # a model whose state alone is too big is told so, not to lower the batch
    line = memory.memory_refusal(estimate, estimate.model_state // 2, torch.device("cpu"), 4096, 512, 1)
    assert "alone do not fit" in line and "--batch-size" not in line.split("; ")[1]


def test_a_tiny_run_fits_the_real_machine(world, tmp_path):
    cfg = TrainConfig(data=world["data"], out_dir=str(tmp_path / "r"), steps=1, **TINY)
    assert training_memory_refusal(cfg, torch.device("cpu")) is None
    assert train(cfg).step == 1


def test_finetune_is_refused_before_it_loads_the_base_or_writes_finetune_json(world, tmp_path, monkeypatch):
    from spectra.finetune import run as finetune_run

    monkeypatch.setattr(memory, "available_memory", lambda device: 2**20)
    monkeypatch.setattr(finetune_run, "load_checkpoint", _no_model_built)
    for method in ("lora", "full", "convert"):
        task = FinetuneConfig(checkpoint=world["ckpt"], method=method)
        with pytest.raises(DeviceError, match="needs about"):
            finetune(task, data=world["examples"], out_dir=str(tmp_path / "ft"), steps=1, batch_size=2, seq_len=32,
                     device="cpu", progress=False, echo=lambda *a: None)
    assert not (tmp_path / "ft").exists()


@pytest.fixture(scope="module")
def checkpoints(world, tmp_path_factory):
    from spectra.convert import pack_model

    root = tmp_path_factory.mktemp("kinds")
    torch.manual_seed(1)
    float_model = SpectraLM(get_config("tiny", vocab_size=300, weight_kind="float"))
    packed = pack_model(SpectraLM(get_config("tiny", vocab_size=300)).eval(), "tq1")
    return {"ternary": world["ckpt"], "float": str(save_checkpoint(float_model, root / "float")),
            "tq1": str(save_checkpoint(packed, root / "tq1"))}


@pytest.mark.parametrize("stored", ["ternary", "float", "tq1"])
@pytest.mark.parametrize("method", ["lora", "full", "convert"])
def test_the_planned_finetune_model_has_the_built_models_sizes(checkpoints, method, stored):
    from spectra.finetune import run as finetune_run

    if method == "convert" and stored != "float":
        pytest.skip("conversion starts from a float model")
    task = FinetuneConfig(checkpoint=checkpoints[stored], method=method)
    kind = finetune_run._training_kind(task)
    planned = finetune_run.planned_model(task, kind)
    built = finetune_run.build_model(task, kind, torch.device("cpu"))

    def sizes(model):
        params = list(model.parameters())
        return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                sum(b.numel() * b.element_size() for b in model.buffers()), model.config.weight_kind)

    assert all(p.device.type == "meta" for p in planned.parameters())
    assert sizes(planned) == sizes(built)


def test_the_estimate_grows_with_what_a_step_holds():
    config = get_config("mini")
    base = estimate_step_memory(config, 8, 256)
    assert estimate_step_memory(config, 16, 256).total > base.total
    assert estimate_step_memory(config, 8, 512).total > base.total
    assert estimate_step_memory(config.replace(vocab_size=32000), 8, 256).logits == 8 * 256 * 32000 * 16
    assert estimate_step_memory(config, 8, 256, bf16=True).activations < base.activations
    # LoRA: a frozen base has no gradients or AdamW moments
    lora = estimate_step_memory(config, 8, 256, trainable=1000)
    assert lora.optimizer == 8000 and lora.gradients == 4000 and lora.weights == base.weights
    # FSDP shards the parameter state and splits the batch; DDP keeps both whole plus its gradient buckets
    fsdp, ddp = estimate_step_memory(config, 8, 256, dp=2), estimate_step_memory(config, 8, 256, dp=2, fsdp=False)
    assert fsdp.optimizer == base.optimizer // 2 and fsdp.activations == base.activations // 2
    assert ddp.optimizer == base.optimizer and ddp.gradients == 2 * base.gradients
    # every parameter of a built model is counted
    assert count_parameters(config).total == sum(p.numel() for p in SpectraLM(config).parameters())
    assert "activations" in base.describe()
    # fine-tuning's packed rows attend under a [B, 1, t, t] mask; pretraining windows do not
    packed = estimate_step_memory(config, 8, 256, document_masks=True)
    assert base.masks == 0 and packed.masks >= 8 * 8 * 256**2 and packed.total > base.total


CASES = [[None, "rank 1 has too little memory"], ["rank 0 first", "rank 1"], [None, None]]  # text of rank 0, 1


@pytest.mark.parametrize("batch_size, seq_len, eval_batches", [(2, 16, 1), (3, 7, 4), (1000, 16, 20), (5, 64, 3)])
def test_the_fixed_evaluation_rows_are_those_the_loaders_keep(world, batch_size, seq_len, eval_batches):
    cfg = TrainConfig(data=world["data"], out_dir="unused", batch_size=batch_size, eval_batches=eval_batches)
    dataset = TokenDataset(world["data"])
    _, val, fixed = build_loaders(cfg, dataset, seq_len)
    assert memory.fixed_eval_rows(cfg, dataset, seq_len) == sum(len(b[0]) for b in val + fixed)


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        ctx = ParallelContext(rank, 2, rank, torch.device("cpu"), 2, 1, object())  # any mesh: "distributed"
        results[rank] = [first_refusal(ctx, texts[rank]) for texts in CASES]
    finally:
        dist.destroy_process_group()


def test_one_ranks_refusal_reaches_every_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.Manager().dict()
    mp.spawn(_rank, args=(port, results), nprocs=2)
    expected = [next((t for t in texts if t is not None), None) for texts in CASES]
    assert results[0] == results[1] == expected
