"""Inflight tracking for split queues, following the spec's algorithm, including crashes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostkit.errors import InvalidParam
from vhostkit.user.inflight import SplitInflight, split_queue_region_size

N = 16


def region(n: int = N) -> bytearray:
    return bytearray(split_queue_region_size(n))


def test_a_new_region_is_initialised_and_an_old_one_kept() -> None:
    buf = region()
    t = SplitInflight(buf, N)
    assert buf[8:10] == (1).to_bytes(2, "little")  # version
    assert buf[10:12] == N.to_bytes(2, "little")  # desc_num
    t.popped([3, 1])
    again = SplitInflight(buf, N)  # the restarted back-end
    assert again.inflight_heads() == [3, 1]
    again.popped([7])
    assert again.inflight_heads() == [3, 1, 7]  # the counter continues after the old ones


def test_region_size_is_64_byte_aligned() -> None:
    assert split_queue_region_size(256) == 4160
    assert split_queue_region_size(1) == 64


def test_complete_then_recover_returns_the_rest_oldest_first() -> None:
    t = SplitInflight(region(), N)
    t.popped([3, 1, 2])
    t.completing([1])
    t.completed([1], 1)
    assert t.recover(1) == [3, 2]


def test_crash_after_the_used_index_moved_repairs_the_last_batch() -> None:
    buf = region()
    t = SplitInflight(buf, N)
    t.popped([5, 6, 7])
    t.completing([5, 6])
    # the used ring's idx became 2, then the back-end died before completed()
    again = SplitInflight(buf, N)  # the restarted back-end, same memory
    assert again.recover(2) == [7]
    assert again.used_idx == 2


def test_crash_before_the_used_index_moved_resubmits_the_batch() -> None:
    buf = region()
    t = SplitInflight(buf, N)
    t.popped([5, 6, 7])
    t.completing([5, 6])
    assert SplitInflight(buf, N).recover(0) == [5, 6, 7]


def test_bad_regions_are_refused() -> None:
    with pytest.raises(InvalidParam):
        SplitInflight(bytearray(32), N)
    buf = region(32)
    SplitInflight(buf, 32)
    with pytest.raises(InvalidParam):
        SplitInflight(buf, 16)  # initialised for another queue size
    t = SplitInflight(region(), N)
    with pytest.raises(InvalidParam):
        t.recover(N + 5)  # the ring claims more completions than could be in flight


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_recovery_matches_a_model_whatever_the_crash_point(data: st.DataObject) -> None:
    buf = region()
    t = SplitInflight(buf, N)
    free = list(range(N))
    inflight: list[int] = []  # in pop order
    used_idx = 0
    for _ in range(data.draw(st.integers(0, 30))):
        if free and (not inflight or data.draw(st.booleans())):
            k = data.draw(st.integers(1, len(free)))
            heads = [free.pop(data.draw(st.integers(0, len(free) - 1))) for _ in range(k)]
            t.popped(heads)
            inflight += heads
        elif inflight:
            batch = data.draw(st.lists(st.sampled_from(inflight), min_size=1, unique=True))
            t.completing(batch)
            used_idx = (used_idx + len(batch)) & 0xFFFF
            t.completed(batch, used_idx)
            inflight = [h for h in inflight if h not in batch]
            free += batch
    # the crash: maybe in the middle of one more completion
    ring_used = used_idx
    expected = list(inflight)
    if inflight and data.draw(st.booleans()):
        batch = data.draw(st.lists(st.sampled_from(inflight), min_size=1, unique=True))
        t.completing(batch)
        if data.draw(st.booleans()):  # the used index was published before the crash
            ring_used = (used_idx + len(batch)) & 0xFFFF
            expected = [h for h in inflight if h not in batch]
    assert SplitInflight(buf, N).recover(ring_used) == expected
