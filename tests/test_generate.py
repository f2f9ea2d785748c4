"""Generation policy (which decoding path runs when), streaming, and the graph-capturable keyed sampler.

The fast CUDA path's tokens against the plain loop's are checked by the GPU tests at the end.
"""

from __future__ import annotations

import pytest
import torch

from spectra.config import get_config
from spectra.errors import ConfigError, DeviceError
from spectra.generate import (
    DECODE_CACHE_MIN,
    decode_cache_length,
    decode_plan,
    generate,
    generate_stream,
    release_decode_step,
)
from spectra.model import SpectraLM
from spectra.sampling import keyed_uniform, sample_keyed, sample_next

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_decode_plan_chooses_the_fast_path_on_cuda_only():
    assert decode_plan(CUDA) == decode_plan(CUDA, fast=True)
    plan = decode_plan(CUDA)
    assert plan.graph and plan.fuse and not plan.compile
    assert decode_plan(CUDA, compile=True).compile
    off = decode_plan(CUDA, fast=False)
    assert not (off.graph or off.fuse or off.compile)
    cpu = decode_plan(CPU)
    assert not (cpu.graph or cpu.fuse or cpu.compile)
    with pytest.raises(DeviceError, match="pass fast=False"):
        decode_plan(CPU, fast=True)
    with pytest.raises(DeviceError, match="compile applies to CUDA decoding"):
        decode_plan(CPU, compile=True)
    with pytest.raises(DeviceError, match="compile applies to CUDA decoding"):
        decode_plan(CUDA, fast=False, compile=True)


