/*
 * satori host hints: a shared library preloaded (LD_PRELOAD) into a stock qemu-system-x86_64
 * that reports what a guest reads from its disk, for ANY guest kernel (no guest patch).
 *
 * QEMU 7.2's block layer, with the harness's drive (qcow2 overlay over a raw base,
 * cache=writeback, aio=threads), reads guest data with preadv64()/pread64() from its thread
 * pool straight into guest RAM (file-posix handle_aiocb_rw: one iovec -> pread, several ->
 * preadv; qcow2 and raw pass the guest's scatter list down unchanged). This library wraps those
 * calls: after the real call returned n > 0 bytes, every whole, page-aligned 4 KiB page of the
 * first n bytes that lies in guest RAM is hashed (xxh64, seed 0) and pushed as one record
 * (guest address, hash, sector, disk) into a hint ring of the same format the patched guest
 * driver fills (docs/hint-ring.md). The harness's engine reads the ring as it reads a guest's:
 * it re-reads and re-hashes every page before acting, so nothing here is trusted more than a
 * guest's word.
 *
 * In host mode the record's fields mean:
 *   gpa     guest-physical address (= offset in the RAM backend; the harness keeps guest RAM
 *           below the PCI hole, where the two are equal)
 *   hash    xxh64 of the page right after the read returned
 *   sector  byte offset of the page in the IMAGE FILE it came from / 512 (not the guest's sector:
 *           a qcow2 overlay cluster sits anywhere in its file)
 *   disk    index of that image file in SATORI_HOSTHINTS_DISKS (0 = the first listed)
 *
 * Environment (read once by the constructor, then removed, with this library from LD_PRELOAD,
 * so that programs QEMU may start do not load it):
 *   SATORI_HOSTHINTS_RING   path of the ring file the harness created (header initialised);
 *                           unset = the library stays inert (every call passes straight through)
 *   SATORI_HOSTHINTS_RAM    path of the guest RAM backend file (mem-path=, or a /proc/.../fd/N
 *                           link to it); found in /proc/self/maps by device and inode, lazily
 *                           (QEMU maps RAM after the constructor ran)
 *   SATORI_HOSTHINTS_DISKS  the image files whose reads are reported, separated by ':'
 *                           (the overlay and its backing file); reads of other files are not
 *
 * Which calls: pread64, pread, preadv64, preadv, preadv64v2, preadv2 (QEMU 7.2 imports pread64
 * and preadv64; the others are the same functions under their other glibc names, or the
 * flags variant other builds use). Not covered: aio=native (io_submit of
 * libaio: the data lands after io_getevents) and aio=io_uring (liburing): the harness never
 * configures them (its -drive has no aio=, QEMU's default is threads). Reads QEMU makes into its own
 * buffers (qcow2 metadata, bounce buffers) are not in guest RAM and are ignored.
 *
 * Producer side of the ring (docs/hint-ring.md "Protocol" 2-3): the header is checked as the
 * guest module checks it; we continue from its producer; records are written under one mutex
 * (QEMU's thread-pool workers read concurrently), then the producer is stored with release
 * order. The expensive part, xxh64 over 4 KiB, is done before taking the lock. A full ring drops
 * and counts; a call never blocks on the consumer.
 *
 * Counters of a host producer (in the header's guest-written area, zero for a guest producer):
 *   80  partial   u64  pieces of reads into guest RAM that were not whole aligned pages
 *   96  hh_calls  u64  read calls whose destination lay (partly) in guest RAM
 *   104 hh_cpu_ns u64  thread CPU time spent in this library's work after the reads (hash, push)
 *   112 hh_pages  u64  whole pages hashed (records pushed + dropped)
 *   120 hh_other  u64  reads into guest RAM from files not in SATORI_HOSTHINTS_DISKS (ignored)
 *
 * Build: cc -O2 -Wall -Werror -fPIC -shared -pthread -o satori_hosthints.so hosthints.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define PG 4096ULL
#define MAX_DISKS 8
#define BATCH 64 /* records hashed, then pushed under one lock acquisition */

/* ring format version 1 (docs/hint-ring.md) */
#define RING_MAGIC 0x524849524f544153ULL /* "SATORIHR" */
#define RING_VERSION 1
#define HEADER_SIZE 4096
#define RECORD_SIZE 32
#define FLAG_VALID 1
#define OFF_MAGIC 0
#define OFF_VERSION 8
#define OFF_HEADER_SIZE 12
#define OFF_RECORD_SIZE 16
#define OFF_CAPACITY 20
#define OFF_PRODUCER 64
#define OFF_DROPPED 72
#define OFF_PARTIAL 80
#define OFF_GUEST_STATE 88
#define OFF_GUEST_VERSION 92
#define OFF_HH_CALLS 96
#define OFF_HH_CPU_NS 104
#define OFF_HH_PAGES 112
#define OFF_HH_OTHER 120
#define OFF_CONSUMER 128

