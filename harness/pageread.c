/*
 * satori page reader: the oracle's reads of scattered guest pages, in C.
 *
 * The incremental oracle re-reads only pages written since its last sample; they are scattered,
 * so each is one pread(2). In Python each cost ~2 us of interpreter around the system call and
 * held the GIL, which the sharing engine's thread needs; here a whole batch is one call (ctypes
 * releases the GIL for it). Pages of a guest's RAM file are not even read: they are hashed in
 * place through the oracle's own mapping of the file (satori_hash_mapped), no system call at all.
 *
 * Loaded into the harness process with ctypes (never into QEMU). No allocation, no threads; the
 * only state is the SIGBUS handler satori_hash_mapped installs (see bus_install). Built on first
 * use like the merge agent (harness/sharing/agent.py: build_library); needs libxxhash-dev.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

/* libxxhash-dev: XXH3-128, the oracle's content hash, compiled in (header only) */
#define XXH_INLINE_ALL
#include <xxhash.h>

#define PAGE 4096

/*
 * Read page i of the batch from `fd` at byte offset offs[i] into buf + i * 4096, for i < n.
 * Pages whose offsets follow each other are read with one pread. Returns n when every page was
 * read whole; otherwise the index of the first page not read, with errno set (EIO for a short
 * read at the end of the file).
 */
long satori_read_pages(int fd, const uint64_t *offs, size_t n, uint8_t *buf)
{
    size_t i = 0;
    while (i < n) {
        size_t run = 1;
        while (i + run < n && offs[i + run] == offs[i] + run * (uint64_t)PAGE)
            run++;
        size_t want = run * PAGE, got = 0;
        while (got < want) {
            /* pread(2): the run's bytes; a file hole reads as zeros and allocates nothing */
            ssize_t r = pread(fd, buf + i * PAGE + got, want - got, (off_t)(offs[i] + got));
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return (long)(i + got / PAGE);
            }
            if (r == 0) {
                errno = EIO;
                return (long)(i + got / PAGE);
            }
            got += (size_t)r;
        }
        i += run;
    }
    return (long)n;
}

/*
 * Read n byte spans of `fd` one after the other into buf: span i is lens[i] bytes at offs[i].
 * Returns n when every span was read whole; otherwise the index of the first span not read,
 * with errno set (EIO for a short read). Used for runs of /proc/<pid>/pagemap entries.
 */
long satori_read_spans(int fd, const uint64_t *offs, const uint64_t *lens, size_t n, uint8_t *buf)
{
    uint8_t *at = buf;
    for (size_t i = 0; i < n; i++) {
        size_t got = 0;
        while (got < lens[i]) {
            /* pread(2): one span */
            ssize_t r = pread(fd, at + got, lens[i] - got, (off_t)(offs[i] + got));
            if (r < 0) {
                if (errno == EINTR)
                    continue;
                return (long)i;
            }
            if (r == 0) {
                errno = EIO;
                return (long)i;
            }
            got += (size_t)r;
        }
        at += lens[i];
    }
    return (long)n;
}

/* ------------------------------------------------------------------ reading through a mapping */

/* set while this thread copies from a guest mapping; volatile: the compiler must not drop the
 * store as dead (nothing it can see reads it before it is cleared) */
static __thread sigjmp_buf *volatile bus_jump;
static struct sigaction bus_old;       /* the handler before ours: it gets every other SIGBUS */
static pthread_mutex_t bus_lock = PTHREAD_MUTEX_INITIALIZER;

static void on_sigbus(int sig, siginfo_t *si, void *ctx)
{
    if (bus_jump)
        siglongjmp(*bus_jump, 1);
    /* not a copy of ours (another thread's fault): what the process had before */
    if ((bus_old.sa_flags & SA_SIGINFO) && bus_old.sa_sigaction) {
        bus_old.sa_sigaction(sig, si, ctx);
        return;
    }
    if (bus_old.sa_handler != SIG_DFL && bus_old.sa_handler != SIG_IGN) {
        bus_old.sa_handler(sig);
        return;
    }
    /* sigaction(2) + raise(3): the default action, as if we were not here */
    signal(SIGBUS, SIG_DFL);
    raise(SIGBUS);
}