def _reference_loop(model: SpectraLM, prompt: torch.Tensor, n: int, seed: int, **sampling) -> torch.Tensor:
    """The plain loop written out: full forward over the sequence, sample_next with a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    tokens = prompt
    for _ in range(n):
        logits = model(tokens)
        tokens = torch.cat([tokens, sample_next(logits[:, -1], generator=gen, **sampling)[:, None]], dim=1)
    return tokens


def test_captured_steps_share_a_few_cache_lengths():
    """A captured step is bound to its cache length: every total up to max_seq_len maps to one of a few lengths
    (powers of two from DECODE_CACHE_MIN), never below the total, so a later generation can replay it."""
    max_seq_len = 3000
    lengths = {decode_cache_length(total, max_seq_len) for total in range(1, max_seq_len + 1)}
    assert lengths == {256, 512, 1024, 2048, 3000}
    for total in (1, 255, 256, 257, 1000, 2049, 2999, 3000):
        got = decode_cache_length(total, max_seq_len)
        assert total <= got <= max(2 * total, DECODE_CACHE_MIN) and got <= max_seq_len
    assert decode_cache_length(100, 128) == 128  # a short model: its max_seq_len


def test_bad_prompts_are_one_data_error_and_a_short_room_is_a_warning():
    from spectra.errors import DataError, SpectraWarning

    torch.manual_seed(0)
    model = SpectraLM(get_config("tiny", vocab_size=320, max_seq_len=32)).eval()
    for prompt, match in (([], "non-empty"), ([5, 320], "id 320, outside"), ([-1], "id -1"),
                          (torch.rand(1, 4), "integers"), (list(range(33)), "33 tokens")):
        with pytest.raises(DataError, match=match):
            generate(model, prompt, 4)
    with pytest.warns(SpectraWarning, match="only 2 of the 10 new tokens fit"):
        out = generate(model, list(range(30)), 10, temperature=0)
    assert out.shape == (1, 32)


def test_cpu_generation_is_the_plain_loop_and_leaves_the_model_as_it_was():
    torch.manual_seed(5)
    model = SpectraLM(get_config("tiny")).eval()
    prompt = torch.randint(0, 1024, (2, 6))
    sampling = dict(temperature=0.9, top_k=40, top_p=0.95)
    got = generate(model, prompt, 12, seed=11, **sampling)
    want = _reference_loop(model, prompt, 12, 11, **sampling)
    # the cached steps round differently from full recomputation only far below sampling resolution
    assert torch.equal(got, want)
    assert not model.projections_fused
    assert all(layer.self_attn.cache is None for layer in model.model.layers)


def test_int8_cache_generation_on_cpu_keeps_8_bit_rows_close_to_the_model():
    torch.manual_seed(8)
    model = SpectraLM(get_config("tiny", weight_kind="float")).eval()
    prompt = torch.randint(0, 1024, (2, 12))
    positions = torch.arange(12)
    with torch.no_grad():
        model.setup_cache(2, 20)
        exact = model(prompt, input_pos=positions, last_only=True)
        model.setup_cache(2, 20, torch.int8)
        assert model.cache_dtype() == torch.int8
        approx = model(prompt, input_pos=positions, last_only=True)
        cache = model.model.layers[0].self_attn.cache
        assert bool((cache.k_scale[:, :, :12] > 0).all()) and not bool(cache.k_scale[:, :, 12:].any())
        assert int(cache.v.abs().amax(-1)[:, :, :12].min()) == 127  # every filled row uses the full range
        model.clear_cache()
    err = float((approx - exact).abs().max())
    assert 0 < err < 0.02 * float(exact.abs().max())  # quantized, and close
    tokens = generate(model, prompt, 6, temperature=0, cache_dtype=torch.int8)
    assert tokens.shape == (2, 18) and model.model.layers[0].self_attn.cache is None
    with pytest.raises(ConfigError, match="floating-point dtype or torch.int8"):
        model.setup_cache(1, 8, torch.int32)


def test_generate_stream_yields_generate_tokens_and_frees_the_cache_when_closed():
    torch.manual_seed(6)
    model = SpectraLM(get_config("tiny")).eval()
    prompt = torch.randint(0, 1024, (3, 4))
    whole = generate(model, prompt, 9, temperature=0)
    streamed: list[torch.Tensor] = []
    generate(model, prompt, 9, temperature=0, on_token=streamed.append)
    assert torch.equal(torch.stack(streamed, 1), whole[:, 4:])
    assert torch.equal(torch.stack(list(generate_stream(model, prompt, 9, temperature=0)), 1), whole[:, 4:])
    stream = generate_stream(model, prompt, 9, temperature=0)
    next(stream)
    assert model.model.layers[0].self_attn.cache is not None
    stream.close()
    assert model.model.layers[0].self_attn.cache is None
    with pytest.raises(DeviceError, match="pass fast=False"):
        generate(model, prompt, 3, fast=True)


def test_keyed_uniforms_are_a_pure_function_of_seed_position_and_index():
    a = keyed_uniform((3, 1000), 7, torch.tensor([12]))
    assert torch.equal(a, keyed_uniform((3, 1000), 7, torch.tensor([12])))
    assert float(a.min()) > 0 and float(a.max()) < 1
    assert abs(float(a.mean()) - 0.5) < 0.02 and abs(float(a.var()) - 1 / 12) < 0.01
    assert a.unique().numel() > 2990  # 24-bit uniforms: almost no repeats among 3000
    for other in (keyed_uniform((3, 1000), 8, torch.tensor([12])), keyed_uniform((3, 1000), 7, torch.tensor([13]))):
        assert float((a == other).float().mean()) < 0.01
        assert abs(float(torch.corrcoef(torch.stack([a.flatten(), other.flatten()]))[0, 1])) < 0.05


def test_a_seed_tensor_draws_what_the_int_seed_draws():
    # a kept decode graph reads its seed from a tensor, so that a later generation can set another one
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(2))
    for seed in (0, 7, 2**31 - 2):
        assert torch.equal(keyed_uniform((3, 500), torch.tensor(seed), torch.tensor([5])),
                           keyed_uniform((3, 500), seed, torch.tensor([5])))
        assert torch.equal(sample_keyed(logits, torch.tensor([5]), torch.tensor(seed), 0.8, 50, 0.9),
                           sample_keyed(logits, torch.tensor([5]), seed, 0.8, 50, 0.9))


def test_a_kept_decode_step_fits_only_the_settings_and_tensors_it_was_captured_with():
    # What decides that a generation replays the step the previous one captured (CUDA-free: the step here is a
    # stand-in with the captured cache length): same settings, a long enough cache, and the very tensors.
    from types import SimpleNamespace

    from spectra.generate import _IdleStep, _tensor_refs

    torch.manual_seed(3)
    model = SpectraLM(get_config("tiny", weight_kind="float")).eval()
    model.setup_cache(2, 256)

    def kept() -> _IdleStep:
        return _IdleStep(SimpleNamespace(max_len=256), key, torch.tensor(0), _tensor_refs(model))

    key = (2, torch.float32, False, None, 0.8, None, None)
    idle = kept()
    assert idle.fits(model, key, 256) and idle.fits(model, key, 40)
    assert not idle.fits(model, key, 257)                                   # a longer generation
    assert not idle.fits(model, (1, *key[1:]), 40)                           # another batch size
    assert not idle.fits(model, (*key[:4], 0.9, None, None), 40)             # other sampling settings
    with torch.no_grad():
        model.lm_head.weight.mul_(2)                                         # weights changed in place: the
    assert idle.fits(model, key, 40)                                         # graph reads the new values
    model.setup_cache(2, 256)                                                # a new cache
    assert not idle.fits(model, key, 40)
    idle = kept()
    assert model.fuse_projections() > 0                                     # other layers
    assert not idle.fits(model, key, 40)
    idle = kept()
    model.double()                                                           # the same Parameters, moved data
    assert not idle.fits(model, key, 40)
    idle = kept()
    model.clear_cache()                                                      # the cache freed
    assert not idle.fits(model, key, 40)
    model.setup_cache(2, 256)
    release_decode_step(model)  # no kept step (a CPU model): it frees the cache all the same
    assert model.cache_shape() is None


def _frequencies(draw, n: int, vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab)
    for i in range(n):
        counts[draw(i)] += 1
    return counts / n


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.7, top_k=3),
                                      dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, top_k=4, top_p=0.9)])
def test_keyed_sampler_draws_from_the_reference_distribution(sampling):
    # The reference distribution is sample_next's (filtered softmax); 3000 keyed draws (positions 0..2999) must
    # match it within about 4 standard errors, and never draw a token sample_next cannot.
    logits = torch.tensor([[1.2, -0.3, 2.0, 0.4, 1.9, -2.5, 0.0]])
    from spectra.sampling import _filter_logits

    probs = _filter_logits(logits, sampling["temperature"], sampling.get("top_k"), sampling.get("top_p")).softmax(-1)[0]
    n = 3000
    freq = _frequencies(lambda i: int(sample_keyed(logits, torch.tensor([i]), seed=3, **sampling)), n, 7)
    assert torch.all(freq[probs == 0] == 0)
    assert float((freq - probs).abs().max()) < 4 * (0.25 / n) ** 0.5
    gen = torch.Generator().manual_seed(0)
    ref = _frequencies(lambda i: int(sample_next(logits, generator=gen, **sampling)), n, 7)
    assert torch.equal(ref > 0, freq > 0) or float((ref - freq).abs().max()) < 0.05


def test_keyed_sampler_greedy_is_argmax_and_a_seed_repeats():
    logits = torch.randn(5, 301, generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([17])
    assert torch.equal(sample_keyed(logits, pos, seed=9, temperature=0), logits.argmax(-1))
    a = torch.stack([sample_keyed(logits, torch.tensor([p]), seed=9, temperature=1.0, top_p=0.95) for p in range(20)])
    b = torch.stack([sample_keyed(logits, torch.tensor([p]), seed=9, temperature=1.0, top_p=0.95) for p in range(20)])
    c = torch.stack([sample_keyed(logits, torch.tensor([p]), seed=10, temperature=1.0, top_p=0.95) for p in range(20)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(set(a[:, 0].tolist())) > 5  # different positions draw different tokens


# --- GPU: the fast path (fused projections, graph-captured step sampling on the GPU) against the plain loop ---

def _random_model(kind: str, seed: int) -> SpectraLM:
    from spectra import convert as convert_mod

    torch.manual_seed(seed)
    weight_kind = "float" if kind == "fp16" else "ternary"
    model = SpectraLM(get_config("mini", weight_kind=weight_kind, model_parallel_size=2)).cuda().float().eval()
    if kind != "fp16":
        convert_mod.pack_model(model, kind)
    return model.half()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tq2", "tq1", "fp16"])
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_fast_path_greedy_tokens_equal_the_plain_loop(kind, batch):
    # prompt 60 + 150 new tokens: the decode attention crosses its 64-position chunks at 64, 128 and 192
    import copy

    model = _random_model(kind, seed=batch)
    reference = copy.deepcopy(model)
    reference.fuse_projections()  # the same products, launched step by step from Python
    prompt = torch.randint(0, model.config.vocab_size, (batch, 60), device="cuda")
    want = generate(reference, prompt, 150, temperature=0, fast=False)
    got = generate(model, prompt, 150, temperature=0)
    assert model.projections_fused  # the library chose the fast path itself
    assert torch.equal(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_int8_cache_fast_path_greedy_tokens_equal_the_plain_loop(batch):
    import copy

    model = _random_model("tq2", seed=20 + batch)
    reference = copy.deepcopy(model)
    reference.fuse_projections()
    prompt = torch.randint(0, model.config.vocab_size, (batch, 60), device="cuda")
    want = generate(reference, prompt, 150, temperature=0, fast=False, cache_dtype=torch.int8)
    got = generate(model, prompt, 150, temperature=0, cache_dtype=torch.int8)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_gpu_first_token_comes_out_before_the_step_is_captured(monkeypatch):
    """generate_stream hands out the prompt's token before it captures the decode step (the capture delays the
    second token, not the first); the step then decodes from the prefilled cache (the warm-up steps leave it
    intact: the prompt crosses a 64-position chunk), its tokens equal the plain loop's, and the cache is kept for
    the next generation until release_decode_step frees it."""
    import copy

    from spectra import decode_graph

    model = _random_model("tq2", seed=11)
    reference = copy.deepcopy(model)
    reference.fuse_projections()
    prompt = torch.randint(0, model.config.vocab_size, (2, 70), device="cuda")
    captures = []
    init = decode_graph.GraphSamplingStep.__init__

    def recording_init(self, *args, **kwargs):
        captures.append(kwargs.get("keep_cache"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(decode_graph.GraphSamplingStep, "__init__", recording_init)
    stream = generate_stream(model, prompt, 40, temperature=0)
    first = next(stream)
    assert captures == []
    rest = list(stream)
    assert captures == [True]
    want = generate(reference, prompt, 40, temperature=0, fast=False)[:, 70:]
    assert torch.equal(torch.stack([first, *rest], 1).cuda(), want)
    assert model.cache_shape() == (2, 256)
    release_decode_step(model)
    assert model.cache_shape() is None


@pytest.mark.gpu
def test_gpu_fast_path_sampling_with_a_seed_repeats():
    model = _random_model("tq2", seed=4)
    prompt = torch.randint(0, model.config.vocab_size, (4, 9), device="cuda")
    sampling = dict(temperature=0.9, top_k=64, top_p=0.9)
    a = generate(model, prompt, 40, seed=123, **sampling)
    b = generate(model, prompt, 40, seed=123, **sampling)
    c = generate(model, prompt, 40, seed=124, **sampling)
    assert torch.equal(a, b) and not torch.equal(a, c)
    streamed = torch.stack(list(generate_stream(model, prompt, 40, seed=123, **sampling)), 1)
    assert torch.equal(streamed.cuda(), a[:, 9:])
    # eos: a sequence that produced it keeps producing it, and generation stops once every sequence has
    eos = int(a[0, 12])
    d = generate(model, prompt, 40, seed=123, eos_id=eos, **sampling)
    for row in range(4):
        new_d, new_a = d[row, 9:], a[row, 9:]
        hits = (new_d == eos).nonzero()
        first = int(hits[0]) if len(hits) else len(new_d)
        assert torch.equal(new_d[:first], new_a[:first]) and bool((new_d[first:] == eos).all())
    assert bool((d[0, 9:][:4] == eos).any())


@pytest.mark.gpu
def test_gpu_compiled_generations_of_other_lengths_reuse_the_compiled_step():
    """generate(compile=True) with prompts and token counts that change every call (a chat loop): the compiled
    step is compiled for one cache length, not once per call (dynamo gives up after 8 and runs uncompiled)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _random_model("tq2", seed=7)
    graphs = []
    for prompt_len, new in ((5, 20), (9, 31), (14, 17), (30, 44), (41, 9), (50, 60)):  # totals 25 .. 110
        prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device="cuda")
        got = generate(model, prompt, new, temperature=0, compile=True)
        assert got.shape == (1, prompt_len + new) and torch.equal(got[:, :prompt_len], prompt)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[0], graphs  # no recompilation after the first call


