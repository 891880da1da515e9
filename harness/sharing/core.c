/*
 * satori sharing core: the per-hint hot path of the sharing engine, in C.
 *
 * Python (harness/sharing/engine.py and its parts) stays the orchestrator: it polls the hint
 * rings, decides when to flush, talks to the merge agents and keeps the statistics. Everything
 * that runs once per hint record is here, one call per batch of records:
 *
 *   record (gpa, xxh64)
 *     -> read the guest page once (copied from the engine's own guarded view of the RAM file,
 *        see satori_core_set_view, or pread of it; /proc/<pid>/mem for pages QEMU maps
 *        privately since a merge) straight into the store's staging buffer
 *     -> verify: XXH64(page) must equal the record's hash (a guest's word is never trusted)
 *     -> key: a secret-keyed hash of the same bytes (the guest cannot predict it, so it cannot
 *        plant pages that collide with honest content; see "Keyed hash" below)
 *     -> content index (open addressing, key -> store slot or first holder)
 *     -> plan: a content already in the store is planned for this page; the second holder of a
 *        content appends its bytes to the store (they are already in the staging buffer: no
 *        second read, no copy) and both holders are planned. The first holder's page is NOT
 *        read again: the agent memcmps every page against the store before it maps it, so a
 *        first holder that changed meanwhile is simply not merged.
 *     -> merge request pairs (guest_off, store_off) per VM, taken by Python for the agent.
 *
 * So each guest page is read once per pair (at its own hint) plus the agent's memcmp.
 *
 * Bounds (a guest can make the engine do work, never make it grow without bound):
 *   - a page is the first holder ("candidate") of at most one content: a page hinted again
 *     with other bytes replaces its entry; and each VM has a candidate quota (set from its
 *     RAM size by the caller); past it, the VM's own oldest-by-clock candidate is evicted;
 *   - store slots whose pages nobody maps any more are freed (punched) and reused, so slot
 *     metadata is bounded by the pages merged at once, not by merges ever made;
 *   - pending merge pairs per VM are capped (the batch size): ingest stops and returns when a
 *     VM's batch is full, Python flushes it and calls again;
 *   - the staging buffer is a fixed number of pages, written to the store when full.
 * Every allocation is counted in mem_bytes; nothing grows per record.
 *
 * Keyed hash: NH (Black, Halevi, Krawczyk, Krovetz, Rogaway, "UMAC: fast and secure message
 * authentication", CRYPTO 1999) over the page's 1024 32-bit little-endian words w with two
 * independent random keys k (1024 words each):
 *     NH_k(w) = sum_{i < 512} ((w[2i] + k[2i]) mod 2^32) * ((w[2i+1] + k[2i+1]) mod 2^32) mod 2^64
 * is 2^-32-almost-universal; two independent passes give a 128-bit value that collides for two
 * fixed distinct pages with probability <= 2^-64. SipHash-2-4 (Aumasson, Bernstein) with a third
 * random key compresses it to the 64-bit index key. The keys are drawn per engine by Python
 * (os.urandom) and never leave the host. harness/sharing/index.py holds the same function in
 * Python (the specification the tests compare against).
 *
 * Reconcile and free: the agents' LIST replies (pages mapped from the store, not faulted
 * private) are the truth. core_reconcile() resets one VM's books to its agent's LIST;
 * core_free_unused() punches a slot only if no reference is counted AND no agent's current LIST
 * (all of them, passed together) names it.
 *
 * Loaded into the harness process with ctypes (never into QEMU). One thread: the caller's.
 * Built on first use like the merge agent: cc -O2 -Wall -Werror -fPIC -shared.
 *
 * XXH64 follows the published specification (xxhash.com, "xxHash fast digest algorithm");
 * tests check it against the Python xxhash package.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ULL
#define NH_WORDS (PAGE / 4)
#define MAX_VMS 256

/* ------------------------------------------------------------------------ XXH64 */

#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL
#define P5 0x27D4EB2F165667C5ULL

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

static inline uint64_t xround(uint64_t acc, uint64_t in)
{
    acc += in * P2;
    acc = rotl64(acc, 31);
    return acc * P1;
}

