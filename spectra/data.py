"""Pretraining data: text in, tokenized shards out, and a deterministic, resumable window loader.

`prepare_data` reads text files, folders, `.jsonl`, `.parquet` and local Hugging Face `datasets` directories,
tokenizes every document (end-of-text token after each), and writes one flat token stream per split as raw
numpy memmap shards (uint16 when the vocabulary fits, else uint32) beside a small JSON index and the
tokenizer. `WindowLoader` draws fixed-length windows from a split in an order that depends only on
(seed, epoch), so its position is two integers and a run resumes at exactly the next window.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .io import atomic_dir, check_output, is_plain_file_name, is_regular_file, output_lock, read_json
from .progress import progress_bar
from .tokenizer import eos_id, load_tokenizer, save_tokenizer, train_tokenizer

INDEX_FILE = "index.json"
FORMAT_NAME = "spectra-tokens"
FORMAT_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SPLITS = ("train", "val")
# The validation split takes whole blocks of this many tokens, evenly spaced through the stream, so it
# samples the whole corpus (not just its last documents) and its size is exact.
VAL_BLOCK_TOKENS = 1024
DEFAULT_SHARD_TOKENS = 1 << 28  # 512 MiB of uint16 per shard file
PREPARE_OWNER = "data prepare"


# --- reading documents ----------------------------------------------------------------------------

def is_hf_dataset_dir(path: Path) -> bool:
    """A directory written by `datasets`' `save_to_disk` (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "dataset_dict.json").is_file()
                              or ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()))


def list_sources(sources: Sequence[str | Path]) -> list[Path]:
    """Expand folders into the readable files (and dataset directories) they hold, in a stable order."""
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if is_hf_dataset_dir(path):
            found.append(path)
            continue
        if not path.is_dir():
            found.append(_regular(path))
            continue
        for root, dirs, files in os.walk(path):
            root_path = Path(root)
            # A dataset directory inside a folder is one source; do not read its arrow files as text.
            datasets = sorted(d for d in dirs if is_hf_dataset_dir(root_path / d))
            found.extend(root_path / d for d in datasets)
            dirs[:] = sorted(d for d in dirs if d not in datasets and not d.startswith("."))
            found.extend(_regular(root_path / f) for f in sorted(files)
                         if f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES))
    if not found:
        raise DataError(f"no readable input in {', '.join(map(str, sources))}: expected text files "
                        f"({', '.join(TEXT_SUFFIXES)}), .jsonl, .parquet or a Hugging Face datasets directory")
    return found


def _regular(path: Path) -> Path:
    # A FIFO, socket or device would block the read forever or never end: refuse it by name.
    if not is_regular_file(path):
        raise DataError(f"input {path} is not a regular file (a FIFO, socket or device); copy its content to "
                        f"a file, or remove it from the corpus")
    return path


def iter_documents(sources: Sequence[str | Path], text_field: str = "text") -> Iterator[str]:
    """Every non-empty document of `sources`: a text file is one document, a .jsonl line or table row is one."""
    for path in list_sources(sources):
        if is_hf_dataset_dir(path):
            yield from _hf_documents(path, text_field)
        elif path.name.endswith(JSONL_SUFFIXES):
            yield from _jsonl_documents(path, text_field)
        elif path.name.endswith(PARQUET_SUFFIXES):
            yield from _parquet_documents(path, text_field)
        else:
            try:
                text = path.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError:
                raise DataError(f"{path} is not UTF-8 text; convert it or pass .jsonl/.parquet instead") from None
            if text.strip():
                yield text


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Notepad) is not JSON
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno} is not UTF-8 text; fix or drop that line (JSON Lines files "
                                f"are UTF-8)") from None
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{lineno} is not a JSON object with a {field!r} field; "
                                f"choose the field with --text-field") from None
            if isinstance(text, str) and text.strip():
                yield text


