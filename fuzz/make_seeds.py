"""Write the seed inputs of the atheris harnesses to ``fuzz/seeds/<harness>/``.

A seed is a well-formed input (a front-end's set-up, a ring with a request in it) that the
fuzzer mutates from, so it starts past the header checks. Run from the repository root:
``python3 fuzz/make_seeds.py``.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

from vhostkit.user.message import HEADER, FrontendReq

R = FrontendReq
PAGE = os.sysconf("SC_PAGE_SIZE")
UVA = 0x7F00_0000_0000
HERE = Path(__file__).parent / "seeds"


def msg(req: FrontendReq, body: bytes = b"", flags: int = 1) -> bytes:
    return HEADER.pack(int(req), flags, len(body)) + body


def setup(packed: bool) -> list[tuple[bytes, int]]:
    """(message, fd mask) records: bit 0 an eventfd, bit 1 the guest memfd, bit 2 an eventfd."""
    features = (1 << 32) | (1 << 30) | ((1 << 34) if packed else 0)
    region = struct.pack("<QQQQ", 0, 16 * PAGE, UVA, 0)
    return [
        (msg(R.SET_OWNER), 0),
        (msg(R.GET_FEATURES), 0),
        (msg(R.GET_PROTOCOL_FEATURES), 0),
        (msg(R.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 3), 9), 0),
        (msg(R.SET_FEATURES, struct.pack("<Q", features), 9), 0),
        (msg(R.SET_MEM_TABLE, struct.pack("<II", 1, 0) + region, 9), 0b10),
        (msg(R.SET_VRING_NUM, struct.pack("<II", 0, 8), 9), 0),
        (msg(R.SET_VRING_BASE, struct.pack("<II", 0, 0), 9), 0),
        (msg(R.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, UVA, UVA + 0x200, UVA + 0x100, 0)), 0),
        (msg(R.SET_VRING_CALL, struct.pack("<Q", 0), 9), 0b100),
        (msg(R.SET_VRING_KICK, struct.pack("<Q", 0), 9), 0b1),
        (msg(R.SET_VRING_ENABLE, struct.pack("<II", 0, 1), 9), 0),
        (msg(R.GET_VRING_BASE, struct.pack("<II", 0, 0), 9), 0),
    ]


def server_seed(device: int, packed: bool) -> bytes:
    return bytes([device]) + b"".join(bytes([len(m), mask]) + m for m, mask in setup(packed))


def split_ring_seed() -> bytes:
    """Split ring of 8 at DESC: one chain (readable 16 bytes, writable 8), posted."""
    desc = bytearray(0x500 - 0x100 + 8)
    struct.pack_into("<QIHH", desc, 0, 0x2000, 16, 1, 1)  # NEXT -> 1
    struct.pack_into("<QIHH", desc, 16, 0x2100, 8, 2, 0)  # WRITE
    struct.pack_into("<HHH", desc, 0x200, 0, 1, 0)  # avail: flags, idx 1, ring[0] = 0
    return bytes([3 << 1, 0, 0, 0, 0, 0, 0xFF, 0]) + bytes(desc)


def packed_ring_seed() -> bytes:
    desc = bytearray(64)
    struct.pack_into("<QIHH", desc, 0, 0x2000, 16, 0, 1 | 1 << 7)  # NEXT | AVAIL
    struct.pack_into("<QIHH", desc, 16, 0x2100, 8, 0, 2 | 1 << 7)  # WRITE | AVAIL
    return bytes([1 | 7 << 1, 1, 0, 0, 0, 0, 0xFF, 0]) + bytes(desc)


def main() -> None:
    seeds = {
        "codec": {"setup": b"\x20\x00" + b"".join(m for m, _ in setup(False))},
        "server": {f"setup-{d}-{p}": server_seed(d, p) for d in range(3) for p in (False, True)},
        "rings": {"split": split_ring_seed(), "packed": packed_ring_seed()},
    }
    for harness, files in seeds.items():
        (HERE / harness).mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (HERE / harness / name).write_bytes(data)


if __name__ == "__main__":
    main()
