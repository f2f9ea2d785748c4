import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_support import save_tiny_checkpoint, shakespeare, tiny_model, tiny_tokenizer

from spectra import ConfigError, DataError
from spectra.checkpoint import load_model
from spectra.cli.main import main
from spectra.eval import load_eval_tokens, perplexity, sliding_windows


def random_tokens(n: int, vocab: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n,window,stride", [(2, 5, 5), (97, 16, 16), (97, 16, 5), (101, 33, 1), (64, 7, 3)])
def test_windows_score_every_token_once_with_enough_context(n, window, stride):
    scored = []
    for w in sliding_windows(n, window, stride):
        inputs = w.end - 1 - w.start
        assert 0 < w.scored <= inputs <= window
        targets = list(range(w.end - w.scored, w.end))
        scored += targets
        # Every scored target sees `window - stride` tokens of context unless the text is shorter.
        assert all(t - w.start >= min(t, window - stride + 1) for t in targets)
    assert scored == list(range(1, n))


def test_perplexity_is_exp_of_mean_token_loss_by_hand():
    model = tiny_model("ternary", seed=1)
    tokens = random_tokens(77, seed=1)
    _, loss = model(tokens[None, :-1], tokens[None, 1:])
    result = perplexity(model, tokens, window=200, stride=200, progress=False)
    assert result.tokens == 76
    assert result.loss == pytest.approx(loss.item(), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss.item()), rel=1e-5)
    assert result.bits_per_token == pytest.approx(loss.item() / math.log(2), rel=1e-5)


def reference_nll(model, tokens, window, stride):
    """One unpadded forward per scored token: the plainest statement of the sliding-window definition."""
    nll = []
    for w in sliding_windows(tokens.numel(), window, stride):
        for target in range(w.end - w.scored, w.end):
            context = tokens[w.start:target]
            logits = model(context[None])[0, -1].float()
            nll.append(-F.log_softmax(logits, -1)[tokens[target]].item())
    return np.array(nll)


@pytest.mark.parametrize("window,stride,batch", [(13, 13, 3), (15, 4, 4)])
def test_batched_sliding_window_matches_reference(window, stride, batch):
    model = tiny_model("float", seed=2)
    tokens = random_tokens(41, seed=2)
    result = perplexity(model, tokens, window=window, stride=stride, batch_size=batch, progress=False)
    ref = reference_nll(model, tokens, window, stride)
    assert result.tokens == len(ref) == 40
    assert result.loss == pytest.approx(ref.mean(), rel=1e-5)


def test_overlap_gives_more_context_and_lower_loss_on_text():
    # A FloatLM is not needed to learn anything for this: with an n-gram-free random model overlap changes
    # nothing systematic, so check only that different strides score the same tokens.
    model = tiny_model("float", seed=3)
    tokens = random_tokens(60, seed=3)
    a = perplexity(model, tokens, window=20, stride=20, progress=False)
    b = perplexity(model, tokens, window=20, stride=4, progress=False)
    assert a.tokens == b.tokens == 59


def test_bad_perplexity_input():
    model = tiny_model("float")
    with pytest.raises(ConfigError, match="stride 9 exceeds the window 8"):
        perplexity(model, random_tokens(20), window=8, stride=9, progress=False)
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len"):
        perplexity(model, random_tokens(20), window=10_000, progress=False)
    with pytest.raises(DataError, match="another tokenizer"):
        perplexity(model, torch.tensor([1, 5000, 2]), progress=False)
    with pytest.raises(DataError, match="at least 2 tokens"):
        perplexity(model, torch.tensor([3]), progress=False)


