"""Sliding-window token-level perplexity on local text or prepared token shards.

Every token after the first is scored exactly once. Window k scores the targets [s, e) and feeds the
model the `window` tokens just before them (fewer at the start of the text), so each scored token sees at
least `window - stride` tokens of context once the text is long enough (the Hugging Face recipe, made
exact at window borders). stride == window gives disjoint windows; smaller strides buy context with compute.

The "llama.cpp" protocol scores as llama.cpp's perplexity tool does, so numbers compare with published
llama.cpp perplexities: the text is cut into floor(n / n_ctx) disjoint chunks of n_ctx tokens (the tail is
dropped), each chunk is one forward pass from an empty context, and only its second half is scored (the
targets after position n_ctx/2, n_ctx - n_ctx/2 - 1 per chunk); it needs at least 2 * n_ctx tokens.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import INDEX_FILE, TokenDataset, read_tokens, tokenizer_fingerprint
from ..errors import ConfigError, DataError
from ..progress import progress_bar
from ..tokenizer import eos_id

TEXT_SUFFIXES = (".txt", ".md", ".text", ".rst")
PROTOCOLS = ("sliding", "llama.cpp")


@dataclass(frozen=True)
class Window:
    start: int    # first input token
    end: int      # one past the last scored target; inputs are tokens[start:end-1]
    scored: int   # how many of the window's last targets are scored (the rest are context only)


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    loss: float             # mean negative log-likelihood per scored token, nats
    bits_per_token: float
    tokens: int             # scored tokens
    window: int
    stride: int
    protocol: str = "sliding"

    def to_dict(self) -> dict:
        return asdict(self)


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows that score tokens 1 .. n_tokens-1 once each, `stride` new targets per window."""
    if window < 1 or stride < 1:
        raise ConfigError(f"window ({window}) and stride ({stride}) must be positive")
    if stride > window:
        raise ConfigError(f"stride {stride} exceeds the window {window}: tokens between windows would never "
                          f"be scored; use a stride of at most the window")
    if n_tokens < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {n_tokens}; give it more text")
    windows, s = [], 1
    while s < n_tokens:
        e = min(s + stride, n_tokens)
        windows.append(Window(start=max(0, e - 1 - window), end=e, scored=e - s))
        s = e
    return windows


def llama_cpp_windows(n_tokens: int, n_ctx: int) -> list[Window]:
    """llama.cpp's perplexity chunks: disjoint n_ctx-token chunks, the targets after position n_ctx/2 scored."""
    if n_ctx < 2:
        raise ConfigError(f"the llama.cpp protocol needs a context of at least 2 tokens, got {n_ctx}")
    if n_tokens < 2 * n_ctx:
        raise DataError(f"the llama.cpp protocol needs at least 2 * n_ctx = {2 * n_ctx} tokens (as llama.cpp's "
                        f"perplexity tool does), got {n_tokens}; give more text or a smaller --window")
    first = n_ctx // 2
    return [Window(start=i * n_ctx, end=(i + 1) * n_ctx, scored=n_ctx - first - 1) for i in range(n_tokens // n_ctx)]


@torch.no_grad()
def token_nll(model: torch.nn.Module, tokens: torch.Tensor, windows: list[Window], batch_size: int = 8,
              progress: bool = True) -> torch.Tensor:
    """Negative log-likelihood (float64, nats) of every scored target, in text order."""
    device = model.model.embed_tokens.weight.device
    out: list[torch.Tensor] = []
    batches = [windows[i:i + batch_size] for i in range(0, len(windows), batch_size)]
    for batch in progress_bar(batches, desc="perplexity", unit="batch", disable=not progress):
        length = max(w.end - 1 - w.start for w in batch)
        # Right padding is harmless for a causal model: padded positions come after every scored one.
        inputs = torch.zeros(len(batch), length, dtype=torch.long)
        targets = torch.zeros(len(batch), length, dtype=torch.long)
        for row, w in enumerate(batch):
            n = w.end - 1 - w.start
            inputs[row, :n] = tokens[w.start:w.end - 1]
            targets[row, :n] = tokens[w.start + 1:w.end]
        logits = model(inputs.to(device)).float()
        logprobs = F.log_softmax(logits, dim=-1).gather(-1, targets.to(device)[..., None])[..., 0]
        for row, w in enumerate(batch):
            n = w.end - 1 - w.start
            out.append(-logprobs[row, n - w.scored:n].double().cpu())
    return torch.cat(out)


def perplexity(model: torch.nn.Module, tokens: torch.Tensor | list[int], window: int | None = None,
               stride: int | None = None, batch_size: int = 8, progress: bool = True,
               protocol: str = "sliding") -> PerplexityResult:
    """Token-level perplexity of `tokens` (1-D ids) under `model`.

    protocol "sliding" (default): every token after the first scored once, `window` tokens per forward pass and
    `stride` new targets per window. protocol "llama.cpp": llama.cpp's chunks of `window` (its n_ctx) tokens,
    each chunk's second half scored; `stride` does not apply. `window` defaults to the model's max_seq_len,
    `stride` to half the window.
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown perplexity protocol {protocol!r}; choose {' or '.join(PROTOCOLS)}")
    if protocol == "llama.cpp" and stride is not None:
        raise ConfigError("--stride does not apply to the llama.cpp protocol (disjoint chunks, second half "
                          "scored); drop it, or use --protocol sliding")
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1).cpu()
    if tokens.numel() < 2:
        raise DataError(f"perplexity needs at least 2 tokens, got {tokens.numel()}")
    max_len = model.config.max_seq_len
    if (window is not None and window < 2) or (stride is not None and stride < 1):
        raise ConfigError(f"window must be at least 2 and stride at least 1, got window {window}, stride {stride}")
    window = window or max_len
    if window > max_len:
        raise ConfigError(f"window {window} exceeds the model's max_seq_len {max_len}; pass --window {max_len}")
    stride = stride or max(1, window // 2)
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    vocab = model.config.vocab_size
    if int(tokens.max()) >= vocab or int(tokens.min()) < 0:
        raise DataError(f"token ids reach {int(tokens.max())} but the model's vocabulary has {vocab} entries; "
                        f"the data was tokenized with another tokenizer — re-tokenize it with the checkpoint's")
    if protocol == "llama.cpp":
        windows, stride = llama_cpp_windows(tokens.numel(), window), window
    else:
        windows = sliding_windows(tokens.numel(), window, stride)
    nll = token_nll(model, tokens, windows, batch_size, progress)
    loss = float(nll.mean())
    return PerplexityResult(perplexity=math.exp(loss), loss=loss, bits_per_token=loss / math.log(2),
                            tokens=nll.numel(), window=window, stride=stride, protocol=protocol)


# --- data -----------------------------------------------------------------------------------------

def load_eval_tokens(path: str | Path, tokenizer=None, max_tokens: int | None = None,
                     split: str | None = None) -> torch.Tensor:
    """1-D token ids from `path`: prepared shards (`spectra data prepare`; `split`, default its validation
    split), a .npy array of ids, .jsonl with a "text" field, a text file, or a folder of text files. Text
    needs `tokenizer` (a tokenizers.Tokenizer); documents are joined with the end-of-text token.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"evaluation data {path} does not exist")
    if max_tokens is not None and max_tokens < 2:
        raise DataError(f"max_tokens must be at least 2 (or unset for all), got {max_tokens}")
    tokens = _prepared_tokens(path, split, tokenizer)
    if tokens is None and path.suffix == ".npy":
        tokens = _npy_tokens(path)
    if tokens is None:
        tokens = _tokenize_documents(_read_documents(path), tokenizer, path)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    if tokens.numel() < 2:
        which = f"the {split or 'default'} split of " if (path / INDEX_FILE).is_file() else ""
        raise DataError(f"{which}{path} holds {tokens.numel()} tokens; perplexity needs at least 2"
                        + ("; choose another --split" if which else ""))
    return tokens


def _npy_tokens(path: Path) -> torch.Tensor:
    """Token ids of a .npy array: integers only (floats would be truncated to other ids), never unpickled."""
    try:
        ids = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):  # junk bytes, object arrays, a truncated file
        raise DataError(f"{path} is not a plain .npy array of token ids (junk, truncated, or pickled objects, "
                        f"which spectra never loads); save the ids with numpy.save(path, ids)") from None
    if not isinstance(ids, np.ndarray) or ids.dtype.kind not in "iu":
        raise DataError(f"{path} holds {getattr(ids, 'dtype', type(ids).__name__)} values, not integer token "
                        f"ids; save the ids as an integer array")
    return torch.from_numpy(ids.astype(np.int64).reshape(-1))


