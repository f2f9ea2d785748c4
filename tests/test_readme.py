"""The README's Python example runs as written (in a temporary directory)."""

import json
import re
import subprocess
import sys
from pathlib import Path

from tokenizers import Tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README lost its Python example"
    result = subprocess.run([sys.executable, "-c", blocks[0]], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out" / "trilm" / "config.json").exists()
    # The output is the text the model was trained on, not just "no exception": no replacement characters
    # (byte-level pieces of a tokenizer larger than the model's vocabulary, or of an untrained model) and the
    # trained line continued from the prompt.
    printed = result.stdout.strip()
    assert "\ufffd" not in printed and printed.isprintable(), printed
    assert printed.startswith("To be, or not to be"), printed
    config = json.loads((tmp_path / "out" / "trilm" / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(tmp_path / "out" / "trilm" / "tokenizer.json"))
    assert config["vocab_size"] == tokenizer.get_vocab_size()  # the example's tokenizer and model agree