struct record {
    uint64_t gpa;
    uint64_t hash;
    uint64_t sector;
    uint16_t disk;
    uint16_t flags;
    uint32_t seq;
};
_Static_assert(sizeof(struct record) == RECORD_SIZE, "record layout");

/* ---- the real functions ---- */
static ssize_t (*real_pread64)(int, void *, size_t, off_t);
static ssize_t (*real_preadv64)(int, const struct iovec *, int, off_t);
static ssize_t (*real_preadv64v2)(int, const struct iovec *, int, off_t, int);

/* ---- state: set by the constructor (ring, disks) or once by ram_lookup (RAM), then read-only ---- */
static int g_on;                     /* the ring is attached: report reads */
static uint8_t *g_ring;              /* the whole ring file, MAP_SHARED */
static uint64_t g_cap;               /* capacity in records (our own copy, never re-read) */
static struct record *g_recs;
static char *g_ram_path;
static uintptr_t g_ram_base;         /* hva of guest-physical 0, once found */
static uint64_t g_ram_size;
static int g_ram_state;              /* 0 not looked up yet or not found, 1 found */
static uint64_t g_ram_next_ns;       /* not found yet: next look no sooner than this */
static unsigned g_ram_looks;         /* looks that found nothing */
static pthread_mutex_t g_ram_lock = PTHREAD_MUTEX_INITIALIZER;
static struct { dev_t dev; ino_t ino; int ok; } g_disks[MAX_DISKS];
static int g_ndisks;

static pthread_mutex_t g_push_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t g_prod; /* our producer position (under g_push_lock) */

static void logmsg(const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof buf)
        n = sizeof buf - 1;
    /* write(2): to QEMU's stderr (its log); best effort */
    ssize_t r = write(2, buf, (size_t)n);
    (void)r;
}

/* ---- xxh64, seed 0 (the published XXH64 specification; the same function as core.c's satori_xxh64) ---- */
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

/* xxh64 of one 4096-byte page (a multiple of 32 bytes: no tail but the 8-byte lanes) */
static uint64_t xxh64_page(const uint8_t *p)
{
    const uint8_t *end = p + PG, *limit = end - 32;
    uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = -P1;
    do {
        v1 = round64(v1, rd64(p));
        v2 = round64(v2, rd64(p + 8));
        v3 = round64(v3, rd64(p + 16));
        v4 = round64(v4, rd64(p + 24));
        p += 32;
    } while (p <= limit);
    uint64_t h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
    h = merge64(h, v1);
    h = merge64(h, v2);
    h = merge64(h, v3);
    h = merge64(h, v4);
    h += PG;
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

/* ---- header access ---- */
static inline uint64_t *h64(size_t off) { return (uint64_t *)(g_ring + off); }
static inline uint32_t *h32(size_t off) { return (uint32_t *)(g_ring + off); }

static inline void count(size_t off, uint64_t n)
{
    if (n)
        __atomic_fetch_add(h64(off), n, __ATOMIC_RELAXED);
}

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    /* clock_gettime(2) CLOCK_THREAD_CPUTIME_ID: CPU this thread spent (our hashing and pushes) */
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) != 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- guest RAM: the mapping of SATORI_HOSTHINTS_RAM in /proc/self/maps ---- */
static void ram_lookup(void)
{
    pthread_mutex_lock(&g_ram_lock);
    struct timespec ts;
    /* clock_gettime(2): after 32 vain looks (QEMU's start-up reads come before RAM is mapped),
     * a RAM path that never appears costs one look per 100 ms, not one per read */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    uint64_t now = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    if (g_ram_state || now < g_ram_next_ns) {
        pthread_mutex_unlock(&g_ram_lock);
        return;
    }
    if (++g_ram_looks > 32)
        g_ram_next_ns = now + 100000000ULL;
    struct stat sb;
    /* stat(2): device, inode and size of the RAM backend (QEMU created it by now, or not yet) */
    if (stat(g_ram_path, &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size <= 0) {
        pthread_mutex_unlock(&g_ram_lock);
        return;
    }
    /* fopen(3) /proc/self/maps: where QEMU mapped that file */
    FILE *f = fopen("/proc/self/maps", "re");
    if (!f) {
        pthread_mutex_unlock(&g_ram_lock);
        return;
    }
    char line[4096];
    uintptr_t base = 0;
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        unsigned long s, e, off, maj, mnr, ino;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s %lx %lx:%lx %lu", &s, &e, perms, &off, &maj, &mnr, &ino) != 7)
            continue;
        if (ino != (unsigned long)sb.st_ino || makedev(maj, mnr) != sb.st_dev || perms[3] != 's')
            continue;
        base = (uintptr_t)(s - off); /* the VMA at file offset off starts at base + off */
        found = 1;
        break;
    }
    fclose(f);
    if (found) {
        g_ram_base = base;
        g_ram_size = (uint64_t)sb.st_size & ~(PG - 1);
        __atomic_store_n(&g_ram_state, 1, __ATOMIC_RELEASE);
        logmsg("satori-hosthints: guest RAM at %#lx, %" PRIu64 " MiB\n", (unsigned long)base,
               g_ram_size >> 20);
    }
    pthread_mutex_unlock(&g_ram_lock);
}

