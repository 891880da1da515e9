/*
 * side_channel_probe: the guest half of benchmarks/side_channel.py (a static binary built on the
 * host and copied into the attacker and victim guests).
 *
 *   side_channel_probe read  SEED FILE OFF NPAGES [FILE OFF NPAGES ...]
 *       reads each region into the page cache with readahead off (posix_fadvise RANDOM), so a
 *       cold region goes through the guest's virtio-blk (and is hinted to the host) page by page.
 *   side_channel_probe write SEED FILE OFF NPAGES [FILE OFF NPAGES ...]
 *       maps each region MAP_SHARED, makes its page-table entries writable without storing
 *       (MADV_POPULATE_WRITE: the guest's own write fault is taken here, not in the timing), then
 *       in a random order stores each page's first byte back unchanged and times that one store.
 *       A page the host has merged takes a copy-on-write fault in the host: the store is slow.
 *       Prints "calib NS_PER_TICK", then "page REGION INDEX PFN TICKS" per page (PFN from
 *       /proc/self/pagemap: the guest-physical page, so the host can tell which were merged).
 *
 * The file's content is unchanged (each byte is written back as it was). Exit status 0 on
 * success, 2 on bad arguments, 1 on a failed system call (the message says which).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

#define PAGE 4096UL
#define MAX_PAGES (1UL << 20)

static void die(const char *what, const char *path)
{
    fprintf(stderr, "side_channel_probe: %s %s: %s\n", what, path ? path : "", strerror(errno));
    exit(1);
}

static inline uint64_t ticks(void)
{
    uint32_t lo, hi;
    /* lfence: earlier instructions (the store and its fault) complete before the counter is read */
    __asm__ volatile("mfence; lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) : : "memory");
    return ((uint64_t)hi << 32) | lo;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    /* clock_gettime: monotonic wall time, to convert ticks to nanoseconds */
    if (clock_gettime(CLOCK_MONOTONIC, &ts) != 0)
        die("clock_gettime", NULL);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static uint64_t rng_state;
static uint64_t rng(void)
{
    rng_state = rng_state * 6364136223846793005ULL + 1442695040888963407ULL;
    return rng_state >> 33;
}

static int parse_u64(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || end == s || *end || s[0] == '-')
        return -1;
    *out = v;
    return 0;
}

static void read_region(const char *path, uint64_t off, uint64_t npages)
{
    /* open: the candidate file, read only */
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die("open", path);
    /* posix_fadvise: no readahead, so only the region itself is read (and hinted) */
    int rc = posix_fadvise(fd, (off_t)off, (off_t)(npages * PAGE), POSIX_FADV_RANDOM);
    if (rc != 0) {
        errno = rc;
        die("posix_fadvise", path);
    }
    char *buf = malloc(PAGE);
    if (!buf)
        die("malloc", NULL);
    for (uint64_t i = 0; i < npages; i++) {
        /* pread: one page into the page cache (cold: a virtio-blk read the host hears of) */
        ssize_t n = pread(fd, buf, PAGE, (off_t)(off + i * PAGE));
        if (n != (ssize_t)PAGE) {
            if (n >= 0)
                errno = EIO;
            die("pread", path);
        }
    }
    free(buf);
    /* close: done with the file; its pages stay in the page cache */
    if (close(fd) != 0)
        die("close", path);
}

