"""State-machine tests: the radix cache and the slot allocator against simple reference models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sgl_compile.runtime.kv_pool import KVPool
from sgl_compile.runtime.radix_cache import RadixCache

POOL = 48
tokens_st = st.lists(st.integers(0, 3), min_size=1, max_size=8)


class RadixMachine(RuleBasedStateMachine):
    """Reference model: every cached prefix (a tuple of tokens) maps to the slot of its last token."""

    @initialize()
    def setup(self) -> None:
        self.pool = KVPool(1, POOL, 1, 1, torch.float32, "cpu")
        self.freed: list[int] = []

        def free(slots: list[int]) -> None:
            self.freed.extend(slots)
            self.pool.free(slots)

        self.cache = RadixCache(free)
        self.ref: dict[tuple[int, ...], int] = {}
        self.locked: list[tuple] = []  # (node, prefixes the lock protects)

    def _expected_match(self, tokens: list[int]) -> list[int]:
        out = []
        for k in range(1, len(tokens) + 1):
            if tuple(tokens[:k]) not in self.ref:
                break
            out.append(self.ref[tuple(tokens[:k])])
        return out

    @rule(tokens=tokens_st)
    def insert(self, tokens: list[int]) -> None:
        slots = self.pool.alloc(len(tokens))
        if slots is None:
            self.cache.evict(len(tokens) - self.pool.available())
            self._forget_freed()
            slots = self.pool.alloc(len(tokens))
        if slots is None:
            return
        expected_cached = len(self._expected_match(tokens))
        n = self.cache.insert(tokens, slots)
        assert n == expected_cached
        self.pool.free(slots[:n])  # duplicates of what the tree holds
        for k in range(n + 1, len(tokens) + 1):
            self.ref[tuple(tokens[:k])] = slots[k - 1]

    @rule(tokens=tokens_st)
    def match_is_true_prefix(self, tokens: list[int]) -> None:
        slots, _ = self.cache.match_prefix(tokens)
        assert slots == self._expected_match(tokens)

    @rule(tokens=tokens_st)
    def lock(self, tokens: list[int]) -> None:
        slots, node = self.cache.match_prefix(tokens)
        if slots:
            self.cache.lock(node)
            self.locked.append((node, [tuple(tokens[:k]) for k in range(1, len(slots) + 1)]))

    @precondition(lambda self: self.locked)
    @rule(i=st.integers(0, 100))
    def unlock(self, i: int) -> None:
        node, _ = self.locked.pop(i % len(self.locked))
        self.cache.unlock(node)

    @rule(n=st.integers(1, 20))
    def evict(self, n: int) -> None:
        before = self.cache.evictable_size
        freed = self.cache.evict(n)
        assert freed >= min(n, before) or self.cache.evictable_size == 0
        self._forget_freed()

    def _forget_freed(self) -> None:
        gone = set(self.freed)
        self.freed.clear()
        self.ref = {k: v for k, v in self.ref.items() if v not in gone}

    @invariant()
    def integrity(self) -> None:
        self.cache.check_integrity()
        assert self.pool.available() + self.cache.total_size() == POOL, "slot leaked"
        assert len(self.ref) == self.cache.total_size()

    @invariant()
    def locked_prefixes_survive(self) -> None:
        for _, prefixes in self.locked:
            for p in prefixes:
                assert p in self.ref

    def teardown(self) -> None:
        for node, _ in self.locked:
            self.cache.unlock(node)
        self.cache.flush()
        assert self.pool.available() == POOL


TestRadixCache = RadixMachine.TestCase
TestRadixCache.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class AllocatorMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.pool = KVPool(1, 16, 1, 1, torch.float32, "cpu")
        self.held: set[int] = set()

    @rule(n=st.integers(0, 20))
    def alloc(self, n: int) -> None:
        slots = self.pool.alloc(n)
        if n > 16 - len(self.held):
            assert slots is None
            return
        assert slots is not None and len(set(slots)) == n and not self.held.intersection(slots)
        self.held.update(slots)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data) -> None:
        some = data.draw(st.lists(st.sampled_from(sorted(self.held)), unique=True, min_size=1))
        self.pool.free(some)
        self.held.difference_update(some)

    @precondition(lambda self: len(self.held) < 16)
    @rule(data=st.data())
    def double_free_raises(self, data) -> None:
        free_slot = data.draw(st.sampled_from(sorted(set(range(16)) - self.held)))
        with pytest.raises(RuntimeError, match="freed twice"):
            self.pool.free([free_slot])

    @invariant()
    def counts(self) -> None:
        assert self.pool.available() == 16 - len(self.held)


TestAllocator = AllocatorMachine.TestCase
TestAllocator.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)


def test_lru_order_and_split_keeps_locks() -> None:
    pool = KVPool(1, 10, 1, 1, torch.float32, "cpu")
    cache = RadixCache(pool.free)
    a, b = pool.alloc(4), pool.alloc(4)
    cache.insert([1, 2, 3, 4], a)
    cache.insert([5, 6, 7, 8], b)
    slots, node = cache.match_prefix([1, 2, 9])  # partial match of the first node
    assert slots == a[:2]
    cache.lock(node)
    cache.insert([1, 2, 7], [*a[:2], *pool.alloc(1)])  # splits [1,2,3,4] under the lock
    cache.check_integrity()
    assert cache.evict(100) == 5  # [5..8] and [7]; the locked path [1,2]+[3,4] stays
    assert cache.match_prefix([1, 2, 3, 4])[0] == a
    cache.unlock(node)
    cache.check_integrity()
    cache.flush()
    assert pool.available() == 10


def test_version_changes_with_locks_and_shape_only() -> None:
    """What the scheduler derives from a request's path (its cascade group) is reused while `version`
    stands: every lock, unlock, split, new leaf and eviction moves it; lookups and re-inserting cached
    tokens do not."""
    pool = KVPool(1, 16, 1, 1, torch.float32, "cpu")
    cache = RadixCache(pool.free)
    a = pool.alloc(4)
    changes = [
        lambda: cache.insert([1, 2, 3, 4], a),  # a new leaf
        lambda: cache.lock(cache.match_prefix([1, 2, 3, 4])[1]),
        lambda: cache.insert([1, 2, 9], [*a[:2], *pool.alloc(1)]),  # a split and a leaf
        lambda: cache.unlock(cache.match_prefix([1, 2, 3, 4])[1]),
        lambda: cache.evict(1),
    ]
    for change in changes:
        before = cache.version
        change()
        assert cache.version != before
    before = cache.version
    cache.match_prefix([1, 2, 3, 4])
    assert cache.insert([1, 2], cache.match_prefix([1, 2])[0]) == 2  # all cached already
    assert cache.version == before
    cache.check_integrity()