/* Is [p, p+len) partly in guest RAM? Looks RAM up until it is found. */
static int touches_ram(uintptr_t p, size_t len)
{
    if (!__atomic_load_n(&g_ram_state, __ATOMIC_ACQUIRE)) {
        ram_lookup();
        if (!__atomic_load_n(&g_ram_state, __ATOMIC_ACQUIRE))
            return 0;
    }
    return p < g_ram_base + g_ram_size && p + len > g_ram_base;
}

static int disk_index(int fd)
{
    struct stat sb;
    /* fstat(2): which image file this fd reads (fds are reused: never cache by number) */
    if (fstat(fd, &sb) != 0)
        return -1;
    for (int i = 0; i < g_ndisks; i++)
        if (g_disks[i].ok && g_disks[i].dev == sb.st_dev && g_disks[i].ino == sb.st_ino)
            return i;
    return -1;
}

/* ---- producer ---- */
static void push(const struct record *r, int n)
{
    uint64_t dropped = 0;
    pthread_mutex_lock(&g_push_lock);
    uint64_t cons = __atomic_load_n(h64(OFF_CONSUMER), __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++) {
        uint64_t p = g_prod;
        if (p - cons >= g_cap) { /* full (or a consumer ahead of us: counts as full too) */
            dropped += (uint64_t)(n - i);
            break;
        }
        struct record *slot = &g_recs[p % g_cap];
        *slot = r[i];
        slot->flags = FLAG_VALID;
        slot->seq = (uint32_t)p;
        g_prod = p + 1;
    }
    /* the records are complete before the producer position that covers them is visible */
    __atomic_store_n(h64(OFF_PRODUCER), g_prod, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&g_push_lock);
    count(OFF_DROPPED, dropped);
}

/* After a read of n bytes at file offset off into iov[0..cnt): report the whole pages. */
static void report(int fd, const struct iovec *iov, int cnt, off_t off, ssize_t n)
{
    if (n <= 0 || !g_on)
        return;
    int in_ram = 0;
    size_t left = (size_t)n;
    for (int i = 0; i < cnt && left; i++) {
        size_t l = iov[i].iov_len < left ? iov[i].iov_len : left;
        if (l && touches_ram((uintptr_t)iov[i].iov_base, l))
            in_ram = 1;
        left -= l;
    }
    if (!in_ram)
        return;
    uint64_t t0 = thread_cpu_ns();
    count(OFF_HH_CALLS, 1);
    int disk = disk_index(fd);
    if (disk < 0) {
        count(OFF_HH_OTHER, 1);
        __atomic_fetch_add(h64(OFF_HH_CPU_NS), thread_cpu_ns() - t0, __ATOMIC_RELAXED);
        return;
    }
    struct record batch[BATCH];
    int nb = 0;
    uint64_t pages = 0, partial = 0;
    uint64_t foff = (uint64_t)off; /* file offset of the current byte */
    left = (size_t)n;
    /* walk contiguous runs of the scatter list (adjacent iovecs joined: a page may span two) */
    int i = 0;
    while (i < cnt && left) {
        uintptr_t start = (uintptr_t)iov[i].iov_base;
        size_t len = iov[i].iov_len < left ? iov[i].iov_len : left;
        uint64_t run_off = foff;
        left -= len;
        i++;
        while (i < cnt && left && (uintptr_t)iov[i].iov_base == start + len) {
            size_t l = iov[i].iov_len < left ? iov[i].iov_len : left;
            len += l;
            left -= l;
            i++;
        }
        foff += len;
        uintptr_t end = start + len;
        /* clip the run to guest RAM */
        uintptr_t lo = start > g_ram_base ? start : g_ram_base;
        uintptr_t hi = end < g_ram_base + g_ram_size ? end : g_ram_base + g_ram_size;
        if (lo >= hi)
            continue;
        uintptr_t first = (lo + PG - 1) & ~(uintptr_t)(PG - 1);
        uintptr_t last = hi & ~(uintptr_t)(PG - 1);
        if (first >= last) {
            partial++;
            continue;
        }
        partial += (first > lo) + (hi > last);
        for (uintptr_t p = first; p < last; p += PG) {
            struct record *r = &batch[nb++];
            r->gpa = (uint64_t)(p - g_ram_base);
            r->hash = xxh64_page((const uint8_t *)p);
            r->sector = (run_off + (uint64_t)(p - start)) >> 9;
            r->disk = (uint16_t)disk;
            pages++;
            if (nb == BATCH) {
                push(batch, nb);
                nb = 0;
            }
        }
    }
    if (nb)
        push(batch, nb);
    count(OFF_HH_PAGES, pages);
    count(OFF_PARTIAL, partial);
    __atomic_fetch_add(h64(OFF_HH_CPU_NS), thread_cpu_ns() - t0, __ATOMIC_RELAXED);
}

