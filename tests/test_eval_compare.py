import json

import pytest
from eval_support import tiny_model

from spectra import DataError
from spectra.cli.main import main
from spectra.eval import collect_results, describe_model, model_family, write_json
from spectra.eval.plots import comparable_metrics
from spectra.eval.results import result_record


def write_result(path, model, metrics, name, family=None):
    return write_json(result_record(describe_model(model, f"runs/{name}", family, name), metrics, {}), path)


def test_families_and_sizes():
    tri, flt = tiny_model("ternary"), tiny_model("float")
    assert model_family(tri) == "TriLM" and model_family(flt) == "FloatLM"
    quant = tiny_model("float")
    quant.config = quant.config.replace(weight_kind="gptq", weight_options={"bits": 4})
    assert model_family(quant) == "QuantLM 4-bit"
    a, b = describe_model(tri, "x"), describe_model(flt, "y")
    assert a["parameters"] == b["parameters"] and a["size_bits"] < b["size_bits"]


def test_compare_merges_files_and_draws_pngs(tmp_path, capsys):
    files = []
    for i, width in enumerate((64, 96, 128)):
        for kind in ("ternary", "float"):
            shape = dict(hidden_size=width, num_heads=4, intermediate_size=2 * width + 8 * i)
            model = tiny_model(kind, **shape)
            name = f"{kind}-{width}"
            files.append(write_result(tmp_path / f"{name}-ppl.json", model, {"perplexity": 50.0 - 10 * i}, name))
            files.append(write_result(tmp_path / f"{name}-tasks.json", model, {"arc/acc": 0.3 + 0.05 * i}, name))
    entries = collect_results(files)
    assert len(entries) == 6 and all(set(e["metrics"]) == {"perplexity", "arc/acc"} for e in entries)
    assert comparable_metrics(entries) == ["perplexity", "arc/acc"]
    out = tmp_path / "plots"
    assert main(["compare", *map(str, files), "--out-dir", str(out)]) == 0
    assert "6 models" in capsys.readouterr().out
    for png in ("perplexity.png", "arc_acc.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_bad_result_files(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"results": {}}))
    with pytest.raises(DataError, match="not a spectra result file"):
        collect_results([tmp_path / "other.json"])
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        collect_results([tmp_path / "broken.json"])
    good = write_result(tmp_path / "good.json", tiny_model("float"), {"perplexity": 3.0}, "m")
    assert main(["compare", str(good), "--metric", "missing", "--out-dir", str(tmp_path)]) == 2
