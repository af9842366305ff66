"""The paged KV cache's bookkeeping: invariants under random operations, prefix caching,
copy-on-write and rewinding."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from minibatch.kv_cache import CacheFullError, ContiguousKVCache, PagedKVCache

tokens = st.lists(st.integers(0, 3), min_size=1, max_size=14)  # a tiny alphabet: many shared prefixes


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / append / commit / fork / rewind / free sequences; the invariants
    of a block allocator must hold after every step."""

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(num_blocks=12, block_size=3)
        self.contents: dict[int, list[int]] = {}  # seq -> tokens whose slots it claimed
        self.next_id = 0

    @rule(prompt=tokens)
    def allocate(self, prompt):
        if not self.cache.can_allocate(prompt):
            with pytest.raises(MemoryError):
                self.cache.allocate(self.next_id, prompt)
            return
        cached = self.cache.allocate(self.next_id, prompt)
        assert cached % self.cache.block_size == 0 and cached < len(prompt)
        self.contents[self.next_id] = list(prompt)
        self.cache.commit(self.next_id, prompt)
        self.next_id += 1

    @precondition(lambda self: self.contents)
    @rule(data=st.data(), new=st.lists(st.integers(0, 3), min_size=1, max_size=4))
    def append(self, data, new):
        seq = data.draw(st.sampled_from(sorted(self.contents)))
        if not self.cache.can_append(seq, len(new)):
            return
        before = list(self.cache.block_table(seq))
        next_free = bool(before) and (before[-1] + 1 in self.cache.free_plain or
                                      before[-1] + 1 in self.cache.free_cached)
        copies = len(self.cache.pending_copies)
        slots = self.cache.append_slots(seq, len(new))
        table = self.cache.block_table(seq)
        if next_free and len(table) > len(before) and len(self.cache.pending_copies) == copies:
            assert table[len(before)] == before[-1] + 1  # a growing sequence takes the next block if free
        assert all(self.cache.blocks[b].ref_count == 1 for b in {int(s) // 3 for s in slots} if b in table)
        self.contents[seq] += new
        self.cache.commit(seq, self.contents[seq])

    @precondition(lambda self: self.contents)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(sorted(self.contents)))
        self.cache.fork(parent, self.next_id)
        self.contents[self.next_id] = list(self.contents[parent])
        self.next_id += 1

    @precondition(lambda self: self.contents)
    @rule(data=st.data())
    def rewind(self, data):
        seq = data.draw(st.sampled_from(sorted(self.contents)))
        n = data.draw(st.integers(0, len(self.contents[seq])))
        self.cache.rewind(seq, n)
        self.contents[seq] = self.contents[seq][:len(self.contents[seq]) - n]

    @precondition(lambda self: self.contents)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(sorted(self.contents)))
        self.cache.free(seq)
        del self.contents[seq]

    @invariant()
    def refcounts_match_the_tables(self):
        owners = np.zeros(self.cache.num_blocks, dtype=int)
        for table in self.cache.tables.values():
            for block in table:
                owners[block] += 1
        assert [b.ref_count for b in self.cache.blocks] == owners.tolist()  # never negative, never leaked

    @invariant()
    def every_block_is_free_or_owned(self):
        free = set(self.cache.free_plain) | set(self.cache.free_cached)
        owned = {b for table in self.cache.tables.values() for b in table}
        assert not free & owned
        assert len(free) + len(owned) == self.cache.num_blocks

    @invariant()
    def tables_cover_their_tokens(self):
        for seq, content in self.contents.items():
            assert len(self.cache.block_table(seq)) == self.cache.blocks_needed(len(content))

    @invariant()
    def hashes_describe_the_prefix_they_name(self):
        """A registered hash always names the block that holds exactly those tokens."""
        for block_hash, block_id in self.cache.cached.items():
            assert self.cache.blocks[block_id].block_hash == block_hash
            assert len(self.cache.blocks[block_id].token_ids) == self.cache.block_size

    def teardown(self):
        for seq in list(self.contents):
            self.cache.free(seq)
        assert self.cache.num_free_blocks == self.cache.num_blocks  # everything free or merely cached
        assert all(b.ref_count == 0 for b in self.cache.blocks)


TestAllocator = AllocatorMachine.TestCase


