/*
 * satori stall probe: runs in a guest and times the gaps in CLOCK_MONOTONIC that the guest's
 * own code sees (a vCPU held by the host, a write waiting on a page being merged, ...).
 *
 *   stallprobe [-s SPIN_US] [-p PERIOD_US] [-t SECONDS] [-f STOPFILE] [-r]
 *
 * Every PERIOD_US (default 1000) the probe wakes (clock_nanosleep, absolute) and spins for
 * SPIN_US (default 200) reading CLOCK_MONOTONIC in a tight loop. A gap is the time between two
 * consecutive reads, or how late a wake-up came; each period's worst gap is one sample. So a
 * stall is seen whether it hits while the probe spins or while it sleeps, and the probe uses
 * SPIN_US/PERIOD_US of a vCPU, not all of it (SPIN_US = PERIOD_US: a pure busy loop). With -r
 * it runs SCHED_FIFO (priority 50) so the guest's own scheduling does not count as stall.
 * It stops after SECONDS (default 600) or once STOPFILE exists (checked every period), then
 * prints one line of key=value figures, in microseconds:
 *   periods, spins (clock reads), max_us (worst gap), p50_us p99_us p999_us p9999_us (of the
 *   per-period worst gaps), over100us over1ms (periods whose worst gap exceeded that),
 *   stalled_ms (sum of the gaps above 100 us), rt (1 if SCHED_FIFO was granted).
 *
 * Build (on the host, static, copied into the guest): cc -O2 -Wall -Werror -static
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* log buckets of the per-period worst gap: bucket b holds gaps in [LO*R^b, LO*R^(b+1)) ns */
#define NB 400
#define LO 100.0
#define R 1.05

static uint64_t now_ns(void)
{
    struct timespec ts;
    /* clock_gettime(2): the clock whose gaps are measured (vDSO: no system call) */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int bucket(uint64_t ns)
{
    int b = 0;
    double edge = LO * R;
    while (b < NB - 1 && (double)ns >= edge) {
        edge *= R;
        b++;
    }
    return b;
}

static double quantile(const uint64_t *h, uint64_t n, double q)
{
    uint64_t want = (uint64_t)(q * (double)n), acc = 0;
    double edge = LO * R;
    for (int b = 0; b < NB; b++, edge *= R) {
        acc += h[b];
        if (acc > want)
            return edge / 1000.0; /* upper edge of the bucket, us */
    }
    return edge / 1000.0;
}

int main(int argc, char **argv)
{
    uint64_t spin_ns = 200000, period_ns = 1000000;
    double secs = 600;
    const char *stopfile = NULL;
    int want_rt = 0, opt;
    while ((opt = getopt(argc, argv, "s:p:t:f:r")) != -1) {
        switch (opt) {
        case 's':
            spin_ns = (uint64_t)atol(optarg) * 1000;
            break;
        case 'p':
            period_ns = (uint64_t)atol(optarg) * 1000;
            break;
        case 't':
            secs = atof(optarg);
            break;
        case 'f':
            stopfile = optarg;
            break;
        case 'r':
            want_rt = 1;
            break;
        default:
            fprintf(stderr, "usage: stallprobe [-s SPIN_US] [-p PERIOD_US] [-t S] [-f FILE] [-r]\n");
            return 2;
        }
    }
    if (period_ns < 1000 || spin_ns > period_ns) {
        fprintf(stderr, "stallprobe: need 1 <= period and spin <= period\n");
        return 2;
    }
    int rt = 0;
    if (want_rt) {
        struct sched_param sp = {.sched_priority = 50};
        /* sched_setscheduler(2): SCHED_FIFO, so other guest tasks do not preempt the spin */
        rt = sched_setscheduler(0, SCHED_FIFO, &sp) == 0;
    }
    static uint64_t hist[NB];
    uint64_t periods = 0, spins = 0, maxgap = 0, over100 = 0, over1ms = 0, stalled = 0;
    uint64_t start = now_ns(), end = start + (uint64_t)(secs * 1e9), next = start;
    struct stat sb;
    for (;;) {
        uint64_t t = now_ns();
        /* the wake-up came this late: a stall while the probe slept */
        uint64_t worst = t > next ? t - next : 0;
        if (worst > 100000)
            stalled += worst;
        uint64_t stop = t + spin_ns, prev = t;
        while (prev < stop) {
            uint64_t c = now_ns();
            if (c - prev > worst)
                worst = c - prev;
            if (c - prev > 100000)
                stalled += c - prev;
            prev = c;
            spins++;
        }
        periods++;
        hist[bucket(worst)]++;
        if (worst > maxgap)
            maxgap = worst;
        over100 += worst > 100000;
        over1ms += worst > 1000000;
        if (prev >= end || (stopfile && stat(stopfile, &sb) == 0))
            break;
        next += period_ns;
        if (next < prev)
            next = prev; /* fell behind (a long stall): do not count the backlog again */
        struct timespec ts = {(time_t)(next / 1000000000ULL), (long)(next % 1000000000ULL)};
        /* clock_nanosleep(2) TIMER_ABSTIME: sleep until the next period starts */
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
    }
    printf("periods=%llu spins=%llu max_us=%.1f p50_us=%.1f p99_us=%.1f p999_us=%.1f "
           "p9999_us=%.1f over100us=%llu over1ms=%llu stalled_ms=%.3f rt=%d\n",
           (unsigned long long)periods, (unsigned long long)spins, maxgap / 1000.0,
           quantile(hist, periods, 0.5), quantile(hist, periods, 0.99),
           quantile(hist, periods, 0.999), quantile(hist, periods, 0.9999),
           (unsigned long long)over100, (unsigned long long)over1ms, stalled / 1e6, rt);
    return 0;
}
