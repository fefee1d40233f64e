"""PrefixStore: longest-prefix lookup, LRU eviction within its positions, no entry kept twice."""

from __future__ import annotations

from deployments.engine.prefix_store import PrefixStore, shared_prefix


def test_the_longest_shared_prefix_wins_and_counts_as_used():
    store: PrefixStore[str] = PrefixStore(capacity=100)
    store.put((1, 2, 3), lambda: "short")
    store.put((1, 2, 9, 9), lambda: "long")
    entry, length = store.longest_prefix((1, 2, 9, 4, 5))
    assert (entry.kv, length) == ("long", 3)
    assert store.longest_prefix((7, 1, 2)) == (None, 0)
    entry, length = store.longest_prefix((1, 2, 3))
    assert (entry.kv, length) == ("short", 3)


def test_an_entry_another_extends_is_not_kept_twice():
    calls: list[tuple[int, ...]] = []

    def kv_of(tokens: tuple[int, ...]) -> str:  # a stand-in for copying KV out
        calls.append(tokens)
        return f"kv{tokens}"

    store: PrefixStore[str] = PrefixStore(capacity=100)
    assert store.put((1, 2, 3), lambda: kv_of((1, 2, 3)))
    assert store.put((1, 2, 3, 4, 5), lambda: kv_of((1, 2, 3, 4, 5)))  # replaces (1, 2, 3)
    assert not store.put((1, 2, 3, 4), lambda: kv_of((1, 2, 3, 4)))  # (1..5) serves it
    assert calls == [(1, 2, 3), (1, 2, 3, 4, 5)]  # nothing copied for what is not kept
    assert len(store) == 1 and store.positions == 5


def test_the_least_recently_used_entries_go_first_to_make_room():
    store: PrefixStore[str] = PrefixStore(capacity=10)
    store.put((1, 1, 1, 1), lambda: "a")
    store.put((2, 2, 2, 2), lambda: "b")
    store.longest_prefix((1, 1))  # "a" is now the most recently used
    store.put((3, 3, 3, 3), lambda: "c")  # 12 > 10 positions: "b" goes
    assert [store.longest_prefix(p)[0].kv for p in ((1,), (3,))] == ["a", "c"]
    assert store.longest_prefix((2,)) == (None, 0)
    assert store.positions == 8


def test_every_entry_let_go_of_is_reported_with_its_positions():
    dropped: list[int] = []
    store: PrefixStore[str] = PrefixStore(capacity=10, on_drop=dropped.append)
    store.put((1, 2), lambda: "a")
    store.put((1, 2, 3), lambda: "b")  # extends (1, 2): that one goes
    store.put((4, 4, 4, 4), lambda: "c")
    store.put((5, 5, 5, 5, 5), lambda: "d")  # 12 > 10: the oldest, (1, 2, 3), goes
    assert dropped == [2, 3] and store.positions == 9


def test_nothing_longer_than_the_whole_store_or_empty_is_kept():
    store: PrefixStore[str] = PrefixStore(capacity=3)
    assert not store.put((1, 2, 3, 4), lambda: "too long")
    assert not store.put((), lambda: "empty")
    assert len(store) == 0 and store.positions == 0


def test_shared_prefix_counts_leading_equal_tokens():
    assert shared_prefix((1, 2, 3), (1, 2, 4, 5)) == 2
    assert shared_prefix((1, 2), (1, 2, 3)) == 2
    assert shared_prefix((), (1,)) == 0
    assert shared_prefix([5], [6]) == 0


def test_prompt_logits_are_kept_with_their_entry_and_count_against_the_capacity():
    store: PrefixStore[str] = PrefixStore(capacity=10)
    assert store.put((1, 2, 3), lambda: "kv", prompt_logits=(2, "logits"), logits_positions=4)
    assert store.positions == 7
    entry, shared = store.longest_prefix((1, 2))
    assert (entry.prompt_logits, shared) == ((2, "logits"), 2)
    assert store.put((4, 5, 6), lambda: "kv2")  # 7 + 3 fits
    assert store.put((7,), lambda: "kv3")  # the first entry (7 positions) goes
    assert store.positions == 4 and store.longest_prefix((1,)) == (None, 0)
    assert not store.put((8,), lambda: "big", prompt_logits=(1, "x"), logits_positions=10)


def test_lookups_walk_the_prompt_not_the_entries(monkeypatch):
    from deployments.engine import prefix_store

    store = PrefixStore(100_000)
    for i in range(500):
        store.put((i // 50, i % 50, 7, 7), lambda i=i: i)
    monkeypatch.setattr(prefix_store, "shared_prefix", lambda *_: 1 / 0)  # no scan allowed
    entry, length = store.longest_prefix((3, 21, 7, 9))
    assert (entry.kv, length) == (171, 3)
    assert store.longest_prefix((99,)) == (None, 0)
    store.put((3, 21), lambda: "short")  # served by (3, 21, 7, 7): not kept twice
    store.put((3, 21, 7, 7, 1), lambda: "longer")  # extends it: the shorter one goes
    assert len(store) == 500 and store.longest_prefix((3, 21, 7, 7, 1))[0].kv == "longer"