class ResidualRowMachine(AllocatorMachine):
    """The same operations on a KIVI cache, where each sequence also owns a residual row:
    rows are never shared or leaked, a fork without a free row changes nothing, and a
    rewind that would reopen a quantized block is refused and changes nothing."""

    def __init__(self):
        super().__init__()
        self.cache = PagedKVCache(num_blocks=12, block_size=3, num_residual_rows=4)

    @precondition(lambda self: self.contents)
    @rule(data=st.data())
    def fork(self, data):
        if self.cache.free_rows:
            super().fork(data)
            return
        parent = data.draw(st.sampled_from(sorted(self.contents)))
        tables = {seq: list(table) for seq, table in self.cache.tables.items()}
        copies = len(self.cache.pending_row_copies)
        with pytest.raises(MemoryError):
            self.cache.fork(parent, self.next_id)
        assert self.cache.tables == tables and len(self.cache.pending_row_copies) == copies

    @precondition(lambda self: self.contents)
    @rule(data=st.data())
    def rewind(self, data):
        seq = data.draw(st.sampled_from(sorted(self.contents)))
        n = data.draw(st.integers(0, len(self.contents[seq])))
        end, full = len(self.contents[seq]) - n, len(self.contents[seq]) // 3 * 3
        if end < full and end % 3:
            with pytest.raises(ValueError, match="quantized"):
                self.cache.rewind(seq, n)
            return
        self.cache.rewind(seq, n)
        self.contents[seq] = self.contents[seq][:end]

    @invariant()
    def every_row_is_free_or_owned_once(self):
        owned = list(self.cache.residual_row.values())
        assert len(set(owned)) == len(owned) and not set(owned) & set(self.cache.free_rows)
        assert sorted(owned + self.cache.free_rows) == list(range(4))
        assert set(self.cache.residual_row) == set(self.cache.tables)


TestResidualRows = ResidualRowMachine.TestCase


def test_prefix_hit_reuses_blocks_and_leaves_the_last_token():
    cache = PagedKVCache(num_blocks=8, block_size=2)
    prompt = [1, 2, 3, 4, 5, 6]
    assert cache.allocate("a", prompt) == 0
    cache.commit("a", prompt)
    assert cache.allocate("b", prompt) == 4  # two blocks reused; the last block recomputed
    assert cache.block_table("b")[:2] == cache.block_table("a")[:2]
    assert cache.block_table("b")[2] != cache.block_table("a")[2]
    assert cache.counters.prefix_hit_blocks == 2


def test_freed_blocks_stay_cached_until_evicted_least_recently_used_first():
    cache = PagedKVCache(num_blocks=4, block_size=2)
    cache.allocate("a", [1, 2, 3, 4, 9])
    cache.commit("a", [1, 2, 3, 4])
    cache.free("a")
    assert cache.num_free_blocks == 4 and cache.num_cached_free_blocks == 2
    assert cache.allocate("b", [1, 2, 3, 4, 7]) == 4  # hit after free
    cache.free("b")
    cache.allocate("c", [5, 5, 5, 5, 5, 5, 5, 5])  # needs all four blocks: evicts both
    assert cache.counters.evictions == 2 and not cache.cached


def test_a_sequence_grows_into_the_block_after_its_last():
    cache = PagedKVCache(num_blocks=16, block_size=2)
    cache.allocate("a", [1, 2, 3])  # two blocks, side by side
    first = cache.block_table("a")[0]
    for _ in range(5):
        cache.append_slots("a", 2)
    assert cache.block_table("a") == list(range(first, first + 7))


def test_a_new_sequence_starts_in_the_middle_of_the_longest_free_run():
    cache = PagedKVCache(num_blocks=16, block_size=1)
    cache.allocate("a", [1])
    assert cache.block_table("a") == [8]  # the middle of 0..15
    cache.allocate("b", [1, 2])  # the longest run left is 0..7
    assert cache.block_table("b") == [4, 5]
    cache.allocate("c", [1])  # runs 0..3, 6..7 and 9..15: the longest is 9..15
    assert cache.block_table("c") == [12]
    cache.append_slots("a", 2)  # a grows into 9 and 10; c still has 13.. to grow into
    assert cache.block_table("a") == [8, 9, 10]


def test_when_the_next_block_is_taken_the_sequence_moves_on_and_stays_adjacent_there():
    cache = PagedKVCache(num_blocks=8, block_size=1)
    cache.allocate("a", [1])  # block 4
    cache.allocate("b", [1])  # block 2 (middle of 0..3)
    cache.append_slots("b", 1)  # 3 is free: b = [2, 3]
    cache.append_slots("b", 1)  # 4 is a's: b moves to the middle of the longest run, 5..7
    cache.append_slots("b", 1)
    assert cache.block_table("b") == [2, 3, 6, 7]