static inline uint64_t xmerge(uint64_t acc, uint64_t v)
{
    acc ^= xround(0, v);
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
            v1 = xround(v1, rd64(p));
            v2 = xround(v2, rd64(p + 8));
            v3 = xround(v3, rd64(p + 16));
            v4 = xround(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xmerge(h, v1);
        h = xmerge(h, v2);
        h = xmerge(h, v3);
        h = xmerge(h, v4);
    } else {
        h = seed + P5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= xround(0, rd64(p));
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

/* ------------------------------------------------------------------- keyed hash */

struct satori_key {
    uint32_t nh[2][NH_WORDS]; /* two independent NH keys */
    uint64_t sip[2];          /* SipHash-2-4 key */
};

static void nh2_scalar(const uint8_t *page, const struct satori_key *k, uint64_t out[2])
{
    uint64_t a0 = 0, a1 = 0;
    for (size_t i = 0; i < NH_WORDS; i += 2) {
        uint32_t w0 = rd32(page + 4 * i), w1 = rd32(page + 4 * i + 4);
        a0 += (uint64_t)(uint32_t)(w0 + k->nh[0][i]) * (uint32_t)(w1 + k->nh[0][i + 1]);
        a1 += (uint64_t)(uint32_t)(w0 + k->nh[1][i]) * (uint32_t)(w1 + k->nh[1][i + 1]);
    }
    out[0] = a0;
    out[1] = a1;
}

/* The same sums with AVX2: 8 words per step; _mm256_mul_epu32 multiplies the low 32 bits of
 * each 64-bit lane, i.e. word 2i (after the add) by word 2i+1 (the lane shifted right by 32). */
__attribute__((target("avx2"))) static void nh2_avx2(const uint8_t *page, const struct satori_key *k,
                                                     uint64_t out[2])
{
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (size_t i = 0; i < NH_WORDS; i += 8) {
        __m256i m = _mm256_loadu_si256((const __m256i *)(page + 4 * i));
        __m256i x = _mm256_add_epi32(m, _mm256_loadu_si256((const __m256i *)&k->nh[0][i]));
        __m256i y = _mm256_add_epi32(m, _mm256_loadu_si256((const __m256i *)&k->nh[1][i]));
        a0 = _mm256_add_epi64(a0, _mm256_mul_epu32(x, _mm256_srli_epi64(x, 32)));
        a1 = _mm256_add_epi64(a1, _mm256_mul_epu32(y, _mm256_srli_epi64(y, 32)));
    }
    uint64_t l0[4], l1[4];
    _mm256_storeu_si256((__m256i *)l0, a0);
    _mm256_storeu_si256((__m256i *)l1, a1);
    out[0] = l0[0] + l0[1] + l0[2] + l0[3];
    out[1] = l1[0] + l1[1] + l1[2] + l1[3];
}

#define SIPROUND                                                                                \
    do {                                                                                        \
        v0 += v1; v1 = rotl64(v1, 13); v1 ^= v0; v0 = rotl64(v0, 32);                           \
        v2 += v3; v3 = rotl64(v3, 16); v3 ^= v2;                                                \
        v0 += v3; v3 = rotl64(v3, 21); v3 ^= v0;                                                \
        v2 += v1; v1 = rotl64(v1, 17); v1 ^= v2; v2 = rotl64(v2, 32);                           \
    } while (0)

/* SipHash-2-4 of the 16-byte message m[0] || m[1] (little-endian words). */
static uint64_t siphash16(const uint64_t key[2], const uint64_t m[2])
{
    uint64_t v0 = key[0] ^ 0x736f6d6570736575ULL, v1 = key[1] ^ 0x646f72616e646f6dULL;
    uint64_t v2 = key[0] ^ 0x6c7967656e657261ULL, v3 = key[1] ^ 0x7465646279746573ULL;
    for (int i = 0; i < 2; i++) {
        v3 ^= m[i];
        SIPROUND;
        SIPROUND;
        v0 ^= m[i];
    }
    uint64_t b = 16ULL << 56;
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static int g_avx2 = -1;

static uint64_t keyed_hash(const struct satori_key *k, const uint8_t *page)
{
    uint64_t nh[2];
    if (g_avx2 < 0) {
        __builtin_cpu_init();
        g_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    if (g_avx2)
        nh2_avx2(page, k, nh);
    else
        nh2_scalar(page, k, nh);
    uint64_t h = siphash16(k->sip, nh);
    return h ? h : 1; /* 0 marks an empty index entry */
}

/* XXH64 (seed 0) and the NH pair of one page in one pass over it (AVX2): the scalar XXH64
 * lanes and the vector NH sums have no dependency on each other, so the CPU runs them side by
 * side. out[0] = XXH64, out[1..2] = NH. */
__attribute__((target("avx2"))) static void xxh_nh2_avx2(const uint8_t *page, const struct satori_key *k,
                                                         uint64_t out[3])
{
    uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = -P1;
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    for (size_t i = 0; i < PAGE; i += 32) {
        const uint8_t *p = page + i;
        v1 = xround(v1, rd64(p));
        v2 = xround(v2, rd64(p + 8));
        v3 = xround(v3, rd64(p + 16));
        v4 = xround(v4, rd64(p + 24));
        __m256i m = _mm256_loadu_si256((const __m256i *)p);
        __m256i x = _mm256_add_epi32(m, _mm256_loadu_si256((const __m256i *)&k->nh[0][i / 4]));
        __m256i y = _mm256_add_epi32(m, _mm256_loadu_si256((const __m256i *)&k->nh[1][i / 4]));
        a0 = _mm256_add_epi64(a0, _mm256_mul_epu32(x, _mm256_srli_epi64(x, 32)));
        a1 = _mm256_add_epi64(a1, _mm256_mul_epu32(y, _mm256_srli_epi64(y, 32)));
    }
    uint64_t h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
    h = xmerge(h, v1);
    h = xmerge(h, v2);
    h = xmerge(h, v3);
    h = xmerge(h, v4);
    h += PAGE; /* 4096 bytes: no tail */
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    uint64_t l0[4], l1[4];
    _mm256_storeu_si256((__m256i *)l0, a0);
    _mm256_storeu_si256((__m256i *)l1, a1);
    out[0] = h;
    out[1] = l0[0] + l0[1] + l0[2] + l0[3];
    out[2] = l1[0] + l1[1] + l1[2] + l1[3];
}

/* Whether the page's XXH64 is `want`; if so *key = its keyed hash. One pass with AVX2. */
static int verify_and_key(const struct satori_key *k, const uint8_t *page, uint64_t want, uint64_t *key)
{
    if (g_avx2 < 0) {
        __builtin_cpu_init();
        g_avx2 = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    if (!g_avx2) {
        if (satori_xxh64(page, PAGE, 0) != want)
            return 0;
        *key = keyed_hash(k, page);
        return 1;
    }
    uint64_t o[3];
    xxh_nh2_avx2(page, k, o);
    if (o[0] != want)
        return 0;
    uint64_t h = siphash16(k->sip, o + 1);
    *key = h ? h : 1;
    return 1;
}

/* ---------------------------------------------------------------- content index */

/* value of an entry: a store slot (top bit set) or a candidate (vm << 40 | page) */
#define V_SLOT (1ULL << 63)
#define V_CAND(vm, p) (((uint64_t)(vm) << 40) | (uint64_t)(p))
#define V_VM(v) ((uint32_t)(((v) >> 40) & 0x7fffff))
#define V_PG(v) ((v) & ((1ULL << 40) - 1))

struct ent {
    uint64_t key; /* 0: empty */
    uint64_t val;
};

/* ----------------------------------------------------------------------- state */

enum { F_REMAPPED = 1, F_PENDING = 2, F_UNCONFIRMED = 4 };

/* per VM counters, read by Python (harness/sharing/core.py mirrors this layout) */
struct vm_counters {
    uint64_t hinted;      /* records given to ingest */
    uint64_t skipped;     /* page already merged with that content: nothing to read */
    uint64_t changed;     /* page did not hash to the record (stale or forged), or unreadable */
    uint64_t broken;      /* merged pages found holding other bytes, or gone from the LIST */
    uint64_t planned;     /* merge pairs planned */
    uint64_t candidates;  /* first holders now */
    uint64_t evicted;     /* candidates evicted by the quota */
    uint64_t merged;      /* pages merged or planned now (the engine's books) */
    uint64_t pending;     /* pairs planned and not yet taken */
    uint64_t adopted;     /* pages the agent maps that the books had let go of */
    uint64_t unconfirmed; /* pages of failed batches dropped because the agent's LIST lacks them */
    uint64_t bad_list;    /* LIST entries outside the VM or the store */
    uint64_t version;     /* bumped whenever the books of this VM change */
    uint64_t pending_t0;  /* hint time (ns) of the oldest pending pair */
};

struct vmstate {
    int used;
    int fd_ram, fd_mem;
    const uint8_t *view; /* the engine's own read-only view of the RAM file (guarded), or NULL */
    uint64_t hva, npages, quota, clock;
    uint32_t *slot; /* per page: slot + 1 if merged or planned, 0 if not */
    uint64_t *cand; /* per page: key of its candidate entry, 0 if none */
    uint8_t *flag;  /* per page: F_* */
    uint32_t *seen; /* per page: generation of the last LIST that named it */
    uint32_t gen;
    uint64_t *pend; /* pairs (guest_off, store_off) */
    uint64_t *pend_t; /* hint time (ns) per pair */
    uint32_t npend, pend_cap;
    struct vm_counters c;
};

/* core-wide counters and profile, read by Python */
struct core_counters {
    uint64_t slots_hw;      /* slot numbers ever used (store size / 4096) */
    uint64_t slots_live;    /* slots holding content */
    uint64_t slots_freed;   /* slots punched, total */
    uint64_t slots_reused;  /* appends that took a freed slot */
    uint64_t appended;      /* pages appended to the store, total */
    uint64_t entries;       /* index entries now */
    uint64_t table_cap;     /* index capacity */
    uint64_t mem_bytes;     /* every allocation of the core now */
    uint64_t lost;          /* a LIST named a slot already freed: must stay 0 */
    uint64_t kept_listed;   /* unreferenced slots kept because some agent's LIST names them */
    uint64_t store_writes;  /* pwrite calls */
    uint64_t unreferenced;  /* slots no page references now, waiting for the agents' word */
    uint64_t slot_limit;    /* second holders not stored: max_slots reached (until a free) */
    uint64_t ns_read, ns_verify, ns_key, ns_index, ns_store; /* profile (when enabled; ns_verify
                                                              * includes the keyed hash, ns_key is 0) */
    uint64_t n_read, n_key;
};

struct core {
    struct satori_key key;
    struct ent *tab;
    uint64_t tab_cap, tab_n;
    int tab_bits;
    /* slots */
    uint64_t *slot_key, *slot_xxh;
    uint32_t *slot_refs;
    uint64_t *freemap;       /* bit set: slot free (punched, reusable) */
    uint64_t *zmark;         /* bit set: slot is in the zero list */
    uint64_t *zero;          /* slots whose refs fell to 0 (each once) */
    uint64_t max_slots;
    uint64_t nzero, zero_cap;
    uint64_t slot_cap, nfree, free_cursor;
    /* store */
    int store_fd;
    uint8_t *stage;          /* staging pages; the next page is read into stage[nstage] */
    uint64_t *stage_slot;
    uint32_t nstage, stage_cap;
    /* VMs */
    struct vmstate vms[MAX_VMS];
    uint32_t nvms;
    int full;                /* some VM's pending batch is full */
    int prof;
    /* pageread.c's SIGBUS guard, for reads through a view (see satori_core_set_view) */
    int (*bus_ready)(void);
    int (*copy_guarded)(void *dst, const void *src, size_t len);
    struct core_counters c;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    /* clock_gettime(2), vDSO: profile timestamps */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void *xcalloc(struct core *c, size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz);
    if (p)
        c->c.mem_bytes += n * sz;
    return p;
}

static void xfree(struct core *c, void *p, size_t bytes)
{
    if (p) {
        free(p);
        c->c.mem_bytes -= bytes;
    }
}

static int grow(struct core *c, void **p, size_t old_n, size_t new_n, size_t sz)
{
    void *q = realloc(*p, new_n * sz);
    if (!q)
        return -1;
    memset((uint8_t *)q + old_n * sz, 0, (new_n - old_n) * sz);
    c->c.mem_bytes += (new_n - old_n) * sz;
    *p = q;
    return 0;
}

/* ------------------------------------------------------------- table operations */

static inline uint64_t home(const struct core *c, uint64_t key)
{
    return (key * 0x9E3779B97F4A7C15ULL) >> (64 - c->tab_bits);
}

static struct ent *tab_find(struct core *c, uint64_t key)
{
    uint64_t mask = c->tab_cap - 1;
    for (uint64_t i = home(c, key);; i = (i + 1) & mask) {
        if (c->tab[i].key == key)
            return &c->tab[i];
        if (!c->tab[i].key)
            return NULL;
    }
}

static void tab_put_raw(struct core *c, uint64_t key, uint64_t val)
{
    uint64_t mask = c->tab_cap - 1;
    uint64_t i = home(c, key);
    while (c->tab[i].key)
        i = (i + 1) & mask;
    c->tab[i].key = key;
    c->tab[i].val = val;
}

static int tab_resize(struct core *c, int bits)
{
    struct ent *old = c->tab;
    uint64_t old_cap = c->tab_cap;
    struct ent *n = xcalloc(c, 1ULL << bits, sizeof *n);
    if (!n)
        return -1;
    c->tab = n;
    c->tab_cap = 1ULL << bits;
    c->tab_bits = bits;
    for (uint64_t i = 0; i < old_cap; i++)
        if (old[i].key)
            tab_put_raw(c, old[i].key, old[i].val);
    xfree(c, old, old_cap * sizeof *old);
    c->c.table_cap = c->tab_cap;
    return 0;
}

static int tab_insert(struct core *c, uint64_t key, uint64_t val)
{
    if ((c->tab_n + 1) * 2 > c->tab_cap && tab_resize(c, c->tab_bits + 1) < 0)
        return -1;
    tab_put_raw(c, key, val);
    c->tab_n++;
    c->c.entries = c->tab_n;
    return 0;
}

/* delete with backward shift (linear probing, no tombstones) */
static void tab_delete(struct core *c, struct ent *e)
{
    uint64_t mask = c->tab_cap - 1;
    uint64_t i = (uint64_t)(e - c->tab), j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!c->tab[j].key)
            break;
        uint64_t k = home(c, c->tab[j].key);
        /* move j back to i unless its home lies cyclically in (i, j] */
        int in_between = (i <= j) ? (k > i && k <= j) : (k > i || k <= j);
        if (!in_between) {
            c->tab[i] = c->tab[j];
            i = j;
        }
    }
    c->tab[i].key = 0;
    c->tab[i].val = 0;
    c->tab_n--;
    c->c.entries = c->tab_n;
}

/* ------------------------------------------------------------------------ slots */

static int slots_reserve(struct core *c, uint64_t want)
{
    if (want <= c->slot_cap)
        return 0;
    uint64_t n = c->slot_cap ? c->slot_cap : 1024;
    while (n < want)
        n *= 2;
    if (grow(c, (void **)&c->slot_key, c->slot_cap, n, 8) < 0 ||
        grow(c, (void **)&c->slot_xxh, c->slot_cap, n, 8) < 0 ||
        grow(c, (void **)&c->slot_refs, c->slot_cap, n, 4) < 0 ||
        grow(c, (void **)&c->freemap, (c->slot_cap + 63) / 64, (n + 63) / 64, 8) < 0 ||
        grow(c, (void **)&c->zmark, (c->slot_cap + 63) / 64, (n + 63) / 64, 8) < 0)
        return -1;
    c->slot_cap = n;
    return 0;
}

static inline int slot_is_free(const struct core *c, uint64_t s)
{
    return (c->freemap[s / 64] >> (s % 64)) & 1;
}

/* a slot for a new content: the next freed one after the cursor (freed slots come in runs, so
 * consecutive appends stay consecutive and the agent maps them with one mmap), else a new one */
static int64_t slot_alloc(struct core *c)
{
    if (c->nfree) {
        uint64_t words = (c->c.slots_hw + 63) / 64;
        uint64_t w = (c->free_cursor / 64) % words;
        uint64_t first = c->freemap[w] & (~0ULL << (c->free_cursor % 64));
        for (uint64_t k = 0; k <= words; k++) {
            uint64_t bits = k ? c->freemap[w] : first;
            if (bits) {
                uint64_t s = w * 64 + (uint64_t)__builtin_ctzll(bits);
                c->freemap[s / 64] &= ~(1ULL << (s % 64));
                c->nfree--;
                c->free_cursor = s + 1;
                c->c.slots_reused++;
                c->c.slots_live++;
                return (int64_t)s;
            }
            w = (w + 1) % words;
        }
    }
    if (c->c.slots_hw >= c->max_slots) {
        c->c.slot_limit++;
        return -ENOSPC;
    }
    if (slots_reserve(c, c->c.slots_hw + 1) < 0)
        return -ENOMEM;
    c->c.slots_live++;
    return (int64_t)c->c.slots_hw++;
}

static void zero_push(struct core *c, uint64_t s)
{
    if ((c->zmark[s / 64] >> (s % 64)) & 1)
        return;
    if (c->nzero == c->zero_cap) {
        uint64_t n = c->zero_cap ? c->zero_cap * 2 : 1024;
        if (grow(c, (void **)&c->zero, c->zero_cap, n, 8) < 0) {
            c->c.slot_limit++; /* out of memory: this slot stays unfreed (counted) */
            return;
        }
        c->zero_cap = n;
    }
    c->zmark[s / 64] |= 1ULL << (s % 64);
    c->zero[c->nzero++] = s;
    c->c.unreferenced = c->nzero;
}

/* ------------------------------------------------------------------------ store */

/* Write the staged appended pages to the store: one pwrite per run of consecutive slots. */
int satori_core_sync(struct core *c)
{
    uint64_t t0 = c->prof ? now_ns() : 0;
    uint32_t i = 0;
    while (i < c->nstage) {
        uint32_t j = i + 1;
        while (j < c->nstage && c->stage_slot[j] == c->stage_slot[j - 1] + 1)
            j++;
        size_t len = (size_t)(j - i) * PAGE, done = 0;
        off_t off = (off_t)(c->stage_slot[i] * PAGE);
        while (done < len) {
            /* pwrite(2): the pages of slots [i, j) into the store file (tmpfs or memfd) */
            ssize_t r = pwrite(c->store_fd, c->stage + (size_t)i * PAGE + done, len - done,
                               off + (off_t)done);
            c->c.store_writes++;
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return -errno; /* staged pages kept: the caller stops before any merge */
            }
            done += (size_t)r;
        }
        i = j;
    }
    c->nstage = 0;
    if (c->prof)
        c->c.ns_store += now_ns() - t0;
    return 0;
}

/* -------------------------------------------------------------------- lifecycle */

/* A core over the store file store_fd: key = sizeof(struct satori_key) random bytes; at most
 * stage_pages staged appends between writes, at most max_slots store slots in use. */
struct core *satori_core_new(const uint8_t *key, size_t key_len, int store_fd, uint32_t stage_pages,
                             uint64_t max_slots)
{
    if (key_len != sizeof(struct satori_key) || stage_pages == 0 || max_slots == 0)
        return NULL;
    struct core *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->c.mem_bytes = sizeof *c;
    memcpy(&c->key, key, sizeof c->key);
    c->store_fd = store_fd;
    c->max_slots = max_slots;
    c->stage_cap = stage_pages;
    c->stage = aligned_alloc(PAGE, (size_t)stage_pages * PAGE);
    c->stage_slot = xcalloc(c, stage_pages, 8);
    if (!c->stage || !c->stage_slot || tab_resize(c, 12) < 0 || slots_reserve(c, 1024) < 0) {
        free(c->stage);
        free(c->stage_slot);
        free(c->tab);
        free(c);
        return NULL;
    }
    c->c.mem_bytes += (size_t)stage_pages * PAGE;
    return c;
}

void satori_core_free(struct core *c)
{
    if (!c)
        return;
    for (uint32_t v = 0; v < c->nvms; v++) {
        struct vmstate *s = &c->vms[v];
        free(s->slot);
        free(s->cand);
        free(s->flag);
        free(s->seen);
        free(s->pend);
        free(s->pend_t);
    }
    free(c->tab);
    free(c->slot_key);
    free(c->slot_xxh);
    free(c->slot_refs);
    free(c->freemap);
    free(c->zmark);
    free(c->zero);
    free(c->stage);
    free(c->stage_slot);
    free(c);
}

/* Add a VM; returns its index or -errno. fd_ram may be -1 (anonymous RAM: read via fd_mem). */
int satori_core_add_vm(struct core *c, int fd_ram, int fd_mem, uint64_t hva, uint64_t ram_size,
                       uint64_t quota, uint32_t batch_pages)
{
    if (c->nvms >= MAX_VMS)
        return -ENOSPC;
    if (ram_size % PAGE || ram_size == 0 || ram_size / PAGE >= (1ULL << 40) || batch_pages == 0)
        return -EINVAL;
    struct vmstate *s = &c->vms[c->nvms];
    memset(s, 0, sizeof *s);
    s->fd_ram = fd_ram;
    s->fd_mem = fd_mem;
    s->hva = hva;
    s->npages = ram_size / PAGE;
    s->quota = quota;
    s->pend_cap = batch_pages;
    s->slot = xcalloc(c, s->npages, 4);
    s->cand = xcalloc(c, s->npages, 8);
    s->flag = xcalloc(c, s->npages, 1);
    s->seen = xcalloc(c, s->npages, 4);
    /* a record may plan two pages of one VM: room for the batch plus one more pair */
    s->pend = xcalloc(c, ((size_t)batch_pages + 2) * 2, 8);
    s->pend_t = xcalloc(c, (size_t)batch_pages + 2, 8);
    if (!s->slot || !s->cand || !s->flag || !s->seen || !s->pend || !s->pend_t)
        return -ENOMEM; /* freed with the core */
    s->used = 1;
    return (int)c->nvms++;
}

/*
 * Read VM v's RAM-file pages through `view` (the engine's own read-only shared mapping of the
 * file, registered with a userfaultfd in missing mode with UFFD_FEATURE_SIGBUS: harness/oracle.py
 * RamMirror) instead of one pread(2) per page: a system call costs 1-3 us on a host like this one.
 * The page is still copied once into the staging buffer and verified there (what is verified is
 * what the store gets). A page punched out of the file since (an agent's merge, a balloon) raises
 * SIGBUS in the view instead of being allocated; `copy_guarded` (pageread.c) catches it and gives
 * zeros, as pread of a hole reads; `bus_ready` installs that handler (once per ingest call).
 * view 0: back to pread. 0, or -EINVAL.
 */
int satori_core_set_view(struct core *c, uint32_t v, uint64_t view, void *bus_ready, void *copy_guarded)
{
    if (v >= c->nvms || !c->vms[v].used || c->vms[v].fd_ram < 0 || (view && (!bus_ready || !copy_guarded)))
        return -EINVAL;
    c->vms[v].view = (const uint8_t *)(uintptr_t)view;
    if (view) {
        c->bus_ready = (int (*)(void))bus_ready;
        c->copy_guarded = (int (*)(void *, const void *, size_t))copy_guarded;
    }
    return 0;
}

/* ----------------------------------------------------------------- bookkeeping */

static void cand_remove(struct core *c, uint32_t v, uint64_t p)
{
    struct vmstate *s = &c->vms[v];
    uint64_t k = s->cand[p];
    if (!k)
        return;
    struct ent *e = tab_find(c, k);
    if (e && e->val == V_CAND(v, p))
        tab_delete(c, e);
    s->cand[p] = 0;
    s->c.candidates--;
}

static void evict_one(struct core *c, uint32_t v)
{
    struct vmstate *s = &c->vms[v];
    for (uint64_t n = 0; n < s->npages; n++) {
        uint64_t p = s->clock++ % s->npages;
        if (s->cand[p]) {
            cand_remove(c, v, p);
            s->c.evicted++;
            return;
        }
    }
}

static void unref(struct core *c, uint32_t v, uint64_t p)
{
    struct vmstate *s = &c->vms[v];
    uint64_t sl = s->slot[p] - 1;
    s->slot[p] = 0;
    s->c.merged--;
    s->c.version++;
    if (--c->slot_refs[sl] == 0)
        zero_push(c, sl);
}

static void plan(struct core *c, uint32_t v, uint64_t p, uint64_t sl, uint64_t t)
{
    struct vmstate *s = &c->vms[v];
    if (s->cand[p])
        cand_remove(c, v, p);
    if (s->slot[p])
        unref(c, v, p);
    if (!s->npend)
        s->c.pending_t0 = t;
    s->pend[2 * s->npend] = p * PAGE;
    s->pend[2 * s->npend + 1] = sl * PAGE;
    s->pend_t[s->npend] = t;
    s->npend++;
    s->c.pending = s->npend;
    s->c.planned++;
    s->slot[p] = (uint32_t)(sl + 1);
    s->flag[p] |= F_REMAPPED | F_PENDING;
    s->c.merged++;
    s->c.version++;
    c->slot_refs[sl]++;
    if (s->npend >= s->pend_cap)
        c->full = 1;
}

/* The agent maps page p of VM v from slot sl and the books did not hold that: take its word. */
static void adopt(struct core *c, uint32_t v, uint64_t p, uint64_t sl)
{
    struct vmstate *s = &c->vms[v];
    if (slot_is_free(c, sl)) {
        /* we punched a slot this VM maps: must never happen (counted, tests check 0); take
         * the slot back so that at least nothing else is written there */
        c->c.lost++;
        c->freemap[sl / 64] &= ~(1ULL << (sl % 64));
        c->nfree--;
        c->c.slots_live++;
        c->slot_key[sl] = 0;
        c->slot_xxh[sl] = 0;
    }
    if (s->slot[p])
        unref(c, v, p);
    if (s->cand[p])
        cand_remove(c, v, p);
    s->slot[p] = (uint32_t)(sl + 1);
    s->flag[p] = (uint8_t)((s->flag[p] | F_REMAPPED) & ~F_UNCONFIRMED);
    s->c.merged++;
    s->c.adopted++;
    s->c.version++;
    c->slot_refs[sl]++;
}

/* --------------------------------------------------------------------- ingest */

/*
 * Take n hint records of VM v (the ring's 32-byte records: u64 gpa at +0, u64 xxh64 at +8;
 * `stride` bytes apart), read at time t_ns. Returns how many were consumed (fewer than n when
 * some VM's pending batch became full: take it, then call again with the rest), or -errno
 * (store write failed, out of memory: nothing half done for the record that failed).
 */
static int64_t ingest(struct core *c, uint32_t v, const uint8_t *recs, size_t stride, size_t n,
                      uint64_t t_ns, const uint8_t *view, uint64_t *view_lo, uint64_t *view_hi)
{
    struct vmstate *s = &c->vms[v];
    int prof = c->prof;
    uint64_t t0 = 0, t1 = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        if (c->full)
            break;
        uint64_t gpa = rd64(recs + i * stride), h = rd64(recs + i * stride + 8);
        uint64_t p = gpa / PAGE;
        if ((gpa & (PAGE - 1)) || p >= s->npages) {
            s->c.changed++; /* the ring reader refuses these; never trust it blindly */
            continue;
        }
        s->c.hinted++;
        uint32_t cur = s->slot[p];
        if (cur && c->slot_xxh[cur - 1] == h && !slot_is_free(c, cur - 1)) {
            s->c.skipped++; /* merged (or planned) with this content already */
            continue;
        }
        if (c->nstage == c->stage_cap) {
            int e = satori_core_sync(c);
            if (e < 0)
                return e;
        }
        uint8_t *page = c->stage + (size_t)c->nstage * PAGE;
        if (prof)
            t0 = now_ns();
        ssize_t r;
        if (s->fd_ram < 0 || (s->flag[p] & F_REMAPPED))
            /* pread(2) of /proc/<pid>/mem: the page as QEMU maps it (store page or private
             * copy); a read fault there never allocates */
            r = pread(s->fd_mem, page, PAGE, (off_t)(s->hva + gpa));
        else if (view) {
            /* a page never merged, copied from the engine's view of the RAM file: no system
             * call; a hole (punched since) reads as zeros and stays a hole */
            c->copy_guarded(page, view + gpa, PAGE);
            r = (ssize_t)PAGE;
            if (gpa < *view_lo)
                *view_lo = gpa;
            if (gpa + PAGE > *view_hi)
                *view_hi = gpa + PAGE;
        } else
            /* pread(2) of the RAM file: a page never merged; a hole reads as zeros */
            r = pread(s->fd_ram, page, PAGE, (off_t)gpa);
        if (prof) {
            t1 = now_ns();
            c->c.ns_read += t1 - t0;
            c->c.n_read++;
        }
        uint64_t k = 0;
        int ok = r == (ssize_t)PAGE && verify_and_key(&c->key, page, h, &k);
        if (prof) {
            t0 = now_ns();
            c->c.ns_verify += t0 - t1; /* XXH64 and the keyed hash, one pass */
            c->c.n_key += ok;
            t1 = t0;
        }
        if (!ok) {
            s->c.changed++;
            continue;
        }
        if (cur && c->slot_key[cur - 1] == k) {
            s->c.skipped++; /* the same content under another xxh64: impossible, but harmless */
        } else {
            if (cur && !(s->flag[p] & F_PENDING)) {
                s->c.broken++; /* a merged page holds other bytes now: the guest wrote it */
            }
            struct ent *e = tab_find(c, k);
            if (e && (e->val & V_SLOT)) {
                plan(c, v, p, e->val & ~V_SLOT, t_ns);
            } else if (e) {
                uint32_t v2 = V_VM(e->val);
                uint64_t p2 = V_PG(e->val);
                if (!(v2 == v && p2 == p)) {
                    /* the second holder: its bytes (in the staging page) become the slot */
                    int64_t sl = slot_alloc(c);
                    if (sl == -ENOMEM)
                        return -ENOMEM;
                    if (sl < 0)
                        goto next; /* max_slots in use: the pair waits for a later hint */
                    c->stage_slot[c->nstage++] = (uint64_t)sl;
                    c->c.appended++;
                    c->slot_key[sl] = k;
                    c->slot_xxh[sl] = h;
                    c->slot_refs[sl] = 0;
                    e->val = V_SLOT | (uint64_t)sl; /* the key now names the slot */
                    c->vms[v2].cand[p2] = 0;
                    c->vms[v2].c.candidates--;
                    plan(c, v2, p2, (uint64_t)sl, t_ns);
                    plan(c, v, p, (uint64_t)sl, t_ns);
                } else if (cur) {
                    unref(c, v, p); /* (a candidate is never merged: cannot happen) */
                }
            } else {
                /* a first holder */
                if (cur)
                    unref(c, v, p);
                if (s->cand[p])
                    cand_remove(c, v, p);
                if (s->quota) {
                    if (s->c.candidates >= s->quota)
                        evict_one(c, v);
                    if (tab_insert(c, k, V_CAND(v, p)) < 0)
                        return -ENOMEM;
                    s->cand[p] = k;
                    s->c.candidates++;
                }
            }
        }
    next:
        if (prof)
            c->c.ns_index += now_ns() - t1;
    }
    return (int64_t)i;
}

int64_t satori_core_ingest(struct core *c, uint32_t v, const uint8_t *recs, size_t stride, size_t n,
                           uint64_t t_ns)
{
    if (v >= c->nvms || !c->vms[v].used)
        return -EINVAL;
    struct vmstate *s = &c->vms[v];
    /* the SIGBUS guard in place before the first read through the view (else: pread) */
    const uint8_t *view = s->view && c->bus_ready() == 0 ? s->view : NULL;
    uint64_t lo = UINT64_MAX, hi = 0;
    int64_t r = ingest(c, v, recs, stride, n, t_ns, view, &lo, &hi);
    if (lo < hi)
        /* madvise(2) MADV_DONTNEED: drop the view's page-table entries of the pages just read
         * (the file keeps them). Kept, every later punch of those pages (a merge agent's, right
         * after it maps the store over them) would have to unmap them from this process too:
         * measured, that nearly doubles the punch (one mapping more for the kernel to zap and a
         * TLB flush here). One call per batch. */
        madvise((void *)(view + lo), hi - lo, MADV_DONTNEED);
    return r;
}

/* ------------------------------------------------------------- pending batches */

/* Copy VM v's pending pairs (n x 2 u64) and their hint times out and clear the batch; the pages
 * become unconfirmed until the agent's result (core_confirm) or LIST (core_reconcile) says. */
int64_t satori_core_take(struct core *c, uint32_t v, uint64_t *pairs, uint64_t *times, size_t cap)
{
    if (v >= c->nvms)
        return -EINVAL;
    struct vmstate *s = &c->vms[v];
    if (cap < s->npend)
        return -ENOSPC;
    uint32_t n = s->npend;
    memcpy(pairs, s->pend, (size_t)n * 16);
    memcpy(times, s->pend_t, (size_t)n * 8);
    for (uint32_t i = 0; i < n; i++) {
        uint64_t p = s->pend[2 * i] / PAGE;
        s->flag[p] = (uint8_t)((s->flag[p] & ~F_PENDING) | F_UNCONFIRMED);
    }
    s->npend = 0;
    s->c.pending = 0;
    c->full = 0;
    for (uint32_t w = 0; w < c->nvms; w++)
        if (c->vms[w].npend >= c->vms[w].pend_cap)
            c->full = 1;
    return n;
}

/* The agent merged every pair of the batch: the pages are confirmed. */
void satori_core_confirm(struct core *c, uint32_t v, const uint64_t *pairs, size_t n)
{
    struct vmstate *s = &c->vms[v];
    for (size_t i = 0; i < n; i++) {
        uint64_t p = pairs[2 * i] / PAGE;
        if (p < s->npages)
            s->flag[p] &= (uint8_t)~F_UNCONFIRMED;
    }
}

/* Per guest offset: the slot the books hold for it (-1 if none). */
void satori_core_lookup(struct core *c, uint32_t v, const uint64_t *gpas, size_t n, int64_t *out)
{
    struct vmstate *s = &c->vms[v];
    for (size_t i = 0; i < n; i++) {
        uint64_t p = gpas[i] / PAGE;
        out[i] = (p < s->npages && s->slot[p]) ? (int64_t)s->slot[p] - 1 : -1;
    }
}

/* ------------------------------------------------------------ reconcile & free */

/*
 * Reset VM v's books to its agent's LIST (ranges: m x (guest_off, store_off, npages), the pages
 * mapped from the store and not faulted private). Pages with a plan not yet sent are left alone.
 * A page the books hold and the LIST lacks: broken (the guest wrote it), or, if its batch's
 * result was lost or missed, dropped as unconfirmed. A page the LIST names that the books lack
 * (or hold with another slot): adopted. Returns the pages counted broken.
 */
int64_t satori_core_reconcile(struct core *c, uint32_t v, const uint64_t *ranges, size_t m)
{
    if (v >= c->nvms)
        return -EINVAL;
    struct vmstate *s = &c->vms[v];
    if (++s->gen == 0) {
        memset(s->seen, 0, s->npages * 4);
        s->gen = 1;
    }
    uint32_t gen = s->gen;
    for (size_t r = 0; r < m; r++) {
        uint64_t g = ranges[3 * r], so = ranges[3 * r + 1], np = ranges[3 * r + 2];
        if ((g | so) & (PAGE - 1)) {
            s->c.bad_list++;
            continue;
        }
        for (uint64_t k = 0; k < np; k++) {
            uint64_t p = g / PAGE + k, sl = so / PAGE + k;
            if (p >= s->npages || sl >= c->c.slots_hw) {
                s->c.bad_list++;
                continue;
            }
            s->seen[p] = gen;
            if (s->slot[p] == sl + 1) {
                s->flag[p] &= (uint8_t)~F_UNCONFIRMED;
                continue;
            }
            if (s->flag[p] & F_PENDING)
                continue; /* a newer plan is on its way; the listed slot stays protected */
            adopt(c, v, p, sl);
        }
    }
    int64_t broken = 0;
    for (uint64_t p = 0; p < s->npages; p++) {
        if (!s->slot[p] || s->seen[p] == gen || (s->flag[p] & F_PENDING))
            continue;
        unref(c, v, p);
        if (s->flag[p] & F_UNCONFIRMED) {
            s->flag[p] &= (uint8_t)~F_UNCONFIRMED;
            s->c.unconfirmed++;
        } else {
            s->c.broken++;
            broken++;
        }
    }
    return broken;
}

/*
 * The agent's per-pair answer to a batch (status[i]: 0 merged, 1 mismatched, 2 failed), in
 * the batch's order: merged pages are confirmed (or taken back if the books had let go of
 * them), the others dropped from the books unless planned again since. Returns pages dropped.
 */
int64_t satori_core_settle(struct core *c, uint32_t v, const uint64_t *pairs, const uint8_t *status,
                           size_t n)
{
    if (v >= c->nvms)
        return -EINVAL;
    struct vmstate *s = &c->vms[v];
    int64_t dropped = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t p = pairs[2 * i] / PAGE, sl = pairs[2 * i + 1] / PAGE;
        if (p >= s->npages || sl >= c->c.slots_hw)
            continue;
        if (status[i] == 0) {
            if (s->slot[p] == sl + 1) {
                s->flag[p] &= (uint8_t)~F_UNCONFIRMED;
                continue;
            }
            if (s->flag[p] & F_PENDING)
                continue; /* planned again: the next batch decides */
            adopt(c, v, p, sl);
        } else if (s->slot[p] == sl + 1 && !(s->flag[p] & F_PENDING)) {
            unref(c, v, p);
            s->flag[p] &= (uint8_t)~F_UNCONFIRMED;
            s->c.unconfirmed++;
            dropped++;
        }
    }
    return dropped;
}

