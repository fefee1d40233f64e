"""LangChain chains over a real Serve application running the demo model (SmolLM2-135M-Instruct,
sym_int4), through the application's handle.

The prompt template is the one of LangChain's IpexLLM example. As a raw completion this tiny
model answers it with "The answer is:" over and over (measured), so the chains that must say
"Paris" use ``chat_template=True`` (the prompt framed by the model's chat template); the raw
mode is checked for the mechanics (stream == invoke, stop).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.prompts import PromptTemplate
from ray import serve

from deployments.app import build_app
from deployments.checkpoints import verify_checkpoint
from deployments.constants import DEFAULT_LOW_BIT, DEMO_MODEL_NAME
from deployments.convert import demo_gguf_path
from langchain_adapter import ChatRayServe, RayServeLLM

pytestmark = [pytest.mark.model, pytest.mark.timeout(300)]

APP = "llm"
TEMPLATE = "USER: {question}\nASSISTANT:"
FRANCE = {"question": "What is the capital of France?"}
COUNTRIES = ["France", "Germany", "Japan", "England", "Russia", "China", "Egypt", "Greece"]
# IpexLLM's model_kwargs, as the example of LangChain's IpexLLM passes them.
SEED_KWARGS = {"temperature": 0, "max_length": 24, "trust_remote_code": True}


@pytest.fixture(scope="module")
def demo_app(demo_checkpoint: Path) -> Iterator[None]:
    # address="local": a Ray of our own, never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app({"engine": "ipex_llm", "checkpoint_path": str(demo_checkpoint),
                             "max_batch_size": 8}), name=APP, route_prefix=None)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def llm(demo_app: None) -> RayServeLLM:
    return RayServeLLM(app_name=APP, chat_template=True, model_kwargs=SEED_KWARGS)


@pytest.fixture(scope="module")
def raw_llm(demo_app: None) -> RayServeLLM:
    return RayServeLLM(app_name=APP, model_kwargs={**SEED_KWARGS, "max_length": 12})


def batches_above_one(before: dict[str, Any], after: dict[str, Any]) -> int:
    return sum(count - before["batch_sizes"].get(size, 0)
               for size, count in after["batch_sizes"].items() if size > 1)


@pytest.fixture(scope="module")
def paris(llm: RayServeLLM) -> str:
    """The chain's answer to the France question (greedy, so every way of asking agrees)."""
    return (PromptTemplate.from_template(TEMPLATE) | llm).invoke(FRANCE)


def test_the_chain_answers_paris(paris: str) -> None:
    assert "Paris" in paris
    assert "USER:" not in paris and "What is the capital" not in paris


def test_a_batch_of_eight_questions_is_served_together(llm: RayServeLLM) -> None:
    stats = serve.get_deployment_handle("LLMServer", app_name=APP).stats
    before = stats.remote().result()
    chain = PromptTemplate.from_template(TEMPLATE) | llm
    answers = chain.batch([{"question": f"What is the capital of {country}?"}
                           for country in COUNTRIES])
    assert "Paris" in answers[0]
    assert all(answer.strip() for answer in answers)
    assert batches_above_one(before, stats.remote().result()) > 0


def test_stream_concatenates_to_invoke(llm: RayServeLLM, paris: str) -> None:
    chunks = list((PromptTemplate.from_template(TEMPLATE) | llm).stream(FRANCE))
    assert len([chunk for chunk in chunks if chunk]) > 1
    assert "".join(chunks) == paris


def test_raw_completion_streams_and_stops(raw_llm: RayServeLLM) -> None:
    prompt = TEMPLATE.format(**FRANCE)
    chunks = list(raw_llm.stream(prompt))
    assert len([chunk for chunk in chunks if chunk]) > 1
    whole = raw_llm.invoke(prompt)
    assert "".join(chunks) == whole
    assert ":" in whole  # "The answer is:" (see the module docstring)
    cut = raw_llm.invoke(prompt, stop=[":"])
    assert ":" not in cut and whole.startswith(cut)


def test_stop_cuts_the_answer(llm: RayServeLLM, paris: str) -> None:
    cut = (PromptTemplate.from_template(TEMPLATE) | llm.bind(stop=["Paris"])).invoke(FRANCE)
    assert "Paris" not in cut
    assert paris.startswith(cut) and len(cut) < len(paris)


async def test_async_variants(llm: RayServeLLM, paris: str) -> None:
    chain = PromptTemplate.from_template(TEMPLATE) | llm
    assert await chain.ainvoke(FRANCE) == paris
    chunks = [chunk async for chunk in chain.astream(FRANCE)]
    assert len([chunk for chunk in chunks if chunk]) > 1
    assert "".join(chunks) == paris
    answers = await chain.abatch([FRANCE, {"question": "What is the capital of Germany?"}])
    assert "Paris" in answers[0] and "Berlin" in answers[1]


def test_the_chat_model_answers_with_usage(demo_app: None) -> None:
    chat = ChatRayServe(app_name=APP, model_kwargs={"temperature": 0, "max_tokens": 24})
    answer = chat.invoke([SystemMessage("Answer in one sentence."),
                          HumanMessage("What is the capital of France?")])
    assert "Paris" in answer.content
    assert answer.usage_metadata is not None
    assert 0 < answer.usage_metadata["output_tokens"] <= 24


def test_moving_from_ipex_llm_is_one_line(demo_checkpoint: Path, tmp_path: Path) -> None:
    """IpexLLM.from_model_id_low_bit(path, model_kwargs=...) becomes RayServeLLM's, same
    arguments. The application already serving that checkpoint is reused, not deployed
    again (a whole-host replica reserves the host's CPUs: a second one could not start)."""
    deployed_at = serve.status().applications[APP].last_deployed_time_s
    llm = RayServeLLM.from_model_id_low_bit(str(demo_checkpoint), model_kwargs=SEED_KWARGS,
                                            app_name=APP, checkpoint_root=tmp_path,
                                            chat_template=True)
    assert (llm.app_name, llm.model) == (APP, DEMO_MODEL_NAME)
    assert "Paris" in (PromptTemplate.from_template(TEMPLATE) | llm).invoke(FRANCE)
    assert serve.status().applications[APP].last_deployed_time_s == deployed_at


def test_from_model_id_converts_the_model_once(tmp_path: Path, demo_app: None) -> None:
    """Two clients at once, as IpexLLM.from_model_id users would start: the real conversion
    (GGUF -> sym_int4) runs once under the lock, the second client reuses its checkpoint.
    The application runs the echo engine: this host's CPUs are reserved by the demo app's
    whole-host replica, and what is checked here is the conversion and the deploy path."""
    gguf = demo_gguf_path()

    def client(_: int) -> RayServeLLM:
        return RayServeLLM.from_model_id(str(gguf), model_kwargs=SEED_KWARGS,
                                         checkpoint_root=tmp_path, app_args={"engine": "echo"})

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(client, range(2))
    try:
        assert first.app_name == second.app_name
        assert first.model == second.model == gguf.stem
        (published,) = [path for path in tmp_path.iterdir() if path.is_symlink()]
        assert len(list(published.parent.glob(f".{published.name}.versions/*"))) == 1
        manifest = verify_checkpoint(published)
        assert (manifest.source, manifest.low_bit) == (str(gguf), DEFAULT_LOW_BIT)
        assert first.invoke("say hello", max_tokens=5) == "hello"
    finally:
        serve.delete(first.app_name)
