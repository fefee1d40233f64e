"""ipex-llm's ``merge_linear`` without ``torch.cat`` on meta tensors: a replica starts sooner.

``load_low_bit`` builds the model on the meta device (shapes, no memory), then merges each
attention's q/k/v projections into one linear (``merge_qkv``: ``torch.cat`` of their
weights) before the low-bit weights are loaded into it. On meta tensors ``torch.cat`` runs
torch's Python meta kernel, and that kernel's first call imports ``torch._dynamo``: a large
share of a small model's load (bench/RESULTS.md, start-up), for tensors that hold no data.
Nothing else in loading or serving imports it.

``merge_linear`` here gives the merged meta weight (and bias) the shape, dtype and device
``torch.cat`` would, with ``torch.empty``; anything else (tensors with data, as when
converting; shapes or dtypes ``torch.cat`` would check or promote) goes to ipex-llm's own.
``install()`` is called by ``IpexLLMRunner.load`` before ``load_low_bit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deployments.engine.ipex_common import CommonFunction


def merge_linear(linears: Sequence[Any]) -> Any:
    """ipex-llm's ``merge_linear``: one ``torch.nn.Linear`` whose output rows are the
    ``linears``' outputs in order (weights and, if the first has one, biases concatenated
    along dim 0)."""
    import torch

    with_bias = getattr(linears[0], "bias", None) is not None
    weights = [getattr(linear, "weight", None) for linear in linears]
    biases = [linear.bias for linear in linears] if with_bias else []
    if not (_stackable(weights) and (not with_bias or _stackable(biases))):
        return PATCH.original()(linears)
    merged = torch.nn.Linear(0, 0, bias=with_bias)
    merged.weight = torch.nn.Parameter(_meta_cat(weights), requires_grad=False)
    if with_bias:
        merged.bias = torch.nn.Parameter(_meta_cat(biases), requires_grad=False)
    merged.in_features, merged.out_features = merged.weight.size(1), merged.weight.size(0)
    return merged


def _stackable(tensors: Sequence[Any]) -> bool:
    """Meta tensors that ``torch.cat(dim=0)`` would join as they are (no promotion)."""
    first = tensors[0]
    return all(t is not None and t.is_meta and t.dtype == first.dtype
               and t.dim() == first.dim() >= 1 and t.shape[1:] == first.shape[1:]
               for t in tensors)


def _meta_cat(tensors: Sequence[Any]) -> Any:
    import torch

    rows = sum(t.shape[0] for t in tensors)
    return torch.empty((rows, *tensors[0].shape[1:]), dtype=tensors[0].dtype, device="meta")


# ``install()`` / ``uninstall()``: ipex-llm's models merge with merge_linear, or their own.
PATCH = CommonFunction("merge_linear", merge_linear)
install, uninstall = PATCH.install, PATCH.uninstall