/*
 * Pages the agent saw break copy-on-write (ranges: m x (guest_off, store_off, npages)): each one
 * the books hold with that very slot, and not planned again since, is dropped and counted broken.
 * Returns the pages counted.
 */
int64_t satori_core_apply_breaks(struct core *c, uint32_t v, const uint64_t *ranges, size_t m)
{
    if (v >= c->nvms)
        return -EINVAL;
    struct vmstate *s = &c->vms[v];
    int64_t broken = 0;
    for (size_t r = 0; r < m; r++) {
        uint64_t g = ranges[3 * r], so = ranges[3 * r + 1], np = ranges[3 * r + 2];
        if ((g | so) & (PAGE - 1)) {
            s->c.bad_list++;
            continue;
        }
        for (uint64_t k = 0; k < np; k++) {
            uint64_t p = g / PAGE + k, sl = so / PAGE + k;
            if (p >= s->npages) {
                s->c.bad_list++;
                break;
            }
            if (s->slot[p] != sl + 1 || (s->flag[p] & F_PENDING))
                continue;
            unref(c, v, p);
            s->flag[p] &= (uint8_t)~F_UNCONFIRMED;
            s->c.broken++;
            broken++;
        }
    }
    return broken;
}

/* The slots no page references now (candidates for freeing), up to cap of them. */
int64_t satori_core_unreferenced(struct core *c, uint64_t *out, size_t cap)
{
    size_t k = 0;
    for (uint64_t i = 0; i < c->nzero && k < cap; i++) {
        uint64_t sl = c->zero[i];
        if (!c->slot_refs[sl] && !slot_is_free(c, sl))
            out[k++] = sl;
    }
    return (int64_t)k;
}