/* Our SIGBUS handler in place, if it is not (first use, or someone installed theirs since: then
 * theirs becomes the one every SIGBUS not ours goes to). Never removed: restoring the old one
 * after each call would race with another thread's call. Returns 0, or -1 with errno set. */
static int bus_install(void)
{
    struct sigaction cur, sa;
    int rc;
    pthread_mutex_lock(&bus_lock);
    /* sigaction(2): who handles SIGBUS now */
    rc = sigaction(SIGBUS, NULL, &cur);
    if (rc == 0 && !((cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_sigbus)) {
        memset(&sa, 0, sizeof(sa));
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        /* sigaction(2): ours, the old one kept for every SIGBUS that is not ours */
        rc = sigaction(SIGBUS, &sa, &bus_old);
    }
    pthread_mutex_unlock(&bus_lock);
    return rc;
}

/*
 * Hash pages pages[i] (page indices) of a read-only shared mapping at `base` in place, for i < n:
 * out[2i], out[2i+1] = XXH3-128 of the page (high, low 64 bits: the order of the canonical digest
 * the Python xxhash package gives). No system call per page, no copy. The mapping is the oracle's
 * own of a guest's RAM file, registered with a userfaultfd in missing mode with
 * UFFD_FEATURE_SIGBUS: a page punched out of the file since the caller looked (a hole now) raises
 * SIGBUS instead of being allocated. Such a page hashes as zeros, as pread(2) of a hole reads, and
 * hole[i] is set to 1 (0 otherwise). Returns the number of holes, or -1 with errno set if the
 * SIGBUS handler could not be installed (nothing was read).
 */
long satori_hash_mapped(const uint8_t *base, const uint64_t *pages, size_t n, uint64_t *out, uint8_t *hole)
{
    static const uint8_t zero[PAGE];
    if (bus_install() != 0)
        return -1;
    sigjmp_buf jb;
    volatile size_t i = 0;
    volatile long holes = 0;
    while (i < n) {
        if (sigsetjmp(jb, 1)) {
            /* page i faulted: a hole by now */
            bus_jump = NULL;
            XXH128_hash_t h = XXH3_128bits(zero, PAGE);
            out[2 * i] = h.high64;
            out[2 * i + 1] = h.low64;
            hole[i] = 1;
            holes++;
            i++;
            continue;
        }
        bus_jump = &jb;
        for (; i < n; i++) {
            XXH128_hash_t h = XXH3_128bits(base + pages[i] * (uint64_t)PAGE, PAGE);
            out[2 * i] = h.high64;
            out[2 * i + 1] = h.low64;
            hole[i] = 0;
        }
        bus_jump = NULL;
    }
    return holes;
}

/*
 * For the sharing core (harness/sharing/core.c), which reads hinted guest pages through the
 * engine's own view of each RAM file (a RamMirror, like the oracle's) instead of pread(2): the
 * SIGBUS handling lives here once, the core calls these two through function pointers.
 */

/* Our SIGBUS handler in place (see bus_install); the core calls it once per batch. 0, or -1. */
int satori_bus_ready(void)
{
    return bus_install();
}

/*
 * Copy len bytes from src, in a guarded mapping, to dst. Returns 0; or 1 if src faulted (a hole
 * by now: punched out of the file since the caller looked), dst then zero-filled, which is what
 * pread(2) of a hole reads. satori_bus_ready() must have returned 0 in this process.
 */
int satori_copy_guarded(void *dst, const void *src, size_t len)
{
    sigjmp_buf jb;
    /* no signal mask saved (a system call per page otherwise): the jump comes from inside the
     * handler, which runs with SIGBUS blocked, so it is unblocked below */
    if (sigsetjmp(jb, 0)) {
        bus_jump = NULL;
        sigset_t m;
        sigemptyset(&m);
        sigaddset(&m, SIGBUS);
        /* pthread_sigmask(3): SIGBUS deliverable again (the handler's mask stayed) */
        pthread_sigmask(SIG_UNBLOCK, &m, NULL);
        memset(dst, 0, len);
        return 1;
    }
    bus_jump = &jb;
    __asm__ volatile("" ::: "memory"); /* the copy may not start before the jump is armed */
    memcpy(dst, src, len);
    __asm__ volatile("" ::: "memory");
    bus_jump = NULL;
    return 0;
}
