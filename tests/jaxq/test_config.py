import pytest

from jaxq import config
from jaxq.config import ConfigError, QuantConfig, Rule, UniformConfig


@pytest.mark.parametrize("settings, message", [
    (dict(bits=5), "bits=5 is not supported"),
    (dict(bits=1), "bits=1 is not supported"),
    (dict(group_size=0), "group_size must be a positive integer"),
    (dict(group_size=-1), "group_size must be a positive integer"),
    (dict(group_size=12.5), "group_size must be a positive integer"),
    (dict(granularity="row"), "granularity='row'"),
    (dict(calibration="kl"), "calibration='kl' is for activation ranges"),
    (dict(calibration="entropy"), "calibration='entropy'"),
    (dict(zero_point="half"), "zero_point='half'"),
    (dict(symmetric=True, zero_point="float"), "symmetric quantization has no zero point"),
    (dict(percentile=30.0), "percentile must be in"),
    (dict(scale_dtype="int8"), "scale_dtype='int8'"),
])
def test_invalid_uniform_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        UniformConfig(**settings)


def test_rules_validate_their_pattern_and_method():
    with pytest.raises(ConfigError, match="not a valid regex"):
        Rule("layers/(", UniformConfig())
    with pytest.raises(ConfigError, match="is not a method config"):
        Rule("layers", {"bits": 4})
    with pytest.raises(ConfigError, match="at least one rule"):
        QuantConfig(rules=())


def test_first_matching_rule_wins():
    cfg = QuantConfig(rules=(Rule(r"^layers/0/", None), Rule(r"_proj/kernel$", UniformConfig(bits=3))))
    assert cfg.method_for("layers/0/mlp/up_proj/kernel") is None
    assert cfg.method_for("layers/1/mlp/up_proj/kernel").bits == 3
    assert cfg.method_for("embed_tokens/embedding") is None


@pytest.mark.parametrize("text,value", [("0.5", 0.5), ("50%", 0.5), (" 25 % ", 0.25), ("0.7", 0.7),
                                        ("2:4", (2, 4)), ("4:8", (4, 8)), (" 1 : 4 ", (1, 4))])
def test_sparsity_pattern(text, value):
    assert config.sparsity_pattern(text) == value


@pytest.mark.parametrize("text", ["0", "1.2", "1", "100%", "0%", "-0.5", "nan", "4:2", "4:4", "0:4",
                                  "a:b", "2:4:8", "abc", ""])
def test_sparsity_pattern_errors(text):
    with pytest.raises(ConfigError, match="sparsity"):
        config.sparsity_pattern(text)