static int64_t free_one(struct core *c, uint64_t sl)
{
    struct ent *en = tab_find(c, c->slot_key[sl]);
    if (en && en->val == (V_SLOT | sl))
        tab_delete(c, en);
    /* fallocate(2) PUNCH_HOLE|KEEP_SIZE: free the page's memory; the file keeps its size
     * (a shrinking file would SIGBUS the QEMUs that map it) */
    if (fallocate(c->store_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(sl * PAGE),
                  (off_t)PAGE) < 0)
        return -errno;
    c->slot_key[sl] = 0;
    c->slot_xxh[sl] = 0;
    c->freemap[sl / 64] |= 1ULL << (sl % 64);
    c->nfree++;
    c->c.slots_live--;
    c->c.slots_freed++;
    return 0;
}

/*
 * Free these slots (a subset of core_unreferenced()) that still no page references. The caller
 * must hold, for each of them, the word of EVERY agent that it maps none of them (e.g. the
 * agents' MAPPED answers); otherwise use core_free_unused with every agent's LIST.
 * Returns the slots freed, or -errno.
 */
int64_t satori_core_free_slots(struct core *c, const uint64_t *slots, size_t n)
{
    int e = satori_core_sync(c);
    if (e < 0)
        return e;
    int64_t freed = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t sl = slots[i];
        if (sl >= c->c.slots_hw || c->slot_refs[sl] || slot_is_free(c, sl))
            continue;
        int64_t r = free_one(c, sl);
        if (r < 0)
            return r;
        freed++;
    }
    /* drop the freed (and re-referenced) ones from the zero list */
    uint64_t keep = 0;
    for (uint64_t i = 0; i < c->nzero; i++) {
        uint64_t sl = c->zero[i];
        if (c->slot_refs[sl] || slot_is_free(c, sl)) {
            c->zmark[sl / 64] &= ~(1ULL << (sl % 64));
            continue;
        }
        c->zero[keep++] = sl;
    }
    c->nzero = keep;
    c->c.unreferenced = keep;
    return freed;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* whether store page `so` lies in one of the m sorted (store_off, npages) spans */
