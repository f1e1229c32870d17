"""decode_steps=auto: several decode steps per dispatch on a GPU, one elsewhere."""

from __future__ import annotations

import types

import pytest

from lmidist_jax.config import ConfigError, config_from_kwargs
from lmidist_jax.engine import factory

SPEC = types.SimpleNamespace(is_encoder_decoder=False)


def test_option_parses_auto_and_integers():
    assert config_from_kwargs(None).decode_steps == "auto"
    assert config_from_kwargs(None, decode_steps="AUTO").decode_steps == "auto"
    assert config_from_kwargs(None, decode_steps="4").decode_steps == 4
    with pytest.raises(ConfigError, match="decode_steps=0.*integer >= 1 or auto"):
        config_from_kwargs(None, decode_steps=0)


def test_auto_resolves_by_device_and_model(monkeypatch):
    assert factory.resolve_decode_steps("auto", SPEC, has_draft=False) == 1  # this CPU
    assert factory.resolve_decode_steps(3, SPEC, has_draft=False) == 3
    gpu = [types.SimpleNamespace(platform="gpu")]
    monkeypatch.setattr(factory.jax, "devices", lambda *a: gpu)
    assert factory.resolve_decode_steps("auto", SPEC, has_draft=False) == factory.AUTO_DECODE_STEPS_GPU == 8
    assert factory.resolve_decode_steps("auto", SPEC, has_draft=True) == 1
    t5 = types.SimpleNamespace(is_encoder_decoder=True)
    assert factory.resolve_decode_steps("auto", t5, has_draft=False) == 1
    assert factory.resolve_decode_steps(1, SPEC, has_draft=False) == 1
