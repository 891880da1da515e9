/*
 * satori verifier: the sharing engine's per-hint check, in C.
 *
 * A hint record says "guest page GPA holds content with xxh64 HASH". The engine never trusts
 * it: it reads the page's real bytes from the host side and hashes them. Doing that one record
 * at a time in Python cost ~40 us per record (a pread, a hash and the interpreter around them);
 * here a whole batch is one call: for each record, pread() the page into the caller's buffer
 * and compare XXH64(page, 4096, 0) with the record's hash.
 *
 * Loaded into the harness process with ctypes (never into QEMU). No state, no allocation,
 * no threads. Built on first use like the merge agent (harness/sharing/agent.py).
 *
 * XXH64 follows the published specification (xxhash.com, "xxHash fast digest algorithm",
 * XXH64); tests check it against the Python xxhash package.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

#define PAGE 4096

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t rd64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8); /* little-endian host (x86-64) */
    return v;
}

static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t round64(uint64_t acc, uint64_t in)
{
    acc += in * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t merge64(uint64_t acc, uint64_t v)
{
    acc ^= round64(0, v);
    return acc * P1 + P4;
}

uint64_t satori_xxh64(const void *data, size_t len, uint64_t seed)
{
    const uint8_t *p = data, *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = seed + P1 + P2, v2 = seed + P2, v3 = seed, v4 = seed - P1;
        const uint8_t *limit = end - 32;
        do {
            v1 = round64(v1, rd64(p));
            v2 = round64(v2, rd64(p + 8));
            v3 = round64(v3, rd64(p + 16));
            v4 = round64(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = merge64(h, v1);
        h = merge64(h, v2);
        h = merge64(h, v3);
        h = merge64(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= round64(0, rd64(p));
        h = rotl64(h, 27) * P1 + P4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)rd32(p) * P1;
        h = rotl64(h, 23) * P2 + P3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P5;
        h = rotl64(h, 11) * P1;
        p++;
    }
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

/*
 * Verify n records. For record i the page is read from fds[src[i]] at offset offs[i] into
 * pages + i*4096 (src picks between the RAM file and /proc/<pid>/mem; the caller computes the
 * offset). ok[i] = 1 when the read returned a whole page whose XXH64 equals hashes[i], else 0.
 * Returns the number of records verified; a failed read counts as not verified (never fatal).
 */
size_t satori_verify(const int *fds, const uint8_t *src, const uint64_t *offs, const uint64_t *hashes,
                     size_t n, uint8_t *pages, uint8_t *ok)
{
    size_t good = 0;
    for (size_t i = 0; i < n; i++) {
        uint8_t *page = pages + i * (size_t)PAGE;
        ssize_t r = pread(fds[src[i]], page, PAGE, (off_t)offs[i]);
        ok[i] = r == PAGE && satori_xxh64(page, PAGE, 0) == hashes[i];
        good += ok[i];
    }
    return good;
}
