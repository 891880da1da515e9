/*
 * Guest write storm for the pause-free merge test (tests/test_merging.py): runs in a guest,
 * writes the very pages the host is merging, and checks that no write is ever lost.
 *
 *   guest_storm NPAGES SECONDS
 *
 * Allocates NPAGES anonymous pages, fills page i with 0x5A bytes and i in its first 8 bytes,
 * locks them and prints their guest-physical addresses ("gpas 0x... 0x..."; from
 * /proc/self/pagemap, root). After a line "go" on stdin it writes for SECONDS, in bursts: pick
 * a page, check that it holds exactly what was last written there (a shadow copy), write its
 * next word (and the shadow); then prints "writes=W checks=C bad=B". Then it serves stdin
 * lines: "w I" writes page I once more (prints "ok"), "c" checks every page (prints "bad=N"),
 * "q" exits.
 *
 * Build: cc -O2 -Wall -Werror -static
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PG 4096

static uint8_t *buf, *shadow;
static uint32_t *word;
static long npages;
static uint64_t nwrites;

static double now_s(void)
{
    struct timespec ts;
    /* clock_gettime(2): monotonic time for the storm's length */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void write_page(long p)
{
    uint32_t w = 1 + word[p]++ % (PG / 8 - 1); /* word 0 keeps the page number */
    uint64_t v = ++nwrites;
    __atomic_store_n((uint64_t *)(buf + p * PG + w * 8), v, __ATOMIC_RELAXED);
    memcpy(shadow + p * PG + w * 8, &v, 8);
}

static uint64_t check_all(void)
{
    uint64_t bad = 0;
    for (long p = 0; p < npages; p++)
        if (memcmp(buf + p * PG, shadow + p * PG, PG) != 0) {
            bad++;
            memcpy(shadow + p * PG, buf + p * PG, PG);
        }
    return bad;
}

int main(int argc, char **argv)
{
    if (argc != 3)
        return 2;
    npages = atol(argv[1]);
    double secs = atof(argv[2]);
    /* mmap(2): the pages the host will merge */
    buf = mmap(NULL, (size_t)npages * PG, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
               -1, 0);
    shadow = malloc((size_t)npages * PG);
    word = calloc((size_t)npages, sizeof *word);
    if (buf == MAP_FAILED || !shadow || !word)
        return 2;
    for (long p = 0; p < npages; p++) {
        memset(buf + p * PG, 0x5A, PG);
        memcpy(buf + p * PG, &p, sizeof p);
    }
    memcpy(shadow, buf, (size_t)npages * PG);
    /* mlock(2): keep the pages resident at their guest-physical addresses */
    if (mlock(buf, (size_t)npages * PG) < 0)
        perror("mlock");
    /* open(2) /proc/self/pagemap: page frame numbers of the buffer (needs root) */
    int pm = open("/proc/self/pagemap", O_RDONLY);
    if (pm < 0)
        return 2;
    printf("gpas");
    for (long p = 0; p < npages; p++) {
        uint64_t e = 0;
        /* pread(2): the pagemap entry of page p */
        if (pread(pm, &e, 8, (off_t)(((uintptr_t)buf / PG + p) * 8)) != 8 || !(e >> 63))
            return 3;
        printf(" 0x%llx", (unsigned long long)((e & ((1ULL << 55) - 1)) * PG));
    }
    printf("\n");
    fflush(stdout);
    char line[128];
    if (!fgets(line, sizeof line, stdin) || strncmp(line, "go", 2) != 0)
        return 4;
    uint64_t checks = 0, bad = 0, seed = 88172645463325252ULL;
    double end = now_s() + secs;
    while (now_s() < end) {
        for (int burst = 0; burst < 32; burst++) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            long p = (long)(seed % (uint64_t)npages);
            checks++;
            if (memcmp(buf + p * PG, shadow + p * PG, PG) != 0) {
                if (bad < 5)
                    fprintf(stderr, "page %ld lost a write\n", p);
                bad++;
                memcpy(shadow + p * PG, buf + p * PG, PG);
            }
            write_page(p);
        }
        /* nanosleep(2): a pause between bursts, so most pages stay unchanged long enough for
         * the host to read, store and merge them */
        struct timespec d = {0, 500000};
        nanosleep(&d, NULL);
    }
    bad += check_all();
    printf("writes=%llu checks=%llu bad=%llu\n", (unsigned long long)nwrites,
           (unsigned long long)checks, (unsigned long long)bad);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (line[0] == 'w') {
            long p = atol(line + 1);
            if (p >= 0 && p < npages)
                write_page(p);
            printf("ok\n");
        } else if (line[0] == 'c') {
            printf("bad=%llu\n", (unsigned long long)check_all());
        } else if (line[0] == 'q') {
            break;
        }
        fflush(stdout);
    }
    return 0;
}
