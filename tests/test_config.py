import pytest

from spectra import SUITE, ConfigError, ModelConfig, count_parameters, get_config, size_in_bits

# Parameter counts reported for the Spectra suite (millions), 50304-token vocabulary, untied head.
EXPECTED_M = {"99M": 99.74, "190M": 190.0, "390M": 390.0, "560M": 560.0, "830M": 830.0, "1.1B": 1100.0,
              "1.5B": 1500.0, "2.4B": 2400.0, "3.9B": 3989.0}


@pytest.mark.parametrize("name", list(SUITE))
def test_suite_parameter_counts(name):
    total = count_parameters(get_config(name)).total / 1e6
    tolerance = 0.005 if name in ("99M", "3.9B") else 0.06  # the two sizes the issue pins exactly
    assert abs(total - EXPECTED_M[name]) / EXPECTED_M[name] < tolerance, total


def test_suite_shapes_match_paper():
    c = get_config("3.9B")
    assert (c.hidden_size, c.intermediate_size, c.num_heads, c.num_layers, c.model_parallel_size) == \
        (3072, 9216, 24, 30, 6)
    assert get_config("2.4b").model_parallel_size == 3  # names are case-insensitive


def test_unknown_size_and_bad_heads():
    with pytest.raises(ConfigError, match="unknown model size '7B'"):
        get_config("7B")
    with pytest.raises(ConfigError, match="must divide hidden_size"):
        ModelConfig(hidden_size=100, num_heads=3)
    with pytest.raises(ConfigError, match="positive integer"):
        ModelConfig(num_layers=0)


@pytest.mark.parametrize("field", ["norm_eps", "rope_theta"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, 0.0, "1e-5", True])
def test_eps_and_rope_theta_must_be_finite_positive(field, value):
    # A NaN or negative eps used to load, then give NaN logits.
    with pytest.raises(ConfigError, match=f"{field} must be a finite positive number"):
        ModelConfig(**{field: value})


def test_zero_heads_is_named_not_taken_for_grouped_query_attention():
    data = get_config("tiny").to_hf_dict() | {"num_attention_heads": 0}
    with pytest.raises(ConfigError, match="num_heads must be a positive integer"):
        ModelConfig.from_hf_dict(data)


def test_a_path_that_is_no_checkpoint_is_not_called_an_unknown_size(tmp_path):
    with pytest.raises(ConfigError, match="checkpoint directory .*nope does not exist"):
        get_config(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ConfigError, match="f.txt is not a directory"):
        get_config(str(tmp_path / "f.txt"))


def test_hf_config_roundtrip():
    c = get_config("1.1B", weight_kind="float")
    assert ModelConfig.from_hf_dict(c.to_hf_dict()) == c


def test_size_in_bits_by_hand():
    c = get_config("3.9B")
    n = count_parameters(c)
    fp = 16 * (n.embedding + n.lm_head + n.norms)
    assert size_in_bits(c, "float16") == 16 * n.total
    scales = 16 * 6 * 7 * 30
    assert size_in_bits(c, "ternary") == pytest.approx(fp + 1.5849625 * n.linear + scales)
    assert size_in_bits(c, "tq2") == fp + 2 * n.linear + scales  # 3.9B shapes need no padding