static int spans_hold(const uint64_t *spans, size_t m, uint64_t so)
{
    size_t lo = 0, hi = m;
    while (lo < hi) { /* last span starting at or before so */
        size_t mid = (lo + hi) / 2;
        if (spans[2 * mid] <= so)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo > 0 && so < spans[2 * (lo - 1)] + spans[2 * (lo - 1) + 1] * PAGE;
}

/*
 * Free the slots no reference is counted for and no agent's LIST names. lists/counts: the
 * current LIST reply of EVERY agent of the core (nv of them, in any order; ranges as in
 * core_reconcile). The caller must not call this unless it holds every agent's LIST from now.
 * Frees = removes the content from the index, punches the store page, makes the slot reusable.
 * Returns the slots freed, or -errno.
 */
int64_t satori_core_free_unused(struct core *c, const uint64_t *const *lists, const size_t *counts,
                                size_t nv)
{
    if (nv != c->nvms)
        return -EINVAL;
    if (!c->nzero)
        return 0;
    int e = satori_core_sync(c);
    if (e < 0)
        return e;
    size_t total = 0;
    for (size_t v = 0; v < nv; v++)
        total += counts[v];
    uint64_t *spans = malloc((total ? total : 1) * 16);
    if (!spans)
        return -ENOMEM;
    size_t m = 0;
    for (size_t v = 0; v < nv; v++)
        for (size_t r = 0; r < counts[v]; r++) {
            spans[2 * m] = lists[v][3 * r + 1];
            spans[2 * m + 1] = lists[v][3 * r + 2];
            m++;
        }
    qsort(spans, m, 16, cmp_u64); /* sorts by store_off (the first u64 of each 16 bytes) */
    int64_t freed = 0;
    uint64_t keep = 0;
    for (uint64_t i = 0; i < c->nzero; i++) {
        uint64_t sl = c->zero[i];
        c->zmark[sl / 64] &= ~(1ULL << (sl % 64));
        if (c->slot_refs[sl] || slot_is_free(c, sl))
            continue; /* referenced again since */
        if (spans_hold(spans, m, sl * PAGE)) {
            c->c.kept_listed++;
            c->zmark[sl / 64] |= 1ULL << (sl % 64);
            c->zero[keep++] = sl; /* try again at the next check */
            continue;
        }
        int64_t r = free_one(c, sl);
        if (r < 0) {
            int err = (int)-r;
            /* keep this slot and the rest for the next try */
            for (uint64_t j = i; j < c->nzero; j++) {
                c->zmark[c->zero[j] / 64] |= 1ULL << (c->zero[j] % 64);
                c->zero[keep++] = c->zero[j];
            }
            c->nzero = keep;
            c->c.unreferenced = keep;
            free(spans);
            return -err;
        }
        freed++;
    }
    c->nzero = keep;
    c->c.unreferenced = keep;
    free(spans);
    return freed;
}

/* --------------------------------------------------------------- figures & tests */

void satori_core_profile(struct core *c, int on) { c->prof = on; }

/* bytes of the core's fixed part (counted in mem_bytes from the start) */
size_t satori_core_base_bytes(void) { return sizeof(struct core); }

int satori_core_counters(struct core *c, struct core_counters *out)
{
    *out = c->c;
    return 0;
}

int satori_core_vm_counters(struct core *c, uint32_t v, struct vm_counters *out)
{
    if (v >= c->nvms)
        return -EINVAL;
    *out = c->vms[v].c;
    return 0;
}

uint64_t satori_core_keyed(struct core *c, const uint8_t *page) { return keyed_hash(&c->key, page); }

/* verify_and_key as ingest runs it: 1 and *key if the page's XXH64 is want, else 0 */
int satori_core_verify_key(struct core *c, const uint8_t *page, uint64_t want, uint64_t *key)
{
    return verify_and_key(&c->key, page, want, key);
}

/* the NH pair alone, scalar or AVX2 (tests compare both) */
void satori_core_nh(struct core *c, const uint8_t *page, int avx2, uint64_t out[2])
{
    if (avx2)
        nh2_avx2(page, &c->key, out);
    else
        nh2_scalar(page, &c->key, out);
}

int satori_core_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}

