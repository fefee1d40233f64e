"""ipex_meta_merge: ipex-llm's merge_linear on meta tensors without torch.cat (which imports
torch._dynamo); everything else still goes to ipex-llm's own."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ipex_llm")

from deployments.engine import ipex_meta_merge  # noqa: E402
from deployments.engine.ipex_meta_merge import merge_linear  # noqa: E402


def linears(rows: tuple[int, ...], *, bias: bool, device: str = "meta",
            dtype: torch.dtype = torch.float32) -> list[torch.nn.Linear]:
    torch.manual_seed(0)
    return [torch.nn.Linear(64, n, bias=bias, device=device, dtype=dtype) for n in rows]


def described(linear: torch.nn.Linear) -> tuple:
    parameters = [linear.weight] + ([linear.bias] if linear.bias is not None else [])
    return (linear.in_features, linear.out_features,
            [(tuple(p.shape), p.dtype, p.device.type, p.requires_grad) for p in parameters])


@pytest.mark.parametrize("bias", [False, True])
def test_meta_merge_is_what_ipex_llm_makes_without_torch_cat(monkeypatch, bias):
    parts = linears((72, 24, 24), bias=bias)
    expected = ipex_meta_merge.PATCH.original()(parts)

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat called")

    monkeypatch.setattr(torch, "cat", no_cat)
    merged = merge_linear(parts)
    assert described(merged) == described(expected)
    assert described(merged)[:2] == (64, 120)


def test_tensors_with_data_go_to_ipex_llm_merge():
    parts = linears((8, 4), bias=True, device="cpu")
    merged = merge_linear(parts)
    assert torch.equal(merged.weight, torch.cat([p.weight for p in parts]))
    assert torch.equal(merged.bias, torch.cat([p.bias for p in parts]))


def test_meta_tensors_torch_cat_would_promote_go_to_ipex_llm_merge():
    parts = [*linears((8,), bias=False), *linears((4,), bias=False, dtype=torch.float16)]
    assert merge_linear(parts).weight.dtype == \
        ipex_meta_merge.PATCH.original()(parts).weight.dtype == torch.float32


def test_a_linear_without_weight_gets_ipex_llm_answer():
    class Quantized(torch.nn.Module):  # a GPTQ layer has qweight instead
        bias = None

    assert merge_linear([Quantized(), Quantized()]) is None


def test_install_replaces_merge_linear_in_ipex_llm_model_modules_and_back():
    import ipex_llm.transformers.models.bert as bert  # imports merge_linear by name
    import ipex_llm.transformers.models.common as common

    own = ipex_meta_merge.PATCH.original()
    try:
        ipex_meta_merge.install()
        ipex_meta_merge.install()
        assert common.merge_linear is merge_linear
        assert bert.merge_linear is merge_linear
        ipex_meta_merge.uninstall()
        assert common.merge_linear is bert.merge_linear is own
    finally:
        ipex_meta_merge.uninstall()
