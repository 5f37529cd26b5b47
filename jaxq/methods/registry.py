"""Which quantization methods exist: a name -> its config class and its implementation.

    registry.register(GPTQConfig, GPTQ)           # in jaxq/methods/gptq.py; the name is GPTQConfig.method
    registry.method(GPTQConfig())                 # -> GPTQ(config=GPTQConfig())
    registry.method_config("gptq", damp=0.02)     # -> GPTQConfig(damp=0.02)

`jaxq.methods` registers the built-in methods when imported (which `import jaxq` does); a
method defined anywhere else is usable once registered: `jaxq.quantize`, the calibration
driver, checkpoints' QuantConfig records and the `jaxq quantize` options all read from here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxq.config import ActivationConfig, ConfigError, KVCacheConfig, QuantConfig, Rule
from jaxq.methods.protocol import Method


@dataclasses.dataclass(frozen=True)
class Registration:
    name: str
    config: type           # a frozen dataclass with a ClassVar `method` = name
    implementation: type   # a `Method` subclass

    @property
    def data_free(self) -> bool:
        return self.implementation.data_free


_REGISTERED: dict[str, Registration] = {}


def register(config: type, implementation: type) -> Registration:
    """Make `implementation` the method for configs of class `config`, under `config.method`."""
    name = getattr(config, "method", None)
    if not isinstance(name, str) or not dataclasses.is_dataclass(config):
        raise ConfigError(f"{config.__name__} is not a method config (a dataclass with a ClassVar `method` name)")
    if not (isinstance(implementation, type) and issubclass(implementation, Method)):
        raise ConfigError(f"{implementation!r} does not implement jaxq.methods.protocol.Method")
    previous = _REGISTERED.get(name)
    if previous is not None and previous.config is not config:
        raise ConfigError(f"method name {name!r} is already registered for {previous.config.__name__}")
    _REGISTERED[name] = Registration(name, config, implementation)
    return _REGISTERED[name]


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTERED))


def registration(name: str) -> Registration:
    if name not in _REGISTERED:
        raise ConfigError(f"unknown method {name!r}; available: {', '.join(names())}")
    return _REGISTERED[name]


def of_config(config: Any) -> Registration:
    """The registration of a method config (by its class)."""
    name = getattr(type(config), "method", None)
    found = _REGISTERED.get(name) if isinstance(name, str) else None
    if found is None or found.config is not type(config):
        raise ConfigError(f"{config!r} is not the config of a registered method (available: {', '.join(names())})")
    return found


def method(config: Any) -> Method:
    """The implementation bound to `config`."""
    return of_config(config).implementation(config)


def method_config(name: str, **settings: Any) -> Any:
    """The config of the method called `name` with `settings`."""
    return registration(name).config(**settings)


def quant_config_from_dict(d: dict[str, Any]) -> QuantConfig:
    """The inverse of `QuantConfig.to_dict`."""
    rules = []
    for r in d["rules"]:
        method_cfg = None if r["method"] is None else _from_settings(registration(r["method"]).config, r["settings"])
        rules.append(Rule(r["pattern"], method_cfg))
    model = {"activations": ActivationConfig, "kv_cache": KVCacheConfig}
    return QuantConfig(rules=tuple(rules), rotate=d.get("rotate", "none"), rotate_seed=d.get("rotate_seed", 0),
                       **{k: None if d.get(k) is None else cls(**d[k]) for k, cls in model.items()})


def _from_settings(cls: type, settings: dict[str, Any]) -> Any:
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in settings:
            value = settings[f.name]
            nested = dataclasses.is_dataclass(f.default) and isinstance(value, dict)
            kwargs[f.name] = _from_settings(type(f.default), value) if nested else value
    return cls(**kwargs)