/* slot -> (key, xxh64, refs, free); -1 if out of range */
int satori_core_slot(struct core *c, uint64_t sl, uint64_t out[4])
{
    if (sl >= c->c.slots_hw)
        return -1;
    out[0] = c->slot_key[sl];
    out[1] = c->slot_xxh[sl];
    out[2] = c->slot_refs[sl];
    out[3] = (uint64_t)slot_is_free(c, sl);
    return 0;
}

/* what the index says for a key: 0 none, 1 slot (out = slot), 2 candidate (out = vm, page) */
int satori_core_find(struct core *c, uint64_t key, uint64_t out[2])
{
    struct ent *e = tab_find(c, key);
    if (!e)
        return 0;
    if (e->val & V_SLOT) {
        out[0] = e->val & ~V_SLOT;
        return 1;
    }
    out[0] = V_VM(e->val);
    out[1] = V_PG(e->val);
    return 2;
}

/*
 * The floor of one merge per page, for benchmarks/engine_cost.py: over n pages (n >= 64) of
 * anonymous memory, out_ns[0] = ns per memcmp of a 4 KiB page with a page of the file fd,
 * out_ns[1] = ns per page of mapping fd's page 0..63 over them MAP_FIXED|MAP_PRIVATE in runs
 * of 64 pages (one page-table change per page at the next touch, which is timed too),
 * out_ns[2] = the same one page per mmap (scattered merges). fd must hold 64 pages.
 */