@pytest.mark.gpu
def test_gpu_later_generations_replay_the_kept_step(monkeypatch):
    """generate keeps its captured step: later generations with the same batch size and settings (other prompts,
    lengths and seeds) replay it without a capture and give the tokens the plain loop (greedy) or a fresh capture
    (sampled) gives; other settings or a longer cache capture again; a generation started while another runs
    gets its own step and cache, and both stay right."""
    import copy

    from spectra import decode_graph

    model = _random_model("tq2", seed=5)
    reference = copy.deepcopy(model)
    reference.fuse_projections()
    captures = []
    init = decode_graph.GraphSamplingStep.__init__

    def recording_init(self, *args, **kwargs):
        captures.append(args[1:3])  # (batch, cache length)
        init(self, *args, **kwargs)

    monkeypatch.setattr(decode_graph.GraphSamplingStep, "__init__", recording_init)

    def prompt(length: int, seed: int) -> torch.Tensor:
        gen = torch.Generator(device="cuda").manual_seed(seed)
        return torch.randint(0, model.config.vocab_size, (2, length), device="cuda", generator=gen)

    for i, (length, new) in enumerate(((9, 20), (70, 40), (30, 7), (120, 100))):  # totals 29 .. 220: one cache
        p = prompt(length, i)
        assert torch.equal(generate(model, p, new, temperature=0), generate(reference, p, new, temperature=0,
                                                                              fast=False))
    assert captures == [(2, 256)]
    sampling = dict(temperature=0.9, top_k=50, top_p=0.95)
    generate(model, prompt(12, 7), 30, seed=1, **sampling)                  # other settings: a capture
    replayed = generate(model, prompt(12, 8), 30, seed=2, **sampling)       # another seed: replayed
    assert len(captures) == 2
    fresh = generate(copy.deepcopy(reference), prompt(12, 8), 30, seed=2, **sampling)  # another model: captures
    assert torch.equal(replayed, fresh) and len(captures) == 3
    p = prompt(200, 9)
    assert torch.equal(generate(model, p, 100, temperature=0),                 # 300 > 256: a new cache
                       generate(reference, p, 100, temperature=0, fast=False))
    assert captures[-1] == (2, 512) and len(captures) == 4
    # interleaved: the first takes the kept step, the second captures its own on a new cache
    p1, p2 = prompt(40, 10), prompt(50, 11)
    first = generate_stream(model, p1, 60, temperature=0)
    head = [next(first) for _ in range(12)]
    second = torch.stack(list(generate_stream(model, p2, 60, temperature=0)), 1).cuda()
    tail = list(first)
    assert len(captures) == 5
    assert torch.equal(second, generate(reference, p2, 60, temperature=0, fast=False)[:, 50:])
    assert torch.equal(torch.stack(head + tail, 1).cuda(), generate(reference, p1, 60, temperature=0,
                                                                     fast=False)[:, 40:])
    release_decode_step(model)
    assert model.cache_shape() is None