static void write_region(int region, const char *path, uint64_t off, uint64_t npages, int pagemap,
                         uint64_t *total_ticks)
{
    /* open: the candidate file, read-write, to map it shared (its page-cache pages themselves) */
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        die("open", path);
    size_t len = npages * PAGE;
    /* mmap: the page-cache pages of the region, shared: a store lands in the page itself */
    volatile unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)off);
    if (p == MAP_FAILED)
        die("mmap", path);
    /* madvise: take the guest's write faults now (page tables writable, nothing stored) */
    if (madvise((void *)p, len, MADV_POPULATE_WRITE) != 0)
        die("madvise(MADV_POPULATE_WRITE)", path);
    uint64_t *pfn = calloc(npages, sizeof *pfn);
    uint64_t *order = calloc(npages, sizeof *order);
    uint64_t *dt = calloc(npages, sizeof *dt);
    if (!pfn || !order || !dt)
        die("calloc", NULL);
    for (uint64_t i = 0; i < npages; i++) {
        uint64_t e = 0;
        uint64_t va = (uint64_t)(uintptr_t)(p + i * PAGE);
        /* pread: this page's pagemap entry (the PFN is shown to root only; 0 otherwise) */
        if (pread(pagemap, &e, sizeof e, (off_t)(va / PAGE * 8)) != (ssize_t)sizeof e)
            die("pread", "/proc/self/pagemap");
        pfn[i] = (e >> 63) ? (e & ((1ULL << 55) - 1)) : 0;
        order[i] = i;
    }
    for (uint64_t i = npages; i > 1; i--) { /* Fisher-Yates: no page is timed in file order */
        uint64_t j = rng() % i, t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (uint64_t k = 0; k < npages; k++) {
        uint64_t i = order[k];
        unsigned char v = p[i * PAGE]; /* the load is not timed: only the store */
        uint64_t t0 = ticks();
        p[i * PAGE] = v;
        uint64_t t1 = ticks();
        dt[i] = t1 - t0;
        *total_ticks += dt[i];
    }
    for (uint64_t i = 0; i < npages; i++)
        printf("page %d %lu %lu %lu\n", region, (unsigned long)i, (unsigned long)pfn[i], (unsigned long)dt[i]);
    free(pfn);
    free(order);
    free(dt);
    /* munmap: the mapping; the (unchanged) pages stay in the page cache */
    if (munmap((void *)p, len) != 0)
        die("munmap", path);
    /* close: done with the file */
    if (close(fd) != 0)
        die("close", path);
}

int main(int argc, char **argv)
{
    if (argc < 6 || (argc - 3) % 3 != 0 || (strcmp(argv[1], "read") && strcmp(argv[1], "write"))) {
        fprintf(stderr, "usage: side_channel_probe read|write SEED FILE OFF NPAGES [FILE OFF NPAGES ...]\n");
        return 2;
    }
    int writing = strcmp(argv[1], "write") == 0;
    uint64_t seed;
    if (parse_u64(argv[2], &seed)) {
        fprintf(stderr, "side_channel_probe: bad SEED %s\n", argv[2]);
        return 2;
    }
    rng_state = seed ^ 0x9e3779b97f4a7c15ULL;
    int pagemap = -1;
    if (writing) {
        /* open: our own page table entries, to report which guest-physical page each one is */
        pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
        if (pagemap < 0)
            die("open", "/proc/self/pagemap");
    }
    uint64_t ns0 = now_ns(), tk0 = ticks(), total = 0;
    for (int a = 3, region = 0; a < argc; a += 3, region++) {
        uint64_t off, npages;
        if (parse_u64(argv[a + 1], &off) || parse_u64(argv[a + 2], &npages) || off % PAGE ||
            npages == 0 || npages > MAX_PAGES) {
            fprintf(stderr, "side_channel_probe: bad region %s %s %s\n", argv[a], argv[a + 1], argv[a + 2]);
            return 2;
        }
        if (writing)
            write_region(region, argv[a], off, npages, pagemap, &total);
        else
            read_region(argv[a], off, npages);
    }
    uint64_t ns1 = now_ns(), tk1 = ticks();
    if (writing) {
        /* the counter's rate from this run's own wall time (under TCG it is the host's TSC) */
        double ns_per_tick = tk1 > tk0 ? (double)(ns1 - ns0) / (double)(tk1 - tk0) : 0.0;
        printf("calib %.6f\n", ns_per_tick);
        /* close: the pagemap */
        if (close(pagemap) != 0)
            die("close", "/proc/self/pagemap");
    }
    if (fflush(stdout) != 0)
        die("fflush", "stdout");
    return 0;
}
