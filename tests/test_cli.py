import re
import subprocess
import sys

import pytest
import torch

from spectra import SpectraLM, get_config
from spectra.checkpoint import save_checkpoint
from spectra.cli.main import main
from spectra.tokenizer import train_tokenizer

TEXT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
        "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"] * 20


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spectra", *args], capture_output=True, text=True, timeout=120)


def test_info_reports_suite_sizes(capsys):
    assert main(["info", "3.9B"]) == 0
    out = capsys.readouterr().out
    assert "3.990B parameters" in out and "tq1" in out
    # 2 (k, v) x 30 layers x 24 heads x 128 x 2048 positions: 2 bytes each in fp16, 1 + 4/128 as int8
    assert "KV cache per sequence of 2048 tokens: 754.97 MB in fp16, 389.28 MB as int8" in out
    assert main(["info", "99M"]) == 0
    assert "99.76M" in capsys.readouterr().out


def test_bad_input_is_one_line_exit_2(tmp_path):
    result = run_cli("info", "7B")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "unknown model size '7B'" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("generate", str(tmp_path))
    assert result.returncode == 2 and "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    tok = train_tokenizer(TEXT, vocab_size=300)
    torch.manual_seed(0)
    model = SpectraLM(get_config("tiny", vocab_size=tok.get_vocab_size()))
    save_checkpoint(model, path, tokenizer=tok)
    return path


def test_generate_streams_text(tiny_checkpoint, capsys):
    assert main(["generate", str(tiny_checkpoint), "--prompt", "To be", "--max-new-tokens", "12",
                 "--seed", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("To be") and len(out) > len("To be\n")


def test_generate_with_an_int8_kv_cache(tiny_checkpoint, capsys, monkeypatch):
    dtypes = []
    real = SpectraLM.setup_cache
    monkeypatch.setattr(SpectraLM, "setup_cache",
                        lambda self, batch, n, dtype=None: dtypes.append(dtype) or real(self, batch, n, dtype))
    assert main(["generate", str(tiny_checkpoint), "--prompt", "To be", "--max-new-tokens", "8", "--temperature", "0",
                 "--device", "cpu", "--kv-cache", "int8"]) == 0
    assert capsys.readouterr().out.startswith("To be") and dtypes == [torch.int8]
    assert run_cli("generate", str(tiny_checkpoint), "--kv-cache", "int4").returncode == 2


def test_generate_past_the_model_length_says_it_stopped_short(tiny_checkpoint, capsys):
    # The tiny model holds 256 positions; the generation used to end there without a word.
    assert main(["generate", str(tiny_checkpoint), "--prompt", "To be " * 40, "--max-new-tokens", "500",
                 "--temperature", "0", "--device", "cpu"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(r"spectra: warning: only \d+ of the 500 new tokens fit: the model's "
                                          r"maximum length is 256 tokens and the prompt has \d+", err[0]), err


def test_generate_compile_on_cpu_is_a_clear_error(tiny_checkpoint):
    result = run_cli("generate", str(tiny_checkpoint), "--device", "cpu", "--compile")
    assert result.returncode == 2 and "compile applies to CUDA decoding" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_generate_on_missing_cuda_is_clear(tiny_checkpoint):
    result = run_cli("generate", str(tiny_checkpoint), "--device", "cuda")
    assert result.returncode == 2 and "no CUDA GPU is available" in result.stderr


def test_info_on_checkpoint_reports_stored_bits(tiny_checkpoint, capsys):
    assert main(["info", str(tiny_checkpoint)]) == 0
    assert "32.000 bits per linear weight as stored" in capsys.readouterr().out
