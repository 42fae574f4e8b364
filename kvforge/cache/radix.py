"""The prefix index: a radix tree over full blocks, and the LRU of its evictable leaves.

Each node below the root is one cached full block: its chained hash (`hashing.py`), the block,
its token ids and extra keys (compared on every hit, so a hash collision is a miss, never wrong
KV), its parent (the block before it) and its children (the blocks that followed it in some
sequence), indexed by their hash. A path from the root is a cached prefix. To find the longest
cached prefix of a prompt without hashing or walking it block by block in Python (a 32k-token
prompt is 2048 blocks), every node also carries a prefix key: a 64-bit fingerprint of the token ids
of its whole path (`prefix_keys`: weighted sums per block, tagged by block index, summed along the
path), which numpy computes for all of a prompt's block prefixes at once. The tree indexes nodes
by (prefix key, extra keys); since every prefix of a cached path is cached, a binary search over
the prompt's prefix keys finds the deepest cached one in O(log n) lookups, and that path's token
ids are then compared with the prompt's in one pass. A fingerprint collision can only fail that
comparison, and the lookup then walks by chained hash (sha256 per block) instead: slower, never
wrong.

Ref counts live on the blocks and are changed by the block allocator (`allocator.py`), which tells
the tree when a cached block's count drops (`mark_released`) or leaves 0 (`mark_revived`). Holders always hold a
whole path from the root (a sequence holds its matched and committed blocks; a pin holds a
matched prefix), so an in-use node's ancestors are in use, the subtree of an evictable
node is all evictable, and every evictable block can be reached by evicting leaves: the count of
evictable blocks is exactly what allocation can reclaim.

Eviction takes the least recently used evictable leaf (a min-heap on `last_access`, lazily
invalidated: an entry is skipped when its node has left the tree, is in use again, has children,
or was touched since); when a leaf goes, its parent may become an evictable leaf and is pushed.
`last_access` comes from a counter that ticks on every touch, so orders are exact and repeatable.
"""

from __future__ import annotations

import heapq
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from itertools import chain
from operator import mul
from typing import NamedTuple

import numpy as np

from kvforge.cache import hashing
from kvforge.cache.blocks import Block
from kvforge.cache.events import BlockStored

_COMPACT_SLACK = 1024  # stale heap entries tolerated beyond 2x the evictable blocks
_DEPTH_TAG = 0x9E3779B97F4A7C15  # odd constants of the prefix-key fingerprint
_MIX = 0xFF51AFD7ED558CCD
_MASK = (1 << 64) - 1
_NUMPY_FROM = 8  # blocks from which numpy's per-call cost pays


@cache
def _weights(block_size: int) -> list[int]:
    return [(i * _MIX & _MASK) | 1 for i in range(1, block_size + 1)]


def prefix_keys(blocks: np.ndarray | Sequence[Sequence[int]], first_depth: int, base: int) -> list[int]:
    """The prefix keys of consecutive full blocks `blocks` (rows of token ids: a uint32 [n,
    block_size] array or a list of tuples) whose first one sits at block index `first_depth` below a
    node whose prefix key is `base`: element i is the key of the path through block i. Arithmetic
    modulo 2**64: each block's ids weighted and summed, tagged by its index, mixed, and summed along
    the path. Pure."""
    n = len(blocks)
    if n == 0:
        return []
    if n < _NUMPY_FROM:  # the same arithmetic in Python ints
        if isinstance(blocks, np.ndarray):
            blocks = blocks.tolist()
        weights = _weights(len(blocks[0]))
        out, key = [], base
        for depth, row in enumerate(blocks, first_depth + 1):
            key = (key + (sum(map(mul, row, weights)) + depth * _DEPTH_TAG) * _MIX) & _MASK
            out.append(key)
        return out
    return _key_array(blocks, first_depth, base).tolist()


def _key_array(blocks: np.ndarray | Sequence[Sequence[int]], first_depth: int, base: int) -> np.ndarray:
    """`prefix_keys` computed by numpy, as a uint64 array (its way from `_NUMPY_FROM` blocks on)."""
    weights = np.array(_weights(len(blocks[0])), dtype=np.uint64)
    per_block = np.asarray(blocks, dtype=np.uint64) @ weights
    per_block += np.arange(first_depth + 1, first_depth + len(blocks) + 1, dtype=np.uint64) * np.uint64(_DEPTH_TAG)
    per_block *= np.uint64(_MIX)
    return np.cumsum(per_block, dtype=np.uint64) + np.uint64(base)


