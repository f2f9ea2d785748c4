"""Fine-tuning data: prompt/response pairs, chat turns or plain text, tokenized with a loss mask and packed.

Each line of a ``.jsonl`` file is one example:

    {"prompt": "...", "response": "..."}                       loss on the response (and the end token)
    {"messages": [{"role": "user", "content": "..."}, ...]}    loss on every assistant turn
    {"text": "..."}                                            loss on every token

A ``.txt`` file is one plain-text example. Pairs and chats are rendered by the tokenizer's chat template
when its checkpoint has one (``chat_template`` in tokenizer_config.json), otherwise by :data:`TEMPLATE`.
Examples are packed greedily, in file order, into rows of ``seq_len`` tokens with a document id per token;
the model's ``document_ids`` argument keeps their attention apart and restarts their positions, so a
packed example is trained exactly as it would be alone. Examples longer than a row are truncated (the
prompt from the left, then the response from the right) and counted, never dropped.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import LoaderState
from ..errors import CheckpointError, DataError
from ..io import read_json
from ..tokenizer import EOS_TOKEN

IGNORE = -100  # target of tokens that carry no loss (cross_entropy's ignore_index)
# The built-in template: one header line per turn; the end-of-text token closes every assistant turn.
TEMPLATE = "### {role}:\n{content}\n\n"
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One example: chat turns (pairs become a user and an assistant turn) or plain text (loss everywhere)."""

    turns: list[dict[str, str]] | None = None
    text: str | None = None


# --- reading ---------------------------------------------------------------------------------------

def read_examples(path: str | Path) -> list[Example]:
    """Every example of a .jsonl (pairs, chats, text) or .txt file, checked: one DataError names the first bad line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"fine-tuning data {path} does not exist; pass a .jsonl file of prompt/response pairs, "
                        f"chat messages or text")
    if path.suffix not in (".jsonl", ".ndjson"):
        try:
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise DataError(f"{path} is not UTF-8 text; convert it to UTF-8 or pass a .jsonl file") from None
        if not text.strip():
            raise DataError(f"{path} is empty")
        return [Example(text=text)]
    examples = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")  # -sig: a byte-order mark (Notepad) is not JSON
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno} is not UTF-8 text; fix or drop that line") from None
            if line.strip():
                examples.append(_parse(line, f"{path}:{lineno}"))
    if not examples:
        raise DataError(f"{path} holds no examples")
    return examples


def _parse(line: str, where: str) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is not a JSON object")
    if "messages" in record:
        return Example(turns=_checked_turns(record["messages"], where))
    if "prompt" in record or "response" in record:
        for key in ("prompt", "response"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{where} lacks a string {key!r}; a pair needs both 'prompt' and 'response'")
        if not record["response"].strip():
            raise DataError(f"{where} has an empty response; remove the line or give it a response")
        return Example(turns=[{"role": "user", "content": record["prompt"]},
                              {"role": "assistant", "content": record["response"]}])
    if "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            raise DataError(f"{where} has an empty 'text'")
        return Example(text=record["text"])
    raise DataError(f"{where} has none of the keys 'prompt'+'response', 'messages' or 'text' "
                    f"(found {sorted(record)[:5]}); see docs/finetuning.md for the formats")


def _checked_turns(messages, where: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {i} lacks a string 'role' or 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: message {i} has role {m['role']!r}; use one of {', '.join(ROLES)}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise DataError(f"{where}: message {i} is an empty assistant response")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(turn["role"] == "assistant" for turn in out):
        raise DataError(f"{where}: no assistant message, so nothing to learn; add the response turn")
    return out


# --- rendering and tokenizing ----------------------------------------------------------------------

class ChatFormat:
    """Renders chat turns: the tokenizer's Jinja chat template if its checkpoint has one, else TEMPLATE.

    Either way the loss segments are the assistant turns: with a chat template, the text an assistant turn
    adds to the rendering of the turns before it (with the generation prompt) is its response.
    """

    def __init__(self, chat_template: str | None = None, eos: str = EOS_TOKEN) -> None:
        self.eos = eos
        self.template = None
        if chat_template:
            import jinja2
            try:
                self.template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)
            except jinja2.TemplateSyntaxError as err:
                raise DataError(f"the tokenizer's chat_template is not a valid Jinja template ({err}); fix "
                                f"tokenizer_config.json or pass --no-chat-template") from None

    @classmethod
    def for_checkpoint(cls, path: str | Path, eos: str = EOS_TOKEN) -> ChatFormat:
        config = Path(path) / "tokenizer_config.json"
        template = None
        if config.is_file():
            fix = "fix it or delete it (its chat_template is all spectra reads)"
            data = read_json(config, CheckpointError, fix)
            template = data.get("chat_template") if isinstance(data, dict) else None
            if isinstance(template, list):  # transformers also stores named templates
                template = next((t.get("template") for t in template if isinstance(t, dict)
                                 and t.get("name") == "default"), None)
            if not isinstance(data, dict) or not isinstance(template, (str, type(None))):
                raise CheckpointError(f"{config} is not a tokenizer config with a string chat_template; {fix}")
        return cls(template, eos)

    def segments(self, example: Example) -> list[tuple[str, bool]]:
        """(text, takes loss) pieces of an example."""
        if example.turns is None:
            return [(example.text, True)]
        turns = example.turns
        if self.template is None:
            out = []
            for turn in turns:
                header = TEMPLATE.format(role=turn["role"].capitalize(), content="")
                if turn["role"] == "assistant":
                    out += [(header, False), (turn["content"] + self.eos, True), ("\n\n", False)]
                else:
                    out.append((TEMPLATE.format(role=turn["role"].capitalize(), content=turn["content"]), False))
            return out
        out, done = [], ""
        for i, turn in enumerate(turns):
            if turn["role"] != "assistant":
                continue
            prefix = self._render(turns[:i], generation_prompt=True)
            full = self._render(turns[:i + 1], generation_prompt=False)
            if not (prefix.startswith(done) and full.startswith(prefix)):
                raise DataError("the tokenizer's chat template does not render turns as a growing prefix; "
                                "fine-tuning needs that to find the responses (remove chat_template to use "
                                "spectra's built-in template)")
            out += [(prefix[len(done):], False), (full[len(prefix):], True)]
            done = full
        return out

    def _render(self, turns: list[dict], generation_prompt: bool) -> str:
        return self.template.render(messages=turns, add_generation_prompt=generation_prompt,
                                    bos_token="", eos_token=self.eos)


def tokenize_example(tokenizer, segments: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, loss flags) of segments tokenized one by one, so the loss mask is exact at their borders."""
    ids, flags = [], []
    for text, loss in segments:
        piece = tokenizer.encode(text).ids if text else []
        ids += piece
        flags += [loss] * len(piece)
    return np.asarray(ids, dtype=np.int64), np.asarray(flags, dtype=bool)


