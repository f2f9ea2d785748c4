"""Tokenizers through Hugging Face `tokenizers`: load one from a checkpoint, or train a byte-level BPE."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from .errors import CheckpointError, DataError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
# Largest vocabulary train_tokenizer accepts (LLaMA-3 has 128K, Gemma 256K tokens).
MAX_TRAINED_VOCAB = 1 << 20


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False) -> Tokenizer:
    """Byte-level BPE over `texts` (any iterable of strings); the end-of-text token gets id 0."""
    if vocab_size < 257 + 1:
        raise DataError(f"vocab_size {vocab_size} is too small for byte-level BPE (needs at least 258)")
    if vocab_size > MAX_TRAINED_VOCAB:  # the trainer reserves memory for it up front: 1e10 aborts the process
        raise DataError(f"vocab_size {vocab_size:,} is larger than any useful BPE vocabulary; choose at most "
                        f"{MAX_TRAINED_VOCAB:,} (the suite uses 50,304)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN], show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, directory: str | Path) -> None:
    """tokenizer.json plus the tokenizer_config.json transformers' AutoTokenizer expects."""
    directory = Path(directory)
    tok.save(str(directory / TOKENIZER_FILE))
    eos = EOS_TOKEN if tok.token_to_id(EOS_TOKEN) is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eos, "eos_token": eos,
              "unk_token": eos, "model_max_length": 1_000_000}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a checkpoint directory (its tokenizer.json) or a tokenizer.json file."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        if path.is_dir() and ((path / "run.json").is_file() or (path / "checkpoints").is_dir()):
            raise CheckpointError(f"{path} is a training run, not a checkpoint: give one of its checkpoints "
                                  f"({path / 'checkpoints'}/step-N) or its export directory")
        raise CheckpointError(f"no tokenizer found at {file}; pass a checkpoint directory that has "
                              f"{TOKENIZER_FILE}, or train one with spectra.train_tokenizer")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise CheckpointError(f"cannot read tokenizer {file} ({err}); it is not a tokenizer.json of the `tokenizers` "
                              f"library — give a checkpoint directory with its model's tokenizer.json") from None


def eos_id(tok: Tokenizer) -> int | None:
    return tok.token_to_id(EOS_TOKEN)