def token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Token ids as a 1-d uint32 array, the width they are hashed at (no copy for a uint32 array; a list
    converts in one C pass that also checks the range). Raises ValueError for an id that is not an
    integer in [0, 2**32)."""
    if isinstance(token_ids, np.ndarray):
        if token_ids.dtype == np.uint32:
            return token_ids.reshape(-1)
        arr = token_ids.astype(np.int64, copy=False).reshape(-1)
        if not arr.size or (arr.min() >= 0 and arr.max() < 1 << 32):
            return arr.astype(np.uint32)
    else:
        try:
            return np.frombuffer(array(hashing.U32, token_ids), dtype=np.uint32)
        except (TypeError, OverflowError):
            pass
    bad = next(t for t in token_ids if not isinstance(t, (int, np.integer)) or not 0 <= t < 1 << 32)
    raise ValueError(f"token id {bad!r} is not an integer in [0, 2**32)")


class _Found(NamedTuple):
    """What `match_prefix` walked, kept on its match: valid while `tree` has removed no node since."""

    tree: RadixTree
    removals: int  # the tree's removal count at the match
    extra: bytes
    nodes: Sequence[RadixNode]


class _Path(NamedTuple):
    """The path from the root to a node (root side first) as `match_prefix` reads it, kept for the
    next lookup: a long prefix that many prompts share is then matched without walking its nodes
    again. Valid while the tree has removed no node since `removals` (a node's path never changes)."""

    removals: int
    nodes: tuple[RadixNode, ...]
    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]
    token_bytes: bytes  # the nodes' token_bytes joined


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached run of full blocks that prefixes a token list, from `match_prefix`.

    A plain value: it holds no reference on its blocks, so they may be evicted before it is used;
    `add_sequence` and `pin` re-check it and raise ValueError if it went stale.
    `num_tokens == len(block_ids) * block_size`; `num_query_tokens` is the length of the token list
    that was looked up (what hit-rate statistics count as queried). A match from `match_prefix` also
    remembers its nodes, so that re-checking it costs nothing while no node has left the tree since.
    """

    block_ids: tuple[int, ...]
    block_hashes: tuple[bytes, ...]
    num_tokens: int
    num_query_tokens: int
    found: _Found | None = field(default=None, compare=False, repr=False)  # from match_prefix; not part of the value

    def __post_init__(self) -> None:
        if len(self.block_ids) != len(self.block_hashes):
            raise ValueError(f"a PrefixMatch needs one hash per block: got {len(self.block_ids)} block ids "
                             f"and {len(self.block_hashes)} hashes")
        if not 0 <= self.num_tokens <= self.num_query_tokens:
            raise ValueError(f"a PrefixMatch covers 0 to num_query_tokens tokens: got num_tokens "
                             f"{self.num_tokens}, num_query_tokens {self.num_query_tokens}")


class ChainInsert(NamedTuple):
    """What `RadixTree.insert_chain` did, in chain order."""

    tip: RadixNode  # the node of the last block placed (the given tip when none was)
    stored: tuple[tuple[RadixNode, ...], ...]  # runs of consecutive newly inserted nodes
    twins: tuple[tuple[int, RadixNode], ...]  # (index in `blocks`, cached twin) for each block already cached
    stopped: bool  # stopped early: at a hash that names other content, or at a twin of a block others hold too


def stored_event(run: tuple[RadixNode, ...], block_size: int) -> BlockStored:
    """The BlockStored event for a run of consecutive nodes inserted together (nodes never change
    their hash, tokens or parent, so this may be built long after the insert)."""
    tokens = run[0].token_ids if len(run) == 1 else tuple(chain.from_iterable(node.token_ids for node in run))
    return BlockStored(tuple(node.block_hash for node in run), run[0].parent.block_hash, tokens, block_size)


class RadixNode:
    """One cached full block (or the root, which has no block). Owned by `RadixTree`."""

    __slots__ = ("block_hash", "block", "token_ids", "token_bytes", "extra", "parent", "children", "depth",
                 "prefix_key", "last_access")

    def __init__(self, block_hash: bytes | None, block: Block | None, token_ids: tuple[int, ...], extra: bytes,
                 parent: RadixNode | None, prefix_key: int = 0, token_bytes: bytes = b""):
        self.block_hash = block_hash
        self.block = block
        self.token_ids = token_ids
        self.token_bytes = token_bytes  # the same ids as native uint32 bytes (`token_array`), for one-pass compares
        self.extra = extra
        self.parent = parent
        self.children: dict[bytes, RadixNode] = {}
        self.depth = 0 if parent is None else parent.depth + 1  # blocks on the path from the root, itself included
        self.prefix_key = prefix_key  # `prefix_keys` of the path's token ids; 0 for the root
        self.last_access = 0

    def __repr__(self) -> str:
        block = self.block.block_id if self.block is not None else None
        return f"RadixNode(block={block}, children={len(self.children)}, last_access={self.last_access})"


class RadixTree:
    """Cached full blocks by chained hash, as a tree of prefixes, with an LRU of evictable leaves.

    Invariant: a block has a `block_hash` iff it is the block of exactly one node here, under that
    hash. The tree never changes a ref count; the allocator does, and reports transitions to/from 0.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.root = RadixNode(None, None, (), b"", None)
        self._nodes: dict[bytes, RadixNode] = {}
        self._by_prefix: dict[tuple[int, bytes], RadixNode] = {}  # (prefix key, extra) -> node; first one wins
        self._heap: list[tuple[int, int, RadixNode]] = []  # (last_access, push number, node)
        self._pushes = 0
        self._clock = 0
        self._removals = 0  # nodes evicted, plus one per clear: a match's nodes stay valid while it stands still
        self._path: _Path | None = None  # the last path match_prefix walked
        self.num_evictable = 0  # cached blocks with ref_cnt 0

    def __len__(self) -> int:
        """Cached blocks (nodes below the root)."""
        return len(self._nodes)

    def get(self, block_hash: bytes) -> RadixNode | None:
        """The node caching `block_hash`, or None. Pure."""
        return self._nodes.get(block_hash)

    def nodes(self) -> list[RadixNode]:
        """Every cached node (for checks and tests; O(n))."""
        return list(self._nodes.values())

    # ---- lookups ----------------------------------------------------------------------------

    def match_prefix(self, token_ids: Sequence[int] | np.ndarray, extra: bytes) -> PrefixMatch:
        """The longest cached run of full blocks prefixing `token_ids` under `extra`, never covering
        the last token: at most (len(token_ids) - 1) // block_size blocks. A node matches only if its
        stored token ids and extra keys equal the query's. O(log n) lookups plus numpy passes over
        the tokens (see the module docstring); a uint32 array (`token_array`) saves converting a list.
        Pure: changes no access time, count or ref. Raises ValueError for a token id outside [0, 2**32)."""
        bs = self.block_size
        tokens = token_array(token_ids)
        n = max(0, (len(tokens) - 1) // bs)
        blocks = tokens[:n * bs].reshape(n, bs)
        keys = prefix_keys(blocks, 0, 0) if n < _NUMPY_FROM else _key_array(blocks, 0, 0)
        by_prefix = self._by_prefix
        lo, hi = 0, n  # bisect for the deepest indexed prefix key: blocks[:lo] are indexed
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (int(keys[mid - 1]), extra) in by_prefix:
                lo = mid
            else:
                hi = mid - 1
        if not lo:
            return PrefixMatch((), (), 0, len(tokens), _Found(self, self._removals, extra, ()))
        node = by_prefix[(int(keys[lo - 1]), extra)]
        path = self._path_to(node)
        matched = blocks[:lo].tobytes()
        if node.depth == lo and node.extra == extra and path.token_bytes[:len(matched)] == matched:
            if len(path.nodes) == lo:  # the whole remembered path: its tuples as they are
                nodes, block_ids, block_hashes = path.nodes, path.block_ids, path.block_hashes
            else:
                nodes, block_ids, block_hashes = path.nodes[:lo], path.block_ids[:lo], path.block_hashes[:lo]
        else:  # a fingerprint collision
            nodes = self._walk_by_hash(blocks, extra)
            block_ids, block_hashes = tuple([n.block.block_id for n in nodes]), tuple([n.block_hash for n in nodes])
        return PrefixMatch(block_ids, block_hashes, len(nodes) * bs, len(tokens),
                           _Found(self, self._removals, extra, nodes))

    def _path_to(self, node: RadixNode) -> _Path:
        """A path from the root through `node` (at index node.depth - 1; it may go on below): the one
        remembered from the last call while it still stands and passes through `node`, else `node`'s
        own, walked up from it and remembered."""
        path = self._path
        if path is not None and path.removals == self._removals and len(path.nodes) >= node.depth \
                and path.nodes[node.depth - 1] is node:
            return path
        found: list[RadixNode] = []
        while node.parent is not None:
            found.append(node)
            node = node.parent
        found.reverse()
        self._path = _Path(self._removals, tuple(found), tuple([n.block.block_id for n in found]),
                           tuple([n.block_hash for n in found]), b"".join([n.token_bytes for n in found]))
        return self._path

    def _walk_by_hash(self, blocks: np.ndarray, extra: bytes) -> list[RadixNode]:
        """The nodes of the longest cached prefix of `blocks` (rows of token ids), found by chained
        hash, one block at a time."""
        found: list[RadixNode] = []
        node = self.root
        for block in map(tuple, blocks.tolist()):
            child = self._nodes.get(hashing.hash_block(node.block_hash, block, extra))
            if child is None or child.parent is not node or child.token_ids != block or child.extra != extra:
                break
            found.append(child)
            node = child
        return found

    def resolve(self, prefix: PrefixMatch, extra: bytes | None, who: str) -> list[RadixNode]:
        """The nodes of `prefix`, checked to still form the matched chain from the root (under
        `extra` unless None). Raises ValueError, naming `who`, for a stale or foreign match. Pure."""
        if prefix.num_tokens != len(prefix.block_ids) * self.block_size:
            raise ValueError(f"{who}: the prefix covers {prefix.num_tokens} tokens but holds {len(prefix.block_ids)} "
                             f"blocks of {self.block_size}; pass a PrefixMatch from this manager's match_prefix()")
        found = prefix.found
        if found is not None and found.tree is self and found.removals == self._removals and (
                extra is None or extra == found.extra):
            return list(found.nodes)  # no node has left the tree since the match: the chain still stands
        nodes: list[RadixNode] = []
        parent = self.root
        for bid, block_hash in zip(prefix.block_ids, prefix.block_hashes):
            node = self._nodes.get(block_hash)
            if node is None or node.block.block_id != bid or node.parent is not parent:
                raise ValueError(f"{who}: the prefix match is stale: block {bid} no longer caches the matched "
                                 f"content (evicted or reset since match_prefix()); call match_prefix() again")
            if extra is not None and node.extra != extra:
                raise ValueError(f"{who}: the prefix was matched under other extra keys than the sequence's; "
                                 f"pass the same extra to match_prefix() and add_sequence()")
            nodes.append(node)
            parent = node
        return nodes

    @staticmethod
    def count_unused(path: Sequence[RadixNode]) -> int:
        """How many nodes of `path` (a chain from the root, root side first) have ref_cnt 0: a suffix
        of it, since holders hold whole paths, so found by bisection. Pure."""
        return len(path) - bisect_left(path, True, key=lambda node: node.block.ref_cnt == 0)

    # ---- changes ----------------------------------------------------------------------------

    def insert_chain(self, tip: RadixNode, blocks: list[Block], token_ids: Sequence[int], start: int,
                     extra: bytes) -> ChainInsert:
        """Cache `blocks`, full blocks holding token_ids[start : start + len(blocks) * block_size]
        that follow `tip` (the root or a node the caller holds). The caller holds each block and
        none is cached yet.

        Hashes every block first (pure: a ValueError for a bad token id changes nothing), then, in
        order: a new hash is inserted as a child of the previous node; a hash already cached under
        the same parent with the same tokens and extra keys is a twin (another sequence computed the
        same block): the block stays uncached and the chain continues through the twin, which the
        caller should use in its place; a hash cached for other content is a collision and stops
        the chain. So does the twin of a block someone else holds too (a fork sharing the block):
        the other holders would keep the old block while later blocks they share chain below the
        twin, holding a path they do not hold. Inserted nodes become most recently used.
        """
        bs, hash_block = self.block_size, hashing.hash_block
        chunks: list[tuple[int, ...]] = []
        hashes: list[bytes] = []
        parent_hash = tip.block_hash
        for pos in range(start, start + len(blocks) * bs, bs):
            chunk = tuple(token_ids[pos:pos + bs])
            parent_hash = hash_block(parent_hash, chunk, extra)
            chunks.append(chunk)
            hashes.append(parent_hash)
        if tip is not self.root and tip.extra != extra:
            raise ValueError(f"insert_chain: blocks under extra keys {extra!r} cannot follow a node cached under "
                             f"{tip.extra!r}")
        keys = prefix_keys(chunks, tip.depth, tip.prefix_key)
        nodes = self._nodes
        node = tip
        runs: list[tuple[RadixNode, ...]] = []
        run: list[RadixNode] = []
        twins: list[tuple[int, RadixNode]] = []
        clock = self._clock
        for placed, block_hash in enumerate(hashes):
            twin = nodes.get(block_hash)
            if twin is None:
                block = blocks[placed]
                assert block.block_hash is None and block.ref_cnt > 0, f"block {block.block_id} cannot be cached"
                child = RadixNode(block_hash, block, chunks[placed], extra, node, keys[placed],
                                  array(hashing.U32, chunks[placed]).tobytes())
                node.children[block_hash] = nodes[block_hash] = child
                self._by_prefix.setdefault((child.prefix_key, extra), child)
                block.block_hash, block.node = block_hash, child
                clock += 1
                child.last_access = clock
                run.append(child)
                node = child
            elif (twin.parent is node and twin.token_ids == chunks[placed] and twin.extra == extra
                  and blocks[placed].ref_cnt == 1):
                if run:
                    runs.append(tuple(run))
                    run = []
                twins.append((placed, twin))
                node = twin
            else:
                break
        self._clock = clock
        if run:
            runs.append(tuple(run))
        return ChainInsert(node, tuple(runs), tuple(twins), node.depth - tip.depth < len(blocks))

    def touch(self, nodes: Sequence[RadixNode]) -> None:
        """Make `nodes` the most recently used, the last one most."""
        clock = self._clock
        for node in nodes:
            clock += 1
            node.last_access = clock
        self._clock = clock

    def mark_released(self, nodes: Sequence[RadixNode]) -> None:
        """A reference to each of these nodes' cached blocks was just dropped: each is touched, in
        order (the last one most recently used), and one whose count reached 0 stays cached and
        becomes evictable (once it is a leaf)."""
        clock, freed, leaves = self._clock, 0, []
        for node in nodes:
            clock += 1
            node.last_access = clock
            if not node.block.ref_cnt:
                freed += 1
                if not node.children:
                    leaves.append(node)
        self._clock = clock
        self.num_evictable += freed
        for node in leaves:
            self._push(node)

    def mark_revived(self, count: int) -> None:
        """References were taken on `count` ref-0 cached blocks: they are no longer evictable (their
        heap entries go stale)."""
        self.num_evictable -= count

    def evict(self, n: int) -> list[RadixNode]:
        """Remove the `n` least recently used evictable leaves, one at a time (a parent whose last
        child goes may be next). Returns the removed nodes in eviction order (each keeps its hash);
        each `node.block` is now uncached, with ref_cnt 0 and in no queue: the caller owns it.
        Raises RuntimeError, having removed nothing, if fewer than `n` blocks are evictable."""
        if n > self.num_evictable:
            raise RuntimeError(f"cannot evict {n} blocks: only {self.num_evictable} are evictable")
        out: list[RadixNode] = []
        heap, nodes, root = self._heap, self._nodes, self.root
        heappop, heappush = heapq.heappop, heapq.heappush
        while len(out) < n:
            if not heap:
                raise RuntimeError(f"the eviction heap ran dry after {len(out)} of {n} blocks although "
                                   f"{self.num_evictable} blocks are counted evictable")
            stamp, _, node = heappop(heap)
            block_hash = node.block_hash
            if (stamp != node.last_access or node.children or node.block.ref_cnt
                    or nodes.get(block_hash) is not node):
                continue  # a stale entry
            del nodes[block_hash]
            self._removals += 1
            parent = node.parent
            del parent.children[block_hash]
            if self._by_prefix.get(key := (node.prefix_key, node.extra)) is node:
                del self._by_prefix[key]
            node.block.block_hash = node.block.node = None
            out.append(node)
            if parent is not root and not parent.children and parent.block.ref_cnt == 0:
                self._pushes += 1
                heappush(heap, (parent.last_access, self._pushes, parent))
        self.num_evictable -= n
        return out

    def clear(self) -> list[Block]:
        """Forget every node (all must be evictable); returns their blocks, now uncached."""
        assert self.num_evictable == len(self._nodes), "clear() while cached blocks are in use"
        blocks = [node.block for node in self._nodes.values()]
        for block in blocks:
            block.block_hash = block.node = None
        self._nodes.clear()
        self._by_prefix.clear()
        self._removals += 1
        self.root.children.clear()
        self._heap.clear()
        self.num_evictable = 0
        return blocks

    # ---- internals --------------------------------------------------------------------------

    def _is_evictable_leaf(self, node: RadixNode, stamp: int) -> bool:
        return (stamp == node.last_access and not node.children and node.block.ref_cnt == 0
                and self._nodes.get(node.block_hash) is node)

    def _push(self, node: RadixNode) -> None:
        self._pushes += 1
        heapq.heappush(self._heap, (node.last_access, self._pushes, node))
        if len(self._heap) > 2 * self.num_evictable + _COMPACT_SLACK:  # drop stale entries, amortised O(1)
            self._heap = [e for e in self._heap if self._is_evictable_leaf(e[2], e[0])]
            heapq.heapify(self._heap)

    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant of the tree: links, hashes, the
        evictable count, in-use nodes having in-use parents, and a live heap entry for every
        evictable leaf. O(nodes + heap entries); for tests and debugging."""
        seen = 0
        stack = [self.root]
        while stack:
            node = stack.pop()
            for key, child in node.children.items():
                seen += 1
                bid = child.block.block_id
                if key != child.block_hash or self._nodes.get(key) is not child:
                    raise RuntimeError(f"radix node of block {bid} is linked under a hash it is not indexed by")
                if child.parent is not node:
                    raise RuntimeError(f"radix node of block {bid} does not point back to its parent")
                prefix_key = prefix_keys([child.token_ids], node.depth, node.prefix_key)[0]
                if child.depth != node.depth + 1 or child.prefix_key != prefix_key:
                    raise RuntimeError(f"radix node of block {bid} has a depth or prefix key its path does not give")
                if child.token_bytes != array(hashing.U32, child.token_ids).tobytes():
                    raise RuntimeError(f"radix node of block {bid} keeps token bytes that are not its token ids")
                if node is not self.root and child.extra != node.extra:
                    raise RuntimeError(f"radix node of block {bid} has other extra keys than its parent")
                if child.block.block_hash != key or child.block.node is not child:
                    raise RuntimeError(f"block {bid} is in the radix tree but its block_hash or node disagrees")
                if child.block.ref_cnt > 0 and node is not self.root and node.block.ref_cnt == 0:
                    raise RuntimeError(f"block {bid} is in use but its parent block {node.block.block_id} "
                                       f"has ref_cnt 0 (holders must hold a whole path from the root)")
                stack.append(child)
        if seen != len(self._nodes):
            raise RuntimeError(f"the radix tree indexes {len(self._nodes)} blocks but {seen} are reachable")
        for (key, extra), node in self._by_prefix.items():
            if self._nodes.get(node.block_hash) is not node or node.prefix_key != key or node.extra != extra:
                raise RuntimeError(f"the prefix-key index holds a node (block {node.block.block_id}) that is not "
                                   f"cached under that key")
        evictable = [n for n in self._nodes.values() if n.block.ref_cnt == 0]
        if len(evictable) != self.num_evictable:
            raise RuntimeError(f"the radix tree counts {self.num_evictable} evictable blocks but "
                               f"{len(evictable)} cached blocks have ref_cnt 0")
        live = {id(node) for stamp, _, node in self._heap if self._is_evictable_leaf(node, stamp)}
        for node in evictable:
            if not node.children and id(node) not in live:
                raise RuntimeError(f"evictable leaf block {node.block.block_id} has no live eviction heap entry")
