"""Typed engine options: each engine's options are checked against its own model when the
config is validated, so a misspelt or out-of-range option never reaches a replica."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from deployments.app import build_app
from deployments.config import LLMConfig
from deployments.engine.options import OPTIONS_BY_ENGINE, EchoOptions, IpexLLMOptions


@pytest.mark.parametrize(("engine", "options", "location"), [
    ("ipex_llm", {"kv_cach_gb": 1}, "engine_options.ipex_llm.kv_cach_gb"),
    ("ipex_llm", {"kv_cache_gb": 0}, "engine_options.ipex_llm.kv_cache_gb"),
    ("llama_cpp", {"kv_cache_gb": 1}, "engine_options.llama_cpp.kv_cache_gb"),
    ("llama_cpp", {"threads": 0}, "engine_options.llama_cpp.threads"),
    ("echo", {"step_delay": 0.1}, "engine_options.echo.step_delay"),
    ("echo", {"engine": "ipex_llm"}, "engine_options are engine ipex_llm's"),
])
def test_a_wrong_engine_option_is_refused_naming_it(engine: str, options: dict,
                                                    location: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(location)):
        LLMConfig.model_validate({"engine": engine, "engine_options": options})


def test_options_are_the_engines_own_model_with_its_defaults() -> None:
    for engine, options_class in OPTIONS_BY_ENGINE.items():
        config = LLMConfig.model_validate({"engine": engine})
        assert config.engine_options == options_class()
    config = LLMConfig.model_validate({"engine": "echo", "engine_options": {"step_delay_s": 1}})
    assert config.engine_options == EchoOptions(step_delay_s=1.0)
    assert LLMConfig(engine_options=IpexLLMOptions(warmup=True)).engine_options.warmup is True


def test_build_app_refuses_before_anything_is_deployed() -> None:
    with pytest.raises(ValidationError, match=re.escape("engine_options.ipex_llm.prompt_cach")):
        build_app({"engine_options": {"prompt_cach": False}})