int satori_core_probe_limit(int fd, size_t n, uint64_t out_ns[3])
{
    if (n < 64)
        return -EINVAL;
    n -= n % 64;
    size_t len = n * PAGE;
    /* mmap(2): scratch anonymous memory standing in for guest RAM */
    uint8_t *ram = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ram == MAP_FAILED)
        return -errno;
    /* mmap(2): a read-only view of the file standing in for the store */
    uint8_t *store = mmap(NULL, 64 * PAGE, PROT_READ, MAP_SHARED, fd, 0);
    if (store == MAP_FAILED) {
        int e = errno;
        munmap(ram, len);
        return -e;
    }
    for (size_t i = 0; i < n; i++)
        memcpy(ram + i * PAGE, store + (i % 64) * PAGE, PAGE);
    volatile uint64_t sink = 0;
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < n; i++)
        sink += memcmp(ram + i * PAGE, store + (i % 64) * PAGE, PAGE) == 0;
    uint64_t t1 = now_ns();
    int err = 0;
    for (size_t i = 0; i < n && !err; i += 64) {
        /* mmap(2) MAP_FIXED|MAP_PRIVATE: 64 store pages over 64 "guest" pages, one call */
        if (mmap(ram + i * PAGE, 64 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd, 0) ==
            MAP_FAILED)
            err = errno;
        for (size_t k = 0; k < 64; k++)
            sink += ram[(i + k) * PAGE]; /* the read fault that installs the page-table entry */
    }
    uint64_t t2 = now_ns();
    for (size_t i = 0; i < n && !err; i++) {
        /* mmap(2) MAP_FIXED|MAP_PRIVATE: one store page over one "guest" page */
        if (mmap(ram + i * PAGE, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, fd,
                 (off_t)((i % 64) * PAGE)) == MAP_FAILED)
            err = errno;
        sink += ram[i * PAGE];
    }
    uint64_t t3 = now_ns();
    /* munmap(2): drop both scratch mappings */
    munmap(ram, len);
    munmap(store, 64 * PAGE);
    if (err)
        return -err;
    out_ns[0] = (t1 - t0) / n;
    out_ns[1] = (t2 - t1) / n;
    out_ns[2] = (t3 - t2) / n;
    return (int)(sink & 0);
}
