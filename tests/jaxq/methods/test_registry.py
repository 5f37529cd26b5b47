"""The method registry: names, config classes and implementations in one place."""

import dataclasses
from typing import ClassVar

import pytest

import jaxq
import models
from jaxq.config import AWQConfig, ConfigError, GPTQConfig, QuantConfig, Rule, UniformConfig
from jaxq.methods import awq, gptq, registry, rtn


def test_built_in_methods_are_registered_with_their_configs():
    assert {"rtn", "gptq", "awq"} <= set(registry.names())
    assert registry.registration("gptq").config is GPTQConfig and registry.registration("gptq").implementation is gptq.GPTQ
    assert registry.method(AWQConfig()) == awq.AWQ(AWQConfig()) and registry.method(AWQConfig()) != gptq.GPTQ(AWQConfig())
    assert registry.registration("rtn").data_free and not registry.registration("awq").data_free
    assert isinstance(registry.method(UniformConfig(bits=3)), rtn.RTN)


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown method 'squeezy'; available: .*rtn"):
        registry.method_config("squeezy", bits=4)
    assert registry.method_config("gptq", damp=0.02) == GPTQConfig(damp=0.02)


def test_quant_config_round_trips_through_a_dict():
    cfg = QuantConfig(rules=(Rule("lm_head", None),
                             Rule("proj", UniformConfig(bits=2, group_size=64, calibration="mse", symmetric=True)),
                             Rule("mlp", GPTQConfig(uniform=UniformConfig(bits=3), act_order=True))))
    assert registry.quant_config_from_dict(cfg.to_dict()) == cfg


@dataclasses.dataclass(frozen=True)
class Unregistered:
    method: ClassVar[str] = "unregistered"
    bits: int = 4


def test_a_config_nobody_registered_is_refused_before_any_work():
    params = models.init_params(models.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=1,
                                                   num_heads=2, num_kv_heads=2, head_dim=16), seed=0)
    with pytest.raises(ConfigError, match="not the config of a registered method"):
        jaxq.quantize(params, Unregistered())


def test_a_name_is_registered_once():
    with pytest.raises(ConfigError, match="already registered for GPTQConfig"):
        registry.register(dataclasses.make_dataclass("Other", [], namespace={"method": "gptq"}, frozen=True), gptq.GPTQ)
    with pytest.raises(ConfigError, match="does not implement"):
        registry.register(Unregistered, object)
    assert "unregistered" not in registry.names()
