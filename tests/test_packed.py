"""PackedTernaryLinear and packed checkpoints: bit-exact against FrozenTernaryLinear, same greedy tokens,
the storage layout on disk, sizes reported from stored bytes, and one clear error per kind of bad input."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import spectra
from spectra.checkpoint import load_checkpoint, save_checkpoint
from spectra.cli.info import info
from spectra.cli.main import main
from spectra.convert import pack_checkpoint, pack_model, pack_report
from spectra.errors import CheckpointError, FormatError
from spectra.formats import STORAGE_ALIGN_BYTES, get_format
from spectra.generate import generate
from spectra.kernels import ternary_matmul_reference
from spectra.linear import FrozenTernaryLinear
from spectra.packed import PackedTernaryLinear
from spectra.tokenizer import load_tokenizer, train_tokenizer

FORMATS = ("tq2", "tq1")


def random_frozen(out_features, in_features, parts, axis, seed):
    g = torch.Generator().manual_seed(seed)
    trits = torch.randint(-1, 2, (out_features, in_features), generator=g, dtype=torch.int8)
    scales = torch.rand(parts, generator=g) + 0.05
    return FrozenTernaryLinear.from_trits(trits, scales, axis)


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(FORMATS), out_features=st.integers(2, 70), in_features=st.integers(2, 300),
       parts=st.integers(1, 2), axis=st.sampled_from([0, 1]), batch=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_packed_layer_equals_frozen_layer_bit_exactly(fmt, out_features, in_features, parts, axis, batch, seed):
    frozen = random_frozen(out_features, in_features, parts, axis, seed)
    packed = PackedTernaryLinear.from_trits(frozen.trits, frozen.scales, axis, fmt)
    x = torch.randn(batch, 3, in_features, generator=torch.Generator().manual_seed(seed + 1))
    assert torch.equal(packed(x), frozen(x))
    assert torch.equal(packed.trits(), frozen.trits)
    assert torch.equal(packed.dense_weight(), frozen.dense_weight(torch.float32))
    ref = ternary_matmul_reference(x, packed.qweight, fmt, in_features, packed.scales, axis)
    assert torch.equal(ref, torch.nn.functional.linear(x, frozen.dense_weight(torch.float32)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_holds_storage_layout_and_round_trips(fmt):
    frozen = random_frozen(23, 333, 2, 1, 0)
    packed = PackedTernaryLinear.from_trits(frozen.trits, frozen.scales, 1, fmt)
    state = packed.state_dict()
    assert set(state) == {"qweight", "scales"}  # the compiled path's unit scale is not checkpoint content
    assert state["qweight"].shape == (23, get_format(fmt).row_bytes(333, STORAGE_ALIGN_BYTES))
    assert packed.qweight.shape == (23, get_format(fmt).row_bytes(333))
    fresh = PackedTernaryLinear(333, 23, shard_axis=1, parts=2, format=fmt)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.qweight, packed.qweight) and torch.equal(fresh.scales, packed.scales)


def test_config_weight_kind_builds_packed_layers():
    model = spectra.SpectraLM(spectra.get_config("tiny", weight_kind="tq1", model_parallel_size=2))
    layers = model.linear_layers()
    assert all(isinstance(m, PackedTernaryLinear) and m.format == "tq1" for m in layers.values())
    assert layers["model.layers.0.self_attn.o_proj"].shard_axis == 1
    with pytest.raises(FormatError, match="unknown packed weight options"):
        spectra.SpectraLM(spectra.get_config("tiny", weight_kind="tq2", weight_options={"bits": 2}))


def test_storage_bits_on_a_meta_3_9b_model():
    with torch.device("meta"):
        model = spectra.SpectraLM(spectra.get_config("3.9B", weight_kind="tq1"))
    layers = model.linear_layers().values()
    bpw = sum(m.storage_bits() for m in layers) / sum(m.in_features * m.out_features for m in layers)
    assert 1.6 <= bpw <= 1.61


# --- models and checkpoints ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(["the quick brown fox jumps over the lazy dog; ternary weights are small."] * 20, 300)


def frozen_model(parts=2, seed=0):
    torch.manual_seed(seed)
    model = spectra.SpectraLM(spectra.get_config("tiny", vocab_size=320, model_parallel_size=parts))
    return spectra.freeze_ternary(model).eval()


@pytest.mark.parametrize("fmt", FORMATS)
def test_pack_model_logits_bit_exact_and_config(fmt):
    model = frozen_model()
    tokens = torch.randint(0, 320, (2, 19))
    packed = pack_model(copy.deepcopy(model), fmt)
    assert packed.config.weight_kind == fmt and packed.config.weight_options == {"format_version": 1}
    assert torch.equal(packed(tokens), model(tokens))
    # From latent TernaryLinear weights directly, and from another packed format.
    torch.manual_seed(1)
    latent = spectra.SpectraLM(spectra.get_config("tiny", vocab_size=320, model_parallel_size=2)).eval()
    expected = spectra.freeze_ternary(copy.deepcopy(latent))(tokens)
    assert torch.equal(pack_model(latent, fmt)(tokens), expected)
    other = "tq1" if fmt == "tq2" else "tq2"
    assert torch.equal(pack_model(pack_model(copy.deepcopy(model), other), fmt)(tokens), model(tokens))


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_checkpoint_logits_and_greedy_tokens(tmp_path, tokenizer, fmt):
    model = frozen_model()
    save_checkpoint(model, tmp_path / "tri", tokenizer=tokenizer, dtype=torch.float16)
    report = pack_checkpoint(tmp_path / "tri", tmp_path / fmt, fmt)
    unpacked = load_checkpoint(tmp_path / "tri")
    packed = load_checkpoint(tmp_path / fmt)
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedTernaryLinear)
    tokens = torch.randint(0, 320, (3, 21))
    assert torch.equal(packed(tokens), unpacked(tokens))
    prompt = tokenizer.encode("the quick").ids
    assert torch.equal(generate(packed, prompt, 24, temperature=0), generate(unpacked, prompt, 24, temperature=0))
    assert load_tokenizer(tmp_path / fmt).to_str() == tokenizer.to_str()
    # Sizes come from the stored bytes: spectra info agrees with the pack report.
    stored = info(str(tmp_path / fmt))["stored"]
    assert stored["bits_per_linear_weight"] == pytest.approx(report.bits_per_weight)
    assert report == pack_report(tmp_path / fmt)
    nominal = 8 / get_format(fmt).trits_per_byte
    assert nominal < report.bits_per_weight < nominal + 0.05  # 64- and 176-wide rows: some padding
    assert report.packed_linear_bytes * 7 < report.fp16_linear_bytes


def test_pack_a_float_loaded_ternary_checkpoint(tmp_path):
    """A SpectraSuite-style unpacked checkpoint loaded as float still packs (its values are ternary)."""
    model = frozen_model()
    save_checkpoint(model, tmp_path / "tri")
    as_float = load_checkpoint(tmp_path / "tri", kind="float")
    tokens = torch.randint(0, 320, (1, 9))
    assert torch.equal(pack_model(as_float, "tq1")(tokens), model(tokens))


# --- bad input ---------------------------------------------------------------------------------------

def test_packing_a_float_checkpoint_fails_clearly(tmp_path):
    torch.manual_seed(0)
    floatlm = spectra.SpectraLM(spectra.get_config("tiny", weight_kind="float"))
    save_checkpoint(floatlm, tmp_path / "float")
    with pytest.raises(FormatError, match="is not ternary.*distinct magnitudes"):
        pack_checkpoint(tmp_path / "float", tmp_path / "out", "tq2")
    assert not (tmp_path / "out").exists()
    assert main(["pack", str(tmp_path / "float"), "--format", "tq2", "--out", str(tmp_path / "out")]) == 2


@pytest.fixture
def packed_dir(tmp_path):
    save_checkpoint(frozen_model(), tmp_path / "tri")
    pack_checkpoint(tmp_path / "tri", tmp_path / "packed", "tq1")
    return tmp_path / "packed"


def test_truncated_packed_file_fails_clearly(packed_dir):
    weights = packed_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(packed_dir)


def test_unknown_format_version_fails_clearly(packed_dir):
    config_file = packed_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["spectra"]["weight_options"]["format_version"] = 99
    config_file.write_text(json.dumps(config))
    with pytest.raises(FormatError, match="format version 99 is unknown"):
        load_checkpoint(packed_dir)
    assert main(["generate", str(packed_dir), "--max-new-tokens", "1"]) == 2


def test_corrupt_packed_bytes_fail_clearly(packed_dir):
    from safetensors.torch import load_file, save_file

    weights = packed_dir / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.1.mlp.up_proj.qweight"
    noncanonical = next(b for b in range(256) if b not in {-(-v * 256 // 243) for v in range(243)})
    tensors[name][0, 0] = noncanonical
    save_file(tensors, str(weights))
    with pytest.raises(FormatError, match=f"{name}: TQ1 data holds byte values"):
        load_checkpoint(packed_dir)


def test_cli_pack_reports_sizes(tmp_path, capsys, tokenizer):
    save_checkpoint(frozen_model(), tmp_path / "tri", tokenizer=tokenizer, dtype=torch.float16)
    assert main(["pack", str(tmp_path / "tri"), "--format", "tq2", "--out", str(tmp_path / "tq2"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "tq2" and report["bits_per_weight"] == pytest.approx(2.0, abs=0.01)
    assert report["fp16_linear_bytes"] == 2 * report["linear_weights"]
    assert main(["pack", str(tmp_path / "tri"), "--format", "tq1", "--out", str(tmp_path / "tq1")]) == 0
    out = capsys.readouterr().out
    assert "bits/weight" in out and "fp16" in out


def test_torch_compile_keeps_packed_matmul_as_one_op_with_equal_logits():
    # Under torch.compile a packed layer calls the opaque spectra::ternary_matmul op (its fake gives the
    # output shape); the traced graph must contain it and compute the same logits as eager, cache included.
    model = pack_model(frozen_model(), "tq2")
    tokens = torch.randint(0, 320, (2, 7))
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        assert torch.equal(compiled(tokens), model(tokens))
        model.setup_cache(2, 16)
        model(tokens, input_pos=torch.arange(7))
        step = torch.randint(0, 320, (2, 1))
        want = model(step, input_pos=torch.tensor([7]))
        model.setup_cache(2, 16)
        model(tokens, input_pos=torch.arange(7))
        got = compiled(step, input_pos=torch.tensor([7]))
        model.clear_cache()
    torch._dynamo.reset()
    assert torch.equal(got, want)
    assert sum("spectra.ternary_matmul" in t for t in seen) >= 2 * len(model.linear_layers())


def fusable_model(kind: str, parts: int, seed: int) -> spectra.SpectraLM:
    """A tiny model whose q/k/v and gate/up can be fused: float, frozen ternary, or packed TQ2/TQ1."""
    torch.manual_seed(seed)
    if kind == "float":
        return spectra.SpectraLM(spectra.get_config("tiny", vocab_size=320, weight_kind="float")).eval()
    model = frozen_model(parts=parts, seed=seed)
    return model if kind == "frozen" else pack_model(model, kind)


@pytest.mark.parametrize("kind", ["frozen", "tq2", "tq1", "float"])
@pytest.mark.parametrize("parts", [1, 2])
def test_fuse_projections_same_outputs_and_fewer_layers(kind, parts):
    model = fusable_model(kind, parts, seed=3)
    tokens = torch.randint(0, 320, (2, 11))
    with torch.no_grad():
        want = model(tokens)
        fused = copy.deepcopy(model)
        assert fused.fuse_projections() == 2 * model.config.num_layers
        assert fused.fuse_projections() == 0  # idempotent
        names = set(fused.linear_layers())
        assert "model.layers.0.self_attn.qkv_proj" in names and "model.layers.0.mlp.gate_up_proj" in names
        assert not {n.rsplit(".", 1)[-1] for n in names} & {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"}
        torch.testing.assert_close(fused(tokens), want, rtol=1e-5, atol=1e-5)
        # the KV-cache decoding path too
        fused.setup_cache(2, 16)
        fused(tokens[:, :5], input_pos=torch.arange(5))
        step = fused(tokens[:, 5:6], input_pos=torch.tensor([5]))
        torch.testing.assert_close(step[:, 0], want[:, 5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("kind", "parts"), [("frozen", 2), ("tq2", 2), ("tq1", 1), ("float", 1)])
def test_a_fused_model_saves_the_checkpoint_of_its_unfused_layers(kind, parts, tmp_path):
    """spectra.generate fuses a GPU model in place; saving it afterwards writes what the unfused model writes."""
    from safetensors.torch import load_file

    model = fusable_model(kind, parts, seed=5)
    save_checkpoint(model, tmp_path / "unfused")
    reference = copy.deepcopy(model)
    original = reference.state_dict()
    model.fuse_projections()
    assert model.projections_fused
    save_checkpoint(model, tmp_path / "fused")
    # and unfuse_projections gives back the layers themselves: the same state, the same outputs
    unfused = copy.deepcopy(model)
    assert unfused.unfuse_projections() == 2 * model.config.num_layers
    assert unfused.unfuse_projections() == 0 and not unfused.projections_fused
    state = unfused.state_dict()
    assert sorted(state) == sorted(original) and all(torch.equal(state[k], original[k]) for k in original)
    layers = unfused.linear_layers()
    for name, want in reference.linear_layers().items():
        got = layers[name]
        assert type(got) is type(want), name
        assert (got.in_features, got.out_features, got.shard_axis, got.parts) == \
            (want.in_features, want.out_features, want.shard_axis, want.parts), name
    want, got = (load_file(tmp_path / d / "model.safetensors") for d in ("unfused", "fused"))
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "fused" / "config.json").read_text() == (tmp_path / "unfused" / "config.json").read_text()
    tokens = torch.randint(0, 320, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(load_checkpoint(tmp_path / "fused")(tokens), model(tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_model_multiplies_no_input_columns_by_shard_scales(fmt, monkeypatch):
    """fuse_projections moves o_proj's and down_proj's column-shard scales onto v's and up's rows, so no packed
    product of a fused model takes column-shard scales (on a GPU each such call is an extra pass over x)."""
    import spectra.packed

    model = fusable_model(fmt, 2, seed=11)
    tokens = torch.randint(0, 320, (2, 7))
    calls = []
    real = spectra.packed.ternary_matmul

    def recording(x, packed, fmt, in_features, scales, shard_axis):
        calls.append((shard_axis, scales.numel()))
        return real(x, packed, fmt, in_features, scales, shard_axis)

    monkeypatch.setattr(spectra.packed, "ternary_matmul", recording)
    with torch.no_grad():
        want = model(tokens)
        assert sum(axis == 1 and parts > 1 for axis, parts in calls) == 2 * model.config.num_layers
        calls.clear()
        model.fuse_projections()
        torch.testing.assert_close(model(tokens), want, rtol=1e-5, atol=1e-5)
    assert calls and not [c for c in calls if c[0] == 1 and c[1] > 1]
    attn = model.model.layers[0].self_attn
    # q, k, v keep P shards each (v's scaled by o_proj's); o_proj multiplies by one unit scale
    assert attn.qkv_proj.kernel_scales.numel() == 6 and attn.o_proj.kernel_scales.tolist() == [1.0]
    assert torch.equal(attn.qkv_proj.kernel_scales[:4], attn.qkv_proj.scales[:4])
    assert torch.equal(attn.qkv_proj.kernel_scales[4:], attn.qkv_proj.scales[4:] * attn.o_proj.scales)


@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FORMATS), rows=st.integers(4, 40), width=st.integers(2, 30),
       producer_parts=st.integers(1, 3), consumer_parts=st.integers(2, 4), data=st.data())
def test_fold_column_scales_keeps_the_composed_product(fmt, rows, width, producer_parts, consumer_parts, data):
    """Odd sizes and shards that do not line up: the consumer's product of the producer's rows
    first_row .. first_row + width - 1 is unchanged, the producer's other rows too; unfold_scales undoes it."""
    width = min(width, rows)
    consumer_parts = min(consumer_parts, width)
    producer_parts = min(producer_parts, rows)
    first_row = data.draw(st.integers(0, rows - width))
    seed = data.draw(st.integers(0, 2**31 - 1))
    producer = PackedTernaryLinear.from_trits(*random_parts(rows, 13, producer_parts, 0, seed), 0, fmt)
    consumer = PackedTernaryLinear.from_trits(*random_parts(5, width, consumer_parts, 1, seed + 1), 1, fmt)
    x = torch.randn(3, 13, dtype=torch.float64).float()
    with torch.no_grad():
        h = producer(x)
        want_y, want_h = consumer(h[:, first_row:first_row + width]), h
        assert consumer.fold_column_scales(producer, first_row)
        assert not consumer.fold_column_scales(producer, first_row)  # once only
        assert consumer.kernel_scales.tolist() == [1.0] and producer.kernel_scales.numel() <= rows
        h = producer(x)
        outside = torch.ones(rows, dtype=torch.bool)
        outside[first_row:first_row + width] = False
        torch.testing.assert_close(h[:, outside], want_h[:, outside], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(consumer(h[:, first_row:first_row + width]), want_y, rtol=1e-5, atol=1e-5)
        producer.unfold_scales()
        consumer.unfold_scales()
        assert torch.equal(producer(x), want_h)
        assert torch.equal(consumer(want_h[:, first_row:first_row + width]), want_y)


def random_parts(out_features, in_features, parts, axis, seed):
    layer = random_frozen(out_features, in_features, parts, axis, seed)
    return layer.trits, layer.scales


def test_fold_column_scales_refuses_what_it_cannot_move():
    consumer = PackedTernaryLinear.from_trits(*random_parts(5, 8, 2, 1, 0), 1)
    across = PackedTernaryLinear.from_trits(*random_parts(8, 6, 2, 1, 1), 1)  # producer scales on its inputs
    assert not consumer.fold_column_scales(across, 0)
    assert not consumer.fold_column_scales(PackedTernaryLinear.from_trits(*random_parts(10, 6, 2, 0, 2), 0), 3)
    single = PackedTernaryLinear.from_trits(*random_parts(5, 8, 1, 1, 3), 1)
    assert not single.fold_column_scales(PackedTernaryLinear.from_trits(*random_parts(8, 6, 2, 0, 2), 0), 0)
    assert consumer.kernel_scales is None and across.kernel_scales is None


def test_fewest_shard_scales():
    from spectra.packed import fewest_shard_scales
    from spectra.ternary import expand_scales

    three = torch.tensor([0.5, 2.0, 0.25])
    per_row = expand_scales(three, (10, 1), 0).flatten()  # tensor_split sizes 4, 3, 3
    assert torch.equal(fewest_shard_scales(per_row), three)
    assert torch.equal(fewest_shard_scales(torch.full((7,), 0.3)), torch.tensor([0.3]))
    uneven = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 3.0])  # runs of 1, 4, 1: not tensor_split shards
    assert torch.equal(fewest_shard_scales(uneven), uneven)


def test_projections_with_mismatched_shards_stay_separate():
    # per-shard scales that would land on other rows after joining: the layers are left alone
    from spectra.linear import FrozenTernaryLinear, concat_output_rows

    trits = torch.randint(-1, 2, (6, 8), dtype=torch.int8)
    a = FrozenTernaryLinear.from_trits(trits, torch.tensor([0.5, 1.0, 2.0]), 1)  # column shards
    assert concat_output_rows([a, a]) is None
    b = FrozenTernaryLinear.from_trits(trits[:5], torch.tensor([0.5, 1.0]), 0)   # 5 rows in 2 shards
    assert concat_output_rows([b, b]) is None
    c = FrozenTernaryLinear.from_trits(trits, torch.tensor([0.5, 1.0]), 0)
    joined = concat_output_rows([c, c])
    x = torch.randn(3, 8)
    torch.testing.assert_close(joined(x), torch.cat([c(x), c(x)], -1))