def _prepared_tokens(path: Path, split: str | None, tokenizer=None) -> torch.Tensor | None:
    """Tokens of a directory of prepared shards (spectra.data owns that format), else None. Shards made with
    another tokenizer than the model's are refused: their ids mean other text, so the perplexity would be noise."""
    if not (path / INDEX_FILE).is_file():
        return None
    expected = TokenDataset(path).index.get("tokenizer_sha256")
    if tokenizer is not None and expected and tokenizer_fingerprint(tokenizer) != expected:
        raise DataError(f"{path} was tokenized with another tokenizer than the checkpoint's; prepare the data "
                        f"with the checkpoint's tokenizer (spectra data prepare --tokenizer CHECKPOINT) or pass text")
    return torch.from_numpy(read_tokens(path, split).astype(np.int64)).reshape(-1)


def _read_documents(path: Path) -> list[str]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + (".jsonl",))
        if not files:
            raise DataError(f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)}, .jsonl) nor prepared shards")
        return [doc for f in files for doc in _read_documents(f)]
    if path.suffix == ".jsonl":
        docs = []
        for i, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Notepad) is not JSON
                if not line.strip():
                    continue
                docs.append(json.loads(line)["text"])
            except UnicodeDecodeError:
                raise DataError(f"{path}:{i} is not UTF-8 text; fix or drop that line") from None
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{i} is not a JSON object with a \"text\" field") from None
            if not isinstance(docs[-1], str):
                raise DataError(f"{path}:{i}: its \"text\" field is a {type(docs[-1]).__name__}, not a string")
        return docs
    try:
        return [path.read_text(encoding="utf-8-sig")]
    except UnicodeDecodeError:
        raise DataError(f"{path} is not UTF-8 text; pass text, .jsonl, .npy token ids or prepared shards") from None


def _tokenize_documents(docs: list[str], tokenizer, path: Path) -> torch.Tensor:
    if tokenizer is None:
        raise DataError(f"{path} is text but no tokenizer was given; use a checkpoint that has tokenizer.json")

    sep = eos_id(tokenizer)
    ids: list[int] = []
    for doc in docs:
        if not doc.strip():
            continue
        if ids and sep is not None:
            ids.append(sep)
        ids.extend(tokenizer.encode(doc, add_special_tokens=False).ids)
    if not ids:
        raise DataError(f"{path} holds no text")
    return torch.tensor(ids, dtype=torch.long)
