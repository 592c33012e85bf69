"""RadixAttention's prefix cache: a radix tree over token ids whose nodes own KV slots.

Contract:
- `match_prefix` is read-only: it returns the cached slots of the longest cached
  prefix and the deepest node it touched (possibly matched only in part).
- `lock(node)` / `unlock(node)` count users along the path to the root; a locked
  node is never evicted. Lock the node `match_prefix` returned while a request
  uses those slots.
- `insert(tokens, slots)` takes ownership of `slots` for the part of `tokens` not
  yet cached and returns how many leading tokens were already cached: the
  caller frees its own slots for that part (they duplicate the tree's).
- `evict(n)` frees at least n slots (if it can) from unlocked leaves, least
  recently used first, back into the pool.
The set of evictable leaves is kept current on every change, so eviction does
not walk the tree. `version` changes with every lock, unlock and change of the
tree's shape: what a caller derived from a request's path stays valid while it
does not (the scheduler's cascade groups of a decode batch).
"""

from __future__ import annotations

import array
import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

_clock = itertools.count()


@dataclass(eq=False)
class Node:
    key: tuple[int, ...] = ()  # (a tuple of ints, which the cycle collector stops tracking)
    slots: array.array = field(default_factory=lambda: array.array("q"))  # (untracked, see KVPool)
    parent: Node | None = None
    children: dict[int, Node] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: int = 0

    def touch(self) -> None:
        self.last_access = next(_clock)


def common_prefix(a: list[int] | tuple[int, ...], b: list[int] | tuple[int, ...]) -> int:
    """Length of the common prefix. Slice comparisons run in C: the whole key first (the usual case on a
    walk down the tree), else a bisection down to a short Python scan; a per-token loop was ~40 us for a
    2048-token system prompt, on every match and insert."""
    n = min(len(a), len(b))
    if tuple(a[:n]) == tuple(b[:n]):  # (tuple() of a tuple is that tuple: no copy)
        return n
    lo, hi = 0, n  # invariant: a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 16:
        mid = (lo + hi) // 2
        if tuple(a[lo:mid]) == tuple(b[lo:mid]):
            lo = mid
        else:
            hi = mid
    while a[lo] == b[lo]:
        lo += 1
    return lo


class RadixCache:
    def __init__(self, free_slots: Callable[[Sequence[int]], None], disabled: bool = False) -> None:
        self.free_slots = free_slots
        self.disabled = disabled
        self.root = Node()
        self.root.lock_ref = 1  # the root is never evicted
        self.evictable: set[Node] = set()  # unlocked leaves
        self.evictable_size = 0  # slots in unlocked nodes
        self.protected_size = 0  # slots in locked nodes
        self.version = 0

    # -- lookup ---------------------------------------------------------------
    def match_prefix(self, tokens: list[int]) -> tuple[list[int], Node]:
        node, slots, i = self.root, [], 0
        while not self.disabled and i < len(tokens) and tokens[i] in node.children:
            child = node.children[tokens[i]]
            n = common_prefix(child.key, tokens[i : i + len(child.key)])
            slots.extend(child.slots[:n])
            node, i = child, i + n
            if n < len(child.key):
                break
        return slots, node

    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    # -- locking --------------------------------------------------------------
    def lock(self, node: Node) -> None:
        self.version += 1
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.slots)
                self.protected_size += len(node.slots)
                self.evictable.discard(node)
            node.lock_ref += 1
            node.touch()
            node = node.parent

    def unlock(self, node: Node) -> None:
        self.version += 1
        while node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of an unlocked node")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.slots)
                self.protected_size -= len(node.slots)
                self._refresh(node)
            node = node.parent

    # -- insertion ------------------------------------------------------------
    def insert(self, tokens: Sequence[int], slots: Sequence[int]) -> int:
        """Cache tokens -> slots; return the number of leading tokens that were already cached."""
        assert len(tokens) == len(slots), f"{len(tokens)} tokens for {len(slots)} slots"
        if self.disabled:
            return 0
        node, i = self.root, 0
        while i < len(tokens) and tokens[i] in node.children:
            child = node.children[tokens[i]]
            n = common_prefix(child.key, tokens[i : i + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            child.touch()
            node, i = child, i + n
        if i < len(tokens):
            self._add_leaf(node, tuple(tokens[i:]), array.array("q", slots[i:]))
        return i

    def _add_leaf(self, parent: Node, key: tuple[int, ...], slots: array.array) -> None:
        self.version += 1
        leaf = Node(key, slots, parent)
        leaf.touch()
        parent.children[key[0]] = leaf
        self.evictable_size += len(slots)
        self.evictable.discard(parent)
        self._refresh(leaf)

    def _split(self, node: Node, n: int) -> Node:
        """Cut `node` after n tokens; the new upper node keeps its locks. `node` stays the lower part,
        so references held to it (a request's locked node) still mean the whole path."""
        self.version += 1
        upper = Node(node.key[:n], node.slots[:n], node.parent, {node.key[n]: node}, node.lock_ref)
        upper.last_access = node.last_access
        node.parent.children[node.key[0]] = upper
        node.key, node.slots, node.parent = node.key[n:], node.slots[n:], upper
        return upper

    # -- eviction -------------------------------------------------------------
    def _refresh(self, node: Node) -> None:
        """Re-derive whether `node` is an evictable leaf."""
        if node is not self.root and node.lock_ref == 0 and not node.children:
            self.evictable.add(node)
        else:
            self.evictable.discard(node)

    def evict(self, n: int) -> int:
        """Free at least n slots from unlocked leaves, LRU first. Returns the number freed."""
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self.evictable]
        heapq.heapify(heap)
        freed = 0
        while freed < n and heap:
            _, _, leaf = heapq.heappop(heap)
            self.version += 1
            self.free_slots(leaf.slots)
            freed += len(leaf.slots)
            self.evictable_size -= len(leaf.slots)
            self.evictable.discard(leaf)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            self._refresh(parent)
            if parent in self.evictable:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def flush(self) -> None:
        """Drop every cached prefix. Only valid when no node is locked."""
        if self.protected_size:
            raise RuntimeError("radix cache: flush while requests hold cached prefixes")
        self.evict(self.evictable_size)

    # -- checking -------------------------------------------------------------
    def check_integrity(self) -> None:
        """Recompute sizes, leaf sets and lock counts from the tree; raise if any bookkeeping is off."""
        evictable, protected, leaves, seen = 0, 0, set(), set()
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            assert node.key and len(node.key) == len(node.slots), "key/slot length mismatch"
            assert node.parent.children[node.key[0]] is node, "parent link broken"
            assert node.lock_ref >= 0 and node.lock_ref >= max(
                (c.lock_ref for c in node.children.values()), default=0
            )
            if node.lock_ref:
                protected += len(node.slots)
            else:
                evictable += len(node.slots)
            if not node.children and not node.lock_ref:
                leaves.add(node)
            assert not seen.intersection(node.slots), "slot owned twice"
            seen.update(node.slots)
            stack.extend(node.children.values())
        assert (evictable, protected) == (self.evictable_size, self.protected_size), "size counters drifted"
        assert leaves == self.evictable, "evictable leaf set drifted"