/* ---- the wrapped calls ---- */
static void resolve(void)
{
    /* dlsym(3) RTLD_NEXT: glibc's own functions, behind this library */
    if (!real_pread64)
        real_pread64 = (ssize_t (*)(int, void *, size_t, off_t))dlsym(RTLD_NEXT, "pread64");
    if (!real_preadv64)
        real_preadv64 = (ssize_t (*)(int, const struct iovec *, int, off_t))dlsym(RTLD_NEXT, "preadv64");
    if (!real_preadv64v2)
        real_preadv64v2 =
            (ssize_t (*)(int, const struct iovec *, int, off_t, int))dlsym(RTLD_NEXT, "preadv64v2");
}

ssize_t pread64(int fd, void *buf, size_t count_, off_t off)
{
    if (!real_pread64)
        resolve();
    int saved;
    /* pread(2): the real read; errno is kept for the caller whatever we do after */
    ssize_t n = real_pread64(fd, buf, count_, off);
    saved = errno;
    if (n > 0 && g_on) {
        struct iovec v = {buf, count_};
        report(fd, &v, 1, off, n);
    }
    errno = saved;
    return n;
}

ssize_t pread(int fd, void *buf, size_t count_, off_t off) { return pread64(fd, buf, count_, off); }

ssize_t preadv64(int fd, const struct iovec *iov, int cnt, off_t off)
{
    if (!real_preadv64)
        resolve();
    int saved;
    /* preadv(2): the real read */
    ssize_t n = real_preadv64(fd, iov, cnt, off);
    saved = errno;
    if (n > 0 && g_on && cnt > 0)
        report(fd, iov, cnt, off, n);
    errno = saved;
    return n;
}

ssize_t preadv(int fd, const struct iovec *iov, int cnt, off_t off) { return preadv64(fd, iov, cnt, off); }

ssize_t preadv64v2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    if (!real_preadv64v2)
        resolve();
    int saved;
    /* preadv2(2): the real read (off -1 = the file position: not a positioned read, not reported) */
    ssize_t n = real_preadv64v2(fd, iov, cnt, off, flags);
    saved = errno;
    if (n > 0 && g_on && cnt > 0 && off >= 0)
        report(fd, iov, cnt, off, n);
    errno = saved;
    return n;
}

ssize_t preadv2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
    return preadv64v2(fd, iov, cnt, off, flags);
}

/* ---- set up ---- */

/* Remove our own library from LD_PRELOAD so programs QEMU starts do not load it. */
static void scrub_ld_preload(void)
{
    const char *v = getenv("LD_PRELOAD");
    if (!v)
        return;
    char *copy = strdup(v), *out = calloc(1, strlen(v) + 1), *save = NULL;
    if (!copy || !out) {
        free(copy);
        free(out);
        return;
    }
    for (char *t = strtok_r(copy, " :", &save); t; t = strtok_r(NULL, " :", &save)) {
        if (strstr(t, "satori_hosthints"))
            continue;
        if (*out)
            strcat(out, ":");
        strcat(out, t);
    }
    if (*out)
        setenv("LD_PRELOAD", out, 1);
    else
        unsetenv("LD_PRELOAD");
    free(copy);
    free(out);
}