def test_load_eval_tokens_formats(tmp_path):
    tok = tiny_tokenizer()
    text = shakespeare(3000)
    (tmp_path / "a.txt").write_text(text)
    ids = tok.encode(text).ids
    assert load_eval_tokens(tmp_path / "a.txt", tok).tolist() == ids
    np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.uint16))
    assert load_eval_tokens(tmp_path / "ids.npy").tolist() == ids
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "To be"}) + "\n\n" + json.dumps({"text": "or not"}) + "\n")
    joined = load_eval_tokens(tmp_path / "d.jsonl", tok).tolist()
    assert joined == tok.encode("To be").ids + [0] + tok.encode("or not").ids  # 0 = <|endoftext|>
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "d.jsonl").read_bytes())  # Notepad's BOM
    assert load_eval_tokens(tmp_path / "bom.jsonl", tok).tolist() == joined
    assert load_eval_tokens(tmp_path / "a.txt", tok, max_tokens=10).numel() == 10
    with pytest.raises(DataError, match="does not exist"):
        load_eval_tokens(tmp_path / "missing.txt", tok)
    with pytest.raises(DataError, match="no tokenizer"):
        load_eval_tokens(tmp_path / "a.txt", None)
    (tmp_path / "bad.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_eval_tokens(tmp_path / "bad.jsonl", tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_eval_tokens(tmp_path / "empty", tok)


def test_cli_ppl_writes_result_json(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "trilm")
    data = tmp_path / "text.txt"
    data.write_text(shakespeare(4000))
    out = tmp_path / "res" / "ppl.json"
    assert main(["eval", "ppl", str(ckpt), "--data", str(data), "--window", "64", "--stride", "32",
                 "--out", str(out), "--no-progress"]) == 0
    record = json.loads(out.read_text())
    assert record == json.loads(capsys.readouterr().out)
    model = load_model(ckpt)
    tokens = load_eval_tokens(data, tiny_tokenizer())
    expected = perplexity(model, tokens, window=64, stride=32, progress=False)
    assert record["metrics"]["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert record["model"]["family"] == "TriLM" and record["model"]["parameters"] > 0
    assert main(["eval", "ppl", str(ckpt), "--data", str(tmp_path / "nope.txt")]) == 2


def test_prepared_shards_are_read_through_spectra_data(tmp_path):
    data = pytest.importorskip("spectra.data")
    tok = tiny_tokenizer()
    (tmp_path / "corpus.txt").write_text(shakespeare(20_000))
    dataset = data.prepare_data(tmp_path / "corpus.txt", tmp_path / "shards", tokenizer=tok, val_fraction=0.2,
                                progress=False)
    val = load_eval_tokens(tmp_path / "shards", tok)
    assert val.tolist() == dataset.tokens("val").astype(int).tolist() and val.numel() > 0
    assert load_eval_tokens(tmp_path / "shards", split="train").numel() == dataset.num_tokens("train")
    data.prepare_data(tmp_path / "corpus.txt", tmp_path / "no-val", tokenizer=tok, val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="the val split of .* holds 0 tokens.*choose another --split"):
        load_eval_tokens(tmp_path / "no-val", split="val")


def llama_cpp_reference(model, tokens, n_ctx):
    """llama.cpp's perplexity tool, statement by statement: floor(n / n_ctx) chunks, first = n_ctx / 2, the
    logits at positions first .. n_ctx - 2 of each chunk score the tokens after them."""
    first, nll = n_ctx // 2, []
    for i in range(tokens.numel() // n_ctx):
        chunk = tokens[i * n_ctx:(i + 1) * n_ctx]
        logprobs = F.log_softmax(model(chunk[None])[0].float(), -1)
        nll += [-logprobs[j, chunk[j + 1]].item() for j in range(first, n_ctx - 1)]
    return np.array(nll)


@pytest.mark.parametrize("n_tokens,n_ctx,batch", [(83, 16, 2), (70, 35, 1), (99, 13, 8)])
def test_llama_cpp_protocol_matches_llama_cpp_scoring(n_tokens, n_ctx, batch):
    model = tiny_model("float", seed=4)
    tokens = random_tokens(n_tokens, seed=4)
    result = perplexity(model, tokens, window=n_ctx, batch_size=batch, progress=False, protocol="llama.cpp")
    ref = llama_cpp_reference(model, tokens, n_ctx)
    assert result.tokens == len(ref) == (n_tokens // n_ctx) * (n_ctx - n_ctx // 2 - 1)
    assert result.loss == pytest.approx(ref.mean(), rel=1e-5) and result.protocol == "llama.cpp"
    with pytest.raises(DataError, match="at least 2 \\* n_ctx"):
        perplexity(model, tokens[:2 * n_ctx - 1], window=n_ctx, progress=False, protocol="llama.cpp")
    with pytest.raises(ConfigError, match="--stride does not apply"):
        perplexity(model, tokens, window=n_ctx, stride=4, progress=False, protocol="llama.cpp")


def test_cli_ppl_llama_cpp_protocol_and_threads(tmp_path, capsys):
    ckpt = save_tiny_checkpoint(tmp_path / "trilm")
    data = tmp_path / "text.txt"
    data.write_text(shakespeare(3000))
    before = torch.get_num_threads()
    try:
        assert main(["eval", "ppl", str(ckpt), "--data", str(data), "--window", "48", "--protocol", "llama.cpp",
                     "--threads", "1", "--no-progress"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    record = json.loads(capsys.readouterr().out)
    expected = llama_cpp_reference(load_model(ckpt), load_eval_tokens(data, tiny_tokenizer()), 48)
    assert record["details"]["protocol"] == "llama.cpp" and record["details"]["tokens"] == len(expected)
    assert record["metrics"]["loss"] == pytest.approx(expected.mean(), rel=1e-5)


def test_threads_is_one_shared_option():
    from spectra.cli.common import _thread_count
    from spectra.cli.main import build_parser

    parser = build_parser()
    commands = [["train"], ["eval", "ppl", "x", "--data", "y"], ["eval", "tasks", "x"], ["quantize", "x", "--out", "y"],
                ["pack", "x", "--format", "tq2", "--out", "y"], ["export", "gguf", "x", "--type", "f16", "--out", "y"],
                ["generate", "x"], ["analyze", "weights", "x"]]
    for argv in commands:
        assert parser.parse_args([*argv, "--threads", "3"]).threads == 3, argv
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "ppl", "x", "--data", "y", "--threads", "0"])
    train = parser._subparsers._group_actions[0].choices["train"]
    assert next(a for a in train._actions if a.dest == "threads").type is _thread_count
