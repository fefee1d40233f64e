"""The application's configuration: one pydantic model, one source of truth for every knob.

``LLMConfig`` is what ``serve_config.yaml`` passes as an application's ``args``. Ray-level
options (num_replicas, max_ongoing_requests, max_queued_requests, autoscaling_config,
ray_actor_options) are not here: they belong in the config's ``deployments:`` section,
Ray's standard place for operators to tune them. Unknown keys are refused (extra="forbid"),
so a typo fails the deploy instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments import constants
from deployments.engine.options import OPTIONS_BY_ENGINE, EngineOptions, IpexLLMOptions
from deployments.tool_calls import ToolCallParserName

EngineName = Literal["ipex_llm", "llama_cpp", "echo"]
# Each engine's model runner (deployments/engine/runner.py), under the shared scheduler.
RUNNER_CLASSES: dict[str, str] = {
    "ipex_llm": "deployments.engine.ipex_llm:IpexLLMRunner",
    "llama_cpp": "deployments.engine.llama_cpp:LlamaCppRunner",
    "echo": "deployments.engine.echo:EchoRunner",
}
# Engines without a GPU path: `device: xpu` is refused, `device: auto` never picks a GPU.
CPU_ONLY_ENGINES = frozenset({"llama_cpp"})


class LLMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_name: str = Field(constants.DEMO_MODEL_NAME, min_length=1,
                            description="Name clients pass as `model`; /v1/models lists it.")
    checkpoint_path: str = Field(
        constants.DEMO_CHECKPOINT_DIR,
        description="Checkpoint made by `llm-checkpoint` (a version folder or a name that "
                    "points at one). On a cluster: an absolute path on the shared mount; a "
                    "relative path is taken from the Ray cluster's working directory.")
    engine: EngineName = Field(
        "ipex_llm", description="Backend behind the engine protocol. ipex_llm: ipex-llm "
        "low-bit checkpoints, CPU or Intel GPU. llama_cpp: gguf checkpoints "
        "(`llm-checkpoint convert --format gguf`), CPU only, the faster CPU path; needs the "
        "`llama-cpp` extra. echo: model-free, for tests and overhead benchmarks.")
    engine_options: EngineOptions = Field(
        default_factory=IpexLLMOptions,
        description="Options of the chosen engine, checked against that engine's own model: "
        "a misspelt option fails when the application is built (the engine options tables "
        "below).")
    device: Literal["auto", "cpu", "xpu"] = Field(
        "auto", description="xpu: one Intel GPU tile per replica; cpu: one CPU socket per "
                            "replica; auto: whatever the cluster advertises, else the host.")
    accelerator_type: str | None = Field(
        None, description="Ray accelerator type XPU replicas ask for (e.g. Intel-GPU-Max-1550).")
    xmx_disabled: bool = Field(
        False, description="Set BIGDL_LLM_XMX_DISABLED=1 in replicas: GPUs without XMX units "
                           "(Core Ultra iGPUs).")
    local_cache_dir: str | None = Field(
        None, description="Copy the checkpoint to this node-local folder once per node "
                          "(under a file lock) and load from there.")

    max_batch_size: int = Field(constants.MAX_BATCH_SIZE, ge=1, le=256,
                                description="Sequences decoded together per step.")
    max_prefill_tokens_per_step: int = Field(
        constants.MAX_PREFILL_TOKENS_PER_STEP, ge=16,
        description="Prompt tokens prefilled per step; longer prompts are chunked so they "
                    "do not stall everyone's decoding.")
    default_max_tokens: int = Field(constants.DEFAULT_MAX_TOKENS, ge=1,
                                    description="max_tokens of a request that names none.")
    max_stop_strings: int = Field(constants.MAX_STOP_STRINGS, ge=0,
                                  description="Stop strings one request may give.")
    max_prompts_per_request: int = Field(
        constants.MAX_PROMPTS_PER_REQUEST, ge=1,
        description="Prompts one /v1/completions request may carry (each is a sequence).")
    request_timeout_s: float = Field(
        constants.REQUEST_TIMEOUT_S, gt=0,
        description="Deadline of a request that names none (field `timeout`).")
    max_request_timeout_s: float = Field(constants.MAX_REQUEST_TIMEOUT_S, gt=0,
                                         description="Cap on a request's own `timeout`.")
    max_request_body_bytes: int = Field(
        constants.MAX_REQUEST_BODY_BYTES, ge=1024,
        description="Largest request body the router reads; a larger one is a 413.")
    max_stream_chunks_per_s: float | None = Field(
        constants.MAX_STREAM_CHUNKS_PER_S, gt=0,
        description="Chunks a replica streams per second, all answers together: with N "
                    "answers running, each gets at most one chunk per N / this seconds "
                    f"(at most {constants.MAX_STREAM_INTERVAL_S:g} s), carrying every "
                    "token made since; first and last chunks go at once. Each chunk costs "
                    "two Ray messages (replica to router to proxy), CPU that a small host "
                    "takes from the model (bench/RESULTS.md measures it). null: one chunk "
                    "per token.")
    api_key_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the API key(s), "
                    "comma-separated. Keys never go in this file.")
    api_key_file: str | None = Field(
        None, description="File holding API keys, one per line.")
    log_prompts: bool = Field(False, description="Put prompt text in request logs.")
    tool_call_parser: ToolCallParserName = Field(
        "hermes", description="How tool calls are read from an answer when `tool_choice` "
        "is auto: `hermes` (<tool_call> blocks: Hermes, Qwen, and the format tools are "
        "written in for models whose chat template has none) or `llama3_json`.")
    engine_thread_niceness: int | None = Field(
        None, ge=-20, le=19,
        description="Run the engine thread (and the OpenMP threads it starts) at this "
                    "niceness instead of Ray's worker niceness (15); needs CAP_SYS_NICE to "
                    "go lower. 0 speeds decoding where Ray's processes share the model's "
                    "cores, but the replica then starves Ray Serve's proxy and routers on "
                    "the same node under load; off by default.")

    reserved_cores: int | Literal["auto"] = Field(
        "auto", description="Physical cores of each node kept out of every model slot for "
        "the serving stack (Ray's processes, Serve's proxy and routers, the replicas' "
        "non-compute threads); the model's compute threads run one per core on the rest. "
        "`auto`: 1 on nodes of 8 or more physical cores, else 0 (measured: "
        "bench/RESULTS.md). A node whose Ray was started through "
        "`python -m deployments.core_reservation` (`make serve`, cluster/start-node.sh) "
        "uses the reservation it was started with.")

    @field_validator("reserved_cores")
    @classmethod
    def _reserved_cores_not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be 0 or more, or auto")
        return value

    @model_validator(mode="before")
    @classmethod
    def _options_of_the_engine(cls, data: Any) -> Any:
        """Tag ``engine_options`` with ``engine``, so that engine's option model checks them."""
        if not isinstance(data, dict):
            return data
        engine = data.get("engine", "ipex_llm")
        options = data.get("engine_options")
        if engine in OPTIONS_BY_ENGINE and (options is None or isinstance(options, dict)):
            data = {**data, "engine_options": {"engine": engine, **(options or {})}}
        return data

    @model_validator(mode="after")
    def _options_match_the_engine(self) -> LLMConfig:
        if self.engine_options.engine != self.engine:
            raise ValueError(f"engine_options are engine {self.engine_options.engine}'s, and "
                             f"engine is {self.engine}")
        return self

    @field_validator("checkpoint_path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        return str(Path(value).expanduser().absolute())

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> LLMConfig:
        if self.request_timeout_s > self.max_request_timeout_s:
            raise ValueError("request_timeout_s must not exceed max_request_timeout_s")
        return self

    @model_validator(mode="after")
    def _engine_runs_on_device(self) -> LLMConfig:
        if self.cpu_only and self.device == "xpu":
            raise ValueError(f"engine {self.engine} runs on the CPU; for device xpu use "
                             "engine ipex_llm")
        return self

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], app_name: str = "llm") -> LLMConfig:
        """The args of application ``app_name`` in a Serve config file."""
        document = yaml.safe_load(Path(path).read_text())
        for app in document.get("applications", []):
            if app.get("name") == app_name:
                return cls.model_validate(app.get("args") or {})
        raise ValueError(f"{path}: no application named {app_name!r}")

    @property
    def cpu_only(self) -> bool:
        """The engine has no GPU path (placement keeps its replicas on CPUs)."""
        return self.engine in CPU_ONLY_ENGINES

    @property
    def runner_class_path(self) -> str:
        return RUNNER_CLASSES[self.engine]

    def api_keys(self) -> frozenset[str]:
        """Configured API keys (empty: no auth). Read at start-up, never logged.

        A configured source that yields no key (variable unset or blank, file missing or
        blank) is an error, never a silently open server.
        """
        keys: set[str] = set()
        if self.api_key_env:
            from_env = {k.strip() for k in os.environ.get(self.api_key_env, "").split(",")}
            from_env.discard("")
            if not from_env:
                raise ValueError(f"api_key_env names ${self.api_key_env}, which is unset or "
                                 "holds no key; set it, or remove api_key_env to serve "
                                 "without keys")
            keys |= from_env
        if self.api_key_file:
            try:
                lines = Path(self.api_key_file).read_text().splitlines()
            except OSError as error:
                raise ValueError(f"api_key_file {self.api_key_file} cannot be read: "
                                 f"{error.strerror or error}") from None
            from_file = {line.strip() for line in lines} - {""}
            if not from_file:
                raise ValueError(f"api_key_file {self.api_key_file} holds no key; add one "
                                 "per line, or remove api_key_file to serve without keys")
            keys |= from_file
        return frozenset(keys)
