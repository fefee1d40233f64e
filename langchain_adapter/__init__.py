"""LangChain models served by a Ray Serve application of this project, called through its
handle (no HTTP). Apps outside the Ray cluster use the OpenAI API with langchain-openai."""

from deployments.errors import ServiceError
from langchain_adapter.chat import ChatRayServe
from langchain_adapter.llm import RayServeLLM
from langchain_adapter.router_client import AppUnavailableError

__all__ = ["AppUnavailableError", "ChatRayServe", "RayServeLLM", "ServiceError"]
