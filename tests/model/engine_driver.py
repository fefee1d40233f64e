"""Driving an engine step by step, as the replica's loop does: shared by the engine tests."""

from __future__ import annotations

from typing import Any

from deployments.engine.protocol import GenerationRequest, LLMEngine, SamplingParams


def chat_ids(engine: LLMEngine, question: str) -> tuple[int, ...]:
    """The token ids of one user turn in the model's chat template."""
    return tuple(engine.encode(engine.apply_chat_template([{"role": "user",
                                                            "content": question}])))


def generate(engine: LLMEngine, prompts: dict[str, tuple[int, ...]],
             **params: Any) -> dict[str, str]:
    """Add every prompt as one request, step until all finish; the text of each."""
    for rid, ids in prompts.items():
        engine.add_request(GenerationRequest(rid, ids, SamplingParams(**params)))
    texts = dict.fromkeys(prompts, "")
    while engine.has_unfinished_requests():
        for out in engine.step().outputs:
            texts[out.request_id] = texts.get(out.request_id, "") + out.text
    return texts
