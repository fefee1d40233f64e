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


def assert_batched_requests_keep_their_words(
        engine: LLMEngine, words: list[str],
        others: dict[str, tuple[int, ...]] | None = None) -> tuple[list[str], dict[str, str]]:
    """Run "w, w, w, w," for each word alone, then all together (with ``others``): every
    word the model repeats alone it repeats in the batch, and no answer names another
    request's word. Returns the repeated words and the batched answers."""
    prompts = {w: tuple(engine.encode(f"{w}, {w}, {w}, {w},")) for w in words}
    prompts.update(others or {})
    alone = {w: generate(engine, {w: ids}, max_tokens=8, temperature=0)[w]
             for w, ids in prompts.items()}
    together = generate(engine, prompts, max_tokens=8, temperature=0)
    repeating = [w for w in words if w in alone[w]]
    for word in repeating:
        assert word in together[word], (word, together[word])
    for word in words:
        assert not any(other in together[word] for other in words if other != word), together
    return repeating, together
