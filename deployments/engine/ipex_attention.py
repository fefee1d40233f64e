"""Attention for ipex-llm's CPU path that reads a grouped-query KV cache as it is.

On the CPU, ipex-llm's ``scaled_dot_product_attention`` (``ipex_llm.transformers.models.
common``, called by its Llama, Mistral, Qwen2 and other forwards) first expands a
grouped-query model's keys and values to every query head (``repeat_kv``): each layer of
each step copies its whole KV cache ``heads / kv_heads`` times, and torch's flash-attention
kernel then reads the copy. That kernel can read the KV heads where they are
(``enable_gqa``) and computes the same numbers, bit for bit. Attention is bound by memory
traffic, which the copy multiplies, so skipping it shortens decode steps, more as the cache
grows (bench/RESULTS.md measures it).

``install()`` puts ``grouped_query_attention`` in the place of ipex-llm's function. Calls it
does not cover (an XPU, which has kernels of its own; a model without grouped heads) go to
ipex-llm's own.
"""

from __future__ import annotations

from typing import Any

from deployments.engine.ipex_common import CommonFunction


def grouped_query_attention(query: Any, key: Any, value: Any, mask: Any = None,
                            is_causal: bool = False, scale: float | None = None) -> Any:
    """ipex-llm's ``scaled_dot_product_attention``, CPU branch, without ``repeat_kv``:
    ``query`` is (batch, heads, positions, head_dim), ``key`` and ``value`` (batch, kv_heads,
    cached, head_dim) with query head ``h`` reading KV head ``h // (heads // kv_heads)``;
    ``mask`` is additive (float) or a keep-mask (bool), cut to (positions, cached) as
    ipex-llm cuts it; with no mask, ``is_causal`` makes the attention causal."""
    import torch

    heads, kv_heads = query.shape[1], key.shape[1]
    if query.device.type != "cpu" or heads == kv_heads or heads % kv_heads:
        return PATCH.original()(query, key, value, mask, is_causal, scale)
    if mask is not None:
        mask = mask[..., :query.shape[2], :key.shape[2]]
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, mask, is_causal=is_causal and mask is None, scale=scale,
        enable_gqa=True)
    return output.to(query.dtype)


# ``install()`` / ``uninstall()``: ipex-llm's models call grouped_query_attention, or their own.
PATCH = CommonFunction("scaled_dot_product_attention", grouped_query_attention)
install, uninstall = PATCH.install, PATCH.uninstall
