"""The lm-eval adapter on a local task (YAML + JSON data), checked against the model computed directly."""

import json
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from eval_support import save_tiny_checkpoint, shakespeare, tiny_tokenizer

from spectra import ConfigError, DataError
from spectra.checkpoint import load_model
from spectra.cli.main import main
from spectra.eval import perplexity
from spectra.eval.harness import SpectraEvalLM, evaluate_tasks, flatten_metrics, task_availability, task_manager
from spectra.generate import generate

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

DOCS = [
    {"question": "Who is the Prince of Denmark?", "choices": [" Hamlet", " Horatio", " Laertes"], "label": 0,
     "answer": "Hamlet"},
    {"question": "Who speaks to the ghost", "choices": [" the prince", " Ophelia"], "label": 1, "answer": "Hamlet"},
    {"question": "What is rotten?", "choices": [" something in the state", " Denmark", " the king's ale",
                                               " nothing"], "label": 0, "answer": "Denmark"},
]

MC_YAML = """task: spectra_local_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
"""

GEN_YAML = """task: spectra_local_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
generation_kwargs:
  until: ["\\n", "?"]
  max_gen_toks: 10
metric_list:
  - metric: exact_match
"""

HUB_YAML = """task: spectra_needs_hub
dataset_path: allenai/ai2_arc
dataset_name: ARC-Easy
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices.text}}"
doc_to_target: 0
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harness")
    ckpt = save_tiny_checkpoint(root / "trilm", seed=4)
    tasks = root / "tasks"
    tasks.mkdir()
    data = tasks / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / "mc.yaml").write_text(MC_YAML.format(data=data))
    (tasks / "gen.yaml").write_text(GEN_YAML.format(data=data))
    (tasks / "hub.yaml").write_text(HUB_YAML)
    return SimpleNamespace(ckpt=ckpt, tasks=tasks, model=load_model(ckpt), tok=tiny_tokenizer())


def _request_args(args) -> tuple[str, str]:
    # Logged samples hold each request's arguments as a dict {"arg_0": ..., "arg_1": ...} or a tuple.
    return (args["arg_0"], args["arg_1"]) if isinstance(args, dict) else tuple(args)


@torch.no_grad()
def direct_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool]:
    ctx = tok.encode(context).ids
    cont = tok.encode(context + continuation).ids[len(ctx):]
    ids = torch.tensor([ctx + cont])
    logprobs = F.log_softmax(model(ids[:, :-1])[0].float(), -1)[len(ctx) - 1:]
    target = torch.tensor(cont)
    return float(logprobs.gather(-1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_local_tasks_match_direct_model_values(setup):
    lm = SpectraEvalLM(str(setup.ckpt), batch_size=2)
    results = evaluate_tasks(lm, ["spectra_local_mc", "spectra_local_gen"], include_path=setup.tasks,
                             log_samples=True)
    mc = results["samples"]["spectra_local_mc"]
    assert len(mc) == len(DOCS)
    for sample in mc:
        doc = sample["doc"]
        scores = []
        for args, resp, choice in zip(sample["arguments"], sample["resps"], doc["choices"]):
            context, continuation = _request_args(args)
            assert context == f"Question: {doc['question']}\nAnswer:" and continuation == " " + choice
            logprob, greedy = direct_loglikelihood(setup.model, setup.tok, context, continuation)
            assert resp[0][0] == pytest.approx(logprob, abs=1e-4)
            assert resp[0][1] == greedy
            scores.append(logprob)
        assert sample["acc"] == float(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    gen = results["samples"]["spectra_local_gen"]
    for sample in gen:
        prompt = setup.tok.encode(f"Question: {sample['doc']['question']}\nAnswer:").ids
        out = generate(setup.model, prompt, max_new_tokens=10, temperature=0)[0, len(prompt):].tolist()
        if 0 in out:  # <|endoftext|> ends generation
            out = out[:out.index(0)]
        text = setup.tok.decode(out).split("\n")[0].split("?")[0]
        assert sample["resps"][0][0] == text
    metrics = flatten_metrics(results)
    assert set(metrics) == {"spectra_local_mc/acc", "spectra_local_gen/exact_match"}
    assert metrics["spectra_local_mc/acc"] == pytest.approx(sum(s["acc"] for s in mc) / len(mc))


def test_loglikelihood_rolling_equals_sliding_window_perplexity(setup):
    # With windows of the full context and stride = window, lm-eval's rolling windows and spectra's
    # perplexity windows are the same; the document is scored after an <|endoftext|> prefix.
    lm = SpectraEvalLM(setup.model, tokenizer=setup.tok, max_length=24, batch_size=3)
    text = shakespeare(700)
    [total] = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))], disable_tqdm=True)
    ids = torch.tensor([0] + setup.tok.encode(text).ids)
    ref = perplexity(setup.model, ids, window=24, stride=24, progress=False)
    assert total == pytest.approx(-ref.loss * ref.tokens, rel=1e-5)


def test_registered_and_built_from_arg_string(setup):
    from lm_eval.api.registry import get_model

    cls = get_model("spectra")
    assert cls is SpectraEvalLM
    lm = cls.create_from_arg_string(f"pretrained={setup.ckpt},max_length=32", {"batch_size": "auto:4",
                                                                             "max_batch_size": 5})
    assert lm.max_length == 32 and lm.batch_size == 5 and lm.eot_token_id == 0
    with pytest.raises(ConfigError, match="max_length 4096"):
        SpectraEvalLM(setup.model, tokenizer=setup.tok, max_length=4096)
    with pytest.raises(ConfigError, match="batch size must be an integer"):
        SpectraEvalLM(setup.model, tokenizer=setup.tok, batch_size="many")


def test_unavailable_and_unknown_tasks_are_clear_errors(setup):
    with pytest.raises(DataError, match=r"1 of 2 tasks cannot run offline — spectra_needs_hub: needs the Hugging "
                                        r"Face hub \(allenai/ai2_arc\)"):
        evaluate_tasks(setup.model, ["spectra_local_mc", "spectra_needs_hub"], tokenizer=setup.tok,
                       include_path=setup.tasks)
    # (Only the local index here: an unknown name makes evaluate_tasks index all of lm-eval's tasks.)
    local = task_manager(["spectra_local_mc"], setup.tasks)
    assert task_availability(["no_such_task"], local)["no_such_task"].startswith("unknown task")
    results = evaluate_tasks(setup.model, ["spectra_local_mc", "spectra_needs_hub"], tokenizer=setup.tok,
                             include_path=setup.tasks, skip_unavailable=True, limit=1)
    assert list(results["results"]) == ["spectra_local_mc"]
    assert "spectra_needs_hub" in results["skipped_tasks"]


def test_cli_tasks_writes_results(setup, tmp_path, capsys):
    out = tmp_path / "tasks.json"
    assert main(["eval", "tasks", str(setup.ckpt), "--tasks", "spectra_local_mc", "--include-path",
                 str(setup.tasks), "--out", str(out), "--family", "TriLM", "--name", "tiny"]) == 0
    record = json.loads(out.read_text())
    assert record["format"] == "spectra-eval/1" and record["model"]["name"] == "tiny"
    assert 0.0 <= record["metrics"]["spectra_local_mc/acc"] <= 1.0
    capsys.readouterr()
    assert main(["eval", "tasks", str(setup.ckpt), "--tasks", "spectra_needs_hub", "--include-path",
                 str(setup.tasks)]) == 2
    assert "needs the Hugging Face hub" in capsys.readouterr().err


def test_hub_access_is_restored():
    import datasets.config

    from spectra.eval.harness import hub_access

    before = (os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_HUB_OFFLINE)
    with hub_access(online=True):
        assert os.environ["HF_DATASETS_OFFLINE"] == "0" and datasets.config.HF_HUB_OFFLINE is False
    assert (os.environ.get("HF_DATASETS_OFFLINE"), datasets.config.HF_HUB_OFFLINE) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_tasks_on_a_missing_cuda_device_is_refused(setup, capsys):
    # The adapter falls back to the CPU for lm-eval's own default device; a --device the user gave must not.
    capsys.readouterr()
    assert main(["eval", "tasks", str(setup.ckpt), "--tasks", "spectra_local_mc", "--include-path",
                 str(setup.tasks), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "no CUDA GPU" in err


@pytest.mark.parametrize("extra", [["--limit", "-1"], ["--limit", "0"], ["--limit", "nan"], ["--num-fewshot", "-1"],
                                   ["--include-path", "no-such-dir"]])
def test_cli_tasks_bad_options_are_one_line(setup, capsys, extra):
    # lm-eval failed deep inside on the limits (exit 1), took -1 few-shot examples as 0, and a missing
    # --include-path was reported as an unknown task.
    capsys.readouterr()
    include = [] if "--include-path" in extra else ["--include-path", str(setup.tasks)]
    assert main(["eval", "tasks", str(setup.ckpt), "--tasks", "spectra_local_mc", *include, "--device", "cpu",
                 *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("limit" in err[0] or "num_fewshot" in err[0] or "not a directory" in err[0]), err


def test_cli_tasks_more_fewshot_examples_than_documents_is_one_error_line(setup, capsys):
    # lm-eval samples the few-shot examples once it has started (its own log lines come first) and failed with
    # "Sample larger than population" (exit 1): now exit 2 and one error line naming the fix.
    capsys.readouterr()
    assert main(["eval", "tasks", str(setup.ckpt), "--tasks", "spectra_local_mc", "--include-path", str(setup.tasks),
                 "--device", "cpu", "--num-fewshot", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if "error" in line.lower()]
    assert errors == [err[-1]] and "num_fewshot 1000" in err[-1] and "lower --num-fewshot" in err[-1], err[-3:]
