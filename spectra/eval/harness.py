"""lm-evaluation-harness adapter: spectra checkpoints as an lm-eval ``LM`` registered under "spectra".

Importing this module registers the model, so ``lm_eval.simple_evaluate(model="spectra",
model_args="pretrained=DIR")`` works in Python and ``python -m spectra.eval --model spectra ...`` is the
lm-eval command line with spectra registered (lm-eval 0.4 has no plugin entry point for models).
Every weight kind loads through :func:`spectra.checkpoint.load_model`, so TriLM, FloatLM, packed and
QuantLM checkpoints are scored by the same code.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from ..checkpoint import load_model, parse_dtype
from ..errors import CheckpointError, ConfigError, DataError
from ..generate import sample_next
from ..progress import progress_bar
from ..tokenizer import eos_id, load_tokenizer

log = logging.getLogger(__name__)

# The zero-shot benchmarks of the Spectra paper (arXiv 2407.12327, Sec. 5), lm-eval task names.
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "boolq", "piqa", "winogrande", "lambada_openai", "sciq",
               "logiqa", "mmlu_continuation", "triviaqa", "crows_pairs_english", "truthfulqa_mc1")
DEFAULT_BATCH_SIZE = 16


@register_model("spectra")
class SpectraEvalLM(TemplateLM):
    """A spectra model for lm-eval: loglikelihood, loglikelihood_rolling and generate_until.

    `pretrained` is a checkpoint directory (or an already built SpectraLM together with `tokenizer`).
    """

    def __init__(self, pretrained: str | torch.nn.Module, tokenizer: Any = None, device: str | None = None,
                 dtype: str | torch.dtype | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_batch_size: int | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 kind: str | None = None, **unused: Any) -> None:
        super().__init__()
        if unused:
            log.warning("spectra model: ignoring unknown arguments %s", sorted(unused))
        if isinstance(pretrained, torch.nn.Module):
            self.model = pretrained.eval()
            if tokenizer is None:
                raise ConfigError("a model object needs its tokenizer: SpectraEvalLM(model, tokenizer=tok)")
        else:
            if isinstance(dtype, str):
                dtype = None if dtype == "auto" else parse_dtype(dtype)
            self.model = load_model(pretrained, device=_usable_device(device), dtype=dtype, kind=kind)
            tokenizer = tokenizer or load_tokenizer(pretrained)
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer
        self._device = self.model.model.embed_tokens.weight.device
        self._eot = eos_id(self.tokenizer)
        if self._eot is None:
            raise CheckpointError("the tokenizer has no <|endoftext|> token, which lm-eval needs as the "
                                  "prefix of empty contexts; use a tokenizer trained by spectra.train_tokenizer")
        self.max_length = int(max_length or self.model.config.max_seq_len)
        if not 1 < self.max_length <= self.model.config.max_seq_len:
            raise ConfigError(f"max_length {self.max_length} must lie in 2..{self.model.config.max_seq_len} "
                              f"(the model's max_seq_len)")
        self.max_gen_toks = int(max_gen_toks)
        self.batch_size = _parse_batch_size(batch_size, max_batch_size)

    # --- tokenization (TemplateLM contract) ---
    @property
    def eot_token_id(self) -> int:
        return self._eot

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    @property
    def tokenizer_name(self) -> str:
        return "spectra-bpe"

    # --- scoring ---
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first: the first batch fails fast on memory, and batches hold similar lengths.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        for batch in progress_bar(batches, desc="loglikelihood", unit="batch", disable=disable_tqdm):
            rows = [self._score_row(requests[i][1], requests[i][2]) for i in batch]
            length = max(len(inp) for inp, _ in rows)
            inputs = torch.zeros(len(rows), length, dtype=torch.long)
            for r, (inp, _) in enumerate(rows):
                inputs[r, :len(inp)] = torch.tensor(inp)
            logprobs = F.log_softmax(self.model(inputs.to(self._device)).float(), dim=-1)
            for r, (inp, cont) in enumerate(rows):
                n, k = len(inp), len(cont)
                scores = logprobs[r, n - k:n]
                target = torch.tensor(cont, device=scores.device)
                total = float(scores.gather(-1, target[:, None]).sum())
                greedy = bool((scores.argmax(-1) == target).all())
                results[batch[r]] = (total, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[batch[r]][0], (total, greedy))
        return results  # type: ignore[return-value]

    def _score_row(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        if not continuation:
            raise DataError("lm-eval sent an empty continuation; the task's choices must not be empty")
        if len(continuation) > self.max_length:
            raise DataError(f"a continuation of {len(continuation)} tokens exceeds the model's context "
                            f"{self.max_length}; it cannot be scored")
        # Keep the most recent context that fits: inputs are every token but the last.
        whole = (context + continuation)[-(self.max_length + 1):]
        return whole[:-1], continuation

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents (each token once, windows of the model's full context)."""
        windows, owners = [], []
        for idx, (string,) in enumerate(req.args for req in requests):
            for context, target in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(((string, ""), context, target))
                owners.append(idx)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for idx, (logprob, _) in zip(owners, scores):
            totals[idx] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation ---
    @torch.no_grad()
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when the task asks) continuations cut at the first stop sequence."""
        outputs = []
        for req in progress_bar(requests, desc="generate_until", unit="request", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self._generate_one(context, dict(gen_kwargs))
            outputs.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return outputs

    def _generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        eot_text = self.tok_decode([self._eot])
        until = _stop_sequences(gen_kwargs.pop("until", None), eot_text)
        max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
        sampling = bool(gen_kwargs.pop("do_sample", False))
        temperature = float(gen_kwargs.pop("temperature", 1.0 if sampling else 0.0)) if sampling else 0.0
        top_k, top_p = gen_kwargs.pop("top_k", None), gen_kwargs.pop("top_p", None)
        generator = torch.Generator(device=self._device).manual_seed(int(gen_kwargs.pop("seed", 1234)))
        # Leave room for the new tokens inside the model's context.
        prompt = (self.tok_encode(context) or [self._eot])[-max(1, self.max_length - max_new):]
        total = min(len(prompt) + max_new, self.max_length)
        new: list[int] = []
        self.model.setup_cache(1, total)
        try:
            tokens = torch.tensor([prompt], device=self._device)
            logits = self.model.prefill(tokens)
            for pos in range(len(prompt), total):
                nxt = sample_next(logits[:, -1], temperature, top_k, top_p, generator)
                token = int(nxt[0])
                if token == self._eot:
                    break
                new.append(token)
                if any(stop in self.tok_decode(new) for stop in until):
                    break
                if pos + 1 < total:
                    logits = self.model(nxt[:, None], input_pos=torch.tensor([pos], device=self._device))
        finally:
            self.model.clear_cache()
        text = self.tok_decode(new)
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text

    def get_model_info(self) -> dict[str, Any]:
        return {"model_config": self.model.config.to_dict()}


def _stop_sequences(until: str | list[str] | None, eot_text: str) -> list[str]:
    stops = [until] if isinstance(until, str) else list(until or [])
    return stops if eot_text in stops else stops + [eot_text]


def _parse_batch_size(batch_size: int | str | None, max_batch_size: int | None) -> int:
    # Scoring is plain forward passes of known length; "auto" needs no memory probe on CPU, so it means
    # the largest batch the user allows.
    if batch_size is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        return int(max_batch_size or DEFAULT_BATCH_SIZE)
    try:
        size = int(batch_size)
    except ValueError:
        raise ConfigError(f"batch size must be an integer or 'auto', got {batch_size!r}") from None
    if size < 1:
        raise ConfigError(f"batch size must be positive, got {size}")
    return size


def _usable_device(device: str | None) -> str:
    # lm-eval's command line passes device="cuda:0" unless told otherwise; like its Hugging Face model,
    # fall back to the CPU (with a warning) rather than refuse to run on a machine without a GPU.
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available; running on the CPU", device)
        return "cpu"
    return str(device)


# --- running tasks --------------------------------------------------------------------------------

@contextlib.contextmanager
def hub_access(online: bool) -> Iterator[None]:
    """Allow or forbid Hugging Face hub access for datasets inside the block (even if `datasets` is already
    imported, which reads its environment once), restoring the previous settings afterwards."""
    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {n: os.environ.get(n) for n in names}
    modules = []
    try:
        import datasets.config
        import huggingface_hub.constants

        modules = [(datasets.config, "HF_HUB_OFFLINE"), (huggingface_hub.constants, "HF_HUB_OFFLINE")]
    except ImportError:
        pass
    saved_attrs = [(m, a, getattr(m, a, None)) for m, a in modules]
    try:
        for n in names:
            os.environ[n] = "0" if online else "1"
        for m, a in modules:
            setattr(m, a, not online)
        yield
    finally:
        for n, v in saved_env.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v
        for m, a, v in saved_attrs:
            setattr(m, a, v)


def task_manager(tasks: list[str] | tuple[str, ...], include_path: str | Path | None = None) -> Any:
    """An lm-eval TaskManager that knows `tasks`; lm-eval's own task index is skipped (it costs seconds)
    when every task is defined under `include_path`."""
    from lm_eval.tasks import TaskManager

    if include_path:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(name in local.all_tasks for name in tasks):
            return local
        return TaskManager(include_path=str(include_path))
    return TaskManager()


def task_availability(tasks: list[str] | tuple[str, ...], manager: Any) -> dict[str, str | None]:
    """Task name -> None when its data loads locally, else the reason it does not."""
    status: dict[str, str | None] = {}
    for name in tasks:
        if name not in manager.all_tasks:
            status[name] = "unknown task (not in lm-eval's registry nor under --include-path)"
            continue
        try:
            manager.load([name])
            status[name] = None
        except (ConnectionError, OSError) as err:
            repo = re.search(r"reach '([^']+)'", str(err))  # datasets' "Couldn't reach 'org/name' on the Hub"
            status[name] = f"needs the Hugging Face hub ({repo.group(1) if repo else err})"
        except Exception as err:  # lm-eval and datasets raise many kinds while building a task
            status[name] = f"{type(err).__name__}: {err}"
    return status


def evaluate_tasks(model: str | Path | torch.nn.Module, tasks: list[str] | tuple[str, ...] = PAPER_TASKS,
                   tokenizer: Any = None, include_path: str | Path | None = None, num_fewshot: int = 0,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str | None = None, limit: int | float | None = None,
                   skip_unavailable: bool = False, online: bool = False, log_samples: bool = False,
                   seed: int = 1234) -> dict[str, Any]:
    """Run lm-eval `tasks` on a checkpoint directory (or a SpectraLM with its tokenizer).

    Offline by default: a task whose dataset is not in the local Hugging Face cache raises a DataError
    naming it (or is skipped with `skip_unavailable`). Returns lm-eval's results dict, plus
    "skipped_tasks" (name -> reason).
    """
    import lm_eval

    tasks = list(tasks)
    # lm-eval itself fails on these deep inside (islice of -1, no docs for 0, NaN to int) or samples nonsense.
    if limit is not None and not (0 < limit < math.inf and (limit < 1 or float(limit).is_integer())):
        raise ConfigError(f"limit must be a fraction in (0, 1) or a whole number of documents >= 1, got {limit}")
    if num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    if include_path is not None and not Path(include_path).is_dir():
        raise DataError(f"--include-path {include_path} is not a directory of task YAMLs")
    with hub_access(online):
        manager = task_manager(tasks, include_path)
        status = task_availability(tasks, manager)
        missing = {name: why for name, why in status.items() if why is not None}
        if missing and (not skip_unavailable or len(missing) == len(tasks)):
            lines = "; ".join(f"{name}: {why}" for name, why in missing.items())
            raise DataError(f"{len(missing)} of {len(tasks)} tasks cannot run offline — {lines}. Fix: put the "
                            f"datasets in the local Hugging Face cache (download them where there is network), "
                            f"pass --online, point --include-path at local task YAMLs, or pass --skip-unavailable")
        runnable = [name for name in tasks if name not in missing]
        lm = model if isinstance(model, SpectraEvalLM) else SpectraEvalLM(model, tokenizer=tokenizer,
                                                                          device=device, batch_size=batch_size)
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=runnable, num_fewshot=num_fewshot, limit=limit,
                                              task_manager=manager, log_samples=log_samples, random_seed=seed,
                                              numpy_random_seed=seed, torch_random_seed=seed,
                                              fewshot_random_seed=seed)
        except ValueError as err:
            # lm-eval draws the few-shot examples with random.sample, which fails this way deep inside
            if "larger than population" not in str(err):
                raise
            raise DataError(f"num_fewshot {num_fewshot} asks for more few-shot examples than a task's documents "
                            f"hold ({', '.join(runnable)}); lower --num-fewshot") from None
    results["skipped_tasks"] = missing
    return results


def flatten_metrics(results: dict[str, Any]) -> dict[str, float]:
    """lm-eval's nested results as {"task/metric": value} (filters named only when not "none")."""
    flat: dict[str, float] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "_stderr" in key \
                    or key == "sample_len":
                continue
            metric, _, filt = key.partition(",")
            name = f"{task}/{metric}" if filt in ("", "none") else f"{task}/{metric}[{filt}]"
            flat[name] = float(value)
    return flat
