import pytest
import torch
import torch.nn.functional as F

from spectra import FrozenTernaryLinear, SpectraLM, TernaryLinear, freeze_ternary, get_config, ternarize
from spectra.generate import generate, generate_uncached, sample_next
from spectra.ternary import expand_scales, shard_bounds


def test_forward_backward_shapes():
    torch.manual_seed(0)
    model = SpectraLM(get_config("tiny"))
    tokens = torch.randint(0, 1024, (3, 19))
    logits, loss = model(tokens, tokens)
    assert logits.shape == (3, 19, 1024)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_ste_gradient_equals_float_gradient_of_ternarized_weight():
    torch.manual_seed(1)
    layer = TernaryLinear(37, 23)
    x = torch.randn(5, 37)
    layer(x).pow(2).sum().backward()
    trits, scales = layer.freeze()
    w_q = (trits.float() * scales).requires_grad_(True)
    F.linear(x, w_q).pow(2).sum().backward()
    torch.testing.assert_close(layer.weight.grad, w_q.grad)


@pytest.mark.parametrize("parts", [1, 2, 3, 6])
@pytest.mark.parametrize("axis", [0, 1])
def test_per_shard_scales_on_odd_shapes(parts, axis):
    torch.manual_seed(parts)
    w = torch.randn(31, 47) * torch.linspace(0.1, 2.0, 47)  # uneven magnitudes across shards
    trits, scales = ternarize(w, parts, axis)
    assert scales.shape == (parts,)
    assert set(trits.unique().tolist()) <= {-1, 0, 1}
    for i, (s, e) in enumerate(shard_bounds(w.shape[axis], parts)):
        shard = w.narrow(axis, s, e - s)
        expected_scale = shard.abs().mean() + 1e-5
        torch.testing.assert_close(scales[i], expected_scale)
        expected = torch.round(torch.clamp(shard / expected_scale, -1, 1))
        assert torch.equal(trits.narrow(axis, s, e - s).float(), expected)
    # Ternarized values are exactly {-1, 0, 1} times the shard's scale.
    dense = trits.float() * expand_scales(scales, tuple(w.shape), axis)
    for i, (s, e) in enumerate(shard_bounds(w.shape[axis], parts)):
        vals = set(dense.narrow(axis, s, e - s).abs().unique().tolist())
        assert vals <= {0.0, float(scales[i])}


def test_freeze_gives_identical_outputs():
    torch.manual_seed(2)
    model = SpectraLM(get_config("tiny", model_parallel_size=2)).eval()
    tokens = torch.randint(0, 1024, (2, 11))
    before = model(tokens)
    freeze_ternary(model)
    assert all(isinstance(m, FrozenTernaryLinear) for m in model.linear_layers().values())
    torch.testing.assert_close(model(tokens), before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["float", "ternary"])
def test_kv_cache_matches_full_recomputation(kind):
    torch.manual_seed(3)
    model = SpectraLM(get_config("tiny", weight_kind=kind)).eval()
    prompt = torch.randint(0, 1024, (2, 7))
    assert torch.equal(generate(model, prompt, 20, temperature=0), generate_uncached(model, prompt, 20))


def test_sampling_filters_and_seed():
    logits = torch.tensor([[0.0, 5.0, 4.0, -3.0]])
    assert sample_next(logits, 0).item() == 1
    draws = {sample_next(logits, 1.0, top_k=2).item() for _ in range(50)}
    assert draws <= {1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.5).item() for _ in range(50)}
    assert draws == {1}
    model = SpectraLM(get_config("tiny")).eval()
    a = generate(model, [1, 2, 3], 10, temperature=1.0, seed=7)
    b = generate(model, [1, 2, 3], 10, temperature=1.0, seed=7)
    assert torch.equal(a, b)