def test_the_block_after_a_sequence_is_taken_even_from_the_prefix_cache():
    """The one exception to "plain free blocks first, then cached ones, least recently
    freed first": the block right after a sequence's last is taken whenever it is free,
    and its cached prefix is forgotten."""
    cache = PagedKVCache(num_blocks=8, block_size=1)
    cache.allocate("a", [1])  # block 4, the middle of 0..7
    cache.allocate("b", [7, 8])  # 2 (the middle of 0..3), then its neighbour 3
    cache.commit("b", [7, 8])
    cache.free("b")  # 2 and 3 stay cached
    cache.allocate("c", [5, 5])  # 6, 7: the middle of the longest plain run, 5..7
    cache.allocate("d", [6])  # 1: the middle of the plain run 0..1
    assert [cache.block_table(s) for s in ("a", "c", "d")] == [[4], [6, 7], [1]]
    assert cache.cached_prefix([7, 8, 9]) == [2, 3]
    cache.append_slots("d", 1)  # plain 0 and 5 are free, but 2 comes next
    assert cache.block_table("d") == [1, 2] and cache.counters.evictions == 1
    assert cache.cached_prefix([7, 8, 9]) == []  # b's prefix lost its first block


def test_fork_then_write_copies_the_shared_partial_block():
    cache = PagedKVCache(num_blocks=6, block_size=4)
    cache.allocate("parent", [1, 2, 3, 4, 5, 6])
    cache.fork("parent", "child")
    shared_tail = cache.block_table("parent")[-1]
    cache.append_slots("child", 1)
    assert cache.pending_copies == [(shared_tail, cache.block_table("child")[-1])]
    assert cache.block_table("child")[0] == cache.block_table("parent")[0]  # full block still shared
    assert cache.blocks[shared_tail].ref_count == 1
    cache.append_slots("parent", 1)  # the parent owns its tail alone now: no copy
    assert len(cache.pending_copies) == 1


def test_rewind_frees_emptied_blocks_and_drops_stale_hashes():
    cache = PagedKVCache(num_blocks=6, block_size=2)
    cache.allocate("a", [1, 2, 3, 4, 5])
    cache.commit("a", [1, 2, 3, 4])
    second = cache.block_table("a")[1]
    cache.rewind("a", 2)  # now [1, 2, 3]: the last block empties, the second is partial
    assert len(cache.block_table("a")) == 2 and cache.num_free_blocks == 4
    cache.append_slots("a", 1)  # overwrites position 3 inside the hashed second block
    assert cache.blocks[second].block_hash is None
    assert cache.allocate("b", [1, 2, 3, 4, 8]) == 2  # only the first block is still a hit


def test_allocation_that_cannot_fit_changes_nothing():
    cache = PagedKVCache(num_blocks=2, block_size=2)
    with pytest.raises(MemoryError):
        cache.allocate("a", [1, 2, 3, 4, 5])
    assert cache.num_free_blocks == 2 and not cache.tables


def cache_state(cache: PagedKVCache) -> tuple:
    return ({seq: list(table) for seq, table in cache.tables.items()}, dict(cache.num_tokens),
            [b.ref_count for b in cache.blocks], cache.num_free_blocks, list(cache.free_rows),
            dict(cache.residual_row), list(cache.pending_row_copies))


@pytest.mark.parametrize("num_residual_rows", [0, 3])
def test_bad_fork_append_and_free_are_refused_and_change_nothing(num_residual_rows):
    """Forking into a sequence that has blocks used to overwrite its table and leak its
    blocks; forking an unknown parent in a KIVI cache used to leak a residual row; a
    negative append used to shrink the sequence without releasing anything."""
    cache = PagedKVCache(num_blocks=8, block_size=4, num_residual_rows=num_residual_rows)
    cache.allocate("a", [1, 2, 3, 4, 5, 6])
    cache.allocate("b", [7, 8, 9, 10, 11])
    before = cache_state(cache)
    with pytest.raises(ValueError, match="'b' already has blocks"):
        cache.fork("a", "b")
    with pytest.raises(ValueError, match="cannot fork sequence 'nope'"):
        cache.fork("nope", "c")
    with pytest.raises(ValueError, match="must be >= 0"):
        cache.append_slots("a", -3)
    with pytest.raises(ValueError, match="'nope' has no blocks to free"):
        cache.free("nope")
    assert cache_state(cache) == before
    cache.free("a")
    cache.free("b")
    assert cache.num_free_blocks == 8 and all(b.ref_count == 0 for b in cache.blocks)


def test_contiguous_cache_rows():
    cache = ContiguousKVCache(max_seqs=2, max_len=8)
    cache.allocate("a")
    cache.allocate("b")
    assert cache.slot_mapping("b", np.array([0, 7])).tolist() in ([0, 7], [8, 15])
    with pytest.raises(CacheFullError, match="in use"):
        cache.allocate("c")
