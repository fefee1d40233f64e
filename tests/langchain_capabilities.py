"""What ChatRayServe supports, as LangChain's standard suites ask it: shared by the unit
suite (tests/unit/test_langchain_unit_standard.py) and the integration suite against a live
app (tests/serve/test_langchain_standard.py)."""

from __future__ import annotations

from langchain_adapter import ChatRayServe


class ChatRayServeCapabilities:
    """Mixed in before langchain-tests' suite class, so these answers win."""

    @property
    def chat_model_class(self) -> type[ChatRayServe]:
        return ChatRayServe

    @property
    def has_tool_calling(self) -> bool:
        return True

    @property
    def has_tool_choice(self) -> bool:
        return True

    @property
    def has_structured_output(self) -> bool:
        return True

    @property
    def supports_json_mode(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_model_override(self) -> bool:
        return False  # an application serves one model
