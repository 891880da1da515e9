/*
 * satori page reader: the oracle's reads of scattered guest pages, in C.
 *
 * The incremental oracle re-reads only pages written since its last sample; they are scattered,
 * so each is one pread(2). In Python each cost ~2 us of interpreter around the system call and
 * held the GIL, which the sharing engine's thread needs; here a whole batch is one call (ctypes
 * releases the GIL for it).
 *
 * Loaded into the harness process with ctypes (never into QEMU). No state, no allocation, no
 * threads. Built on first use like the merge agent (harness/sharing/agent.py: build_library).
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <unistd.h>

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
