"""What the inflight-area fuzz (test_fuzz_inflight.py) found: a hostile region is refused.

The inflight area comes from the front-end (SET_INFLIGHT_FD); a restarted back-end parses
it. Indices read from it must be checked before they index it: an out-of-range one raised
``IndexError`` (untyped: it ended the connection's server with a traceback) instead of the
:class:`InvalidParam` that refuses the ring start.
"""

from __future__ import annotations

import struct

import pytest

from vhostkit.errors import InvalidParam
from vhostkit.user.backend.inflight import (
    PackedInflight,
    SplitInflight,
    packed_queue_region_size,
    split_queue_region_size,
)

pytestmark = pytest.mark.reliability


def test_a_packed_chain_whose_last_entry_is_outside_the_region_is_refused() -> None:
    num = 1
    region = bytearray(packed_queue_region_size(num))
    struct.pack_into("<QHH", region, 0, 0, 1, num)  # version 1, desc_num 1
    # entry 0: inflight, next 0, last 1 (there is no entry 1), num 1
    struct.pack_into("<BBHHH", region, 32, 1, 0, 0, 1, 1)
    with pytest.raises(InvalidParam, match="outside the region"):
        PackedInflight(region, num)
    struct.pack_into("<BBHHH", region, 32, 1, 0, 0, 0, 1)  # last 0: a valid one-entry chain
    assert PackedInflight(region, num).inflight_heads() == [0]


def test_a_split_batch_list_that_runs_off_the_region_is_refused() -> None:
    num = 1
    region = bytearray(split_queue_region_size(num))
    # version 1, desc_num 1, last_batch_head 1 (there is no entry 1), used_idx 0xffff:
    # the ring's used index 0 is one past it, so recovery walks the batch list one step
    struct.pack_into("<QHHHH", region, 0, 0, 1, num, 1, 0xFFFF)
    tracker = SplitInflight(region, num)
    with pytest.raises(InvalidParam, match="runs off the region"):
        tracker.recover(0)
    assert bytes(region[16:]) == bytes(len(region) - 16)  # nothing written before refusing
    struct.pack_into("<QHHHH", region, 0, 0, 1, num, 0, 0xFFFF)  # head 0: a valid batch
    assert SplitInflight(region, num).recover(0) == []
