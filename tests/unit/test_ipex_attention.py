"""grouped_query_attention against ipex-llm's own scaled_dot_product_attention (CPU).

Shapes as in a grouped-query model: 6 query heads over 2 KV heads, keys and values as views
into a longer preallocated buffer (as ipex-llm's KV cache hands them out), masks with left
padding, a hole, and for prefill chunks the causal part. The two must agree bit for bit.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ipex_llm")

from deployments.engine import ipex_attention  # noqa: E402
from deployments.engine.ipex_attention import grouped_query_attention  # noqa: E402

BATCH, HEADS, KV_HEADS, HEAD_DIM = 3, 6, 2, 16


def ipex_own(*args):
    return ipex_attention.PATCH.original()(*args)


def inputs(positions: int, cached: int):
    generator = torch.Generator().manual_seed(positions * 100 + cached)
    query = torch.randn(BATCH, HEADS, positions, HEAD_DIM, generator=generator)
    buffers = [torch.randn(BATCH, KV_HEADS, cached + 5, HEAD_DIM, generator=generator)
               for _ in range(2)]
    key, value = (b[:, :, :cached] for b in buffers)  # views with room behind, not copies
    keep = torch.ones(positions + 3, cached + 5, dtype=torch.bool).tril(cached - positions)
    keep = keep.expand(BATCH, 1, positions + 3, cached + 5).clone()  # cut as ipex-llm cuts
    keep[0, ..., :4] = False  # left padding
    keep[2, ..., 6] = False  # a hole
    return query, key, value, keep


def masks(keep):
    additive = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min)
    return {"additive": additive, "bool": keep,
            "per head": additive.expand(BATCH, HEADS, *additive.shape[2:])}


@pytest.mark.parametrize("positions,cached", [(1, 11), (1, 40), (4, 20), (9, 9)])
@pytest.mark.parametrize("mask_kind", ["additive", "bool", "per head"])
def test_equals_ipex_attention_bit_for_bit(positions, cached, mask_kind):
    query, key, value, keep = inputs(positions, cached)
    mask = masks(keep)[mask_kind]
    expected = ipex_own(query, key, value, mask, positions == cached)
    got = grouped_query_attention(query, key, value, mask, positions == cached)
    assert got.shape == (BATCH, HEADS, positions, HEAD_DIM)
    # exactly equal; a query position that sees only padding is NaN under a bool mask in both
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("is_causal", [True, False])
def test_without_a_mask_is_causal_decides_as_in_ipex_attention(is_causal):
    query, key, value, _ = inputs(9, 9)
    got = grouped_query_attention(query, key, value, None, is_causal)
    assert torch.equal(got, ipex_own(query, key, value, None, is_causal))
    other = grouped_query_attention(query, key, value, None, not is_causal)
    assert not torch.equal(got, other)


def test_scale_is_passed_on():
    query, key, value, keep = inputs(1, 11)
    mask = masks(keep)["additive"]
    got = grouped_query_attention(query, key, value, mask, False, 0.05)
    assert torch.equal(got, ipex_own(query, key, value, mask, False, 0.05))
    assert not torch.equal(got, grouped_query_attention(query, key, value, mask, False))


def test_the_kv_cache_is_not_copied_per_query_head(monkeypatch):
    import ipex_llm.transformers.models.utils as ipex_utils

    def no_copies(*args):
        raise AssertionError("repeat_kv called")

    monkeypatch.setattr(ipex_utils, "repeat_kv", no_copies)
    query, key, value, keep = inputs(1, 40)
    grouped_query_attention(query, key, value, masks(keep)["additive"], False)
    with pytest.raises(AssertionError, match="repeat_kv"):  # ipex-llm's own copies
        ipex_own(query, key, value, masks(keep)["additive"], False)


def test_install_replaces_ipex_llm_attention_in_its_model_modules_and_back():
    import ipex_llm.transformers.models.common as common
    import ipex_llm.transformers.models.llama as llama

    try:
        ipex_attention.uninstall()
        assert llama.scaled_dot_product_attention is common.scaled_dot_product_attention \
            is ipex_attention.PATCH.original()
        ipex_attention.install()
        ipex_attention.install()
        assert llama.scaled_dot_product_attention is grouped_query_attention
        assert common.scaled_dot_product_attention is grouped_query_attention
        ipex_attention.uninstall()
        assert llama.scaled_dot_product_attention is ipex_attention.PATCH.original()
    finally:
        ipex_attention.install()
