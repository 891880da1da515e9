/*
 * Racing writers for the pause-free merge test (tests/test_agent.py): stands in for QEMU's
 * vCPUs. Run with the merge agent preloaded (SATORI_AGENT_SOCKET, SATORI_AGENT_MEMPATH).
 *
 *   wp_writers RAM_FILE NPAGES THREADS SECONDS [track]
 *
 * Maps RAM_FILE (NPAGES pages, MAP_SHARED: the agent finds it as "guest RAM") and starts
 * THREADS writers; writer t owns the pages p with p % THREADS == t. Each writer, in a loop:
 * picks one of its pages, checks that the page holds exactly what it last wrote there (its
 * shadow copy), writes the next word of the page and its shadow, then pauses a little. A merge
 * that lost a write shows up as a page that differs from its shadow. Prints
 * "writes=W checks=C bad=B" and exits 0 after SECONDS (or 1 on bad pages).
 * The pages start as 0x5A-filled pages with the page number in the first 8 bytes.
 *
 * With "track", a write tracker like the oracle's (harness/wptrack.c + the harness) runs too:
 * a userfaultfd made before the agent's, in asynchronous write-protect mode, that registers
 * all of "guest RAM" every 20 ms (taking back what the agent's chunks took) and reads and
 * re-protects the written pages (PAGEMAP_SCAN). It prints "track_ok=R track_busy=B
 * track_last=E" (its registrations that succeeded / found a range held by the agent, and the
 * errno of its last one: 0 once the agent holds nothing).
 *
 * Build: cc -O2 -Wall -Werror -pthread -o wp_writers wp_writers.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PG 4096

static uint8_t *ram, *shadow;
static long npages, nthreads;
static double secs;
static uint64_t writes_total, checks_total, bad_total;
static int track_fd = -1;
static volatile int running = 1;
static uint64_t track_ok, track_busy;
static int track_last = -1; /* errno of the tracker's last registration, 0 if it worked */

/* PAGEMAP_SCAN (Linux 6.7), as in linux/fs.h */
struct region {
    uint64_t start, end, categories;
};
struct scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define PAGEMAP_SCAN_ _IOWR('f', 16, struct scan_arg)

/* The tracker: every 20 ms register all of RAM (asynchronous wp) and re-protect what was
 * written since, as the oracle does from outside QEMU. */
static void *tracker(void *arg)
{
    (void)arg;
    /* open(2) /proc/self/pagemap: for PAGEMAP_SCAN */
    int pm = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    static struct region vec[512];
    while (running) {
        struct uffdio_register reg = {.range = {(uint64_t)(uintptr_t)ram, (uint64_t)npages * PG},
                                      .mode = UFFDIO_REGISTER_MODE_WP};
        /* ioctl(2) UFFDIO_REGISTER: all of RAM (EBUSY while an agent chunk holds a part) */
        int ok = ioctl(track_fd, UFFDIO_REGISTER, &reg) == 0;
        track_last = ok ? 0 : errno;
        if (ok) {
            track_ok++;
            struct scan_arg a = {.size = sizeof a, .flags = 1 | 2 /* WP_MATCHING|CHECK_WPASYNC */,
                                 .start = (uint64_t)(uintptr_t)ram,
                                 .end = (uint64_t)(uintptr_t)ram + (uint64_t)npages * PG,
                                 .vec = (uint64_t)(uintptr_t)vec, .vec_len = 512,
                                 .category_mask = 2 /* PAGE_IS_WRITTEN */, .return_mask = 2};
            /* ioctl(2) PAGEMAP_SCAN: the pages written since, re-protected at once */
            ioctl(pm, PAGEMAP_SCAN_, &a);
        } else if (errno == EBUSY) {
            track_busy++;
        }
        struct timespec d = {0, 20000000};
        /* nanosleep(2): the tracker's period */
        nanosleep(&d, NULL);
    }
    return NULL;
}