def test_sequence_longer_than_max_is_rejected():
    from spectra import ConfigError
    model = SpectraLM(get_config("tiny", max_seq_len=16))
    with pytest.raises(ConfigError, match="exceeds the model's max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize("size,parts", [(1, 1), (7, 1), (7, 3), (10, 4), (12, 6), (13, 13)])
def test_expand_scales_follows_tensor_split(size, parts):
    scales = torch.rand(parts) + 0.5
    want = torch.cat([torch.full((e - s,), float(scales[i])) for i, (s, e) in enumerate(shard_bounds(size, parts))])
    assert torch.equal(expand_scales(scales, (size, 5), 0), want[:, None])
    assert torch.equal(expand_scales(scales, (5, size), 1), want[None, :])


def test_last_only_gives_the_last_position_of_the_full_logits():
    cfg = get_config("tiny", num_layers=2, weight_kind="ternary")
    torch.manual_seed(3)
    model = SpectraLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (3, 11))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(3, 16)
        last = model(tokens, input_pos=torch.arange(11), last_only=True)
    assert last.shape == (3, 1, cfg.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        model(tokens, targets=tokens, last_only=True)


def test_cache_shape_reports_the_allocated_cache():
    model = SpectraLM(get_config("tiny")).eval()
    assert model.cache_shape() is None
    model.setup_cache(3, 17)
    assert model.cache_shape() == (3, 17)
    model.clear_cache()
    assert model.cache_shape() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_with_signed_sines_is_apply_rope_bit_for_bit(dtype):
    from spectra.model import rope_tables
    from spectra.ternary import apply_rope, apply_rope_signed, signed_sines

    x = (torch.randn(2, 5, 33, 40) * 4).to(dtype)
    cos, sin = (t[7:40].to(dtype) for t in rope_tables(40, 64, 10000.0))
    assert torch.equal(apply_rope_signed(x, cos, signed_sines(sin)), apply_rope(x, cos, sin))
    assert torch.equal(apply_rope_signed(x.transpose(1, 2), cos[:, None], signed_sines(sin)[:, None]),
                       apply_rope(x.transpose(1, 2), cos[:, None], sin[:, None]))


def test_fused_prefill_rotates_q_and_k_together_as_the_separate_layers_do():
    torch.manual_seed(12)
    model = SpectraLM(get_config("tiny", weight_kind="float")).eval()
    prompt = torch.randint(0, 1024, (2, 9))
    with torch.no_grad():
        model.setup_cache(2, 16)
        want = model(prompt, input_pos=torch.arange(9))
        k_want = model.model.layers[1].self_attn.cache.k.clone()
        model.fuse_projections()
        model.setup_cache(2, 16)
        got = model(prompt, input_pos=torch.arange(9))
        k_got = model.model.layers[1].self_attn.cache.k
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_got, k_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int8])
def test_kv_cache_bytes_is_what_setup_cache_allocates(dtype):
    from spectra.size import kv_cache_bytes

    model = SpectraLM(get_config("tiny", weight_kind="float"))
    model.setup_cache(3, 40, dtype)
    caches = [layer.self_attn.cache for layer in model.model.layers]
    allocated = sum(buf.numel() * buf.element_size() for cache in caches for buf in cache.buffers())
    assert allocated == kv_cache_bytes(model.config, 40, dtype, batch=3)


@pytest.mark.parametrize("dtype", [None, torch.int8])
def test_prefill_is_the_uncached_forward_and_fills_the_cache_as_the_masked_step_does(dtype):
    torch.manual_seed(13)
    model = SpectraLM(get_config("tiny", weight_kind="float")).eval()
    prompt = torch.randint(0, 1024, (2, 11))
    with torch.no_grad():
        whole = model(prompt)
        model.setup_cache(2, 24, dtype)
        masked = model(prompt, input_pos=torch.arange(11))
        filled = [t.clone() for t in model.model.layers[0].self_attn.cache.buffers()]
        model.setup_cache(2, 24, dtype)
        got = model.prefill(prompt, last_only=False)
        cache = list(model.model.layers[0].self_attn.cache.buffers())
        last = model.prefill(prompt)
    assert torch.equal(got, whole)  # the prompt attends to itself: the training forward's attention
    if dtype is None:  # the masked step reads the cache back (8-bit rows in an int8 one): the same up to rounding
        torch.testing.assert_close(masked, whole, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(cache, filled))  # the first layer's rows, written alike
    torch.testing.assert_close(last, whole[:, -1:], rtol=1e-5, atol=1e-5)
