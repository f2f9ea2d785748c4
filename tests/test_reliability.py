"""Every bad input is one line on stderr and exit code 2, leaves no new file, and destroys nothing (issue 16)."""

import argparse
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import spectra
from spectra import SpectraLM, get_config, io
from spectra.checkpoint import save_checkpoint
from spectra.cli.common import _thread_count
from spectra.cli.main import main
from spectra.data import prepare_data
from spectra.errors import CheckpointError, ConfigError
from spectra.tokenizer import train_tokenizer
from spectra.train import TrainConfig, read_metrics

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 40
TRAIN = ["--model", "tiny", "--vocab-size", "300", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1",
         "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A checkpoint, a prepared dataset and a short finished run, shared by the probes (read-only)."""
    root = tmp_path_factory.mktemp("world")
    tok = train_tokenizer(TEXT, vocab_size=300)
    torch.manual_seed(0)
    ckpt = save_checkpoint(SpectraLM(get_config("tiny", vocab_size=300)), root / "ckpt", tokenizer=tok)
    (root / "corpus.txt").write_text("\n".join(TEXT))
    data = prepare_data(root / "corpus.txt", root / "data", tokenizer=tok, progress=False).path
    run = root / "run"
    assert main(["train", "--data", str(data), "--out", str(run), "--steps", "2", "--save-every", "1", *TRAIN]) == 0
    return {"root": root, "ckpt": ckpt, "data": data, "run": run, "tok": tok}


def _snapshot(root: Path) -> dict:
    """Every path under `root`, with size and mtime for files (a directory's mtime moves with a lock file)."""
    return {str(p.relative_to(root)): None if p.is_dir() else (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


def run_cli(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def _copy_ckpt(world, tmp_path, name="bad") -> Path:
    return Path(shutil.copytree(world["ckpt"], tmp_path / name))


# Each case: (id, setup(world, tmp) -> argv); the setup builds the bad input inside tmp before the snapshot.
def _truncated(world, tmp):
    c = _copy_ckpt(world, tmp)
    blob = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    return c


def _junk(world, tmp):
    c = _copy_ckpt(world, tmp)
    (c / "model.safetensors").write_bytes(os.urandom(4096))
    return c


def _index(content):
    def make(world, tmp):
        c = _copy_ckpt(world, tmp)
        (c / "model.safetensors.index.json").write_text(content)
        return c
    return make


def _config(content: bytes):
    def make(world, tmp):
        c = _copy_ckpt(world, tmp)
        (c / "config.json").write_bytes(content)
        return c
    return make


def _rope_abc(world, tmp):
    c = _copy_ckpt(world, tmp)
    config = json.loads((c / "config.json").read_text())
    config["rope_theta"] = "abc"
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": "abc"}
    (c / "config.json").write_text(json.dumps(config))
    return c


def _config_field(key, raw: str):
    def make(world, tmp):
        c = _copy_ckpt(world, tmp)
        (c / "config.json").write_text((c / "config.json").read_text().replace(
            f'"{key}": {json.dumps(json.loads((c / "config.json").read_text())[key])}', f'"{key}": {raw}'))
        return c
    return make


def _with_file(world, tmp, name, content: bytes) -> Path:
    c = _copy_ckpt(world, tmp)
    (c / name).write_bytes(content)
    return c


def _negative_scale(world, tmp):
    packed = spectra.pack_checkpoint(world["ckpt"], tmp / "tq2", "tq2") and tmp / "tq2"
    tensors = load_file(str(packed / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.scales"] *= -1
    save_file(tensors, str(packed / "model.safetensors"), metadata={"format": "pt"})
    return packed


def _other_tokenizer_data(world, tmp) -> Path:
    other = train_tokenizer(["sailing across the ocean blue, far from any shore"] * 40, vocab_size=300)
    return prepare_data(world["root"] / "corpus.txt", tmp / "other-data", tokenizer=other, progress=False).path


def _nan_weight(world, tmp):
    c = _copy_ckpt(world, tmp)
    tensors = load_file(str(c / "model.safetensors"))
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, str(c / "model.safetensors"), metadata={"format": "pt"})
    return c


def _big_tokenizer(world, tmp):
    torch.manual_seed(0)
    return save_checkpoint(SpectraLM(get_config("tiny", vocab_size=260)), tmp / "small-vocab", tokenizer=world["tok"])


def _user_dir(tmp):
    d = tmp / "proj"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    return d


def _data_copy(world, tmp, name="data") -> Path:
    return Path(shutil.copytree(world["data"], tmp / name))


def _escaping_index(world, tmp):
    """An index whose shard is another checkpoint's complete weights, one directory up."""
    _copy_ckpt(world, tmp, "other")
    c = _copy_ckpt(world, tmp)
    names = load_file(str(c / "model.safetensors")).keys()
    (c / "model.safetensors").unlink()
    (c / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../other/model.safetensors" for n in names}}))
    return c


def _escaping_data(world, tmp):
    """A dataset index whose first training shard is a complete shard outside its directory."""
    d = _data_copy(world, tmp)
    shutil.copy(d / "train-00000.bin", tmp / "outside.bin")
    index = json.loads((d / "index.json").read_text())
    index["splits"]["train"][0]["file"] = "../outside.bin"
    (d / "index.json").write_text(json.dumps(index))
    return d


def _corpus_dir(world, tmp):
    d = _user_dir(tmp)
    shutil.copy(world["root"] / "corpus.txt", d / "corpus.txt")
    return d


def _ids_beyond_vocab(world, tmp):
    d = _data_copy(world, tmp)
    shard = d / "train-00000.bin"
    np.full(shard.stat().st_size // 2, 65000, dtype=np.uint16).tofile(shard)
    return d


def _resume_without(key):
    def make(world, tmp):
        run = Path(shutil.copytree(world["run"], tmp / "run"))
        for step in (run / "checkpoints").iterdir():
            record = json.loads((step / "train_state.json").read_text())
            del record["meta"][key]
            (step / "train_state.json").write_text(json.dumps(record))
        return run
    return make


def _resume_without_tensors(prefix):
    def make(world, tmp):
        run = Path(shutil.copytree(world["run"], tmp / "run"))
        for step in (run / "checkpoints").iterdir():
            tensors = load_file(str(step / "train_state.safetensors"))
            kept = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
            save_file(kept, str(step / "train_state.safetensors"), metadata={"format": "pt"})
        return run
    return make


def _jsonl_junk(world, tmp):
    (tmp / "c.jsonl").write_bytes(b'{"text": "fine"}\n\xff\xfe{"text": "bad"}\n')
    return tmp / "c.jsonl"


def _fifo_corpus(world, tmp):
    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("\n".join(TEXT))
    os.mkfifo(corpus / "b.txt")
    return corpus


def _file(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


POINTS = ("N,D,L\n" + "".join(f"{n}M,{d}B,{2 + 100 / n ** 0.3 + 50 / d ** 0.3:.4f}\n"
                              for n in (10, 30, 100, 300) for d in (1, 3, 10, 30))).encode()


def _npy(tmp, array) -> Path:
    np.save(tmp / "c.npy", array, allow_pickle=array.dtype == object)
    return tmp / "c.npy"


def _index_list(world, tmp):
    d = _data_copy(world, tmp)
    (d / "index.json").write_text("[]")
    return d


CASES = {
    "pack truncated safetensors": lambda w, t: ["pack", _truncated(w, t), "--format", "tq2", "--out",
                                                t / "new" / "deep" / "o"],
    "info truncated safetensors": lambda w, t: ["info", _truncated(w, t)],
    "info junk safetensors": lambda w, t: ["info", _junk(w, t)],
    "pack junk safetensors": lambda w, t: ["pack", _junk(w, t), "--format", "tq1", "--out", t / "o"],
    "generate junk safetensors": lambda w, t: ["generate", _junk(w, t), "--device", "cpu"],
    "info malformed index.json": lambda w, t: ["info", _index("{")(w, t)],
    "generate index without weight_map": lambda w, t: ["generate", _index('{"metadata": {}}')(w, t)],
    "index shard ../": lambda w, t: ["generate", _escaping_index(w, t), "--device", "cpu"],
    "index shard absolute": lambda w, t: ["info", _index(json.dumps(
        {"weight_map": {"a": str(w["ckpt"] / "model.safetensors")}}))(w, t)],
    "config.json is a list": lambda w, t: ["info", _config(b"[1, 2]")(w, t)],
    "config.json not UTF-8": lambda w, t: ["generate", _config(b'{"vocab_size": "\xff\xfe"}')(w, t)],
    "config.json rope_theta abc": lambda w, t: ["info", _rope_abc(w, t)],
    "config.json rms_norm_eps NaN (gave NaN logits)": lambda w, t: ["generate", _config_field("rms_norm_eps", "NaN")(
        w, t), "--device", "cpu"],
    "info of a missing path (was 'unknown model size')": lambda w, t: ["info", t / "nope"],
    "TQ2 checkpoint with a negative scale (loaded, flipped the layer)": lambda w, t: ["generate", _negative_scale(
        w, t), "--device", "cpu"],
    "NaN weight (generate)": lambda w, t: ["generate", _nan_weight(w, t), "--device", "cpu"],
    "NaN weight (eval ppl)": lambda w, t: ["eval", "ppl", _nan_weight(w, t), "--data", w["data"], "--device", "cpu"],
    "tokenizer larger than vocab (generate)": lambda w, t: ["generate", _big_tokenizer(w, t), "--device", "cpu"],
    "tokenizer larger than vocab (pack)": lambda w, t: ["pack", _big_tokenizer(w, t), "--format", "tq2",
                                                        "--out", t / "o"],
    "pack --out is a parent of the source": lambda w, t: ["pack", _copy_ckpt(w, t, "proj/ckpt"), "--format", "tq1",
                                                          "--out", t / "proj", "--force"],
    "pack --out is a user directory": lambda w, t: ["pack", w["ckpt"], "--format", "tq1", "--out", _user_dir(t)],
    "quantize --out is a user directory": lambda w, t: ["quantize", w["ckpt"], "--method", "rtn", "--device", "cpu",
                                                        "--out", _user_dir(t)],
    "export gguf --out is a foreign file": lambda w, t: ["export", "gguf", w["ckpt"], "--type", "tq2_0", "--out",
                                                         _user_dir(t) / "notes.txt"],
    "export gguf --out is a directory": lambda w, t: ["export", "gguf", w["ckpt"], "--type", "tq2_0", "--out", t],
    "eval --out is a foreign file": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", w["data"], "--device", "cpu",
                                                  "--out", _user_dir(t) / "notes.txt"],
    "plot --out is a foreign file": lambda w, t: ["plot", w["run"], "--out", _user_dir(t) / "notes.txt"],
    "scaling plot --out is a foreign file": lambda w, t: ["scaling", "plot", "--out", _user_dir(t) / "notes.txt"],
    "data prepare --out is a user directory": lambda w, t: ["data", "prepare", w["root"] / "corpus.txt", "--out",
                                                            _user_dir(t), "--tokenizer", w["ckpt"], "--no-progress"],
    "data prepare --out inside the input": lambda w, t: ["data", "prepare", _corpus_dir(w, t), "--out",
                                                         t / "proj" / "d",
                                                         "--tokenizer", w["ckpt"], "--no-progress"],
    "data prepare junk bytes in .jsonl": lambda w, t: ["data", "prepare", _jsonl_junk(w, t), "--out", t / "d",
                                                       "--tokenizer", w["ckpt"], "--no-progress"],
    "data prepare FIFO in corpus": lambda w, t: ["data", "prepare", _fifo_corpus(w, t), "--out", t / "d",
                                                 "--tokenizer", w["ckpt"], "--no-progress"],
    "train --lr nan": lambda w, t: ["train", "--data", w["data"], "--out", t / "r", "--lr", "nan", *TRAIN],
    "train token ids >= vocab, new nested --out": lambda w, t: ["train", "--data", _ids_beyond_vocab(w, t), "--out",
                                                                t / "new" / "deep" / "r", *TRAIN],
    "train --threads -1": lambda w, t: ["train", "--data", w["data"], "--out", t / "r", "--threads", "-1", *TRAIN],
    "train --device banana": lambda w, t: ["train", "--data", w["data"], "--out", t / "r", *TRAIN, "--device",
                                           "banana"],
    "train --out is a file": lambda w, t: ["train", "--data", w["data"], "--out", _user_dir(t) / "notes.txt", *TRAIN],
    "train --out is a user directory": lambda w, t: ["train", "--data", w["data"], "--out", _user_dir(t), *TRAIN],
    "train --out inside --data": lambda w, t: ["train", "--data", _data_copy(w, t), "--out", t / "data" / "r", *TRAIN],
    "train --steps abc (argparse)": lambda w, t: ["train", "--data", w["data"], "--out", t / "r", "--steps", "abc"],
    "train token ids >= vocab": lambda w, t: ["train", "--data", _ids_beyond_vocab(w, t), "--out", t / "r", *TRAIN],
    "train data index shard ../": lambda w, t: ["train", "--data", _escaping_data(w, t), "--out", t / "r", "--steps",
                                                "1", *TRAIN],
    "data index.json is a list": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", _index_list(w, t), "--device",
                                               "cpu"],
    "generate --temperature nan": lambda w, t: ["generate", w["ckpt"], "--temperature", "nan", "--device", "cpu"],
    "generate --max-new-tokens -1": lambda w, t: ["generate", w["ckpt"], "--max-new-tokens", "-1", "--device", "cpu"],
    "plot of a junk metrics.jsonl": lambda w, t: ["plot", _file(t / "m" / "metrics.jsonl", b"{junk\n"), "--out",
                                                  t / "l.png"],
    "scaling fit of a binary CSV": lambda w, t: ["scaling", "fit", _file(t / "p.csv", b"\xff\xfe\x00" * 40)],
    "scaling plot --law that is a list": lambda w, t: ["scaling", "plot", "--law", _file(t / "l.json", b"[1]"),
                                                       "--out", t / "s.png"],
    "compare of a non-UTF-8 result": lambda w, t: ["compare", _file(t / "r.json", b"\xff\xfe"), "--out-dir", t / "c"],
    "eval --out under a file": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", w["data"], "--device", "cpu",
                                             "--out", _user_dir(t) / "notes.txt" / "r.json"],
    "train --export under a file": lambda w, t: ["train", "--data", w["data"], "--out", t / "r", *TRAIN, "--export",
                                                 _user_dir(t) / "notes.txt" / "e"],
    "resume state without loader": lambda w, t: ["train", "--resume", _resume_without("loader")(w, t), "--steps", "4"],
    "resume state without config": lambda w, t: ["train", "--resume", _resume_without("config")(w, t), "--steps", "4"],
    "resume state without optim::": lambda w, t: ["train", "--resume", _resume_without_tensors("optim::")(w, t),
                                                  "--steps", "4"],
    "resume state without rng::": lambda w, t: ["train", "--resume", _resume_without_tensors("rng::")(w, t),
                                                "--steps", "4"],
    # An output over or inside an input is refused even with --force (it used to overwrite the input).
    "eval --out = its --data file, --force": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", _file(
        t / "d.txt", "\n".join(TEXT).encode()), "--device", "cpu", "--out", t / "d.txt", "--force"],
    "scaling fit --out = its points CSV, --force": lambda w, t: ["scaling", "fit", _file(t / "p.csv", POINTS),
                                                                 "--out", t / "p.csv", "--force"],
    "analyze --json = the checkpoint's config.json, --force": lambda w, t: [
        "analyze", "weights", _copy_ckpt(w, t), "--plot", t / "w.png", "--json", t / "bad" / "config.json",
        "--force"],
    "analyze --plot inside the checkpoint": lambda w, t: ["analyze", "weights", _copy_ckpt(w, t), "--plot",
                                                          t / "bad" / "w.png"],
    "plot --out inside the run": lambda w, t: ["plot", shutil.copytree(w["run"], t / "run"), "--out",
                                               t / "run" / "loss.png"],
    # Both outputs are checked before the work (the plot used to be written, then the JSON refused).
    "analyze --json a foreign file": lambda w, t: ["analyze", "weights", w["ckpt"], "--plot", t / "w.png",
                                                   "--json", _user_dir(t) / "notes.txt"],
    "analyze --json = --plot": lambda w, t: ["analyze", "weights", w["ckpt"], "--plot", t / "w.png", "--json",
                                             t / "w.png"],
    "scaling fit --out = --plot": lambda w, t: ["scaling", "fit", _file(t / "p.csv", POINTS), "--out", t / "x.png",
                                                "--plot", t / "x.png"],
    # A figure suffix matplotlib cannot write (an unexpected ValueError, exit 1).
    "plot --out loss.txt": lambda w, t: ["plot", w["run"], "--out", t / "loss.txt"],
    "scaling plot --out s.json": lambda w, t: ["scaling", "plot", "--out", t / "s.json"],
    "scaling fit --plot p.txt": lambda w, t: ["scaling", "fit", _file(t / "p.csv", POINTS), "--plot", t / "p.txt"],
    # Loaders that raised an unexpected error (exit 1) or read nonsense silently.
    "eval ppl .npy of junk bytes": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", _file(t / "c.npy", b"junk"),
                                                 "--device", "cpu"],
    "eval ppl .npy of floats (were truncated to ids)": lambda w, t: ["eval", "ppl", w["ckpt"], "--data",
                                                                     _npy(t, np.random.rand(500)), "--device", "cpu"],
    "quantize --calib .npy of objects": lambda w, t: ["quantize", w["ckpt"], "--calib", _npy(
        t, np.array([{"a": 1}], dtype=object)), "--device", "cpu", "--out", t / "q"],
    "eval ppl .jsonl text 5": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", _file(t / "e.jsonl", b'{"text": 5}'),
                                            "--device", "cpu"],
    "eval ppl .jsonl not UTF-8": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", _file(t / "e.jsonl", b"\xff\n"),
                                               "--device", "cpu"],
    "eval ppl --max-tokens -5 (was a slice)": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", w["data"],
                                                            "--device", "cpu", "--max-tokens", "-5"],
    "finetune .jsonl not UTF-8": lambda w, t: ["finetune", w["ckpt"], "--data", _file(t / "j.jsonl", b"\xff\xfe"),
                                               "--out", t / "r", "--device", "cpu"],
    "quantize --batch-size 0": lambda w, t: ["quantize", w["ckpt"], "--calib", w["root"] / "corpus.txt",
                                             "--batch-size", "0", "--device", "cpu", "--out", t / "q"],
    "quantize --seq-len 0 (was the default)": lambda w, t: ["quantize", w["ckpt"], "--calib", w["root"] / "corpus.txt",
                                                            "--seq-len", "0", "--device", "cpu", "--out", t / "q"],
    "data instructions --count 0": lambda w, t: ["data", "instructions", "--out", t / "i.jsonl", "--count", "0"],
    "data instructions --count -1 (wrote pairs)": lambda w, t: ["data", "instructions", "--out", t / "i.jsonl",
                                                                "--count", "-1"],
    "data prepare --vocab-size 1e10 (aborted)": lambda w, t: ["data", "prepare", w["root"] / "corpus.txt", "--out",
                                                              t / "d", "--vocab-size", "10000000000", "--no-progress"],
    "analyze --bins 1e11 (out of memory)": lambda w, t: ["analyze", "weights", w["ckpt"], "--plot", t / "w.png",
                                                         "--bins", "100000000000"],
    # Devices, seeds and prompts that raised unexpected errors (exit 1) or were ignored.
    "generate --device banana": lambda w, t: ["generate", w["ckpt"], "--device", "banana"],
    "generate --device mps": lambda w, t: ["generate", w["ckpt"], "--device", "mps"],
    "generate --device meta": lambda w, t: ["generate", w["ckpt"], "--device", "meta"],
    "eval ppl --device meta": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", w["data"], "--device", "meta"],
    "generate --seed 2**70": lambda w, t: ["generate", w["ckpt"], "--device", "cpu", "--seed", str(2**70)],
    "train --seed 2**70": lambda w, t: ["train", "--data", w["data"], "--out", t / "r", *TRAIN, "--seed", str(2**70)],
    "demo --seed -1": lambda w, t: ["demo", "--out", t / "d", "--quick", "--seed", "-1"],
    # Settings checked only once work had started, leaving files behind.
    "finetune --lora-alpha nan (a NaN loss at step 1)": lambda w, t: [
        "finetune", w["ckpt"], "--data", _file(t / "j.jsonl", b'{"prompt": "a", "response": "b"}'), "--out", t / "r",
        "--method", "lora", "--lora-alpha", "nan", "--device", "cpu"],
    "convert --teacher --temperature nan": lambda w, t: ["convert", w["ckpt"], "--data", w["data"], "--out", t / "r",
                                                         "--teacher", "--temperature", "nan", "--device", "cpu"],
    "demo --steps 0 (wrote OUT/data first)": lambda w, t: ["demo", "--out", t / "d", "--quick", "--steps", "0",
                                                          "--no-progress"],
    "demo --threads 0 (wrote OUT/data first)": lambda w, t: ["demo", "--out", t / "d", "--quick", "--threads", "0",
                                                            "--no-progress"],
    "train --resume --steps below the run's step (rewrote run.json)": lambda w, t: [
        "train", "--resume", shutil.copytree(w["run"], t / "run"), "--steps", "1"],
    "finetune with a junk tokenizer_config.json": lambda w, t: [
        "finetune", _with_file(w, t, "tokenizer_config.json", b"{junk"), "--data", w["root"] / "corpus.txt", "--out",
        t / "r", "--device", "cpu"],
    "finetune with an invalid chat_template": lambda w, t: [
        "finetune", _with_file(w, t, "tokenizer_config.json", b'{"chat_template": "{% for %}"}'), "--data", _file(
            t / "c.jsonl", b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}'),
        "--out", t / "r", "--device", "cpu"],
    "plot of a record with loss 'x'": lambda w, t: ["plot", _file(t / "m" / "metrics.jsonl", b'{"split": "train", '
                                                    b'"step": 1, "loss": "x"}\n'), "--out", t / "l.png"],
    "compare of a result whose parameters is a string": lambda w, t: ["compare", _file(t / "r.json", json.dumps(
        {"format": "spectra-eval/1", "model": {"name": "a", "family": "TriLM", "parameters": "x", "size_bits": 1},
         "metrics": {"m": 1}}).encode()), "--out-dir", t / "c"],
    "demo --out holding the user's summary.json (was overwritten)": lambda w, t: [
        "demo", "--out", _file(t / "d" / "summary.json", b"my summary").parent, "--quick", "--no-progress"],
    "demo --out holding the user's loss.png (refused after training)": lambda w, t: [
        "demo", "--out", _file(t / "d" / "loss.png", b"my plot").parent, "--quick", "--no-progress"],
    "finetune --out inside its --data (left finetune.json there)": lambda w, t: [
        "finetune", w["ckpt"], "--data", _data_copy(w, t), "--out", t / "data" / "r", "--device", "cpu"],
    "convert --out inside the checkpoint": lambda w, t: ["convert", _copy_ckpt(w, t), "--data", w["data"], "--out",
                                                         t / "bad" / "r", "--device", "cpu"],
    "train --out inside the --model checkpoint it starts from": lambda w, t: [
        "train", "--data", w["data"], "--model", _copy_ckpt(w, t), "--out", t / "bad" / "r", *TRAIN[4:]],
    # Data tokenized with another tokenizer of the same size: ids that mean other text (ran silently).
    "eval ppl on data of another tokenizer": lambda w, t: ["eval", "ppl", w["ckpt"], "--data", _other_tokenizer_data(
        w, t), "--device", "cpu"],
    "train from a checkpoint on data of another tokenizer": lambda w, t: [
        "train", "--data", _other_tokenizer_data(w, t), "--model", w["ckpt"], "--out", t / "r", *TRAIN[4:]],
    "finetune a checkpoint on data of another tokenizer": lambda w, t: [
        "finetune", w["ckpt"], "--data", _other_tokenizer_data(w, t), "--out", t / "r", "--device", "cpu"],
    "generate a prompt of undecodable bytes": lambda w, t: ["generate", w["ckpt"], "--device", "cpu", "--prompt",
                                                            b"caf\xe9".decode("utf-8", "surrogateescape")],
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_no_new_files(world, tmp_path, capsys, case):
    argv = CASES[case](world, tmp_path)
    before = _snapshot(tmp_path)
    world_before = _snapshot(world["root"])
    code, err = run_cli(argv, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spectra"), err
    assert "Traceback" not in err
    assert _snapshot(tmp_path) == before  # nothing written, nothing removed
    assert _snapshot(world["root"]) == world_before


def test_pack_refuses_then_force_replaces_and_own_output_is_replaced(world, tmp_path, capsys):
    out = _user_dir(tmp_path)
    code, err = run_cli(["pack", world["ckpt"], "--format", "tq1", "--out", out], capsys)
    assert code == 2 and "--force" in err and (out / "notes.txt").read_text() == "my notes"
    assert run_cli(["pack", world["ckpt"], "--format", "tq1", "--out", out, "--force"], capsys)[0] == 0
    assert not (out / "notes.txt").exists() and io.output_owner(out) == "pack"
    assert run_cli(["pack", world["ckpt"], "--format", "tq2", "--out", out], capsys)[0] == 0  # its own output
    assert json.loads((out / "config.json").read_text())["spectra"]["weight_kind"] == "tq2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proj"]  # no temporaries, no lock left behind


