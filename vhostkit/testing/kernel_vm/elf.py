"""ELF and bzImage helpers: the uncompressed kernel for a PVH boot, and static-binary checks.

QEMU's ``microvm`` machine boots fastest from the uncompressed ELF ``vmlinux`` through its PVH
entry point; Debian ships only the compressed bzImage, so :func:`extract_vmlinux` unpacks it and
:func:`has_pvh_note` checks that the result has that entry point.
"""

from __future__ import annotations

import bz2
import logging
import lzma
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

from vhostkit.testing.kernel_vm.common import VmPrepareError

__all__ = ["extract_vmlinux", "has_pvh_note", "is_static_elf"]

log = logging.getLogger(__name__)


_BZ_MAGICS: tuple[tuple[str, bytes], ...] = (
    ("gzip", b"\x1f\x8b\x08"),
    ("xz", b"\xfd7zXZ\x00"),
    ("bzip2", b"BZh"),
    ("lzma", b"\x5d\x00\x00"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzo", b"\x89LZO"),
    ("lz4", b"\x02\x21\x4c\x18"),
)

_EXTERNAL_DECOMPRESSORS: dict[str, tuple[str, ...]] = {
    "zstd": ("zstd", "-dcq"),
    "lzo": ("lzop", "-dcq"),
    "lz4": ("lz4", "-dcq"),
}


def _decompress(kind: str, data: bytes) -> bytes:
    if kind == "gzip":
        return zlib.decompressobj(wbits=31).decompress(data)
    if kind == "xz":
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if kind == "lzma":
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if kind == "bzip2":
        return bz2.BZ2Decompressor().decompress(data)
    tool = _EXTERNAL_DECOMPRESSORS.get(kind)
    if tool is None or shutil.which(tool[0]) is None:
        raise VmPrepareError(f"cannot decompress a {kind} kernel payload (no {kind} tool)")
    # These tools stop with an error on trailing data; what they wrote so far is the image.
    proc = subprocess.run(tool, input=data, capture_output=True, check=False)
    return proc.stdout


def _is_elf(data: bytes) -> bool:
    return data[:4] == b"\x7fELF"


def extract_vmlinux(bzimage: bytes) -> bytes:
    """Return the uncompressed ELF kernel inside an x86 bzImage.

    Uses the boot protocol header (``payload_offset``/``payload_length``, boot protocol 2.08+)
    when present, otherwise scans for a known compression magic, as the kernel's
    ``scripts/extract-vmlinux`` does.
    """
    candidates: list[tuple[str, int, int]] = []
    if len(bzimage) > 0x250 and bzimage[0x202:0x206] == b"HdrS":
        version = struct.unpack_from("<H", bzimage, 0x206)[0]
        if version >= 0x208:
            setup_sects = bzimage[0x1F1] or 4
            payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
            start = (setup_sects + 1) * 512 + payload_offset
            for kind, magic in _BZ_MAGICS:
                if bzimage.startswith(magic, start):
                    candidates.append((kind, start, start + payload_length))
                    break
    for kind, magic in _BZ_MAGICS:
        pos = bzimage.find(magic)
        while pos != -1 and len(candidates) < 64:
            candidates.append((kind, pos, len(bzimage)))
            pos = bzimage.find(magic, pos + 1)
    for kind, start, end in candidates:
        try:
            data = _decompress(kind, bzimage[start:end])
        except (OSError, EOFError, lzma.LZMAError, zlib.error, ValueError, VmPrepareError) as exc:
            log.debug("payload candidate %s at %#x: %s", kind, start, exc)
            continue
        if _is_elf(data):
            log.debug("vmlinux: %s payload at %#x, %d bytes", kind, start, len(data))
            return data
    raise VmPrepareError("no compressed ELF kernel found in the bzImage")


def has_pvh_note(elf: bytes) -> bool:
    """True when a 64-bit ELF kernel carries XEN_ELFNOTE_PHYS32_ENTRY (the PVH entry point)."""
    if not _is_elf(elf) or elf[4] != 2 or elf[5] != 1:
        return False
    e_phoff = struct.unpack_from("<Q", elf, 0x20)[0]
    e_phentsize, e_phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        p_type = struct.unpack_from("<I", elf, off)[0]
        if p_type != 4:  # PT_NOTE
            continue
        p_offset = struct.unpack_from("<Q", elf, off + 8)[0]
        p_filesz = struct.unpack_from("<Q", elf, off + 32)[0]
        pos, end = p_offset, p_offset + p_filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\x00")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + ((namesz + 3) & ~3) + ((descsz + 3) & ~3)
    return False


def is_static_elf(path: Path) -> bool:
    """True when ``path`` is an ELF executable without a PT_INTERP (a static binary)."""
    with path.open("rb") as f:
        head = f.read(64)
        if not _is_elf(head) or head[4] != 2:
            return False
        e_phoff = struct.unpack_from("<Q", head, 0x20)[0]
        e_phentsize, e_phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(e_phoff)
        table = f.read(e_phentsize * e_phnum)
    return all(struct.unpack_from("<I", table, i * e_phentsize)[0] != 3 for i in range(e_phnum))
