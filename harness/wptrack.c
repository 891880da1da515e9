/*
 * satori write tracker: a constructor preloaded (LD_PRELOAD) into every QEMU the harness starts.
 *
 * It creates ONE userfaultfd bound to QEMU's address space and leaves it open at the descriptor
 * number the harness chose (SATORI_TRACK_FD). Nothing else: no UFFDIO_API, no registration,
 * no thread, no signal handler. A userfaultfd acts on the address space of the process that
 * created it, whoever holds the descriptor, so the harness's oracle takes a copy with
 * pidfd_getfd(2) and does everything from outside: it enables asynchronous write-protect
 * (UFFD_FEATURE_WP_ASYNC: the kernel resolves a write to a protected page by itself, the
 * writer never waits for anyone), registers guest RAM, and reads-and-re-protects the pages
 * written since its last look with the PAGEMAP_SCAN ioctl on /proc/<qemu>/pagemap
 * (harness/oracle.py, WriteTracker). Until the harness does so, the descriptor is inert and
 * QEMU runs exactly as without this library.
 *
 * Environment (read once, then removed so that helpers QEMU starts do not inherit it):
 *   SATORI_TRACK_FD   the descriptor number to leave the userfaultfd at (3..65535)
 *
 * Build: cc -O2 -Wall -Werror -fPIC -shared -o satori_wptrack.so wptrack.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((constructor)) static void satori_wptrack_init(void)
{
    const char *want = getenv("SATORI_TRACK_FD");
    if (!want)
        return;
    char *end = NULL;
    long target = strtol(want, &end, 10);
    unsetenv("SATORI_TRACK_FD");
    if (!end || *end || target < 3 || target > 65535) {
        fprintf(stderr, "satori-wptrack: bad SATORI_TRACK_FD %s\n", want);
        return;
    }
    /* userfaultfd(2): a context for this process's address space. Not UFFD_USER_MODE_ONLY:
     * writes the kernel makes on QEMU's behalf (preadv of a disk image into guest RAM) must
     * be tracked like QEMU's own. CLOEXEC: programs QEMU runs do not get it. */
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        fprintf(stderr, "satori-wptrack: userfaultfd: %s\n", strerror(errno));
        return;
    }
    if (fd != target) {
        /* dup3(2): move it to the agreed number (nothing is open there this early) */
        if (dup3(fd, (int)target, O_CLOEXEC) < 0)
            fprintf(stderr, "satori-wptrack: dup3 to %ld: %s\n", target, strerror(errno));
        /* close(2): the original number */
        close(fd);
    }
}
