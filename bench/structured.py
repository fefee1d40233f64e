"""The cost of constrained decoding: tokens/s with and without a JSON schema, at 1 and 8
concurrent requests, the engine alone and over HTTP (engine ipex_llm, the demo model).

    python -m bench.structured [--checkpoint PATH] [--rounds 3] [--max-tokens 96] [--out F]

Each configuration runs ``--rounds`` times, alternating plain and constrained, and reports
the median tokens/s (answer tokens over wall time, prefill included; temperature 0.8). A
section of ``make bench``. The schema lets the model write a long array of bounded integers, so
answers are long with and without it; the target is at most 10% fewer tokens/s at 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from deployments.constants import DEMO_CHECKPOINT_DIR, DEMO_MODEL_NAME

SCHEMA = {"type": "object", "properties": {"values": {
    "type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}}},
    "required": ["values"], "additionalProperties": False}
PROMPT = "List many numbers between 0 and 999 as JSON."
TEMPERATURE = 0.8
LEVELS = (1, 8)
HTTP_PORT = 8731  # the app's, for this run only


def engine_alone(checkpoint: str, rounds: int, max_tokens: int) -> dict[str, Any]:
    """tokens/s of BatchingEngine(IpexLLMRunner) driven in a loop, all requests at once."""
    from deployments.contract import Guide
    from deployments.engine.batching import BatchingEngine
    from deployments.engine.ipex_llm import IpexLLMRunner
    from deployments.engine.protocol import GenerationRequest, SamplingParams

    engine = BatchingEngine(IpexLLMRunner.load(checkpoint, device="cpu", max_batch_size=8,
                                               max_prefill_tokens_per_step=512))
    prompt = tuple(engine.encode(engine.apply_chat_template(
        [{"role": "user", "content": PROMPT}])))
    guide = Guide(kind="json_schema", spec=json.dumps(SCHEMA))

    def run(clients: int, guided: bool, round_: int) -> float:
        for i in range(clients):
            params = SamplingParams(max_tokens=max_tokens, temperature=TEMPERATURE,
                                    seed=abs(round_) * 100 + i, guide=guide if guided else None)
            engine.add_request(GenerationRequest(f"r{round_}-{i}-{guided}", prompt, params))
        tokens, start = 0, time.perf_counter()
        while engine.has_unfinished_requests():
            for out in engine.step().outputs:
                if out.finished:
                    tokens += out.num_generated_tokens
        return tokens / (time.perf_counter() - start)

    run(1, True, -1)  # warm-up: the first forward passes, the tokenizer's grammar view
    return _alternating(run, rounds)


def over_http(checkpoint: str, rounds: int, max_tokens: int) -> dict[str, Any]:
    """tokens/s of concurrent chat requests against the app (Ray Serve real)."""
    import httpx
    import ray
    from ray import serve

    from bench.ray_tuning import apply_ray_tuning
    from deployments.app import build_app

    apply_ray_tuning()  # the service as shipped
    ray.init(include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
    serve.run(build_app({"checkpoint_path": checkpoint, "max_batch_size": 8}), name="llm",
              route_prefix="/")
    with httpx.Client(base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=600) as client:

        def ask(guided: bool, seed: int) -> int:
            body: dict[str, Any] = {
                "model": DEMO_MODEL_NAME, "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": max_tokens, "temperature": TEMPERATURE, "seed": seed}
            if guided:
                body["response_format"] = {"type": "json_schema", "json_schema": {
                    "name": "numbers", "schema": SCHEMA}}
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        def run(clients: int, guided: bool, round_: int) -> float:
            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                tokens = sum(pool.map(lambda i: ask(guided, abs(round_) * 100 + i),
                                      range(clients)))
            return tokens / (time.perf_counter() - start)

        try:
            run(1, True, -1)
            return _alternating(run, rounds)
        finally:
            serve.shutdown()
            ray.shutdown()


def _alternating(run: Any, rounds: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for clients in LEVELS:
        plain, guided = [], []
        for round_ in range(rounds):
            plain.append(run(clients, False, round_))
            guided.append(run(clients, True, round_))
        results[str(clients)] = {
            "plain_tokens_per_s": statistics.median(plain),
            "json_schema_tokens_per_s": statistics.median(guided),
            "ratio": statistics.median(guided) / statistics.median(plain),
            "runs": {"plain": plain, "json_schema": guided}}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(Path(DEMO_CHECKPOINT_DIR).resolve()))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    results = {"engine_alone": engine_alone(args.checkpoint, args.rounds, args.max_tokens),
               "over_http": over_http(args.checkpoint, args.rounds, args.max_tokens)}
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
