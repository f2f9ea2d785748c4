"""config.json is checked against the safetensors headers before anything is allocated (spectra/tensor_table.py)."""

import json
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from spectra import CheckpointError, SpectraLM, get_config
from spectra.checkpoint import load_checkpoint, save_checkpoint
from spectra.cli.main import main
from spectra.convert import pack_model
from spectra.tensor_table import IgnoredTensorWarning, read_header

ROOT = Path(__file__).resolve().parents[1]


def _saved(tmp_path, kind="float", name="ckpt") -> Path:
    torch.manual_seed(0)
    model = SpectraLM(get_config("tiny", weight_kind=kind)).eval()
    return save_checkpoint(model, tmp_path / name)


def _edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("flag,tensor", [("attention_bias", "self_attn.k_proj.bias"),
                                         ("mlp_bias", "mlp.down_proj.bias")])
def test_transformers_checkpoint_with_biases_is_refused_naming_them(tmp_path, flag, tensor):
    transformers = pytest.importorskip("transformers")
    cfg = get_config("tiny", weight_kind="float")
    hf_config = transformers.LlamaConfig(**{**{k: v for k, v in cfg.to_hf_dict().items() if k != "spectra"},
                                            flag: True})
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(hf_config)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_()  # nonzero biases: dropping them would change the logits
    hf.save_pretrained(str(tmp_path / "hf"))
    with pytest.raises(CheckpointError,
                       match=rf"bias tensor\(s\) \(model\.layers\.0\.{tensor}.*attention_bias or mlp_bias"):
        load_checkpoint(tmp_path / "hf")