def test_a_second_writer_is_refused(world, tmp_path, capsys):
    out = tmp_path / "packed"
    with io.output_lock(out, "pack"):
        code, err = run_cli(["pack", world["ckpt"], "--format", "tq1", "--out", out], capsys)
    assert code == 2 and "locked by process" in err and not out.exists()
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    with io.hold_lock(run / ".spectra-lock", "test"):
        code, err = run_cli(["train", "--resume", run, "--steps", "3"], capsys)
    assert code == 2 and "locked by process" in err


def test_disk_full_is_one_line_and_keeps_the_previous_output(world, tmp_path, capsys, monkeypatch):
    out = tmp_path / "packed"
    assert run_cli(["pack", world["ckpt"], "--format", "tq1", "--out", out], capsys)[0] == 0
    before = _snapshot(tmp_path)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out))
    monkeypatch.setattr("spectra.checkpoint.save_file", full)
    code, err = run_cli(["pack", world["ckpt"], "--format", "tq2", "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no space left" in err
    assert _snapshot(tmp_path) == before


def test_unexpected_error_is_one_line_unless_debug(world, capsys, monkeypatch):
    monkeypatch.setattr("spectra.cli.info.info", lambda source: {}["boom"])
    code, err = run_cli(["info", world["ckpt"]], capsys)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "SPECTRA_DEBUG=1" in err
    monkeypatch.setenv("SPECTRA_DEBUG", "1")
    with pytest.raises(KeyError):
        main(["info", str(world["ckpt"])])


def test_nonfinite_weights_load_with_the_flag(world, tmp_path):
    bad = _nan_weight(world, tmp_path)
    with pytest.raises(CheckpointError, match="model.norm.weight holds 1 NaN"):
        spectra.load_checkpoint(bad)
    model = spectra.load_checkpoint(bad, allow_nonfinite=True)
    assert torch.isnan(model.model.norm.weight).sum() == 1


def test_resume_of_a_finished_run_adds_no_final_record_and_paths_are_absolute(world, tmp_path, capsys, monkeypatch):
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    metrics = (run / "metrics.jsonl").read_text()
    assert [r["split"] for r in read_metrics(run)].count("final") == 1
    monkeypatch.chdir(tmp_path)
    assert run_cli(["train", "--resume", "run"], capsys)[0] == 0
    assert (run / "metrics.jsonl").read_text() == metrics  # finished: nothing appended
    assert run_cli(["train", "--resume", "run", "--steps", "3"], capsys)[0] == 0
    records = read_metrics(run)
    assert [r["step"] for r in records if r["split"] == "final"] == [3]  # continued: one end record, the new one
    config = json.loads((run / "run.json").read_text())["config"]
    assert all(Path(config[k]).is_absolute() for k in ("data", "out_dir"))
    # A relative --data given to a new run is stored absolute.
    shutil.copytree(world["data"], tmp_path / "d")
    assert run_cli(["train", "--data", "d", "--out", "new", "--steps", "1", *TRAIN], capsys)[0] == 0
    saved = json.loads((tmp_path / "new" / "run.json").read_text())["config"]
    assert saved["data"] == str(tmp_path / "d") and saved["out_dir"] == str(tmp_path / "new")


def test_a_run_killed_before_its_first_checkpoint_starts_over_and_its_stale_lock_is_taken(world, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"split": "train", "step": 7, "loss": 9.0}\n')
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # the killed trainer
    (run / ".spectra-lock").write_text(json.dumps({"pid": pid, "host": io._host(), "what": "training run"}))
    code, err = run_cli(["train", "--data", world["data"], "--out", run, "--steps", "1", *TRAIN], capsys)
    assert code == 0, err
    assert max(r["step"] for r in read_metrics(run)) == 1 and not (run / ".spectra-lock").exists()


def test_out_given_as_dot_dotdot_or_root_is_one_line(world, tmp_path, capsys, monkeypatch):
    # '.' and 'ckpt/..' have no name to derive the lock and staging siblings from; they are refused as the
    # source's parent, and '/' as the file system's root, before anything is written.
    _copy_ckpt(world, tmp_path, "proj/ckpt")
    monkeypatch.chdir(tmp_path / "proj")
    before = _snapshot(tmp_path)
    for out in (".", "ckpt/..", "/"):
        code, err = run_cli(["pack", "ckpt", "--format", "tq1", "--out", out], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (out, err)
    assert _snapshot(tmp_path) == before


def test_thread_counts_are_bounded(world, tmp_path):
    # torch.set_num_threads(100_000) crashed the process (segmentation fault) instead of an error line; the
    # check must come before torch sees the number, so it is made on the option and on the config alone.
    with pytest.raises(argparse.ArgumentTypeError, match="1 to 1024 threads"):
        _thread_count("100000")
    with pytest.raises(ConfigError, match="threads must be an integer from 1 to 1024"):
        TrainConfig(data=str(world["data"]), out_dir=str(tmp_path / "r"), threads=100_000)


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                 "allocate 512000000000 bytes"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"),
    MemoryError()])
def test_out_of_memory_is_one_line_and_exit_2(world, capsys, monkeypatch, error):
    # e.g. `train --vocab-size 2000000000` or `analyze weights 3.9B` on a small machine: exit 1, "a bug".
    def allocate(source):
        raise error
    monkeypatch.setattr("spectra.cli.info.info", allocate)
    code, err = run_cli(["info", world["ckpt"]], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "out of memory" in err and "bug" not in err
