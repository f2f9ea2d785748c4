"""Hints for missing optional packages say what works from a clone, and the README names the extras."""

import re
import sys
from pathlib import Path

import pytest

from spectra import SpectraError
from spectra.cli.main import main

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_missing_gguf_names_an_install_that_works(monkeypatch):
    from spectra.gguf_export import _gguf

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now raises ImportError
    with pytest.raises(SpectraError, match=r'pip install gguf \(or, in a clone of spectra, pip install -e "\.\[gguf'):
        _gguf()


def test_missing_lm_eval_names_an_install_that_works(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "spectra.eval.harness", raising=False)
    assert main(["eval", "tasks", str(tmp_path)]) == 2
    assert 'pip install lm-eval (or, in a clone of spectra, pip install -e ".[eval]")' in capsys.readouterr().err


@pytest.mark.parametrize("heading,extra", [("`spectra export gguf`", "gguf"), ("`spectra eval`", "eval"),
                                           ("`spectra bench`", "gpu")])
def test_readme_sections_name_the_extras_they_need(heading, extra):
    section = README.split(f"### {heading}", 1)[1].split("\n### ", 1)[0]
    assert f'pip install -e ".[{extra}]"' in section
    assert "spectra-lm[" not in README and not re.search(r"pip install 'spectra-lm", README)
