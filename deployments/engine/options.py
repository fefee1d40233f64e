"""Engine options: one pydantic model per engine, the one place their defaults are decided.

``LLMConfig.engine_options`` is validated against the model of the config's ``engine``
(the ``engine`` field below is the tag that picks it), so a misspelt option or a value out
of range is refused when the application is built, naming the option, before a replica
starts; the engine receives the validated object, never a loose dict. Fields are
documented where they are declared: docs/configuration.md is generated from them.

Imports neither ray nor torch.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from deployments import constants

# What short_first does, from the rule's own constants (deployments/engine/scheduler.py).
SHORT_FIRST = (f"Requests with {constants.LONG_ROW_FACTOR}x the smallest running token budget "
               f"(and {constants.LONG_ROW_MIN_TOKENS} or more tokens to go) decode on one step in "
               f"{constants.LONG_ROW_STRIDE} while shorter ones run.")


class _EngineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IpexLLMOptions(_EngineOptions):
    """Options of engine ipex_llm (ipex-llm low-bit checkpoints, CPU or Intel GPU)."""

    engine: Literal["ipex_llm"] = "ipex_llm"
    kv_cache_gb: float | None = Field(
        None, gt=0, description="GiB for the KV cache, prompt cache included. null: "
        f"{constants.IPEX_KV_CACHE_SHARE['cpu']:.0%} of the host memory free once the model "
        f"has loaded on cpu, {constants.IPEX_KV_CACHE_SHARE['xpu']:.0%} of the tile's on xpu "
        "(room is left for prefill activations).")
    max_context_tokens: int | None = Field(
        None, ge=16, description="Tokens (prompt + answer) one sequence may hold. null: the "
        "model's max_position_embeddings.")
    prompt_cache: bool = Field(
        True, description="Keep finished requests' KV (in "
        f"{constants.IPEX_PROMPT_CACHE_SHARE:.0%} of the KV budget) so a prompt that starts "
        "the same way prefills only the rest; the same prompt again computes nothing before "
        "its first token.")
    short_first: bool | None = Field(
        None, description=f"{SHORT_FIRST} null: on for cpu (a step's time grows with its "
        "rows), off for xpu.")
    warmup: bool | None = Field(
        None, description="Run the model at batch 1 and 2 before the replica reports ready, "
        "so a cold SYCL kernel cache compiles then, not during the first requests. null: on "
        "for xpu, off for cpu.")


class LlamaCppOptions(_EngineOptions):
    """Options of engine llama_cpp (GGUF checkpoints, CPU only)."""

    engine: Literal["llama_cpp"] = "llama_cpp"
    context_tokens: int = Field(
        constants.LLAMA_CPP_CONTEXT_TOKENS, ge=16, description="KV cells per request slot "
        "(prompt + answer), allocated up front for max_batch_size slots; capped by the "
        "model's training context.")
    threads: int | None = Field(
        None, ge=1, description="llama.cpp compute threads. null: the CPUs this replica is "
        "pinned to.")
    prompt_cache: bool = Field(
        True, description="A new request takes the slot holding the longest prefix of its "
        "prompt and prefills only the rest.")
    short_first: bool = Field(True, description=SHORT_FIRST)


class EchoOptions(_EngineOptions):
    """Options of engine echo (model-free, for tests and overhead benchmarks)."""

    engine: Literal["echo"] = "echo"
    step_delay_s: float = Field(0.0, ge=0, description="Seconds each step sleeps, as a "
                                "model's forward pass would take.")
    max_context_tokens: int = Field(constants.ECHO_CONTEXT_TOKENS, ge=1,
                                    description="Tokens one sequence may hold.")
    max_kv_tokens: int | None = Field(
        None, ge=1, description="KV positions admission may fill, as a model's KV budget "
        "(null: unbounded).")
    short_first: bool = Field(False, description=SHORT_FIRST)


EngineOptions = Annotated[IpexLLMOptions | LlamaCppOptions | EchoOptions,
                          Field(discriminator="engine")]
OPTIONS_BY_ENGINE: dict[str, type[_EngineOptions]] = {
    "ipex_llm": IpexLLMOptions, "llama_cpp": LlamaCppOptions, "echo": EchoOptions}
