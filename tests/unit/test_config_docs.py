"""docs/configuration.md is what the configuration models say, field for field."""

from __future__ import annotations

from deployments import config_docs
from deployments.config import LLMConfig
from deployments.engine.options import OPTIONS_BY_ENGINE


def test_the_committed_reference_is_up_to_date() -> None:
    assert config_docs.DOC.read_text() == config_docs.render(), (
        "docs/configuration.md is stale: run `make docs` (python -m deployments.config_docs)")
    assert config_docs.main(["--check"]) == 0


def test_every_field_is_documented_with_its_default() -> None:
    text = config_docs.render()
    models = [LLMConfig, *OPTIONS_BY_ENGINE.values()]
    for model in models:
        for name, field in model.model_fields.items():
            if name == "engine" and model is not LLMConfig:
                continue  # the options' tag, not an option
            assert field.description, f"{model.__name__}.{name} has no description"
            assert f"| `{name}` |" in text
    assert "| `kv_cache_gb` | float \\| null | `null` |" in text
    assert "| `max_batch_size` | int | `16` |" in text