def _parquet_documents(path: Path, field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(str(path))
    except Exception as err:  # pyarrow raises its own ArrowInvalid for non-parquet files
        raise DataError(f"cannot read {path} as parquet ({err})") from None
    if field not in table.schema_arrow.names:
        raise DataError(f"{path} has no column {field!r} (columns: {table.schema_arrow.names}); "
                        f"choose it with --text-field")
    for batch in table.iter_batches(columns=[field], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())


def _check_hf_dataset_files(path: Path) -> None:
    """`load_from_disk` opens whatever its JSON files name, `../` paths included: only plain names inside."""
    fix = "save the dataset again with save_to_disk"
    dirs = [path]
    if (path / "dataset_dict.json").is_file():
        splits = read_json(path / "dataset_dict.json", DataError, fix)
        splits = splits.get("splits") if isinstance(splits, dict) else None
        if not isinstance(splits, list) or not all(is_plain_file_name(s) for s in splits):
            raise DataError(f"{path / 'dataset_dict.json'} does not list its splits as plain names inside {path}; "
                            f"{fix}")
        dirs = [path / s for s in splits]
    for d in dirs:
        state = read_json(d / "state.json", DataError, fix) if (d / "state.json").is_file() else None
        files = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(files, list) or not all(isinstance(f, dict) and is_plain_file_name(f.get("filename"))
                                                  for f in files):
            raise DataError(f"{d / 'state.json'} is missing or names data files that are not plain file names "
                            f"inside {d}; a dataset may only load files from its own directory — {fix}")


def _hf_documents(path: Path, field: str) -> Iterator[str]:
    from datasets import DatasetDict, load_from_disk

    _check_hf_dataset_files(path)
    try:
        data = load_from_disk(str(path))
    except Exception as err:  # datasets raises JSON, pyarrow and its own errors for a damaged directory
        raise DataError(f"cannot read the datasets directory {path} ({type(err).__name__}: {err}); save the "
                        f"dataset again with save_to_disk") from None
    if isinstance(data, DatasetDict):
        # The train split when there is one; otherwise every split, in name order.
        parts = [data["train"]] if "train" in data else [data[k] for k in sorted(data)]
    else:
        parts = [data]
    for part in parts:
        if field not in part.column_names:
            raise DataError(f"dataset {path} has no column {field!r} (columns: {part.column_names}); "
                            f"choose it with --text-field")
        for start in range(0, len(part), 1024):
            yield from (t for t in part[start:start + 1024][field] if isinstance(t, str) and t.strip())


# --- writing shards -------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class _ShardWriter:
    """Appends tokens of one split to `<split>-00000.bin`, `<split>-00001.bin`, ... of at most `shard_tokens`."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            piece, tokens = tokens[:room], tokens[room:]
            self._file.write(piece.astype(self.dtype, copy=False).tobytes())
            self.shards[-1]["tokens"] += int(piece.size)

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.shards.append({"file": name, "tokens": 0})
        self._file = (self.directory / name).open("wb")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @property
    def total(self) -> int:
        return sum(s["tokens"] for s in self.shards)


class _SplitRouter:
    """Cuts the token stream into blocks and sends every k-th block to validation (k = 1 / val_fraction).

    The latest block is held back, so a corpus too small to reach a k-th block still gets one.
    """

    def __init__(self, train: _ShardWriter, val: _ShardWriter, val_fraction: float) -> None:
        self.train, self.val, self.val_fraction = train, val, val_fraction
        self.buffer = np.empty(0, dtype=np.int64)
        self.blocks = 0
        self.held: np.ndarray | None = None

    def add(self, tokens: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, tokens])
        while self.buffer.size >= VAL_BLOCK_TOKENS:
            block, self.buffer = self.buffer[:VAL_BLOCK_TOKENS], self.buffer[VAL_BLOCK_TOKENS:]
            self._route(block)

    def _route(self, block: np.ndarray) -> None:
        if self.held is not None:
            self.train.write(self.held)
            self.held = None
        i = self.blocks
        self.blocks += 1
        if int((i + 1) * self.val_fraction) > int(i * self.val_fraction):
            self.val.write(block)
        else:
            self.held = block

    def finish(self) -> None:
        tail = [b for b in (self.held, self.buffer) if b is not None and b.size]
        if self.val_fraction > 0 and self.val.total == 0 and tail:
            # Nothing reached validation yet: the last full block (or the remainder) becomes it.
            self.val.write(tail.pop(0))
        for piece in tail:
            self.train.write(piece)
        self.held, self.buffer = None, np.empty(0, dtype=np.int64)


def tokenizer_fingerprint(tokenizer) -> str:
    return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]


def prepare_data(sources: str | Path | Sequence[str | Path], out_dir: str | Path, tokenizer=None,
                 vocab_size: int = 4096, val_fraction: float = 0.05, text_field: str = "text",
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False,
                 progress: bool = True) -> TokenDataset:
    """Tokenize `sources` into a shard directory `out_dir` and return it opened.

    `tokenizer` is a `tokenizers.Tokenizer`, a checkpoint directory or a tokenizer.json path; when None a
    byte-level BPE with `vocab_size` entries is trained on the sources first. Every `1/val_fraction`-th block
    of 1024 tokens goes to the validation split. The directory is written to a temporary sibling first and
    appears in one rename; an existing non-empty `out_dir` is an error unless `overwrite`.
    """
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    with output_lock(out_dir, PREPARE_OWNER):
        check_output(out_dir, PREPARE_OWNER, force=overwrite, sources=sources, replace_own=False)
        list_sources(sources)  # fail on missing input before any tokenizer training
        _prepare(sources, out_dir, tokenizer, vocab_size, val_fraction, text_field, shard_tokens, progress)
    return TokenDataset(out_dir)


def _prepare(sources: list, out_dir: Path, tokenizer, vocab_size: int, val_fraction: float, text_field: str,
             shard_tokens: int, progress: bool) -> None:
    if tokenizer is None:
        docs = _progress(iter_documents(sources, text_field), progress, "training tokenizer (documents)")
        tokenizer = train_tokenizer(docs, vocab_size)
    elif isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    vocab = tokenizer.get_vocab_size()
    eos = eos_id(tokenizer)

    with atomic_dir(out_dir, PREPARE_OWNER) as tmp:
        dtype = token_dtype(vocab)
        writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
        router = _SplitRouter(writers["train"], writers["val"], val_fraction)
        documents = 0
        docs = _progress(iter_documents(sources, text_field), progress, "tokenizing (documents)")
        for batch in _batched(docs, 256):
            for encoding in tokenizer.encode_batch(batch):
                ids = encoding.ids + ([eos] if eos is not None else [])
                router.add(np.asarray(ids, dtype=np.int64))
                documents += 1
        router.finish()
        for w in writers.values():
            w.close()
        if writers["train"].total == 0 and writers["val"].total:  # "holds no text" misled here
            raise DataError(f"all {writers['val'].total:,} tokens of the corpus {', '.join(map(str, sources))} "
                            f"went to the validation split (too small to split: validation takes whole "
                            f"{VAL_BLOCK_TOKENS}-token blocks); give more text or pass --val-fraction 0")
        if writers["train"].total == 0:
            raise DataError(f"the corpus {', '.join(map(str, sources))} holds no text (0 training tokens); "
                            f"check the inputs and --text-field")
        save_tokenizer(tokenizer, tmp)
        index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype.name, "vocab_size": vocab,
                 "eos_id": eos, "tokenizer_sha256": tokenizer_fingerprint(tokenizer), "documents": documents,
                 "val_fraction": val_fraction, "val_block_tokens": VAL_BLOCK_TOKENS,
                 "sources": [str(s) for s in sources], "splits": {s: w.shards for s, w in writers.items()}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _progress(items: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    return progress_bar(items, desc=desc, unit="doc", leave=False)


# --- reading shards -------------------------------------------------------------------------------

class TokenDataset:
    """A prepared shard directory: its index, tokenizer and one read-only memmap per shard file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        file = self.path / INDEX_FILE
        if not file.is_file():
            raise DataError(f"{self.path} is not a prepared dataset (no {INDEX_FILE}); "
                            f"create one with `spectra data prepare`")
        try:
            self.index = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{file} is not valid JSON ({err}); prepare the data again") from None
        if not isinstance(self.index, dict) or self.index.get("format") != FORMAT_NAME:
            raise DataError(f"{file} is not a spectra token index; prepare the data with `spectra data prepare`")
        self.dtype = _check_index(self.index, file)
        self._shards: dict[str, list[np.ndarray]] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.index["vocab_size"])

    @property
    def eos_id(self) -> int | None:
        return self.index.get("eos_id")

    def tokenizer(self):
        return load_tokenizer(self.path)

    def fingerprint(self) -> dict:
        """What a resumed run checks: the same tokenizer and the same number of tokens per split."""
        return {"tokenizer_sha256": self.index["tokenizer_sha256"],
                "tokens": {s: self.num_tokens(s) for s in SPLITS}}

    def shards(self, split: str) -> list[np.ndarray]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if split not in self._shards:
            arrays = []
            for shard in self.index["splits"].get(split, []):
                file = self.path / shard["file"]
                if not file.is_file() or file.stat().st_size != shard["tokens"] * self.dtype.itemsize:
                    raise DataError(f"shard {file} is missing or truncated (expected {shard['tokens']} tokens); "
                                    f"prepare the data again")
                if shard["tokens"]:
                    arrays.append(np.memmap(file, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
            self._shards[split] = arrays
        return self._shards[split]

    def num_tokens(self, split: str) -> int:
        return sum(s["tokens"] for s in self.index["splits"].get(split, []))

    def tokens(self, split: str) -> np.ndarray:
        """The whole split as one array (copied into memory; for evaluation-sized splits)."""
        shards = self.shards(split)
        tokens = np.concatenate(shards) if shards else np.empty(0, dtype=self.dtype)
        self.check_ids(tokens, split)
        return tokens

    def check_ids(self, tokens: np.ndarray, split: str) -> None:
        """Refuse token ids outside the dataset's vocabulary (a damaged or foreign shard)."""
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise DataError(f"the {split} split of {self.path} holds token id {int(tokens.max())}, outside its "
                            f"vocabulary of {self.vocab_size}; the shards are damaged or from another "
                            f"tokenizer — prepare the data again")


def _check_index(index: dict, file: Path) -> np.dtype:
    """The token dtype of a parsed index.json, after checking every field the reader relies on."""
    try:
        dtype = np.dtype(index.get("dtype"))
    except TypeError:
        dtype = None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise DataError(f"{file}: dtype {index.get('dtype')!r} is not uint16 or uint32; prepare the data again")
    vocab = index.get("vocab_size")
    if not isinstance(vocab, int) or isinstance(vocab, bool) or not 0 < vocab <= np.iinfo(dtype).max + 1:
        raise DataError(f"{file}: vocab_size {vocab!r} is not a positive integer that fits {dtype.name}; "
                        f"prepare the data again")
    splits = index.get("splits")
    if not isinstance(splits, dict) or not isinstance(index.get("tokenizer_sha256"), str):
        raise DataError(f"{file} lacks its splits or tokenizer_sha256; prepare the data again")
    for split, shards in splits.items():
        for shard in shards if isinstance(shards, list) else [None]:
            if not isinstance(shard, dict) or not isinstance(shard.get("tokens"), int) or shard["tokens"] < 0:
                raise DataError(f"{file}: split {split!r} has a malformed shard entry {shard!r}; prepare the "
                                f"data again")
            if not is_plain_file_name(shard.get("file")):
                raise DataError(f"{file}: shard name {shard.get('file')!r} is not a plain file name inside "
                                f"{file.parent}; an index may only name files in its own directory")
    return dtype


def read_tokens(path: str | Path, split: str | None = None) -> np.ndarray:
    """Token ids of a prepared dataset: `split`, or by default the validation split (the training split
    when there is no validation data)."""
    data = TokenDataset(path)
    if split is None:
        split = "val" if data.num_tokens("val") else "train"
    return data.tokens(split)


# --- windows --------------------------------------------------------------------------------------

@dataclass
class LoaderState:
    """Where a loader stands: the epoch and the index of the next window in that epoch's order."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class WindowLoader:
    """Batches of `batch_size` windows of `seq_len + 1` tokens (inputs and shifted targets) from one split.

    Each epoch cuts every shard into non-overlapping windows starting at a per-epoch random offset and
    visits them in a random permutation; both come from a generator seeded by (seed, epoch), so the window
    sequence is a pure function of (seed, position) and `state` resumes it exactly. With `shuffle=False`
    the windows start at offset 0 and keep their order (fixed evaluation batches).
    """

    def __init__(self, dataset: TokenDataset, split: str, seq_len: int, batch_size: int, seed: int = 0,
                 shuffle: bool = True) -> None:
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be positive (got {seq_len}, {batch_size})")
        self.shards = dataset.shards(split)
        self.dataset = dataset
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.shuffle = seed, shuffle
        longest = max((s.size for s in self.shards), default=0)
        if longest < seq_len + 1:
            raise DataError(f"the {split} split of {dataset.path} has {dataset.num_tokens(split)} tokens "
                            f"(longest shard {longest}), fewer than one window of seq_len + 1 = {seq_len + 1}; "
                            f"use a shorter --seq-len or more data")
        self.state = LoaderState()
        self._epoch_cache: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None

    def _epoch_windows(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(order, shard-of-window cumulative counts, per-epoch offset) of one epoch."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1:]
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        offset = int(rng.integers(self.seq_len)) if self.shuffle else 0
        counts = np.array([max(0, (s.size - offset - 1) // self.seq_len) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:  # the random offset left no room in a barely long enough split
            offset, counts = 0, np.array([(s.size - 1) // self.seq_len for s in self.shards], dtype=np.int64)
        total = int(counts.sum())
        order = rng.permutation(total) if self.shuffle else np.arange(total)
        self._epoch_cache = (epoch, order, np.cumsum(counts), np.array(offset))
        return self._epoch_cache[1:]

    def windows_per_epoch(self) -> int:
        return int(self._epoch_windows(self.state.epoch)[0].size)

    def _window(self, epoch: int, index: int) -> np.ndarray:
        order, cumulative, offset = self._epoch_windows(epoch)
        w = int(order[index])
        shard = int(np.searchsorted(cumulative, w, side="right"))
        local = w - (int(cumulative[shard - 1]) if shard else 0)
        start = int(offset) + local * self.seq_len
        window = np.asarray(self.shards[shard][start:start + self.seq_len + 1], dtype=np.int64)
        self.dataset.check_ids(window, self.split)
        return window

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), each [batch_size, seq_len] int64; advances the position, wrapping epochs."""
        rows = []
        for _ in range(self.batch_size):
            if self.state.index >= self.windows_per_epoch():
                self.state = LoaderState(self.state.epoch + 1, 0)
            rows.append(self._window(self.state.epoch, self.state.index))
            self.state.index += 1
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]

    def fixed_batches(self, num_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first `num_batches` batches of epoch 0 (fewer when the split is small), position untouched."""
        saved = LoaderState(self.state.epoch, self.state.index)
        self.state = LoaderState()
        total = self.windows_per_epoch()
        batches = []
        for _ in range(num_batches):
            take = min(self.batch_size, total - self.state.index)
            if take <= 0:
                break
            rows = [self._window(0, self.state.index + i) for i in range(take)]
            self.state.index += take
            batch = torch.from_numpy(np.stack(rows))
            batches.append((batch[:, :-1], batch[:, 1:]))
        self.state = saved
        return batches

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, index = int(state["epoch"]), int(state["index"])
        except (TypeError, KeyError, ValueError):
            raise DataError(f"loader position {state!r} is not {{'epoch': int, 'index': int}}; the training "
                            f"state is damaged — resume from an earlier checkpoint") from None
        if epoch < 0 or not 0 <= index <= self._epoch_windows(epoch)[0].size:
            raise DataError(f"loader position {state} does not exist in this data; was it prepared again?")
        self.state = LoaderState(epoch, index)


def unigram_loss(dataset: TokenDataset, train_split: str = "train", eval_split: str = "val") -> float:
    """Cross-entropy (nats/token) on `eval_split` of the add-one-smoothed unigram distribution of `train_split`:
    the loss a model that ignores context would reach; a trained LM should end clearly below it."""
    counts = np.zeros(dataset.vocab_size, dtype=np.float64)
    for shard in dataset.shards(train_split):
        counts += np.bincount(shard, minlength=dataset.vocab_size)[:dataset.vocab_size]
    probs = (counts + 1) / (counts.sum() + counts.size)
    tokens = dataset.tokens(eval_split if dataset.num_tokens(eval_split) else train_split)
    return float(-np.log(probs[tokens.astype(np.int64)]).mean())
