"""The messages across the router -> replica handle: typed, one prompt form, and the replica's
handle method takes and returns them."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from deployments.contract import (
    ChatTurn,
    ErrorChunk,
    ErrorKind,
    GenerateRequest,
    OutputChunk,
    Sampling,
)


def test_a_request_has_exactly_one_prompt_form() -> None:
    chat = GenerateRequest(request_id="r", messages=[{"role": "user", "content": "hi"}],
                           timeout_s=5)
    assert chat.messages == (ChatTurn(role="user", content="hi"),)
    assert chat.sampling == Sampling() and chat.max_tokens is None
    for forms in ({}, {"prompt": "a", "prompt_token_ids": [1]}):
        with pytest.raises(ValidationError, match="exactly one of prompt"):
            GenerateRequest(request_id="r", timeout_s=5, **forms)
    with pytest.raises(ValidationError, match="extra"):
        Sampling(temprature=0)  # a misspelt setting never travels silently


def test_messages_survive_the_trip_through_pickle() -> None:
    """Ray pickles handle arguments and results."""
    import pickle

    request = GenerateRequest(request_id="r", prompt_token_ids=[1, 2], max_tokens=3,
                              sampling=Sampling(temperature=0, stop=("\n",)), timeout_s=9)
    for message in (request, OutputChunk(text="a", prompt_tokens=2, completion_tokens=1),
                    ErrorChunk(message="m", kind=ErrorKind.TIMEOUT)):
        assert pickle.loads(pickle.dumps(message)) == message


def test_the_replica_handle_speaks_the_contract() -> None:
    from deployments.server import LLMServer

    method = LLMServer.func_or_class.generate_stream
    hints = typing.get_type_hints(method)
    assert hints["request"] is GenerateRequest
    assert set(typing.get_args(typing.get_args(hints["return"])[0])) == {OutputChunk,
                                                                        ErrorChunk}