def fit_example(ids: np.ndarray, flags: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """At most `limit` tokens: prompt tokens cut from the left (keeping up to half for the response), then
    the response from the right; returns (ids, flags, truncated)."""
    if ids.size <= limit:
        return ids, flags, False
    first_loss = int(np.argmax(flags)) if flags.any() else ids.size
    prompt_keep = max(limit - (ids.size - first_loss), min(first_loss, limit // 2))
    start = first_loss - min(first_loss, prompt_keep)
    return ids[start:start + limit], flags[start:start + limit], True


# --- packing ---------------------------------------------------------------------------------------

@dataclass
class PackedRows:
    """Rows of `seq_len` tokens: inputs, targets (IGNORE without loss) and document ids (-1: padding)."""

    inputs: np.ndarray
    targets: np.ndarray
    documents: np.ndarray

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(torch.from_numpy(a[rows]) for a in (self.inputs, self.targets, self.documents))


def pack_examples(examples: list[tuple[np.ndarray, np.ndarray]], seq_len: int, pad_id: int) -> PackedRows:
    """Greedy packing in order: an example (its n tokens give n - 1 input/target pairs) goes into the
    current row if it fits, else starts the next one. Targets of tokens without loss are IGNORE."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = [[]]
    used = 0
    for ids, flags in examples:
        n = ids.size - 1
        if n < 1 or not flags[1:].any():
            continue  # nothing to predict (cannot happen for checked, fitted examples; kept for safety)
        if used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, flags))
        used += n
    inputs = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets = np.full((len(rows), seq_len), IGNORE, dtype=np.int64)
    documents = np.full((len(rows), seq_len), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for d, (ids, flags) in enumerate(row):
            n = ids.size - 1
            inputs[r, at:at + n] = ids[:-1]
            targets[r, at:at + n] = np.where(flags[1:], ids[1:], IGNORE)
            documents[r, at:at + n] = d
            at += n
    return PackedRows(inputs, targets, documents)


# --- the dataset and its loader --------------------------------------------------------------------

class PackedLoader:
    """Batches of packed rows in an order that depends only on (seed, epoch): resumable like WindowLoader."""

    def __init__(self, rows: PackedRows, batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        self.rows, self.batch_size, self.seed, self.shuffle = rows, batch_size, seed, shuffle
        self.state = LoaderState()

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.rows))
        return np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(len(self.rows))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size):
            if self.state.index >= len(self.rows):
                self.state = LoaderState(self.state.epoch + 1, 0)
            picked.append(self._order(self.state.epoch)[self.state.index])
            self.state.index += 1
        return self.rows.batch(np.asarray(picked))

    def fixed_batches(self, num_batches: int) -> list[tuple[torch.Tensor, ...]]:
        """The first `num_batches` batches in file order (the held-out loss)."""
        return [self.rows.batch(np.arange(s, min(s + self.batch_size, len(self.rows))))
                for s in range(0, min(len(self.rows), num_batches * self.batch_size), self.batch_size)]

    def state_dict(self) -> dict:
        return self.state.to_dict()

    def load_state_dict(self, state: dict) -> None:
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= len(self.rows):
            raise DataError(f"loader position {state} does not exist in this data; was the file changed?")
        self.state = LoaderState(epoch, index)


class FinetuneDataset:
    """Fine-tuning examples of a file, tokenized, split (every k-th example held out) and packed.

    Offers what the training loop asks of a dataset: `path`, `vocab_size`, `tokenizer()`, `fingerprint()`
    and `loaders(cfg, seq_len)`.
    """

    def __init__(self, path: str | Path, tokenizer, seq_len: int, chat: ChatFormat | None = None,
                 val_fraction: float = 0.1, val_path: str | Path | None = None) -> None:
        self.path, self._tokenizer, self.seq_len = Path(path), tokenizer, seq_len
        if not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        chat = chat or ChatFormat()
        examples = read_examples(path)
        if val_path is not None:
            train, val = examples, read_examples(val_path)
        else:
            every = round(1 / val_fraction) if val_fraction > 0 else 0
            val = [e for i, e in enumerate(examples) if every and i % every == every - 1]
            train = [e for i, e in enumerate(examples) if not (every and i % every == every - 1)]
        if not train:
            raise DataError(f"{path}: no training examples left after holding out validation ones; "
                            f"lower --val-fraction or add examples")
        self.truncated = 0
        self.examples = {"train": len(train), "val": len(val)}
        pad = self._pad_id()
        self.splits = {name: pack_examples(self._tokenize(part, chat), seq_len, pad)
                       for name, part in (("train", train), ("val", val))}
        self.response_tokens = {name: int((rows.targets != IGNORE).sum()) for name, rows in self.splits.items()}

    def _pad_id(self) -> int:
        eos = self._tokenizer.token_to_id(EOS_TOKEN)
        return int(eos) if eos is not None else 0

    def _tokenize(self, examples: list[Example], chat: ChatFormat) -> list[tuple[np.ndarray, np.ndarray]]:
        out, limit = [], self.seq_len + 1
        for example in examples:
            ids, flags = tokenize_example(self._tokenizer, chat.segments(example))
            if example.turns is None:  # plain text: cut into rows like pretraining windows, nothing lost
                out += [(ids[s:s + limit], flags[s:s + limit]) for s in range(0, max(ids.size - 1, 1), limit - 1)]
                continue
            ids, flags, cut = fit_example(ids, flags, limit)
            self.truncated += cut
            out.append((ids, flags))
        return out

    @property
    def vocab_size(self) -> int:
        return int(self._tokenizer.get_vocab_size())

    def tokenizer(self):
        return self._tokenizer

    def fingerprint(self) -> dict:
        """What a resumed run checks: the same packed tokens, targets and documents."""
        digest = hashlib.sha256()
        for name in ("train", "val"):
            for array in (self.splits[name].inputs, self.splits[name].targets, self.splits[name].documents):
                digest.update(np.ascontiguousarray(array).tobytes())
        return {"finetune_sha256": digest.hexdigest(), "rows": {k: len(v) for k, v in self.splits.items()}}

    def num_tokens(self, split: str) -> int:
        return len(self.splits[split]) * self.seq_len

    def loaders(self, cfg, seq_len: int) -> tuple[PackedLoader, list, list]:
        """(training loader, fixed validation batches, fixed training batches), as build_loaders returns."""
        if seq_len != self.seq_len:
            raise DataError(f"the examples were packed into rows of {self.seq_len} tokens, not {seq_len}")
        train = PackedLoader(self.splits["train"], cfg.batch_size, seed=cfg.seed)
        val = PackedLoader(self.splits["val"], cfg.batch_size, shuffle=False).fixed_batches(cfg.eval_batches)
        fixed = PackedLoader(self.splits["train"], cfg.batch_size, shuffle=False).fixed_batches(cfg.eval_batches)
        return train, val, fixed

    def describe(self) -> str:
        return (f"{self.examples['train']} training / {self.examples['val']} held-out examples in "
                f"{len(self.splits['train'])} / {len(self.splits['val'])} packed rows of {self.seq_len} tokens "
                f"({self.response_tokens['train']:,} / {self.response_tokens['val']:,} loss tokens); "
                f"{self.truncated} example(s) longer than {self.seq_len + 1} tokens were truncated")