static double now_s(void)
{
    struct timespec ts;
    /* clock_gettime(2): monotonic time for the run length */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void *writer(void *arg)
{
    long t = (long)arg;
    uint64_t seed = 0x9E3779B97F4A7C15ULL * (uint64_t)(t + 1), writes = 0, checks = 0, bad = 0;
    uint32_t *word = calloc((size_t)npages, sizeof *word);
    double end = now_s() + secs;
    while (now_s() < end) {
        for (int burst = 0; burst < 64; burst++) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            long p = (long)(seed % (uint64_t)((npages - 1 - t) / nthreads + 1)) * nthreads + t;
            uint8_t *pg = ram + p * PG, *sh = shadow + p * PG;
            checks++;
            if (memcmp(pg, sh, PG) != 0) {
                if (bad < 5)
                    fprintf(stderr, "page %ld differs from what was written\n", p);
                bad++;
                memcpy(sh, pg, PG); /* count each loss once */
            }
            uint32_t w = 1 + word[p]++ % (PG / 8 - 1); /* word 0 keeps the page number */
            uint64_t v = ((uint64_t)t << 48) ^ ++writes;
            /* the racing write: a merge may be comparing or remapping this very page */
            __atomic_store_n((uint64_t *)(pg + w * 8), v, __ATOMIC_RELAXED);
            memcpy(sh + w * 8, &v, 8);
        }
        /* nanosleep(2): a pause between bursts, so most pages stay unchanged long enough for
         * the test to read, store and merge them */
        struct timespec d = {0, 200000};
        nanosleep(&d, NULL);
    }
    free(word);
    __atomic_add_fetch(&writes_total, writes, __ATOMIC_RELAXED);
    __atomic_add_fetch(&checks_total, checks, __ATOMIC_RELAXED);
    __atomic_add_fetch(&bad_total, bad, __ATOMIC_RELAXED);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5 && !(argc == 6 && strcmp(argv[5], "track") == 0)) {
        fprintf(stderr, "usage: wp_writers RAM_FILE NPAGES THREADS SECONDS [track]\n");
        return 2;
    }
    if (argc == 6) {
        /* userfaultfd(2): the tracker's, made before the agent makes its own */
        track_fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        struct uffdio_api api = {.api = UFFD_API,
                                 .features = (1ULL << 15) | (1ULL << 13) | (1ULL << 12)};
        /* ioctl(2) UFFDIO_API: asynchronous write-protect (the writer never waits) */
        if (track_fd < 0 || ioctl(track_fd, UFFDIO_API, &api) < 0) {
            perror("tracker userfaultfd");
            return 2;
        }
    }
    npages = atol(argv[2]);
    nthreads = atol(argv[3]);
    secs = atof(argv[4]);
    /* open(2): the RAM file the test created */
    int fd = open(argv[1], O_RDWR | O_CLOEXEC);
    if (fd < 0 || npages < 1 || nthreads < 1 || nthreads > 64) {
        perror("open");
        return 2;
    }
    /* mmap(2): "guest RAM", shared, as QEMU maps a memory-backend-file */
    ram = mmap(NULL, (size_t)npages * PG, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    shadow = malloc((size_t)npages * PG);
    if (ram == MAP_FAILED || !shadow) {
        perror("mmap");
        return 2;
    }
    /* madvise(2) MADV_DONTFORK: QEMU's last step in setting up guest RAM; the agent takes RAM
     * as found only once it is there */
    if (madvise(ram, (size_t)npages * PG, MADV_DONTFORK) < 0) {
        perror("madvise");
        return 2;
    }
    for (long p = 0; p < npages; p++) {
        memset(ram + p * PG, 0x5A, PG);
        memcpy(ram + p * PG, &p, sizeof p);
    }
    memcpy(shadow, ram, (size_t)npages * PG);
    pthread_t th[64], tr;
    if (track_fd >= 0)
        pthread_create(&tr, NULL, tracker, NULL);
    printf("ready\n");
    fflush(stdout);
    for (long t = 0; t < nthreads; t++)
        pthread_create(&th[t], NULL, writer, (void *)t);
    for (long t = 0; t < nthreads; t++)
        pthread_join(th[t], NULL);
    running = 0;
    if (track_fd >= 0)
        pthread_join(tr, NULL);
    printf("writes=%llu checks=%llu bad=%llu", (unsigned long long)writes_total,
           (unsigned long long)checks_total, (unsigned long long)bad_total);
    if (track_fd >= 0)
        printf(" track_ok=%llu track_busy=%llu track_last=%d", (unsigned long long)track_ok,
               (unsigned long long)track_busy, track_last);
    printf("\n");
    return bad_total ? 1 : 0;
}