def test_unconsumed_tensor_is_an_error_and_rotary_cache_a_named_warning(tmp_path):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda t: t.update({"model.layers.1.self_attn.rotary_emb.inv_freq": torch.rand(8)}))
    with pytest.warns(IgnoredTensorWarning, match=r"1 saved rotary-embedding cache.*layers\.1\.self_attn\.rotary_emb"):
        load_checkpoint(path)
    _edit_tensors(path, lambda t: t.update({"model.layers.0.mlp.extra_scale": torch.rand(3)}))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) the model would not use \(model\.layers\.0\.mlp\.extra"):
        load_checkpoint(path)


def test_wrong_shape_dtype_and_missing_tensor_name_the_tensor(tmp_path):
    path = _saved(tmp_path)
    _edit_tensors(path, lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.rand(64, 32)}))
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.q_proj\.weight has shape \[64, 32\] but "
                                              r"config\.json implies \[64, 64\]"):
        load_checkpoint(path)
    _edit_tensors(path, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 tensor\(s\) .*\(model\.layers\.1\.self_attn\.q_proj\.weight\)"):
        load_checkpoint(path)
    packed = SpectraLM(get_config("tiny", weight_kind="ternary")).eval()
    path = save_checkpoint(pack_model(packed, "tq2"), tmp_path / "tq2")
    _edit_tensors(path, lambda t: t.update({"model.layers.0.mlp.up_proj.qweight":
                                            t["model.layers.0.mlp.up_proj.qweight"].to(torch.int32)}))
    with pytest.raises(CheckpointError, match=r"up_proj\.qweight is stored as torch\.int32 .* holds torch\.uint8"):
        load_checkpoint(path)


def test_header_is_checked_against_the_file_size(tmp_path):
    path = _saved(tmp_path)
    file = path / "model.safetensors"
    data = file.read_bytes()
    assert set(read_header(file)) >= {"model.embed_tokens.weight", "lm_head.weight"}
    file.write_bytes(data[:-10])  # tensor data cut short
    with pytest.raises(CheckpointError, match="lm_head.weight|truncated"):
        read_header(file)
    file.write_bytes((10**12).to_bytes(8, "little") + data[8:100])  # a header length beyond the file
    with pytest.raises(CheckpointError, match=r"header claims 1000000000000 bytes but the file holds 100"):
        load_checkpoint(path)
    file.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short for a safetensors file"):
        load_checkpoint(path)


# Absurd sizes on a tiny checkpoint: each must fail fast with one line, under an address-space cap of a few
# hundred MB above what the interpreter already holds (before the check, intermediate_size 1e7 took 4.1 GB).
ABSURD = [({"vocab_size": 10**11}, r"embed_tokens\.weight has shape \[1024, 64\] but config\.json implies "
                                   r"\[100000000000, 64\]"),
          ({"num_hidden_layers": 10**8}, r"implies [\d,]+ parameters .* but the weight files hold"),
          ({"intermediate_size": 10**7}, r"implies [\d,]+ parameters .* but the weight files hold"),
          ({"num_hidden_layers": 3}, r"num_hidden_layers = 3 but the weights hold layers 0\.\.1"),
          ({"hidden_size": 128, "num_attention_heads": 4}, r"embed_tokens\.weight has shape \[1024, 64\]")]

_CAPPED = textwrap.dedent("""
    import resource, sys
    import spectra
    from spectra.checkpoint import load_checkpoint
    vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 300 * 2**20, resource.RLIM_INFINITY))
    for path in sys.argv[1:]:
        try:
            load_checkpoint(path)
            print("loaded")
        except spectra.CheckpointError as err:
            print(str(err).replace("\\n", " | "))
""")


def test_absurd_configs_fail_fast_under_a_memory_cap(tmp_path):
    base = _saved(tmp_path)
    paths = []
    for i, (changes, _) in enumerate(ABSURD):
        path = tmp_path / f"absurd{i}"
        path.mkdir()
        (path / "model.safetensors").symlink_to(base / "model.safetensors")
        (path / "config.json").write_text((base / "config.json").read_text())
        _edit_config(path, **changes)
        paths.append(str(path))
    result = subprocess.run([sys.executable, "-c", _CAPPED, *paths], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-1500:]  # a MemoryError would end the process here
    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(ABSURD), result.stdout  # one line per config: each error is a single line
    for (changes, message), line in zip(ABSURD, lines):
        assert re.search(message, line), (changes, line)


@pytest.mark.parametrize("command", [["eval", "ppl", "CKPT", "--data", "CKPT/config.json", "--no-progress"],
                                     ["info", "CKPT"], ["pack", "CKPT", "--format", "tq2", "--out", "CKPT-tq2"]])
def test_cli_reports_an_absurd_config_in_one_line(tmp_path, capsys, command):
    path = _saved(tmp_path)
    _edit_config(path, vocab_size=10**11)
    assert main([a.replace("CKPT", str(path)) for a in command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vocab_size" in err[0]


def test_every_kind_still_loads_without_warnings(tmp_path):
    for kind in ("float", "ternary"):
        path = _saved(tmp_path, kind, name=kind)
        with warnings.catch_warnings():
            warnings.simplefilter("error", IgnoredTensorWarning)
            load_checkpoint(path)


@pytest.mark.parametrize("kind,options", [("float", {}), ("ternary", {}), ("tq2", {}), ("tq1", {}),
                                          ("quant", {"sym": True, "act_order": True}), ("quant", {"sym": False})])
def test_expected_table_is_what_save_checkpoint_writes(kind, options):
    from spectra.checkpoint import DENSE_KINDS, checkpoint_tensors
    from spectra.convert import quantize_model
    from spectra.quant import QuantConfig
    from spectra.tensor_table import expected_tensors

    torch.manual_seed(2)
    base = "ternary" if kind in ("tq2", "tq1") else "float" if kind == "quant" else kind
    model = SpectraLM(get_config("tiny", weight_kind=base, model_parallel_size=2)).eval()
    if kind in ("tq2", "tq1"):
        pack_model(model, kind)
    if kind == "quant":
        calib = torch.randint(0, 1024, (2, 9)) if options.get("act_order") else None
        quantize_model(model, QuantConfig(bits=3, group_size=32, method="gptq" if calib is not None else "rtn",
                                          **options), calib, progress=False)
    saved = checkpoint_tensors(model)
    expected = expected_tensors(model.config, dense=model.config.weight_kind in DENSE_KINDS)
    assert set(saved) == set(expected)
    for name, tensor in saved.items():
        shape, dtype = expected[name]
        assert tuple(tensor.shape) == shape, name
        assert tensor.dtype.is_floating_point == dtype.is_floating_point and (
            dtype.is_floating_point or tensor.dtype == dtype), name


def test_cli_prints_the_ignored_tensor_warning_in_one_line(tmp_path, capsys):
    from spectra.tokenizer import train_tokenizer

    torch.manual_seed(0)
    tok = train_tokenizer(["to be or not to be"] * 20, 300)
    path = save_checkpoint(SpectraLM(get_config("tiny", weight_kind="float", vocab_size=300)), tmp_path / "c",
                           tokenizer=tok)
    _edit_tensors(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8)}))
    (tmp_path / "t.txt").write_text("to be or not to be " * 40)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["eval", "ppl", str(path), "--data", str(tmp_path / "t.txt"), "--window", "32",
                     "--no-progress"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("spectra: warning: ") and "rotary_emb.inv_freq" in err[0], err


@pytest.mark.parametrize("command", [["info"], ["pack", "--format", "tq2", "--out", "OUT"]])
def test_info_and_pack_report_a_junk_weight_file_in_one_line(tmp_path, capsys, command):
    path = _saved(tmp_path, kind="ternary")
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    argv = [command[0], str(path), *[str(tmp_path / "out") if a == "OUT" else a for a in command[1:]]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "safetensors header is not valid JSON" in err[0], err
    assert not (tmp_path / "out").exists()
