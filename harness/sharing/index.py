"""The content index: which content is where, keyed so that no guest can aim at an entry.

The index itself lives in the native core (``core.c``: an open-addressing table from a key to a
store slot, or to the first holder of a content not stored yet). This module owns its rules and
the Python specification of its key:

- **The key is secret.** A guest's hint carries the page's XXH64, which anyone can collide on
  purpose (XXH64 is not a cryptographic hash: two pages with one XXH64 take a few lines to make).
  Indexed by it, a guest could plant a page under the XXH64 of some honest content and keep
  honest holders of that content from ever meeting. So the core indexes by its own hash of the
  bytes it has just read to verify the hint: ``keyed_hash`` below, NH (UMAC, 2^-32-almost-
  universal per pass) twice with independent keys, compressed by SipHash-2-4, all three keys
  drawn per engine by :func:`new_key` and never shown to a guest. Two fixed different pages get
  the same key with probability about 2^-63; a guest that wants to collide with honest content
  can only guess, and every guess costs its own records.
- **Each VM's first holders are bounded** (:func:`candidate_quota`): one entry per guest page at
  most (a page hinted again with other bytes replaces its entry), and a quota per VM tied to its
  RAM size; past the quota the VM's own entries are evicted, nobody else's.
- **Store slots are bounded** (:func:`max_slots`): slots nobody maps are freed and reused.

:func:`memory_bound` is what the core may allocate at most for given VMs; the engine reports it
next to what the core holds now (``engine.stats()['index']``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

PAGE = 4096
NH_WORDS = PAGE // 4
KEY_BYTES = 2 * PAGE + 16  # two NH keys (1024 u32 each) + a 128-bit SipHash key
_M64 = (1 << 64) - 1


def new_key() -> bytes:
    """A fresh secret key for one engine (from the kernel's CSPRNG)."""
    return os.urandom(KEY_BYTES)


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _M64


def siphash24_16(k0: int, k1: int, m0: int, m1: int) -> int:
    """SipHash-2-4 of the 16-byte message ``m0 || m1`` (little-endian u64 words)."""
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573

    def rounds(n: int) -> None:
        nonlocal v0, v1, v2, v3
        for _ in range(n):
            v0 = (v0 + v1) & _M64
            v1 = _rotl(v1, 13) ^ v0
            v0 = _rotl(v0, 32)
            v2 = (v2 + v3) & _M64
            v3 = _rotl(v3, 16) ^ v2
            v0 = (v0 + v3) & _M64
            v3 = _rotl(v3, 21) ^ v0
            v2 = (v2 + v1) & _M64
            v1 = _rotl(v1, 17) ^ v2
            v2 = _rotl(v2, 32)

    for m in (m0, m1):
        v3 ^= m
        rounds(2)
        v0 ^= m
    b = 16 << 56
    v3 ^= b
    rounds(2)
    v0 ^= b
    v2 ^= 0xFF
    rounds(4)
    return v0 ^ v1 ^ v2 ^ v3


def nh(page: bytes, key_words: np.ndarray) -> int:
    """NH of one page: sum over word pairs of (w[2i]+k[2i] mod 2^32)(w[2i+1]+k[2i+1] mod 2^32)
    mod 2^64."""
    w = np.frombuffer(page, dtype="<u4").astype(np.uint64)
    x = (w + key_words.astype(np.uint64)) & np.uint64(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        return int((x[0::2] * x[1::2]).sum(dtype=np.uint64))


def keyed_hash(page: bytes, key: bytes) -> int:
    """The index key of a 4 KiB page under ``key`` (the specification of the core's keyed hash;
    never 0, which marks an empty entry)."""
    if len(page) != PAGE or len(key) != KEY_BYTES:
        raise ValueError("keyed_hash takes one 4096-byte page and a KEY_BYTES key")
    k = np.frombuffer(key, dtype="<u4", count=2 * NH_WORDS)
    a0, a1 = nh(page, k[:NH_WORDS]), nh(page, k[NH_WORDS:])
    k0, k1 = int.from_bytes(key[2 * PAGE:2 * PAGE + 8], "little"), int.from_bytes(key[2 * PAGE + 8:], "little")
    return siphash24_16(k0, k1, a0, a1) or 1


def candidate_quota(ram_size: int, fraction: float = 1.0) -> int:
    """First holders a VM may have in the index at once: ``fraction`` of its RAM pages (at
    least 1; 0 if ``fraction`` is 0: the VM can then only join contents already stored)."""
    if fraction < 0:
        raise ValueError("the candidate quota fraction must be >= 0")
    return 0 if fraction == 0 else max(1, int(ram_size // PAGE * fraction))


def max_slots(ram_sizes: Iterable[int]) -> int:
    """Store slots one engine may use at once: every page of every VM merged, plus as many
    again waiting for the agents' word before they are freed."""
    return 2 * sum(r // PAGE for r in ram_sizes) + 1024


def memory_bound(ram_sizes: list[int], quotas: list[int], batch_pages: int, stage_pages: int,
                 slots: int, base_bytes: int) -> int:
    """Bytes the core may allocate at most for these VMs (see ``core.c``: its fixed part
    ``base_bytes``, per guest page 17 bytes of books, the index table at most half full of
    16-byte entries, 28 bytes and 2 bits per slot, the batches and the staging pages)."""
    entries = sum(quotas) + slots
    table = 16
    while table < 2 * entries:
        table *= 2
    table = max(table, 4096)
    per_vm = sum(r // PAGE * 17 + (batch_pages + 2) * 24 for r in ram_sizes)
    slot_bytes = slots * (8 + 8 + 4 + 8) + 2 * (slots // 8 + 8)  # key, xxh, refs, zero list; 2 bitmaps
    # the slot arrays grow by doubling; the table doubles while the old one is still held
    return base_bytes + stage_pages * (PAGE + 8) + per_vm + 2 * slot_bytes + table * 16 * 3 // 2
