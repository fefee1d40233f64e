"""The LangChain adapter against a real Serve application with the model-free echo engine.

The echo engine answers with the prompt's last word repeated, one character per token, so
every expected answer is exact: "say hello" with max_tokens 8 is "hellohel". Its steps take
STEP_DELAY_S, long enough for concurrent requests to meet in a batch and for streams to
arrive in pieces.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import ray
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.globals import set_llm_cache
from langchain_core.messages import (
    AIMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import LLMResult
from langchain_core.prompts import PromptTemplate
from langchain_core.tools import tool
from ray import serve
from ray.serve.exceptions import BackPressureError

from deployments.app import build_app
from deployments.checkpoints import CheckpointError, publish_checkpoint, verify_checkpoint
from deployments.constants import DEMO_MODEL_NAME
from langchain_adapter import AppUnavailableError, ChatRayServe, RayServeLLM, ServiceError
from langchain_adapter import deploy as deploy_module
from langchain_adapter.router_client import generation_fields, service_errors
from tests.helpers import read_only_view, write_tiny_model

pytestmark = pytest.mark.timeout(180)

APP = "llm"
STEP_DELAY_S = 0.01
ECHO_ARGS = {"engine": "echo", "checkpoint_path": "/unused", "max_batch_size": 8,
             "engine_options": {"step_delay_s": STEP_DELAY_S}}
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]


def echo(word: str, tokens: int) -> str:
    """What the echo engine answers to a prompt whose last word is ``word``."""
    return (word * tokens)[:tokens]


@pytest.fixture(scope="module", autouse=True)
def echo_app() -> Iterator[None]:
    # address="local": a Ray of our own, never a cluster someone else started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        serve.start(proxy_location="Disabled")
        serve.run(build_app(ECHO_ARGS), name=APP, route_prefix=None)
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def llm(echo_app: None) -> RayServeLLM:
    return RayServeLLM(app_name=APP, model_kwargs={"max_tokens": 8})


def server_stats() -> dict[str, Any]:
    return serve.get_deployment_handle("LLMServer", app_name=APP).stats.remote().result()


async def aserver_stats() -> dict[str, Any]:
    return await serve.get_deployment_handle("LLMServer", app_name=APP).stats.remote()


def batches_above_one(before: dict[str, Any], after: dict[str, Any]) -> int:
    """Engine steps that decoded more than one sequence between two stats() readings."""
    return sum(count - before["batch_sizes"].get(size, 0)
               for size, count in after["batch_sizes"].items() if size > 1)


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.results: list[LLMResult] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.results.append(response)


# ---- invoke -----------------------------------------------------------------------------


def test_invoke_returns_the_completion_without_the_prompt(llm: RayServeLLM) -> None:
    assert llm.invoke("say hello") == "hellohel"
    chain = PromptTemplate.from_template("USER: {question}\nASSISTANT:") | llm
    assert chain.invoke({"question": "capital?"}) == echo("capital?\nASSISTANT:", 8)


def test_the_model_is_asked_from_the_application(llm: RayServeLLM) -> None:
    assert llm.model == DEMO_MODEL_NAME
    assert llm._llm_type == "ray_serve"
    assert llm._identifying_params == {"app_name": APP, "model": DEMO_MODEL_NAME,
                                       "max_tokens": 8, "chat_template": False}
    params = llm._get_ls_params(stop=["x"], temperature=0.5)
    assert params["ls_provider"] == "ray_serve"
    assert params["ls_model_name"] == DEMO_MODEL_NAME
    assert (params["ls_temperature"], params["ls_max_tokens"], params["ls_stop"]) == (
        0.5, 8, ["x"])


def test_usage_and_finish_reason_are_reported(llm: RayServeLLM) -> None:
    result = llm.generate(["say hello", "say hi"], max_tokens=4)
    assert [g[0].text for g in result.generations] == ["hell", "hihi"]
    first = result.generations[0][0].generation_info
    no_cache = {"prompt_tokens_details": {"cached_tokens": 0}}  # the echo engine has none
    assert first == {"finish_reason": "length", "token_usage": {
        "prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13, **no_cache}}
    assert result.llm_output == {"model_name": DEMO_MODEL_NAME, "token_usage": {
        "prompt_tokens": 9 + 6, "completion_tokens": 8, "total_tokens": 23, **no_cache}}


async def test_ainvoke(llm: RayServeLLM) -> None:
    assert await llm.ainvoke("say hello", max_tokens=6) == "helloh"


def test_chat_template_frames_the_prompt_as_a_user_message(echo_app: None) -> None:
    llm = RayServeLLM(chat_template=True, model_kwargs={"max_tokens": 8})
    # The echo engine's template: "user: say hello\nassistant:".
    assert llm.invoke("say hello") == echo("hello\nassistant:", 8)
    assert "".join(llm.stream("say hello", max_tokens=20)) == echo("hello\nassistant:", 20)
    result = llm.generate(["say hi"], stop=["a"])
    assert result.generations[0][0].text == "hi\n"
    assert result.llm_output["token_usage"]["prompt_tokens"] == len("user: say hi\nassistant:")


# ---- batch ------------------------------------------------------------------------------


def test_batch_sends_every_prompt_at_once_so_the_replica_batches_them(
        llm: RayServeLLM) -> None:
    before = server_stats()
    answers = llm.batch([f"say {word}" for word in WORDS], max_tokens=20)
    assert answers == [echo(word, 20) for word in WORDS]
    assert batches_above_one(before, server_stats()) > 0


async def test_abatch_sends_every_prompt_at_once(llm: RayServeLLM) -> None:
    before = await aserver_stats()
    answers = await llm.abatch([f"say {word}" for word in WORDS], max_tokens=20)
    assert answers == [echo(word, 20) for word in WORDS]
    assert batches_above_one(before, await aserver_stats()) > 0


def test_a_failing_prompt_fails_the_batch_with_its_error(llm: RayServeLLM) -> None:
    too_many_stops = [str(i) for i in range(9)]
    with pytest.raises(ServiceError) as error:
        llm.batch(["say hello", "say hi"], stop=too_many_stops)
    assert (error.value.status_code, error.value.param) == (400, "stop")


def test_return_exceptions_fails_only_the_bad_prompt(llm: RayServeLLM) -> None:
    answers = llm.batch(["say hello", "", "say hi"], return_exceptions=True)
    assert answers[0::2] == [echo("hello", 8), echo("hi", 8)]
    assert isinstance(answers[1], ServiceError) and answers[1].param == "prompt"
    answers = asyncio.run(llm.abatch(["", "say hi"], return_exceptions=True))
    assert isinstance(answers[0], ServiceError) and answers[1] == echo("hi", 8)


# ---- stream -----------------------------------------------------------------------------


def test_stream_yields_text_as_the_replica_produces_it(llm: RayServeLLM) -> None:
    recorder = TokenRecorder()
    started = time.monotonic()
    chunks, arrivals = [], []
    for chunk in llm.stream("say hello", {"callbacks": [recorder]}, max_tokens=60):
        chunks.append(chunk)
        arrivals.append(time.monotonic() - started)
    assert "".join(chunks) == llm.invoke("say hello", max_tokens=60) == echo("hello", 60)
    assert len([c for c in chunks if c]) > 5
    # 60 steps of STEP_DELAY_S: the first text comes long before the last.
    assert arrivals[0] < arrivals[-1] / 2
    assert recorder.tokens == chunks
    (result,) = recorder.results
    assert result.generations[0][0].generation_info == {"finish_reason": "length",
                                                        "token_usage": {
        "prompt_tokens": 9, "completion_tokens": 60, "total_tokens": 69,
        "prompt_tokens_details": {"cached_tokens": 0}}}


async def test_astream_yields_text_as_the_replica_produces_it(llm: RayServeLLM) -> None:
    recorder = TokenRecorder()
    chunks = [chunk async for chunk in llm.astream("say hello", {"callbacks": [recorder]},
                                                   max_tokens=40)]
    assert "".join(chunks) == await llm.ainvoke("say hello", max_tokens=40)
    assert len([c for c in chunks if c]) > 5
    assert recorder.tokens == chunks


def test_leaving_a_stream_early_stops_its_generation(llm: RayServeLLM) -> None:
    stream = llm.stream("say hello", max_tokens=3000)  # 30 s of steps if left running
    assert next(stream)
    stream.close()
    health = serve.get_deployment_handle("LLMServer", app_name=APP).health
    deadline = time.monotonic() + 10
    while health.remote().result()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health.remote().result()["running"] == 0


# ---- stop and parameters ----------------------------------------------------------------


def test_stop_cuts_the_answer_before_the_stop_string(llm: RayServeLLM) -> None:
    assert llm.invoke("say abcdef", stop=["d"]) == "abc"
    assert "".join(llm.stream("say abcdef", stop=["de", "x"])) == "abc"


async def test_stop_in_async_calls(llm: RayServeLLM) -> None:
    assert await llm.ainvoke("say abcdef", stop=["d"]) == "abc"
    assert "".join([c async for c in llm.astream("say abcdef", stop=["cd"])]) == "ab"


def test_call_kwargs_override_model_kwargs(echo_app: None) -> None:
    llm = RayServeLLM(model_kwargs={"max_tokens": 4, "temperature": 0.5})
    assert llm.invoke("say hello") == "hell"
    assert llm.invoke("say hello", max_tokens=6) == "helloh"
    assert llm.batch(["say hi"], max_tokens=3) == ["hih"]


def test_ipex_llm_model_kwargs_keep_their_meaning(echo_app: None) -> None:
    seed = RayServeLLM(model_kwargs={"temperature": 0, "max_length": 5,
                                     "trust_remote_code": True})
    assert seed.invoke("say hello") == "hello"
    assert seed.invoke("say hello", max_new_tokens=2) == "he"
    assert generation_fields({"max_new_tokens": 3, "max_length": 64}) == {"max_tokens": 3}
    assert generation_fields({"max_tokens": 7, "max_new_tokens": 3}) == {"max_tokens": 7}
    assert generation_fields({"do_sample": False, "temperature": 0.8}) == {"temperature": 0.0}
    assert generation_fields({"do_sample": True, "temperature": 0.8, "seed": None}) == {
        "temperature": 0.8}
    assert generation_fields({"trust_remote_code": True}) == {}
    assert generation_fields({"top_k": 40, "do_sample": True}) == {"top_k": 40}


def test_later_layers_override_earlier_ones() -> None:
    """model_kwargs, then a call's keyword arguments: the call wins, in IpexLLM's names too."""
    assert generation_fields({"temperature": 0.7, "do_sample": False}, {"do_sample": True}) == {
        "temperature": 0.7}
    assert generation_fields({"do_sample": False}, {"temperature": 1.0}) == {"temperature": 1.0}
    assert generation_fields({"temperature": 0.7}, {"do_sample": False}) == {"temperature": 0.0}
    assert generation_fields({"max_tokens": 8}, {"max_length": 2}) == {"max_tokens": 2}
    assert generation_fields({"max_length": 6}, {}) == {"max_tokens": 6}


def test_generation_settings_are_accepted_as_fields_as_chatopenai_takes_them(
        echo_app: None) -> None:
    assert RayServeLLM(max_tokens=3, temperature=0).invoke("say hello") == "hel"
    answer = ChatRayServe(max_tokens=3).invoke("say hello")
    assert answer.usage_metadata is not None and answer.usage_metadata["output_tokens"] == 3
    assert RayServeLLM(max_tokens=3, model_kwargs={"max_tokens": 3}).model_kwargs == {
        "max_tokens": 3}
    with pytest.raises(ValueError, match="max_tokens set both"):
        RayServeLLM(max_tokens=3, model_kwargs={"max_tokens": 4})
    with pytest.raises(ValueError, match="num_beams"):  # never silently dropped
        ChatRayServe(num_beams=2)


def test_stop_as_a_field_is_every_calls_default(echo_app: None) -> None:
    llm = RayServeLLM(max_tokens=8, stop=["l"])
    assert llm.invoke("say hello") == "he"
    assert llm.invoke("say hello", stop=["o"]) == "hell"
    assert ChatRayServe(max_tokens=8, stop=["l"]).invoke("say hello").content == "he"


def test_a_calls_settings_are_part_of_the_llm_cache_key(echo_app: None) -> None:
    """LangChain keys an LLM's cached answers by its fields and stop, not a call's kwargs."""
    llm = RayServeLLM(max_tokens=4)
    set_llm_cache(InMemoryCache())
    try:
        assert llm.invoke("say hello") == "hell"
        decoded = server_stats()["decoded_tokens"]
        assert llm.invoke("say hello") == "hell"  # from the cache: nothing decoded
        assert server_stats()["decoded_tokens"] == decoded
        assert llm.invoke("say hello", max_tokens=2) == "he"
        assert llm.batch(["say hello"], max_tokens=3) == ["hel"]
        assert asyncio.run(llm.ainvoke("say hello", max_tokens=6)) == "helloh"
        assert llm.invoke("say hello", max_tokens=2) == "he"
    finally:
        set_llm_cache(None)


def test_streaming_true_streams_inside_invoke(echo_app: None) -> None:
    recorder = TokenRecorder()
    llm = RayServeLLM(max_tokens=20, streaming=True, callbacks=[recorder])
    result = llm.generate(["say hello", "say hi"])
    assert [g[0].text for g in result.generations] == [echo("hello", 20), echo("hi", 20)]
    assert result.generations[0][0].generation_info["finish_reason"] == "length"
    assert result.llm_output["token_usage"]["completion_tokens"] == 40
    assert "".join(recorder.tokens) == echo("hello", 20) + echo("hi", 20)
    assert asyncio.run(llm.ainvoke("say hi", max_tokens=4)) == "hihi"
    chat_recorder = TokenRecorder()
    chat = ChatRayServe(max_tokens=20, streaming=True, callbacks=[chat_recorder])
    assert chat.invoke("say hello").content == "".join(chat_recorder.tokens)
    assert len([token for token in chat_recorder.tokens if token]) > 1


def test_invoke_with_stream_true_streams(chat: ChatRayServe) -> None:
    recorder = TokenRecorder()
    answer = chat.invoke("say hello", stream=True, config={"callbacks": [recorder]})
    assert answer.content == echo("hello\nassistant:", 8) == "".join(recorder.tokens)


def test_token_counts_come_from_the_served_tokenizer(llm: RayServeLLM,
                                                     chat: ChatRayServe) -> None:
    """Not LangChain's GPT-2 fallback: the echo engine's tokenizer is one token per char."""
    assert llm.get_num_tokens("hello world") == 11
    assert llm.get_token_ids("hi") == [ord("h"), ord("i")]
    assert chat.get_num_tokens("héllo") == 5
    assert RayServeLLM(custom_get_token_ids=lambda text: [1]).get_num_tokens("hello") == 1


def test_unknown_generation_keywords_are_refused(llm: RayServeLLM) -> None:
    with pytest.raises(ValueError, match="num_beams"):
        RayServeLLM(model_kwargs={"num_beams": 2})
    with pytest.raises(ValueError, match="length_penalty"):
        llm.invoke("say hello", length_penalty=1.2)


# ---- errors -----------------------------------------------------------------------------


def test_service_errors_surface_as_exceptions(llm: RayServeLLM) -> None:
    with pytest.raises(ServiceError) as error:
        llm.invoke("say hello", max_tokens=0)
    assert (error.value.status_code, error.value.param) == (400, "max_tokens")
    assert "greater than or equal to 1" in str(error.value)
    with pytest.raises(ServiceError) as error:
        list(llm.stream("say hello", max_tokens=0))
    assert error.value.param == "max_tokens"
    with pytest.raises(ServiceError) as error:
        llm.invoke("say hello", timeout=10_000)
    assert (error.value.status_code, error.value.param) == (400, "timeout")


async def test_service_errors_surface_in_async_calls(llm: RayServeLLM) -> None:
    with pytest.raises(ServiceError) as error:
        await llm.ainvoke("say hello", max_tokens=0)
    assert error.value.status_code == 400
    with pytest.raises(ServiceError) as error:
        [c async for c in llm.astream("say hello", temperature=5)]
    assert error.value.param == "temperature"


def test_a_full_router_queue_is_a_retriable_503() -> None:
    with pytest.raises(ServiceError) as error, service_errors():
        raise BackPressureError(num_queued_requests=10, max_queued_requests=10)
    assert (error.value.status_code, error.value.retriable) == (503, True)
    assert error.value.retry_after_s


def test_an_unknown_application_is_a_clear_error(echo_app: None) -> None:
    with pytest.raises(AppUnavailableError, match=r"'nope'.*running applications: \['llm'\]"):
        RayServeLLM(app_name="nope")


def test_a_model_the_application_does_not_serve_is_a_clear_error(echo_app: None) -> None:
    with pytest.raises(ValueError, match=f"serves \\['{DEMO_MODEL_NAME}'\\], not 'gpt-4'"):
        RayServeLLM(model="gpt-4")


async def test_the_adapter_can_be_made_inside_an_event_loop(echo_app: None) -> None:
    llm = RayServeLLM(model_kwargs={"max_tokens": 3})
    assert await llm.ainvoke("say hello") == "hel"


# ---- chat -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat(echo_app: None) -> ChatRayServe:
    return ChatRayServe(model_kwargs={"max_tokens": 8})


def test_chat_answers_through_the_chat_template(chat: ChatRayServe) -> None:
    answer = chat.invoke([SystemMessage("be brief"), HumanMessage("say hello")])
    assert isinstance(answer, AIMessage)
    assert answer.content == echo("hello\nassistant:", 8)
    prompt = "system: be brief\nuser: say hello\nassistant:"  # the echo engine's template
    assert answer.usage_metadata == {"input_tokens": len(prompt), "output_tokens": 8,
                                     "total_tokens": len(prompt) + 8,
                                     "input_token_details": {"cache_read": 0}}
    assert answer.response_metadata["finish_reason"] == "length"
    assert chat.invoke([HumanMessage(content=[{"type": "text", "text": "say hi"}])],
                       max_tokens=3).content == "hi\n"


def test_chat_stream_concatenates_to_invoke(chat: ChatRayServe) -> None:
    chunks = list(chat.stream("say hello", max_tokens=30))
    assert len([c for c in chunks if c.content]) > 5
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk
    assert whole.content == chat.invoke("say hello", max_tokens=30).content
    assert whole.usage_metadata is not None
    assert whole.usage_metadata["output_tokens"] == 30


async def test_chat_async_variants(chat: ChatRayServe) -> None:
    answer = await chat.ainvoke("say hello", stop=["l"])
    assert answer.content == "he"
    chunks = [c async for c in chat.astream("say hello")]
    assert "".join(str(c.content) for c in chunks) == echo("hello\nassistant:", 8)
    answers = await chat.abatch(["say a", "say b"], max_tokens=2)
    assert [a.content for a in answers] == ["a\n", "b\n"]


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def test_tool_messages_travel_through_the_handle(chat: ChatRayServe) -> None:
    """An AI message's tool calls and the tool's result reach the replica's template."""
    history = [HumanMessage("add 1 and 2"),
               AIMessage("", tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1"}]),
               ToolMessage("3", tool_call_id="c1")]
    plain = chat.invoke(history, max_tokens=40)
    with_tools = chat.bind_tools([add]).invoke(history, max_tokens=40)
    assert plain.content and with_tools.content and not with_tools.tool_calls
    # The tools are offered in the prompt: more prompt tokens.
    assert with_tools.usage_metadata["input_tokens"] > plain.usage_metadata["input_tokens"]
    with pytest.raises(ValueError, match="FunctionMessage is not supported"):
        chat.invoke([FunctionMessage("3", name="add")])


def test_a_forced_tool_call_comes_back_as_a_tool_call(chat: ChatRayServe) -> None:
    """The echo engine has no sense, so its arguments are whatever the grammar let
    through (cut by max_tokens): the call's name, id and shape are what is checked."""
    bound = chat.bind_tools([add], tool_choice="add")
    answer = bound.invoke("say hello", max_tokens=40)
    calls = [*answer.tool_calls, *answer.invalid_tool_calls]
    assert [call["name"] for call in calls] == ["add"] and calls[0]["id"]
    chunks = list(bound.stream("say hello", max_tokens=40))
    assert chunks[0].tool_call_chunks[0]["name"] == "add"
    assert chunks[-1].chunk_position == "last"
    assert all(not chunk.content for chunk in chunks)


def test_response_format_constrains_the_llms_answer(echo_app: None) -> None:
    llm = RayServeLLM(model_kwargs={"response_format": {"type": "json_object"},
                                    "max_tokens": 30})
    # The echo engine has no sense: within the grammar it writes what it can, cut by
    # max_tokens; the answer starts as a JSON object must.
    assert llm.invoke("say hello").startswith("{")
    schema = {"type": "json_schema", "json_schema": {"name": "n", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}}
    assert llm.invoke("say hello", response_format=schema).startswith('{"n":')
    free = llm.invoke("say hello", response_format={"type": "text"})
    assert free == echo("hello", 30)


def test_n_answers_and_logprobs_through_the_handle(chat: ChatRayServe,
                                                  llm: RayServeLLM) -> None:
    result = chat.generate([[HumanMessage("say hi")]], n=2, max_tokens=3)
    assert [g.text for g in result.generations[0]] == ["hi\n", "hi\n"]
    answer = chat.invoke("say hi", logprobs=True, top_logprobs=2, max_tokens=2)
    entries = answer.response_metadata["logprobs"]["content"]
    assert entries and all(len(entry["top_logprobs"]) == 2 for entry in entries)
    (generations,) = llm.generate(["say hi"], n=2, max_tokens=4).generations
    assert [g.text for g in generations] == ["hihi", "hihi"]


# ---- deploying a model, as IpexLLM's constructors load one ------------------------------


def test_from_model_id_converts_once_and_deploys_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two clients at once: one conversion, one application; a later client reuses both."""
    conversions: list[str] = []

    def convert(source: str, output: Path, *, low_bit: str, trust_remote_code: bool,
                force: bool) -> Path:
        conversions.append(source)
        time.sleep(0.5)  # long enough for the other client to arrive meanwhile
        return publish_checkpoint(write_tiny_model, output, source=source, low_bit=low_bit,
                                  force=force)

    monkeypatch.setattr(deploy_module, "convert_checkpoint", convert)
    barrier = threading.Barrier(2)

    def client(_: int) -> RayServeLLM:
        barrier.wait()
        return RayServeLLM.from_model_id("org/tiny", model_kwargs={"max_new_tokens": 5},
                                         checkpoint_root=tmp_path, app_args={"engine": "echo"})

    app = "llm-org--tiny-sym_int4"
    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(client, range(2))
        assert conversions == ["org/tiny"]
        assert (first.app_name, first.model) == (second.app_name, second.model) == (
            app, "org/tiny")
        assert first.invoke("say hello") == "hello"
        assert verify_checkpoint(tmp_path / "org--tiny-sym_int4").source == "org/tiny"
        deployed_at = serve.status().applications[app].last_deployed_time_s

        third = RayServeLLM.from_model_id("org/tiny", checkpoint_root=tmp_path,
                                          app_args={"engine": "echo"})
        assert conversions == ["org/tiny"]
        assert serve.status().applications[app].last_deployed_time_s == deployed_at
        assert third.invoke("say hi", max_tokens=3) == "hih"
    finally:
        serve.delete(app)


def test_from_model_id_low_bit_publishes_a_save_low_bit_folder(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    write_tiny_model(saved)
    (saved / "tokenizer.json").write_text("{}")
    root = tmp_path / "root"
    try:
        llm = RayServeLLM.from_model_id_low_bit(saved, checkpoint_root=root, app_name="saved",
                                                app_args={"engine": "echo"})
        assert (llm.app_name, llm.model) == ("saved", "saved")
        assert llm.invoke("say hello", max_tokens=2) == "he"
        (published,) = [path for path in root.iterdir() if path.name.startswith("saved-")]
        manifest = verify_checkpoint(published)
        assert (manifest.source, manifest.low_bit) == (str(saved), "sym_int4")
        assert {file.path for file in manifest.files} == {"config.json", "model.safetensors",
                                                          "tokenizer.json"}
    finally:
        serve.delete("saved")


def test_from_model_id_low_bit_serves_a_published_checkpoint_as_it_is(tmp_path: Path) -> None:
    publish_checkpoint(write_tiny_model, tmp_path / "tiny-sym_int4", source="tiny",
                       low_bit="sym_int4")
    root = tmp_path / "root"
    try:
        llm = RayServeLLM.from_model_id_low_bit(tmp_path / "tiny-sym_int4",
                                                checkpoint_root=root,
                                                app_args={"engine": "echo"})
        assert (llm.app_name, llm.model) == ("llm-tiny-sym_int4", "tiny")
        assert llm.invoke("say hello", max_tokens=3) == "hel"
        # No copy, no lock: nothing is written to the checkpoint root.
        assert not root.exists() or not list(root.iterdir())
    finally:
        serve.delete("llm-tiny-sym_int4")


def test_a_read_only_checkpoint_root_is_reused_without_a_lock_or_a_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared mount is read-only on serving nodes: a client there reuses what the
    conversion published (from_model_id and from_model_id_low_bit), and never writes."""
    monkeypatch.setattr(deploy_module, "convert_checkpoint", lambda source, output, **_: (
        publish_checkpoint(write_tiny_model, output, source=source, low_bit="sym_int4")))
    root = tmp_path / "root"
    apps = ["llm-org--tiny-sym_int4", "read-only-reuse", "read-only-low-bit"]
    try:
        RayServeLLM.from_model_id("org/tiny", checkpoint_root=root, app_args={"engine": "echo"})
        monkeypatch.setattr(deploy_module, "convert_checkpoint", None)  # no second conversion
        with read_only_view(root, tmp_path / "ro") as read_only:
            reused = RayServeLLM.from_model_id("org/tiny", checkpoint_root=read_only,
                                               app_name=apps[1], app_args={"engine": "echo"})
            low_bit = RayServeLLM.from_model_id_low_bit(
                read_only / "org--tiny-sym_int4", checkpoint_root=read_only,
                app_name=apps[2], app_args={"engine": "echo"})
            assert reused.invoke("say hello", max_tokens=3) == "hel"
            assert low_bit.invoke("say hi", max_tokens=2) == "hi"
            with pytest.raises(OSError, match="Read-only"):
                (read_only / "probe").write_text("x")
    finally:
        for app in apps:
            serve.delete(app)


def test_a_checkpoint_root_that_cannot_be_made_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(CheckpointError, match=r"cannot create the checkpoint at .*file"):
        RayServeLLM.from_model_id("org/tiny", checkpoint_root=tmp_path / "file" / "root",
                                  app_args={"engine": "echo"})


def test_from_model_id_low_bit_needs_a_tokenizer(tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    saved.mkdir()
    write_tiny_model(saved)
    with pytest.raises(Exception, match="no tokenizer files; pass tokenizer_id"):
        RayServeLLM.from_model_id_low_bit(saved, checkpoint_root=tmp_path / "root",
                                          app_args={"engine": "echo"})
    assert APP in serve.status().applications  # nothing deployed, nothing removed


def test_reusing_an_application_that_serves_another_model_is_refused(tmp_path: Path) -> None:
    saved = tmp_path / "other-model"
    saved.mkdir()
    write_tiny_model(saved)
    (saved / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match=f"serves \\['{DEMO_MODEL_NAME}'\\], not 'other-model'"):
        RayServeLLM.from_model_id_low_bit(saved, checkpoint_root=tmp_path / "root",
                                          app_name=APP, app_args={"engine": "echo"})


def test_async_and_sync_calls_share_one_adapter(llm: RayServeLLM) -> None:
    """A sync batch while an event loop in another thread streams from the same adapter."""

    async def streamed() -> str:
        return "".join([c async for c in llm.astream("say world", max_tokens=20)])

    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(asyncio.run, streamed())
        assert llm.batch(["say a", "say b"], max_tokens=2) == ["aa", "bb"]
        assert streaming.result(timeout=30) == echo("world", 20)