static int attach_ring(const char *path)
{
    /* open(2): the ring file the harness created for this VM */
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        logmsg("satori-hosthints: cannot open ring %s: %s\n", path, strerror(errno));
        return -1;
    }
    struct stat sb;
    /* fstat(2): its size bounds everything we touch */
    if (fstat(fd, &sb) != 0 || sb.st_size < HEADER_SIZE + RECORD_SIZE) {
        logmsg("satori-hosthints: ring %s is too small\n", path);
        close(fd);
        return -1;
    }
    /* mmap(2) MAP_SHARED: the harness's reader sees our records live */
    void *m = mmap(NULL, (size_t)sb.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    /* close(2): the mapping keeps the file */
    close(fd);
    if (m == MAP_FAILED) {
        logmsg("satori-hosthints: mmap ring: %s\n", strerror(errno));
        return -1;
    }
    g_ring = m;
    uint64_t cap = *h32(OFF_CAPACITY);
    if (*h64(OFF_MAGIC) != RING_MAGIC) {
        logmsg("satori-hosthints: %s is not a hint ring\n", path);
        /* munmap(2): not ours to write */
        munmap(m, (size_t)sb.st_size);
        g_ring = NULL;
        return -1;
    }
    if (*h32(OFF_VERSION) != RING_VERSION || *h32(OFF_HEADER_SIZE) != HEADER_SIZE ||
        *h32(OFF_RECORD_SIZE) != RECORD_SIZE || cap < 1 ||
        HEADER_SIZE + cap * RECORD_SIZE > (uint64_t)sb.st_size) {
        logmsg("satori-hosthints: ring %s: header not understood\n", path);
        *h32(OFF_GUEST_STATE) = 2;
        munmap(m, (size_t)sb.st_size);
        g_ring = NULL;
        return -1;
    }
    g_cap = cap;
    g_recs = (struct record *)(g_ring + HEADER_SIZE);
    g_prod = *h64(OFF_PRODUCER);
    *h32(OFF_GUEST_VERSION) = RING_VERSION;
    __atomic_store_n(h32(OFF_GUEST_STATE), 1, __ATOMIC_RELEASE);
    return 0;
}

__attribute__((constructor)) static void satori_hosthints_init(void)
{
    resolve();
    const char *ring = getenv("SATORI_HOSTHINTS_RING");
    const char *ram = getenv("SATORI_HOSTHINTS_RAM");
    const char *disks = getenv("SATORI_HOSTHINTS_DISKS");
    int want = ring && *ring;
    char *ring_c = want ? strdup(ring) : NULL;
    g_ram_path = want && ram && *ram ? strdup(ram) : NULL;
    char *disks_c = want && disks ? strdup(disks) : NULL;
    unsetenv("SATORI_HOSTHINTS_RING");
    unsetenv("SATORI_HOSTHINTS_RAM");
    unsetenv("SATORI_HOSTHINTS_DISKS");
    scrub_ld_preload();
    if (!want)
        return; /* preloaded without a ring: inert */
    if (sysconf(_SC_PAGESIZE) != (long)PG) {
        logmsg("satori-hosthints: host page size is not 4096; disabled\n");
        goto out;
    }
    if (!g_ram_path || !disks_c) {
        logmsg("satori-hosthints: SATORI_HOSTHINTS_RAM and SATORI_HOSTHINTS_DISKS are needed; disabled\n");
        goto out;
    }
    char *save = NULL;
    int usable = 0;
    for (char *t = strtok_r(disks_c, ":", &save); t && g_ndisks < MAX_DISKS; t = strtok_r(NULL, ":", &save)) {
        struct stat sb;
        /* stat(2): identify each image file by device and inode (QEMU may open it by another
         * path); one that cannot be found keeps its index and reports nothing */
        if (stat(t, &sb) != 0) {
            logmsg("satori-hosthints: disk %s: %s (not reported)\n", t, strerror(errno));
        } else {
            g_disks[g_ndisks].dev = sb.st_dev;
            g_disks[g_ndisks].ino = sb.st_ino;
            g_disks[g_ndisks].ok = 1;
            usable++;
        }
        g_ndisks++;
    }
    if (usable == 0 || attach_ring(ring_c) != 0)
        goto out;
    g_on = 1;
out:
    free(ring_c);
    free(disks_c);
}
