/*
 * satori merge agent: a shared library preloaded (LD_PRELOAD) into a stock qemu-system-x86_64.
 *
 * It replaces guest RAM pages by copy-on-write mappings of identical pages of a content store
 * (a memfd of the engine, opened as /proc/<engine pid>/fd/<n>); docs/merging.md says why this mechanism (measured), how merging avoids
 * stopping the guest, and why no guest write is lost.
 *
 * Environment (read once by the constructor, then removed from the environment so that helper
 * programs QEMU may start do not load or start a second agent):
 *   SATORI_AGENT_SOCKET   path of the UNIX stream socket to serve (required; unset = agent off)
 *   SATORI_AGENT_MEMPATH  mem-path= of the guest RAM backend
 *                         (-object memory-backend-file,share=on,mem-path=...): the harness
 *                         passes a memfd, /proc/self/fd/<n>
 *   SATORI_AGENT_WP       "0": never use userfaultfd write-protection (merges then need the
 *                         vCPUs held); anything else or unset: use it when the kernel can
 *   SATORI_AGENT_RAMSIZE  instead of MEMPATH, for an anonymous RAM backend
 *                         (-object memory-backend-ram,merge=on: the satori+ksm mode): its size
 *                         in bytes. The mapping is the one private anonymous rw VMA of exactly
 *                         that size that QEMU marked MADV_DONTFORK (and MADV_MERGEABLE).
 * The guest RAM mapping is looked up lazily in /proc/self/smaps by that path (QEMU maps it
 * after the constructor ran) at the first request that needs it; once found it is cached.
 * "Guest offset" everywhere below means the byte offset in the RAM backend file (= RAM block
 * offset; equals the guest-physical address below the PCI hole), or in the anonymous mapping.
 * With an anonymous backend there is no file to punch: mapping the store over the guest's
 * anonymous pages frees them, and an unmerge maps fresh anonymous memory back.
 *
 * Threading: the constructor binds the socket and starts the request thread (all signals
 * blocked) that serves every client with poll(); requests are handled one at a time, to
 * completion. Once guest RAM is found, a second thread (satori-uffd) serves the userfaultfd.
 * QEMU's own threads enter the agent through the interposed discard calls (see "discards");
 * the merge table is shared under g_state_lock, which a MERGE takes per chunk.
 *
 * Pause-free merging (docs/merging.md has the argument): when the kernel supports userfaultfd
 * write-protection of the RAM mapping (shmem: Linux >= 6.0; anonymous RAM needs
 * UFFD_FEATURE_WP_UNPOPULATED, Linux >= 6.6), every chunk of at most WP_CHUNK_PAGES pages of a
 * merge is registered with the agent's own userfaultfd (taken from the oracle's write tracker
 * for that long, see "userfaultfd (wp)"), write-protected while it is compared and remapped,
 * then released and woken. A vCPU or an I/O thread that writes one of those pages meanwhile
 * sleeps in the kernel with mmap_lock dropped; when woken it retries the write, which lands in
 * the new mapping (a copy-on-write copy of the store page). Nothing else is ever held: the
 * caller need not stop the vCPUs. PING/STATS say wp=1. Without the capability (or with
 * SATORI_AGENT_WP=0 in QEMU's environment) wp=0, wp_error says why, and the caller must hold
 * the vCPUs (QMP stop/cont) around merge and unmerge requests: a guest write between the
 * memcmp and the mmap would be lost. The uffd thread counts the writes that waited and wakes
 * their page once no chunk is held: nothing waits on the agent beyond one chunk.
 *
 * ---------------------------------------------------------------------------------------------
 * PROTOCOL (binary, little-endian, version 1). Every request and every reply is a 16-byte
 * header followed by `len` bytes of payload. A client may send any number of requests on one
 * connection, one at a time (send request, read reply).
 *
 *   request header:  u32 magic = 0x52544153 ("SATR")  u16 op  u16 version = 1  u32 flags  u32 len
 *   reply header:    u32 magic = 0x52544153           u16 op  u16 version = 1  i32 status u32 len
 *
 * status 0 = success, payload as listed below; status > 0 = an errno value, payload = a UTF-8
 * error message. An error never changes any page. After a bad magic or a len above 64 MiB the
 * agent replies with an error and closes that connection (it cannot resynchronise); after every
 * other error the connection stays usable. Whatever happens, the agent keeps serving.
 *
 *   op 1 PING        payload: none.   reply: text "key=value\n" lines (version, pid, wp, wp_error,
 *                    ops, ...). wp=1: merges are pause-free (see above), wp=0: hold the vCPUs.
 *                    ops lists the op numbers this agent serves (comma-separated).
 *   op 2 OPEN_STORE  payload: the store file path (1..4095 bytes, no NUL). Opened O_RDONLY
 *                    (MAP_PRIVATE mappings may still be written: copy-on-write). Re-opening the
 *                    same file is fine; switching to another file while pages are merged from
 *                    the current one is EBUSY.   reply: u64 store size in bytes
 *   op 3 MERGE       flags bit 1 (MERGE_STATUS): append one status byte per pair to the reply
 *                    (0 merged, 1 mismatched, 2 failed), in the order of the pairs.
 *                    payload: n x (u64 guest_off, u64 store_off), n >= 0, both 4096-aligned,
 *                    inside the RAM file / the store file (checked for the whole batch first:
 *                    any bad pair -> EINVAL/ERANGE and nothing is done).
 *                    Pairs are handled in order; consecutive pairs whose guest and store offsets
 *                    both advance by one page form a run; a run is memcmp'ed page by page and
 *                    split at mismatches (and, with wp=1, into chunks of WP_CHUNK_PAGES, each
 *                    write-protected while it is compared and mapped); each matching sub-run is
 *                    mapped with ONE mmap;
 *                    MADV_DONTFORK and the RAM file punch follow once per guest-contiguous
 *                    extent of merged pages (fewer calls when only the guest side advances).
 *                    reply: u64 merged, u64 mismatched, u64 failed, u64 elapsed_ns,
 *                           u64 mmap_calls, u64 last_errno (of a failed page, 0 if none)
 *                    "failed" pages (e.g. ENOMEM from vm.max_map_count) are left as they were.
 *   op 4 UNMERGE     payload: u64 guest_off, u64 npages (aligned, inside RAM). Pages of the
 *                    range that this agent merged get their current bytes written back into
 *                    the RAM file, which is then mapped back MAP_SHARED (anonymous RAM: a filled
 *                    anonymous mapping is moved in with mremap); the guest sees no change.
 *                    With wp=1 each chunk is write-protected meanwhile (pause-free).
 *                    reply: u64 restored, u64 failed
 *   op 5 STATS       payload: none.   reply: text "key=value\n" lines (see do_stats;
 *                    thread_cpu_ns is the CPU time of the agent's thread: every request so far)
 *   op 6 LIST        payload: none, or u32 flags; flags bit 0 = leave out pages the guest has
 *                    faulted private since (copy-on-write broken, seen in /proc/self/pagemap as
 *                    present-or-swapped and not file-backed).
 *                    reply: m x (u64 guest_off, u64 store_off, u64 npages): the ranges mapped
 *                    from the store by this agent, coalesced where both offsets advance together.
 *   op 7 BREAKS      payload: none, or u32 flags; flags bit 0 = look even if nothing faulted.
 *                    The copy-on-write breaks since the last BREAKS: merged pages the guest has
 *                    written since (private now, as in LIST). Looked for only if one of QEMU's
 *                    threads other than the agent's took a page fault since the last look
 *                    (getrusage: a break is a write fault of a vCPU or an I/O thread, so no
 *                    fault, no break; a write by ANOTHER process, e.g. through /proc/<pid>/mem,
 *                    is charged to that process: only a forced look sees it); then only the
 *                    merged pages not yet reported are checked (PAGEMAP_SCAN, Linux >= 6.7,
 *                    else /proc/self/pagemap). Each broken page is reported once. Merged pages
 *                    QEMU discarded since (balloon: they got their RAM back and left the table)
 *                    are reported too, without any look.
 *                    reply: u64 pages_checked (0: nothing faulted, not looked), u64 faults (page
 *                           faults of QEMU's other threads so far), then m x (u64 guest_off,
 *                           u64 store_off, u64 npages): the newly broken pages, coalesced.
 *   op 8 MAPPED      payload: n x u64 store_off (4096-aligned). reply: n bytes, 1 if a guest page
 *                    of this VM may still map that store page (merged and not broken; a page
 *                    reported broken counts again if it is no longer private, e.g. after QEMU
 *                    discarded it with MADV_DONTNEED). For freeing store pages safely, without
 *                    listing every merged page.
 * ---------------------------------------------------------------------------------------------
 *
 * Until QEMU has mapped guest RAM, MERGE/UNMERGE/LIST answer ENOENT (STATS: ram_found=0).
 *
 * Limits: the store must only grow (append-only) while any page maps it; if it shrinks under a
 * mapping or under a memcmp, the access raises SIGBUS in QEMU. Pages are 4 KiB.
 * After a merge the RAM file has a hole where the page was: reading the file there gives
 * zeros (and allocates a page): read merged pages through /proc/<pid>/mem or the store.
 *
 * Build: cc -O2 -Wall -Werror -fPIC -shared -pthread -o satori_agent.so agent.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

/* userfaultfd features newer than the build host's headers may know (the values are ABI) */
#ifndef UFFD_FEATURE_WP_HUGETLBFS_SHMEM
#define UFFD_FEATURE_WP_HUGETLBFS_SHMEM (1 << 12) /* Linux 6.0: wp on shmem and hugetlbfs */
#endif
#ifndef UFFD_FEATURE_WP_UNPOPULATED
#define UFFD_FEATURE_WP_UNPOPULATED (1 << 13) /* Linux 6.6: wp on never-touched anon ptes */
#endif
/* PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7), from linux/fs.h */
struct satori_page_region {
    uint64_t start, end, categories;
};
struct satori_pm_scan_arg {
    uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
    uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
#define SATORI_PAGEMAP_SCAN _IOWR('f', 16, struct satori_pm_scan_arg)
#define SATORI_PAGE_IS_FILE (1ULL << 2)
#define SATORI_PAGE_IS_PRESENT (1ULL << 3)
#define SATORI_PAGE_IS_SWAPPED (1ULL << 4)

#define AGENT_MAGIC 0x52544153u
#define AGENT_VERSION 1
#define PG 4096ULL
#define MAX_PAYLOAD (64u << 20)
#define MAX_CLIENTS 16
#define IO_TIMEOUT_S 30
#define UNMERGE_CHUNK_PAGES 512
/* pages write-protected at once during a pause-free merge: bounds how long a guest write to one
 * of them waits (one chunk's memcmp + mmap, tens of microseconds) */
#define WP_CHUNK_PAGES 64

enum {
    OP_PING = 1,
    OP_OPEN_STORE = 2,
    OP_MERGE = 3,
    OP_UNMERGE = 4,
    OP_STATS = 5,
    OP_LIST = 6,
    OP_BREAKS = 7,
    OP_MAPPED = 8,
};
#define OPS_SERVED "1,2,3,4,5,6,7,8"
#define MERGE_STATUS 2u /* MERGE flags bit 1: per-pair status bytes in the reply */
enum { PAIR_MERGED = 0, PAIR_MISMATCHED = 1, PAIR_FAILED = 2 };

/* g_track entry: 0, or store_off | TRACK_MAPPED [| TRACK_BROKEN once BREAKS reported it] */
#define TRACK_MAPPED 1ULL
#define TRACK_BROKEN 2ULL
#define TRACK_FLAGS (PG - 1)

struct req_hdr {
    uint32_t magic;
    uint16_t op;
    uint16_t version;
    uint32_t flags;
    uint32_t len;
} __attribute__((packed));

struct rep_hdr {
    uint32_t magic;
    uint16_t op;
    uint16_t version;
    int32_t status;
    uint32_t len;
} __attribute__((packed));

/* ---- state: written by the constructor, then only by the agent thread ---- */
static char *g_sock_path;
static char *g_mem_path;
static dev_t g_sock_dev;
static ino_t g_sock_ino;
static int g_listen_fd = -1;

static int g_ram_fd = -1;           /* the RAM backend file, O_RDWR, for fallocate/remap */
static dev_t g_ram_dev;             /* its inode: QEMU's own fd of it is recognised by this */
static ino_t g_ram_ino;
static uint8_t *g_ram_base;         /* hva of guest offset 0 */
static uint64_t g_ram_size;         /* bytes */
static uint64_t *g_track;           /* per guest page: 0, or (store_off | 1) if mapped from store */
static uint64_t g_anon_size;        /* SATORI_AGENT_RAMSIZE: anonymous RAM of this size */
/* QEMU's madvise flags on its RAM mapping, re-applied where we map over it */
static int g_ram_dontfork, g_ram_hugepage, g_ram_dontdump, g_ram_mergeable;

static int g_store_fd = -1;
static char *g_store_path;
static dev_t g_store_dev;
static ino_t g_store_ino;
static const uint8_t *g_store_view;  /* PROT_READ MAP_SHARED view of the store for memcmp */
static uint64_t g_store_view_size;

static int g_pagemap_fd = -1;
static int g_pagemap_scan = -1; /* PAGEMAP_SCAN works: -1 unknown, 0 no, 1 yes */
static uint64_t g_faults_seen = UINT64_MAX; /* other threads' faults when BREAKS last looked */

/* userfaultfd write-protection (pause-free merging) */
static int g_wp_off;                 /* SATORI_AGENT_WP=0 */
static int g_uffd = -1;
static int g_wp;                     /* 1: merges protect their pages themselves */
static char g_wp_error[256] = "guest RAM not found yet";
static pthread_t g_uffd_thread;
static int g_uffd_thread_ok;
/* held by the request thread while a chunk is protected; the uffd thread takes it before it
 * touches a page, so it never unprotects a page a chunk is comparing */
static pthread_mutex_t g_chunk_lock = PTHREAD_MUTEX_INITIALIZER;
/* the merge table (g_track) and the mappings it describes: held by every request (a MERGE
 * per chunk, so QEMU's discards never wait for a whole batch) and by the discard hook that
 * runs in QEMU's threads (see "discards" below); recursive, as the agent's own calls of the
 * interposed functions come back through the hook */
static pthread_mutex_t g_state_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;
static __thread int t_agent_thread; /* 1 in the agent's request thread */

static struct {
    uint64_t merged, mismatched, failed, mmap_calls, merge_ns, merge_requests;
    uint64_t mmap_ns, madvise_ns, punch_ns; /* parts of merge_ns; the rest is mostly memcmp */
    uint64_t unmerged, unmerge_failed, punch_errors, madvise_errors, repaired;
    uint64_t requests, bad_requests, last_errno;
    uint64_t discarded, discard_failed; /* merged pages QEMU discarded (balloon): RAM back */
    uint64_t wp_chunks, wp_ns, wp_max_ns, wp_busy, wp_errors;
    uint64_t breaks_looks, breaks_skipped, breaks_pages_checked, breaks_found, breaks_ns;
    uint64_t mapped_queries;
} st;
/* written by the uffd thread, read by STATS: atomics */
static uint64_t g_wp_faults;

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
    /* write(2): to QEMU's stderr (its log); best effort, never blocks long */
    ssize_t r = write(2, buf, (size_t)n);
    (void)r;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    /* clock_gettime(2): monotonic clock for elapsed times */
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---------------------------------- socket I/O ---------------------------------- */

static int read_full(int fd, void *buf, size_t n)
{
    uint8_t *p = buf;
    while (n) {
        /* recv(2): the rest of a request; SO_RCVTIMEO bounds a stalled client */
        ssize_t r = recv(fd, p, n, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t n)
{
    const uint8_t *p = buf;
    while (n) {
        /* send(2) with MSG_NOSIGNAL: a client gone away must not SIGPIPE QEMU */
        ssize_t r = send(fd, p, n, MSG_NOSIGNAL);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

static int reply(int fd, uint16_t op, int32_t status, const void *payload, size_t len)
{
    struct rep_hdr h = {AGENT_MAGIC, op, AGENT_VERSION, status, (uint32_t)len};
    if (write_full(fd, &h, sizeof h) < 0)
        return -1;
    if (len && write_full(fd, payload, len) < 0)
        return -1;
    return 0;
}

static int reply_err(int fd, uint16_t op, int err, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    st.bad_requests++;
    return reply(fd, op, err ? err : EIO, msg, (size_t)n);
}

/* growable text buffer for key=value replies */
struct tbuf {
    char *p;
    size_t len, cap;
};

static void tb_printf(struct tbuf *b, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? b->cap - b->len : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if (b->p && b->len + (size_t)n < b->cap) {
            b->len += (size_t)n;
            return;
        }
        size_t ncap = (b->cap ? b->cap * 2 : 1024) + (size_t)n;
        char *np = realloc(b->p, ncap);
        if (!np)
            return;
        b->p = np;
        b->cap = ncap;
    }
}

/* ------------------------------- guest RAM lookup ------------------------------- */

/* An fd QEMU holds on the file (dev, ino), opened read-write: duplicated, or -1.
 *
 * The kernel merges two VMAs only if they map the same open file (struct file), so it must be
 * the descriptor QEMU mapped guest RAM from. When mem-path is /proc/self/fd/<n> (the harness
 * hands QEMU a memfd that way), QEMU open(2)s that path, which makes a new open file of the same
 * inode, and maps that one: descriptor <n> is the same inode but another open file, and a range
 * mapped back from it stays a VMA of its own forever. So <n> is skipped. (Which of the two a scan
 * met first depended on descriptor numbers: an intermittent test failure, guest RAM left in 61
 * mappings after a full unmerge.) */
static int dup_qemu_ram_fd(dev_t dev, unsigned long ino)
{
    long named = -1;
    if (g_mem_path && strncmp(g_mem_path, "/proc/self/fd/", 14) == 0) {
        char *e;
        named = strtol(g_mem_path + 14, &e, 10);
        if (*e || e == g_mem_path + 14)
            named = -1;
    }
    /* opendir(3) /proc/self/fd: QEMU keeps the memory-backend-file fd open */
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return -1;
    int found = -1;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        char *end;
        long n = strtol(de->d_name, &end, 10);
        if (*end || end == de->d_name || n == dirfd(d) || n == named)
            continue;
        struct stat sb;
        /* fstat(2) + fcntl(2) F_GETFL: same inode, and writable (fallocate, MAP_SHARED RW) */
        if (fstat((int)n, &sb) < 0 || !S_ISREG(sb.st_mode) || (unsigned long)sb.st_ino != ino ||
            sb.st_dev != dev)
            continue;
        int fl = fcntl((int)n, F_GETFL);
        if (fl < 0 || (fl & O_ACCMODE) != O_RDWR)
            continue;
        /* fcntl(2) F_DUPFD_CLOEXEC: our own fd on the same open file description */
        found = fcntl((int)n, F_DUPFD_CLOEXEC, 0);
        break;
    }
    closedir(d);
    return found;
}

static void parse_vmflags(const char *line)
{
    g_ram_dontfork = strstr(line, " dc") != NULL;
    g_ram_hugepage = strstr(line, " hg") != NULL;
    g_ram_dontdump = strstr(line, " dd") != NULL;
    g_ram_mergeable = strstr(line, " mg") != NULL;
}

/* ------------------------------ userfaultfd (wp) ------------------------------- */
/*
 * Guest RAM may already be registered with another userfaultfd: the oracle's write tracker
 * (harness/wptrack.c preloads one into every QEMU, at descriptor SATORI_TRACK_FD; the harness
 * enables asynchronous write-protect on it and registers guest RAM from outside). A mapping can
 * belong to one userfaultfd only, so the agent takes each chunk from the tracker just for the
 * chunk: UFFDIO_UNREGISTER on the tracker's descriptor, UFFDIO_REGISTER on its own, protect,
 * compare, remap, then unregister what is left of it (which also clears the protection and
 * wakes). It never registers anything back with the tracker: the oracle sees the range
 * unregistered at its next look, treats its pages as written and registers them again.
 * Nothing of guest RAM stays registered with the agent between chunks. (The kernel does not
 * check which userfaultfd a UFFDIO_WRITEPROTECT comes from, so the agent only ever protects or
 * unprotects ranges it has just registered itself: it never touches the tracker's bits.)
 */

static uint64_t g_track_gen; /* bumped whenever g_track changes (STATS caches its counts) */
static int g_tracker_fd = -1; /* the write tracker's userfaultfd in this process, if any */

/* The uffd thread: a write to a protected page sleeps in the kernel and queues a message here.
 * The request thread wakes the pages of each chunk itself when the chunk is done (and the
 * unregistration at its end wakes too), so a message read here is for a waiter already woken
 * or about to be. It only counts them, and wakes the page once no chunk is held (a wake is
 * for this userfaultfd's waiters only): nothing can wait on the agent beyond one chunk. */
static void *uffd_main(void *arg)
{
    (void)arg;
    for (;;) {
        struct uffd_msg m;
        /* read(2): the next userfaultfd message; the fd is blocking, so an idle agent costs
         * nothing here */
        ssize_t r = read(g_uffd, &m, sizeof m);
        if (r < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            logmsg("satori-agent: userfaultfd read: %s\n", strerror(errno));
            sleep(1);
            continue;
        }
        if (r != (ssize_t)sizeof m || m.event != UFFD_EVENT_PAGEFAULT)
            continue;
        __atomic_add_fetch(&g_wp_faults, 1, __ATOMIC_RELAXED);
        struct uffdio_range rg = {m.arg.pagefault.address & ~(PG - 1), PG};
        pthread_mutex_lock(&g_chunk_lock);
        /* ioctl(2) UFFDIO_WAKE: wake whoever of ours still waits on that address */
        ioctl(g_uffd, UFFDIO_WAKE, &rg);
        pthread_mutex_unlock(&g_chunk_lock);
    }
    return NULL;
}

/* Is fd a userfaultfd (its /proc/self/fd link is "anon_inode:[userfaultfd]")? */
static int is_uffd(int fd)
{
    char path[64], link[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    /* readlink(2): what the descriptor is */
    ssize_t n = readlink(path, link, sizeof link - 1);
    if (n <= 0)
        return 0;
    link[n] = 0;
    return strcmp(link, "anon_inode:[userfaultfd]") == 0;
}

/* The write tracker's userfaultfd: SATORI_TRACK_FD if it was still set when the agent started
 * (g_tracker_fd), else the one userfaultfd open in this process before the agent made its own. */
static void find_tracker(void)
{
    if (g_tracker_fd >= 0 && is_uffd(g_tracker_fd))
        return;
    g_tracker_fd = -1;
    /* opendir(3) /proc/self/fd: QEMU's descriptors */
    DIR *d = opendir("/proc/self/fd");
    if (!d)
        return;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        char *end;
        long n = strtol(de->d_name, &end, 10);
        if (*end || end == de->d_name || n == dirfd(d) || n == g_uffd)
            continue;
        if (is_uffd((int)n)) {
            g_tracker_fd = (int)n;
            break;
        }
    }
    closedir(d);
}

/* Take [goff, goff+len) of guest RAM from the tracker and register it with the agent's own
 * userfaultfd in write-protect mode. 0 or an errno. */
static int wp_claim(uint64_t goff, uint64_t len)
{
    struct uffdio_range rg = {(uint64_t)(uintptr_t)(g_ram_base + goff), len};
    struct uffdio_register reg = {.range = rg, .mode = UFFDIO_REGISTER_MODE_WP};
    int e = 0;
    for (int tries = 0; tries < 4; tries++) {
        /* ioctl(2) UFFDIO_UNREGISTER on the tracker's descriptor: the range leaves the oracle's
         * write tracking (a no-op where it is not registered; EINVAL while the tracker is not
         * set up: nothing to take) */
        if (g_tracker_fd >= 0)
            ioctl(g_tracker_fd, UFFDIO_UNREGISTER, &rg);
        /* ioctl(2) UFFDIO_REGISTER on the agent's own: write-protect mode only (no missing
         * faults). EBUSY: the tracker registered it again meanwhile: take it again */
        if (ioctl(g_uffd, UFFDIO_REGISTER, &reg) == 0)
            return 0;
        e = errno;
        if (e != EBUSY)
            break;
    }
    return e;
}

/* Unregister [goff, goff+len) from the agent's userfaultfd (clears the protection of what
 * is still mapped there as it was, and wakes its waiters). */
static void wp_release(uint64_t goff, uint64_t len)
{
    struct uffdio_range rg = {(uint64_t)(uintptr_t)(g_ram_base + goff), len};
    /* ioctl(2) UFFDIO_UNREGISTER on the agent's descriptor */
    if (ioctl(g_uffd, UFFDIO_UNREGISTER, &rg) == 0)
        return;
    /* part of it is a mapping made meanwhile that the tracker registered (EINVAL for the whole
     * range): page by page, so that every page still ours is released */
    for (uint64_t o = 0; o < len; o += PG) {
        struct uffdio_range r1 = {(uint64_t)(uintptr_t)(g_ram_base + goff + o), PG};
        /* ioctl(2) UFFDIO_UNREGISTER, one page (EINVAL: not ours, nothing to release) */
        ioctl(g_uffd, UFFDIO_UNREGISTER, &r1);
    }
}

/* Wake every thread of ours waiting on a write to [goff, goff+len). */
static void wp_wake(uint64_t goff, uint64_t len)
{
    struct uffdio_range rg = {(uint64_t)(uintptr_t)(g_ram_base + goff), len};
    /* ioctl(2) UFFDIO_WAKE: by address range, so it also reaches a waiter whose mapping was
     * replaced by the store page meanwhile; it retries its write there */
    if (ioctl(g_uffd, UFFDIO_WAKE, &rg) < 0)
        st.wp_errors++;
}

/* Start protecting a chunk: takes the chunk lock, claims and write-protects the range. 0, or
 * an errno (then nothing is held and nothing changed but the tracker's registration). */
static int chunk_begin(uint64_t goff, uint64_t len, uint64_t *t0)
{
    pthread_mutex_lock(&g_chunk_lock);
    *t0 = now_ns();
    int e = wp_claim(goff, len);
    if (!e) {
        struct uffdio_writeprotect w = {
            .range = {(uint64_t)(uintptr_t)(g_ram_base + goff), len},
            .mode = UFFDIO_WRITEPROTECT_MODE_WP};
        /* ioctl(2) UFFDIO_WRITEPROTECT: the uffd-wp bit on every pte of the range (a marker
         * on empty ones); the TLBs are flushed before it returns, so no CPU can write there
         * afterwards without faulting */
        if (ioctl(g_uffd, UFFDIO_WRITEPROTECT, &w) < 0) {
            e = errno;
            wp_release(goff, len);
        }
    }
    if (e) {
        if (e == EBUSY)
            st.wp_busy++; /* the tracker kept taking it back: not merged now, next time */
        else
            st.wp_errors++;
        pthread_mutex_unlock(&g_chunk_lock);
    }
    return e;
}

/* End a chunk: wake its waiters (those on pages remapped: the rest were woken when their
 * range was released), account for how long it was held, release the lock. */
static void chunk_end(uint64_t goff, uint64_t len, uint64_t t0)
{
    wp_wake(goff, len);
    uint64_t dt = now_ns() - t0;
    pthread_mutex_unlock(&g_chunk_lock);
    st.wp_chunks++;
    st.wp_ns += dt;
    if (dt > st.wp_max_ns)
        st.wp_max_ns = dt;
}

/* Make the agent's userfaultfd and start the uffd thread; on any failure g_wp stays 0 and
 * g_wp_error says why (merges then need the vCPUs held by the caller). */
static void setup_wp(void)
{
    if (g_wp_off) {
        snprintf(g_wp_error, sizeof g_wp_error, "disabled by SATORI_AGENT_WP=0");
        return;
    }
    find_tracker(); /* before the agent's own userfaultfd exists */
    /* shmem RAM needs wp on shmem (Linux 6.0); anonymous RAM needs markers on never-touched
     * ptes (Linux 6.6), or a write to such a page would not fault */
    uint64_t need = g_ram_fd >= 0 ? UFFD_FEATURE_WP_HUGETLBFS_SHMEM : UFFD_FEATURE_WP_UNPOPULATED;
    /* userfaultfd(2): blocking, close-on-exec; not UFFD_USER_MODE_ONLY, so that QEMU's I/O
     * threads writing guest RAM from the kernel (preadv into guest buffers) wait like vCPUs */
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (fd < 0) {
        snprintf(g_wp_error, sizeof g_wp_error, "userfaultfd(): %s", strerror(errno));
        return;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = need};
    /* ioctl(2) UFFDIO_API: the handshake, asking for the feature this kind of RAM needs */
    if (ioctl(fd, UFFDIO_API, &api) < 0 || !(api.ioctls & (1ULL << _UFFDIO_REGISTER))) {
        snprintf(g_wp_error, sizeof g_wp_error,
                 "this kernel's userfaultfd cannot write-protect %s guest RAM (%s; needs Linux "
                 ">= %s)", g_ram_fd >= 0 ? "shmem" : "anonymous", strerror(errno),
                 g_ram_fd >= 0 ? "6.0" : "6.6");
        close(fd);
        return;
    }
    g_uffd = fd;
    /* a trial on the first page: it must register in write-protect mode (EBUSY: the tracker
     * took it back at once; the mechanism works) */
    int e = wp_claim(0, PG);
    if (e == 0)
        wp_release(0, PG);
    if (e && e != EBUSY) {
        snprintf(g_wp_error, sizeof g_wp_error, "UFFDIO_REGISTER of guest RAM in wp mode: %s",
                 strerror(e));
        g_uffd = -1;
        /* close(2): the agent's userfaultfd, unused */
        close(fd);
        return;
    }
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    /* pthread_create(3): the uffd thread; it inherits the request thread's full signal mask */
    e = pthread_create(&g_uffd_thread, &attr, uffd_main, NULL);
    pthread_attr_destroy(&attr);
    if (e) {
        snprintf(g_wp_error, sizeof g_wp_error, "pthread_create: %s", strerror(e));
        close(fd);
        g_uffd = -1;
        return;
    }
    g_uffd_thread_ok = 1;
    pthread_setname_np(g_uffd_thread, "satori-uffd");
    g_wp = 1;
    g_wp_error[0] = 0;
}

static int set_ram(uint64_t start, uint64_t size, int fd, const char **why)
{
    uint64_t *track = calloc(size / PG ? size / PG : 1, sizeof *track);
    if (!track) {
        *why = "out of memory for the merge table";
        return ENOMEM;
    }
    struct stat sb;
    /* fstat(2): the RAM file's inode, to recognise QEMU's own fd of it (discard_hook) */
    if (fd >= 0 && fstat(fd, &sb) == 0) {
        g_ram_dev = sb.st_dev;
        g_ram_ino = sb.st_ino;
    }
    g_ram_fd = fd;
    g_ram_size = size;
    g_track = track;
    g_ram_base = (uint8_t *)(uintptr_t)start;
    setup_wp();
    return 0;
}

/* Anonymous RAM (memory-backend-ram): the private anonymous rw VMA of exactly g_anon_size
 * bytes with QEMU's MADV_DONTFORK; if several, the one also MADV_MERGEABLE. */
static int find_ram_anon(const char **why)
{
    /* fopen(3) of /proc/self/smaps: mapping list with VmFlags (QEMU's madvise flags) */
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f) {
        *why = "cannot read /proc/self/smaps";
        return errno ? errno : EIO;
    }
    char *line = NULL, flags[8][256];
    size_t cap = 0;
    uint64_t starts[8], cur = 0;
    int n = 0, in_cand = 0;
    while (getline(&line, &cap, f) > 0) {
        unsigned long s, e, off, maj, min, inode;
        char perms[8];
        int pos = 0;
        if (sscanf(line, "%lx-%lx %7s %lx %lx:%lx %lu %n", &s, &e, perms, &off, &maj, &min,
                   &inode, &pos) == 7) {
            char *path = line + pos;
            path[strcspn(path, "\n")] = 0;
            in_cand = !*path && inode == 0 && strcmp(perms, "rw-p") == 0 &&
                      (uint64_t)(e - s) == g_anon_size;
            cur = s;
            continue;
        }
        if (in_cand && strncmp(line, "VmFlags:", 8) == 0) {
            in_cand = 0;
            if (strstr(line, " dc") && n < 8) {
                starts[n] = cur;
                snprintf(flags[n], sizeof flags[n], "%s", line);
                n++;
            }
        }
    }
    free(line);
    fclose(f);
    int pick = -1, nmg = 0;
    for (int i = 0; i < n; i++)
        if (strstr(flags[i], " mg")) {
            nmg++;
            pick = i;
        }
    if (n == 1)
        pick = 0;
    else if (nmg != 1)
        pick = -1;
    if (pick < 0) {
        *why = n ? "several anonymous mappings of the RAM size: cannot tell which is guest RAM"
                 : "no anonymous guest RAM mapping of SATORI_AGENT_RAMSIZE bytes in "
                   "/proc/self/smaps (QEMU not started yet, or the size differs)";
        return n ? EEXIST : ENOENT;
    }
    parse_vmflags(flags[pick]);
    return set_ram(starts[pick], g_anon_size & ~(PG - 1), -1, why);
}

/* Find the guest RAM mapping in /proc/self/smaps. Returns 0, or an errno with *why set. */
static int find_ram(const char **why)
{
    if (g_ram_base)
        return 0;
    if (!g_mem_path && g_anon_size)
        return find_ram_anon(why);
    if (!g_mem_path) {
        *why = "neither SATORI_AGENT_MEMPATH nor SATORI_AGENT_RAMSIZE was set when QEMU started";
        return ENODEV;
    }
    struct stat want;
    /* stat(2) of the path given (a memfd is /proc/self/fd/<n>: its name in the mapping list is
     * "/memfd:... (deleted)", so the mapping is found by device and inode, never by name) */
    if (stat(g_mem_path, &want) < 0 || !S_ISREG(want.st_mode)) {
        *why = "SATORI_AGENT_MEMPATH is not a regular file (QEMU not started yet?)";
        return errno ? errno : ENOENT;
    }
    /* fopen(3) of /proc/self/smaps: mapping list with VmFlags (QEMU's madvise flags) */
    FILE *f = fopen("/proc/self/smaps", "re");
    if (!f) {
        *why = "cannot read /proc/self/smaps";
        return errno ? errno : EIO;
    }
    char *line = NULL;
    size_t cap = 0;
    uint64_t start = 0, ext_end = 0;
    int in_ram = 0, got = 0, flags_done = 0;
    while (getline(&line, &cap, f) > 0) {
        unsigned long s, e, off, maj, min, inode;
        char perms[8];
        if (sscanf(line, "%lx-%lx %7s %lx %lx:%lx %lu", &s, &e, perms, &off, &maj, &min,
                   &inode) == 7) {
            in_ram = 0;
            if (inode != (unsigned long)want.st_ino || maj != major(want.st_dev) ||
                min != minor(want.st_dev))
                continue;
            if (!got && off == 0 && perms[3] == 's') {
                start = s;
                ext_end = e;
                got = 1;
                in_ram = 1;
            } else if (got && s == ext_end && off == s - start) {
                ext_end = e; /* the RAM mapping may already be split into several VMAs */
            }
            continue;
        }
        if (in_ram && !flags_done && strncmp(line, "VmFlags:", 8) == 0) {
            parse_vmflags(line);
            flags_done = 1;
        }
    }
    free(line);
    fclose(f);
    if (!got) {
        *why = "guest RAM mapping not found in /proc/self/smaps (QEMU not started yet, or "
               "mem-path differs)";
        return ENOENT;
    }
    /* QEMU maps guest RAM, then madvises it (HUGEPAGE, DONTDUMP, DONTFORK last, in
     * ram_block_add). The flags read here are the ones an unmerge gives the RAM file mapped
     * back, so that it merges with its neighbours into one VMA again: taken before QEMU's
     * madvise, every unmerged range would stay a VMA of its own. So the RAM counts as found
     * only once MADV_DONTFORK is on it, as find_ram_anon requires too. */
    if (!flags_done || !g_ram_dontfork) {
        *why = "QEMU has mapped guest RAM but not finished setting it up (no MADV_DONTFORK "
               "on it yet)";
        return ENOENT;
    }
    /* Prefer a dup of QEMU's own fd of the RAM file: the kernel merges adjacent VMAs only if
     * they map the same struct file, so an unmerge maps it back with the very same file and
     * QEMU's RAM VMA heals into one again (own open(): one VMA more per unmerged range). */
    int fd = dup_qemu_ram_fd(want.st_dev, (unsigned long)want.st_ino);
    if (fd < 0)
        /* open(2): the RAM backend file, O_RDWR for fallocate(PUNCH_HOLE) and the MAP_SHARED
         * remap on unmerge; O_CLOEXEC so QEMU's helpers do not inherit it */
        fd = open(g_mem_path, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        *why = "cannot open the guest RAM file";
        return errno;
    }
    struct stat sb;
    /* fstat(2): check it is the mapped file (same device and inode) and take its size */
    if (fstat(fd, &sb) < 0 || sb.st_ino != want.st_ino || sb.st_dev != want.st_dev) {
        close(fd);
        *why = "guest RAM file was replaced since QEMU mapped it";
        return ESTALE;
    }
    uint64_t size = ext_end - start;
    if ((uint64_t)sb.st_size < size)
        size = (uint64_t)sb.st_size;
    int e = set_ram(start, size & ~(PG - 1), fd, why);
    if (e)
        close(fd);
    return e;
}

/* -------------------------------- content store -------------------------------- */

/* Make g_store_view cover the whole store file. Returns 0 or an errno. */
static int refresh_store_view(const char **why)
{
    struct stat sb;
    /* fstat(2): the store's current size (it grows while the engine appends) */
    if (fstat(g_store_fd, &sb) < 0) {
        *why = "fstat of the store failed";
        return errno;
    }
    uint64_t size = (uint64_t)sb.st_size & ~(PG - 1);
    if (size == g_store_view_size)
        return 0;
    if (size < g_store_view_size) {
        *why = "the store file shrank (it must be append-only while mapped)";
        return EIO;
    }
    /* mmap(2): read-only shared view of the whole store, only used for memcmp */
    void *v = mmap(NULL, size, PROT_READ, MAP_SHARED, g_store_fd, 0);
    if (v == MAP_FAILED) {
        *why = "mmap of the store for reading failed";
        return errno;
    }
    if (g_store_view)
        /* munmap(2): drop the older, shorter view */
        munmap((void *)g_store_view, g_store_view_size);
    g_store_view = v;
    g_store_view_size = size;
    return 0;
}

/* Pages mapped from the store now (merged, not reported broken) and the ranges they form;
 * cached until g_track changes. */
static uint64_t merged_pages_now(uint64_t *ranges)
{
    static uint64_t gen = UINT64_MAX, c_pages, c_ranges;
    if (gen != g_track_gen) {
        uint64_t pages = 0, nr = 0, prev_g = 0, prev_s = 0;
        int have_prev = 0;
        uint64_t n = g_ram_size / PG;
        for (uint64_t i = 0; g_track && i < n; i++) {
            uint64_t t = g_track[i];
            if (!(t & TRACK_MAPPED) || (t & TRACK_BROKEN)) {
                have_prev = 0;
                continue;
            }
            uint64_t s = t & ~TRACK_FLAGS;
            if (!(have_prev && prev_g + 1 == i && prev_s + PG == s))
                nr++;
            pages++;
            have_prev = 1;
            prev_g = i;
            prev_s = s;
        }
        gen = g_track_gen;
        c_pages = pages;
        c_ranges = nr;
    }
    if (ranges)
        *ranges = c_ranges;
    return c_pages;
}

/* Any page still mapped from the store (broken or not): the store must not change under it. */
static int any_tracked(void)
{
    uint64_t n = g_ram_size / PG;
    for (uint64_t i = 0; g_track && i < n; i++)
        if (g_track[i])
            return 1;
    return 0;
}

static int do_open_store(int fd, const uint8_t *p, uint32_t len)
{
    if (len == 0 || len >= 4096 || memchr(p, 0, len))
        return reply_err(fd, OP_OPEN_STORE, EINVAL, "store path must be 1..4095 bytes, no NUL");
    char *path = strndup((const char *)p, len);
    if (!path)
        return reply_err(fd, OP_OPEN_STORE, ENOMEM, "out of memory");
    /* open(2): O_RDONLY is enough for MAP_PRIVATE|PROT_WRITE (writes are private copies) and
     * guarantees the agent never modifies the store; O_CLOEXEC keeps it from QEMU's children */
    int sfd = open(path, O_RDONLY | O_CLOEXEC);
    if (sfd < 0) {
        int e = errno;
        reply_err(fd, OP_OPEN_STORE, e, "cannot open store %s: %s", path, strerror(e));
        free(path);
        return 0;
    }
    struct stat sb;
    /* fstat(2): must be a regular file; identity (dev, inode) decides "same store" */
    if (fstat(sfd, &sb) < 0 || !S_ISREG(sb.st_mode)) {
        close(sfd);
        reply_err(fd, OP_OPEN_STORE, EINVAL, "store %s is not a regular file", path);
        free(path);
        return 0;
    }
    if (g_store_fd >= 0) {
        int same = sb.st_dev == g_store_dev && sb.st_ino == g_store_ino;
        if (!same && any_tracked()) {
            close(sfd);
            reply_err(fd, OP_OPEN_STORE, EBUSY,
                      "pages are still merged from store %s; unmerge them first", g_store_path);
            free(path);
            return 0;
        }
        if (g_store_view)
            /* munmap(2): the view of the previous store (merged mappings hold their own ref) */
            munmap((void *)g_store_view, g_store_view_size);
        g_store_view = NULL;
        g_store_view_size = 0;
        /* close(2): the previous store fd; existing MAP_PRIVATE mappings keep the file alive */
        close(g_store_fd);
        free(g_store_path);
    }
    g_store_fd = sfd;
    g_store_path = path;
    g_store_dev = sb.st_dev;
    g_store_ino = sb.st_ino;
    const char *why = "";
    int e = refresh_store_view(&why);
    if (e)
        return reply_err(fd, OP_OPEN_STORE, e, "%s: %s", why, strerror(e));
    uint64_t size = g_store_view_size;
    return reply(fd, OP_OPEN_STORE, 0, &size, sizeof size);
}

/* ------------------------------------ merge ------------------------------------ */

static void apply_madvise(uint8_t *hva, uint64_t len, int shared_ram)
{
    /* madvise(2) MADV_DONTFORK: QEMU marks guest RAM so a fork (helpers) does not copy it;
     * a new mapping over it lost that mark */
    if (g_ram_dontfork && madvise(hva, len, MADV_DONTFORK) < 0)
        st.madvise_errors++;
    /* madvise(2) MADV_DONTDUMP: keep core dumps as QEMU configured them */
    if (g_ram_dontdump && madvise(hva, len, MADV_DONTDUMP) < 0)
        st.madvise_errors++;
    /* madvise(2) MADV_HUGEPAGE: only when mapping the RAM file back, so the VMA merges with its
     * neighbours again. Never on store mappings: khugepaged could collapse a private range into
     * one anonymous huge page and silently un-share all its pages. */
    if (shared_ram && g_ram_hugepage && madvise(hva, len, MADV_HUGEPAGE) < 0)
        st.madvise_errors++;
    /* madvise(2) MADV_MERGEABLE: an anonymous RAM backend with merge=on stays KSM-scanned */
    if (shared_ram && g_ram_mergeable && madvise(hva, len, MADV_MERGEABLE) < 0)
        st.madvise_errors++;
}

/* Map guest RAM back over [hva, hva+len) as QEMU had it: the RAM file (MAP_SHARED) at its
 * offset, or fresh anonymous memory for an anonymous backend. */
static void *map_ram_back(uint8_t *hva, uint64_t len, uint64_t goff)
{
    if (g_ram_fd < 0)
        /* mmap(2) MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED: zero-filled anonymous guest memory */
        return mmap(hva, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                    -1, 0);
    /* mmap(2) MAP_SHARED|MAP_FIXED of the RAM file at the guest offset */
    return mmap(hva, len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, g_ram_fd, (off_t)goff);
}

/* After a failed MAP_FIXED: make sure the old mapping is still there (Linux >= 6.12 keeps it;
 * older kernels could leave a hole). The RAM file was not punched yet, so mapping it back
 * restores the page exactly. */
static void ensure_mapped(uint8_t *hva, uint64_t len, uint64_t goff)
{
    /* msync(2) MS_ASYNC: a cheap probe, fails with ENOMEM if part of the range is unmapped */
    if (msync(hva, len, MS_ASYNC) == 0 || errno != ENOMEM)
        return;
    /* map the RAM file back over the hole, as QEMU had it (anonymous RAM: its bytes are lost,
     * but QEMU does not crash on an unmapped hole) */
    void *p = map_ram_back(hva, len, goff);
    if (p != MAP_FAILED) {
        apply_madvise(hva, len, 1);
        st.repaired++;
    } else {
        logmsg("satori-agent: FATAL-ish: guest range %#" PRIx64 "+%#" PRIx64
               " unmapped and could not be restored: %s\n", goff, len, strerror(errno));
    }
}

struct merge_acc {
    uint64_t merged, mismatched, failed, mmap_calls, last_errno;
    uint64_t pend_off, pend_len; /* merged guest extent whose madvise+punch is still due */
};

/* madvise and punch a guest extent that was just mapped from the store. Deferred and done per
 * guest-contiguous extent, not per mmap: when the guest advances but the store does not
 * (one mmap per page), one fallocate covers many pages (the shmem punch costs ~5 us a call).
 * Never inside a protected chunk: the guest need not wait for it. */
static void flush_pending(struct merge_acc *a)
{
    if (!a->pend_len)
        return;
    uint8_t *hva = g_ram_base + a->pend_off;
    uint64_t t1 = now_ns();
    apply_madvise(hva, a->pend_len, 0);
    uint64_t t2 = now_ns();
    /* fallocate(2) PUNCH_HOLE|KEEP_SIZE: free the guest's own copy in the RAM file (tmpfs);
     * nothing maps those file pages any more, the file keeps its size */
    if (g_ram_fd >= 0 && fallocate(g_ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                   (off_t)a->pend_off, (off_t)a->pend_len) < 0)
        st.punch_errors++;
    st.madvise_ns += t2 - t1;
    st.punch_ns += now_ns() - t2;
    a->pend_len = 0;
}

/* Note pages [goff, goff+len) as mapped from the store: madvise+punch them later. */
static void add_pending(struct merge_acc *a, uint64_t goff, uint64_t len)
{
    if (a->pend_len && a->pend_off + a->pend_len == goff) {
        a->pend_len += len;
        return;
    }
    flush_pending(a);
    a->pend_off = goff;
    a->pend_len = len;
}

/* Map store pages over npages guest pages. 1 if mapped, 0 if not (the guest page is as it was). */
static int map_run(uint64_t goff, uint64_t soff, uint64_t npages, struct merge_acc *a)
{
    uint8_t *hva = g_ram_base + goff;
    uint64_t len = npages * PG;
    a->mmap_calls++;
    uint64_t t0 = now_ns();
    /* mmap(2) MAP_PRIVATE|MAP_FIXED of the store over the guest pages: the guest now reads the
     * store's page cache frames; a write makes a private anonymous copy (copy-on-write).
     * ENOMEM here (vm.max_map_count) leaves the old mapping as it was. */
    void *p = mmap(hva, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, g_store_fd,
                   (off_t)soff);
    if (p == MAP_FAILED) {
        a->failed += npages;
        a->last_errno = (uint64_t)errno;
        ensure_mapped(hva, len, goff);
        st.mmap_ns += now_ns() - t0;
        return 0;
    }
    st.mmap_ns += now_ns() - t0;
    for (uint64_t i = 0; i < npages; i++)
        g_track[goff / PG + i] = (soff + i * PG) | TRACK_MAPPED;
    g_track_gen++;
    a->merged += npages;
    return 1;
}

/* Merge pairs [i, j), a run (guest and store offsets both advance by one page). With wp the
 * run is one chunk, write-protected from before its memcmp until after its mmap: a guest write
 * meanwhile waits and lands in the store page's copy-on-write copy. status[k] gets the outcome
 * of pair k. */
static void merge_chunk(const uint64_t *pairs, uint64_t i, uint64_t j, uint8_t *status,
                        struct merge_acc *a)
{
    uint64_t g0 = pairs[2 * i], len = (j - i) * PG, t0 = 0;
    if (g_wp) {
        int e = chunk_begin(g0, len, &t0);
        if (e) {
            a->failed += j - i;
            a->last_errno = (uint64_t)e;
            memset(status + i, PAIR_FAILED, j - i);
            return;
        }
    }
    uint64_t k = i;
    while (k < j) {
        uint64_t g = pairs[2 * k], s = pairs[2 * k + 1];
        if (memcmp(g_ram_base + g, g_store_view + s, PG) != 0) {
            a->mismatched++;
            status[k++] = PAIR_MISMATCHED;
            continue;
        }
        uint64_t m = k + 1;
        while (m < j && memcmp(g_ram_base + pairs[2 * m], g_store_view + pairs[2 * m + 1],
                               PG) == 0)
            m++;
        memset(status + k, map_run(g, s, m - k, a) ? PAIR_MERGED : PAIR_FAILED, m - k);
        k = m;
    }
    if (g_wp) {
        /* pages not mapped keep their old mapping: release them (unprotected, woken) */
        for (k = i; k < j;) {
            if (status[k] == PAIR_MERGED) {
                k++;
                continue;
            }
            uint64_t m = k + 1;
            while (m < j && status[m] != PAIR_MERGED)
                m++;
            wp_release(pairs[2 * k], (m - k) * PG);
            k = m;
        }
        chunk_end(g0, len, t0);
    }
    /* madvise and punch what was mapped, outside the protected window */
    for (k = i; k < j;) {
        if (status[k] != PAIR_MERGED) {
            k++;
            continue;
        }
        uint64_t m = k + 1;
        while (m < j && status[m] == PAIR_MERGED)
            m++;
        add_pending(a, pairs[2 * k], (m - k) * PG);
        k = m;
    }
}

static int do_merge(int fd, const uint8_t *p, uint32_t len, uint32_t flags)
{
    if (len % 16)
        return reply_err(fd, OP_MERGE, EINVAL, "merge payload of %u bytes is not n x 16", len);
    if (flags & ~MERGE_STATUS)
        return reply_err(fd, OP_MERGE, EINVAL, "unknown merge flags %#x", flags);
    const char *why = "";
    pthread_mutex_lock(&g_state_lock);
    int e = find_ram(&why);
    if (!e && g_store_fd < 0) {
        e = EBADF;
        why = "no store open (send OPEN_STORE first)";
    } else if (!e) {
        e = refresh_store_view(&why);
    }
    pthread_mutex_unlock(&g_state_lock);
    if (e)
        return reply_err(fd, OP_MERGE, e, "%s (%s)", why, strerror(e));
    uint64_t n = len / 16;
    /* the reply: 6 counters, then (MERGE_STATUS) one status byte per pair */
    uint8_t *out = malloc(48 + n);
    uint64_t *pairs = malloc(len ? len : 1);
    if (!pairs || !out) {
        free(pairs);
        free(out);
        return reply_err(fd, OP_MERGE, ENOMEM, "out of memory");
    }
    memcpy(pairs, p, len);
    for (uint64_t i = 0; i < n; i++) {
        uint64_t g = pairs[2 * i], s = pairs[2 * i + 1];
        const char *bad = NULL;
        if ((g | s) & (PG - 1)) {
            e = EINVAL;
            bad = "not 4096-aligned";
        } else if (g >= g_ram_size) {
            e = ERANGE;
            bad = "guest offset outside guest RAM";
        } else if (s >= g_store_view_size) {
            e = ERANGE;
            bad = "store offset beyond the store's end";
        }
        if (bad) {
            free(pairs);
            free(out);
            return reply_err(fd, OP_MERGE, e,
                             "pair %" PRIu64 ": offsets %#" PRIx64 ", %#" PRIx64
                             ": %s (RAM %#" PRIx64 ", store %#" PRIx64 " bytes)",
                             i, g, s, bad, g_ram_size, g_store_view_size);
        }
    }
    uint64_t t0 = now_ns();
    struct merge_acc a = {0};
    uint8_t *status = out + 48;
    uint64_t i = 0;
    while (i < n) {
        /* a run: both offsets advance by one page; with wp at most WP_CHUNK_PAGES long */
        uint64_t j = i + 1;
        while (j < n && pairs[2 * j] == pairs[2 * (j - 1)] + PG &&
               pairs[2 * j + 1] == pairs[2 * (j - 1) + 1] + PG &&
               (!g_wp || j - i < WP_CHUNK_PAGES))
            j++;
        pthread_mutex_lock(&g_state_lock);
        merge_chunk(pairs, i, j, status, &a);
        pthread_mutex_unlock(&g_state_lock);
        i = j;
    }
    pthread_mutex_lock(&g_state_lock);
    flush_pending(&a);
    pthread_mutex_unlock(&g_state_lock);
    uint64_t dt = now_ns() - t0;
    free(pairs);
    st.merged += a.merged;
    st.mismatched += a.mismatched;
    st.failed += a.failed;
    st.mmap_calls += a.mmap_calls;
    st.merge_ns += dt;
    st.merge_requests++;
    if (a.last_errno)
        st.last_errno = a.last_errno;
    uint64_t c[6] = {a.merged, a.mismatched, a.failed, dt, a.mmap_calls, a.last_errno};
    memcpy(out, c, sizeof c);
    int r = reply(fd, OP_MERGE, 0, out, 48 + ((flags & MERGE_STATUS) ? n : 0));
    free(out);
    return r;
}

/* ----------------------------------- unmerge ----------------------------------- */

/* Give guest pages [i, j) (all mapped from the store) their own RAM back, bytes unchanged.
 * 1 on success, 0 if they stay as they were. */
static int unmerge_chunk(uint64_t i, uint64_t j)
{
    uint8_t *hva = g_ram_base + i * PG;
    uint64_t l = (j - i) * PG, t0 = 0;
    if (g_wp && chunk_begin(i * PG, l, &t0))
        return 0;
    int ok = 0;
    if (g_ram_fd >= 0) {
        /* the guest's current bytes (store page or its private copy) into the RAM file, whose
         * pages here are holes since the merge and mapped by nobody; then the file is mapped
         * back: the guest never sees a state without its bytes */
        uint64_t done = 0;
        while (done < l) {
            /* pwrite(2): from QEMU's own mapping of the page into the RAM file */
            ssize_t w = pwrite(g_ram_fd, hva + done, l - done, (off_t)(i * PG + done));
            if (w <= 0) {
                if (w < 0 && errno == EINTR)
                    continue;
                break;
            }
            done += (uint64_t)w;
        }
        if (done == l && map_ram_back(hva, l, i * PG) != MAP_FAILED) {
            ok = 1;
        } else if (done == l && msync(hva, l, MS_ASYNC) < 0 && errno == ENOMEM) {
            /* msync(2) as a probe: the failed MAP_FIXED left a hole (kernels before 6.12); the
             * file holds the bytes, so mapping it back is the unmerge */
            ok = map_ram_back(hva, l, i * PG) != MAP_FAILED;
            st.repaired += ok;
        }
        if (!ok) {
            st.last_errno = (uint64_t)(errno ? errno : EIO);
            uint64_t repaired = st.repaired;
            ensure_mapped(hva, l, i * PG);
            /* fallocate(2) PUNCH_HOLE: the copy just written is not used (the store mapping is
             * still there): free it again */
            if (st.repaired == repaired)
                fallocate(g_ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)(i * PG),
                          (off_t)l);
        }
    } else if (!g_wp) {
        /* anonymous RAM, vCPUs held by the caller: fresh anonymous memory over the range (it
         * merges into the RAM VMA again), then the bytes copied back */
        uint8_t *buf = malloc(l);
        if (buf) {
            memcpy(buf, hva, l);
            if (map_ram_back(hva, l, i * PG) != MAP_FAILED) {
                apply_madvise(hva, l, 1); /* first: an untouched VMA can still merge back */
                memcpy(hva, buf, l);
                ok = 1;
            } else {
                st.last_errno = (uint64_t)errno;
                ensure_mapped(hva, l, i * PG);
            }
            free(buf);
        } else {
            st.last_errno = ENOMEM;
        }
    } else {
        /* anonymous RAM, pause-free: the guest must never see the range without its bytes, so
         * fill a fresh anonymous mapping elsewhere and move it in at once (the moved pages keep
         * their own anon_vma: the range stays a VMA of its own) */
        /* mmap(2): a private anonymous staging area of the chunk's size */
        void *tmp = mmap(NULL, l, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (tmp != MAP_FAILED) {
            memcpy(tmp, hva, l);
            /* mremap(2) MREMAP_FIXED: replaces the store mapping at hva with the filled pages in
             * one step (the pages move, nothing is copied again) */
            if (mremap(tmp, l, l, MREMAP_MAYMOVE | MREMAP_FIXED, hva) != MAP_FAILED)
                ok = 1;
            else {
                st.last_errno = (uint64_t)errno;
                /* munmap(2): the staging area was not moved */
                munmap(tmp, l);
            }
        } else {
            st.last_errno = (uint64_t)errno;
        }
    }
    if (ok) {
        apply_madvise(hva, l, 1); /* an untouched anonymous VMA can still merge back */
        for (uint64_t k = i; k < j; k++)
            g_track[k] = 0;
        g_track_gen++;
    } else if (g_wp) {
        wp_release(i * PG, l);
    }
    if (g_wp)
        chunk_end(i * PG, l, t0);
    return ok;
}

static int do_unmerge(int fd, const uint8_t *p, uint32_t len)
{
    if (len != 16)
        return reply_err(fd, OP_UNMERGE, EINVAL, "unmerge payload must be 16 bytes, got %u", len);
    const char *why = "";
    int e = find_ram(&why);
    if (e)
        return reply_err(fd, OP_UNMERGE, e, "%s", why);
    uint64_t goff, npages;
    memcpy(&goff, p, 8);
    memcpy(&npages, p + 8, 8);
    if (goff & (PG - 1))
        return reply_err(fd, OP_UNMERGE, EINVAL, "guest offset %#" PRIx64 " not aligned", goff);
    if (goff > g_ram_size || npages > (g_ram_size - goff) / PG)
        return reply_err(fd, OP_UNMERGE, ERANGE,
                         "range %#" PRIx64 " + %" PRIu64 " pages outside guest RAM", goff,
                         npages);
    uint64_t restored = 0, failed = 0, chunk = g_wp ? WP_CHUNK_PAGES : UNMERGE_CHUNK_PAGES;
    uint64_t first = goff / PG, last = first + npages;
    uint64_t i = first;
    while (i < last) {
        if (!g_track[i]) {
            i++;
            continue;
        }
        uint64_t j = i + 1;
        while (j < last && g_track[j] && j - i < chunk)
            j++;
        if (unmerge_chunk(i, j))
            restored += j - i;
        else
            failed += j - i;
        i = j;
    }
    st.unmerged += restored;
    st.unmerge_failed += failed;
    uint64_t out[2] = {restored, failed};
    return reply(fd, OP_UNMERGE, 0, out, sizeof out);
}

/* ------------------------------------ list ------------------------------------- */

/* 1 if the page at hva is now private (copy-on-write broken): pagemap says present or swapped
 * and not a file page. Not-present pages are still backed by the store. */
static int page_private(uint64_t pme)
{
    int present = (pme >> 63) & 1, swapped = (pme >> 62) & 1, file = (pme >> 61) & 1;
    return (present || swapped) && !file;
}

static int open_pagemap(void)
{
    if (g_pagemap_fd >= 0)
        return 0;
    /* open(2) /proc/self/pagemap: per-page present/file bits of QEMU's own mappings */
    g_pagemap_fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    return g_pagemap_fd < 0 ? -1 : 0;
}

/* growable list of (guest_off, store_off, npages) ranges, coalesced where both advance */
struct ranges {
    uint64_t *v;
    uint64_t n, cap;
    int oom;
};

static void ranges_add(struct ranges *r, uint64_t goff, uint64_t soff)
{
    if (r->n && r->v[3 * (r->n - 1)] + r->v[3 * (r->n - 1) + 2] * PG == goff &&
        r->v[3 * (r->n - 1) + 1] + r->v[3 * (r->n - 1) + 2] * PG == soff) {
        r->v[3 * (r->n - 1) + 2]++;
        return;
    }
    if (r->n == r->cap) {
        uint64_t ncap = r->cap ? r->cap * 2 : 256;
        uint64_t *nv = ncap * 24 <= MAX_PAYLOAD * 4ULL ? realloc(r->v, ncap * 24) : NULL;
        if (!nv) {
            r->oom = 1;
            return;
        }
        r->v = nv;
        r->cap = ncap;
    }
    r->v[3 * r->n] = goff;
    r->v[3 * r->n + 1] = soff;
    r->v[3 * r->n + 2] = 1;
    r->n++;
}

/* Call fn(page) for every page of guest pages [first, first+n) that is private now (present
 * or swapped, not a file page: copy-on-write broken). PAGEMAP_SCAN returns only those (Linux
 * >= 6.7); else the pagemap entries are read and tested here. 0 or an errno. */
static int for_private_pages(uint64_t first, uint64_t n, void (*fn)(uint64_t, void *), void *arg)
{
    uint64_t start = (uint64_t)(uintptr_t)(g_ram_base + first * PG), end = start + n * PG;
    if (g_pagemap_scan != 0) {
        struct satori_page_region vec[256];
        uint64_t cur = start;
        while (cur < end) {
            struct satori_pm_scan_arg a = {
                .size = sizeof a,
                .start = cur,
                .end = end,
                .vec = (uint64_t)(uintptr_t)vec,
                .vec_len = 256,
                .category_inverted = SATORI_PAGE_IS_FILE,
                .category_mask = SATORI_PAGE_IS_FILE,
                .category_anyof_mask = SATORI_PAGE_IS_PRESENT | SATORI_PAGE_IS_SWAPPED,
                .return_mask = SATORI_PAGE_IS_PRESENT | SATORI_PAGE_IS_SWAPPED,
            };
            /* ioctl(2) PAGEMAP_SCAN: the kernel walks the page tables of the range and returns
             * only the regions whose pages are not file pages and present or swapped */
            long r = ioctl(g_pagemap_fd, SATORI_PAGEMAP_SCAN, &a);
            if (r < 0) {
                if (g_pagemap_scan < 0 && (errno == ENOTTY || errno == EINVAL)) {
                    g_pagemap_scan = 0; /* an older kernel: read the entries instead */
                    break;
                }
                return errno;
            }
            g_pagemap_scan = 1;
            for (long k = 0; k < r; k++)
                for (uint64_t a2 = vec[k].start; a2 < vec[k].end; a2 += PG)
                    fn((a2 - (uint64_t)(uintptr_t)g_ram_base) / PG, arg);
            if (a.walk_end <= cur)
                break;
            cur = a.walk_end;
        }
        if (g_pagemap_scan == 1)
            return 0;
    }
    uint64_t pm[512];
    for (uint64_t i = 0; i < n; i += 512) {
        uint64_t c = n - i < 512 ? n - i : 512;
        uint64_t vpn = (uint64_t)(uintptr_t)g_ram_base / PG + first + i;
        /* pread(2): c pagemap entries (8 bytes each) from this page on */
        ssize_t r = pread(g_pagemap_fd, pm, c * 8, (off_t)(vpn * 8));
        if (r != (ssize_t)(c * 8))
            return r < 0 ? errno : EIO;
        for (uint64_t k = 0; k < c; k++)
            if (page_private(pm[k]))
                fn(first + i + k, arg);
    }
    return 0;
}

/* merged pages QEMU discarded since the last BREAKS (they left the table) */
static struct ranges g_gone;

static void note_break(uint64_t page, void *arg)
{
    uint64_t t = g_track[page];
    if (!(t & TRACK_MAPPED) || (t & TRACK_BROKEN))
        return;
    g_track[page] = t | TRACK_BROKEN;
    ranges_add(arg, page * PG, t & ~TRACK_FLAGS);
}

/* Look for copy-on-write breaks among the merged pages not yet reported: marks them and adds
 * them to *brk. Returns pages looked at; *err gets an errno on failure (marks undone). */
static uint64_t look_for_breaks(struct ranges *brk, int *err)
{
    uint64_t t0 = now_ns(), n = g_ram_size / PG, checked = 0;
    int e = open_pagemap() ? errno : 0;
    for (uint64_t i = 0; i < n && !e;) {
        if ((g_track[i] & (TRACK_MAPPED | TRACK_BROKEN)) != TRACK_MAPPED) {
            i++;
            continue;
        }
        uint64_t j = i + 1;
        while (j < n && (g_track[j] & (TRACK_MAPPED | TRACK_BROKEN)) == TRACK_MAPPED)
            j++;
        e = for_private_pages(i, j - i, note_break, brk);
        checked += j - i;
        i = j;
    }
    if (!e && brk->oom)
        e = ENOMEM;
    if (e) {
        /* not reported: unmark them, they are found again at the next look */
        for (uint64_t k = 0; k < brk->n; k++)
            for (uint64_t q = 0; q < brk->v[3 * k + 2]; q++)
                g_track[brk->v[3 * k] / PG + q] &= ~TRACK_BROKEN;
        brk->n = 0;
    }
    if (brk->n)
        g_track_gen++;
    st.breaks_looks++;
    st.breaks_pages_checked += checked;
    st.breaks_ns += now_ns() - t0;
    *err = e;
    return checked;
}

static int do_breaks(int fd, const uint8_t *p, uint32_t len)
{
    uint32_t flags = 0;
    if (len == 4)
        memcpy(&flags, p, 4);
    else if (len != 0)
        return reply_err(fd, OP_BREAKS, EINVAL, "breaks payload must be empty or u32 flags");
    if (flags & ~1u)
        return reply_err(fd, OP_BREAKS, EINVAL, "unknown breaks flags %#x", flags);
    const char *why = "";
    int e = find_ram(&why);
    if (e)
        return reply_err(fd, OP_BREAKS, e, "%s", why);
    struct rusage ru, me;
    /* getrusage(2) RUSAGE_SELF and RUSAGE_THREAD: page faults of all of QEMU's threads so far
     * (a copy-on-write break is a write fault of one of them), less this thread's own (it
     * never writes guest RAM: its faults are its heap, stack and the pages it compares) */
    if (getrusage(RUSAGE_SELF, &ru) < 0 || getrusage(RUSAGE_THREAD, &me) < 0)
        return reply_err(fd, OP_BREAKS, errno, "getrusage failed");
    uint64_t faults = (uint64_t)(ru.ru_minflt + ru.ru_majflt - me.ru_minflt - me.ru_majflt);
    uint64_t head[2] = {0, faults};
    struct ranges brk = {0};
    if ((flags & 1) || faults != g_faults_seen) {
        head[0] = look_for_breaks(&brk, &e);
        if (e)
            return reply_err(fd, OP_BREAKS, e, "looking for copy-on-write breaks failed");
        /* counted before looking: a fault during the look is seen next time */
        g_faults_seen = faults;
        for (uint64_t k = 0; k < brk.n; k++)
            st.breaks_found += brk.v[3 * k + 2];
    } else {
        st.breaks_skipped++;
    }
    /* the reply: the counts, the pages QEMU discarded since the last call (they left the table
     * already: no look needed), then the breaks just found */
    uint64_t m = g_gone.n + brk.n;
    uint8_t *buf = malloc(16 + m * 24);
    if (!buf) {
        free(brk.v);
        return reply_err(fd, OP_BREAKS, ENOMEM, "out of memory");
    }
    memcpy(buf, head, 16);
    if (g_gone.n)
        memcpy(buf + 16, g_gone.v, g_gone.n * 24);
    if (brk.n)
        memcpy(buf + 16 + g_gone.n * 24, brk.v, brk.n * 24);
    free(g_gone.v);
    memset(&g_gone, 0, sizeof g_gone);
    free(brk.v);
    int r = reply(fd, OP_BREAKS, 0, buf, 16 + m * 24);
    free(buf);
    return r;
}

static int do_mapped(int fd, const uint8_t *p, uint32_t len)
{
    if (len % 8)
        return reply_err(fd, OP_MAPPED, EINVAL, "mapped payload of %u bytes is not n x 8", len);
    const char *why = "";
    int e = find_ram(&why);
    if (e)
        return reply_err(fd, OP_MAPPED, e, "%s", why);
    uint64_t n = len / 8, maxs = 0;
    for (uint64_t k = 0; k < n; k++) {
        uint64_t s;
        memcpy(&s, p + 8 * k, 8);
        if (s & (PG - 1))
            return reply_err(fd, OP_MAPPED, EINVAL, "store offset %#" PRIx64 " not aligned", s);
        if (s / PG + 1 > maxs)
            maxs = s / PG + 1;
    }
    uint64_t tn = g_ram_size / PG;
    if (g_store_fd < 0 || refresh_store_view(&why))
        maxs = 0; /* no store: nothing is mapped from it */
    else if (maxs > g_store_view_size / PG)
        maxs = g_store_view_size / PG; /* past the store's end: never mapped */
    /* per store page up to maxs: 0 not asked, 1 asked, 2 asked and mapped */
    uint8_t *want = calloc(maxs ? maxs : 1, 1), *ans = malloc(n ? n : 1);
    if (!want || !ans) {
        free(want);
        free(ans);
        return reply_err(fd, OP_MAPPED, ENOMEM, "out of memory");
    }
    for (uint64_t k = 0; k < n; k++) {
        uint64_t s;
        memcpy(&s, p + 8 * k, 8);
        if (s / PG < maxs)
            want[s / PG] = 1;
    }
    for (uint64_t i = 0; i < tn; i++) {
        uint64_t t = g_track[i], sp = (t & ~TRACK_FLAGS) / PG;
        if (!t || sp >= maxs || !want[sp])
            continue;
        if (t & TRACK_BROKEN) {
            /* reported broken: mapped again only if no longer private (QEMU discarded its copy
             * with MADV_DONTNEED: the store page shows through again) */
            uint64_t pme = 0;
            if (open_pagemap() == 0 &&
                /* pread(2): the one pagemap entry of this page */
                pread(g_pagemap_fd, &pme, 8,
                      (off_t)(((uint64_t)(uintptr_t)g_ram_base / PG + i) * 8)) == 8 &&
                page_private(pme))
                continue;
            g_track[i] = t & ~TRACK_BROKEN;
            g_track_gen++;
        }
        want[sp] = 2;
    }
    for (uint64_t k = 0; k < n; k++) {
        uint64_t s;
        memcpy(&s, p + 8 * k, 8);
        ans[k] = s / PG < maxs && want[s / PG] == 2;
    }
    st.mapped_queries++;
    int r = reply(fd, OP_MAPPED, 0, ans, n);
    free(want);
    free(ans);
    return r;
}

static int do_list(int fd, const uint8_t *p, uint32_t len)
{
    uint32_t flags = 0;
    if (len == 4)
        memcpy(&flags, p, 4);
    else if (len != 0)
        return reply_err(fd, OP_LIST, EINVAL, "list payload must be empty or u32 flags");
    if (flags & ~1u)
        return reply_err(fd, OP_LIST, EINVAL, "unknown list flags %#x", flags);
    const char *why = "";
    int e = find_ram(&why);
    if (e)
        return reply_err(fd, OP_LIST, e, "%s", why);
    if ((flags & 1) && open_pagemap())
        return reply_err(fd, OP_LIST, errno, "cannot open /proc/self/pagemap");
    uint64_t n = g_ram_size / PG, cap = 1024, cnt = 0;
    uint64_t *out = malloc(cap * 24);
    uint64_t pm[512];
    uint64_t pm_first = UINT64_MAX;
    if (!out)
        return reply_err(fd, OP_LIST, ENOMEM, "out of memory");
    int have_prev = 0;
    for (uint64_t i = 0; i < n; i++) {
        int keep = g_track[i] != 0;
        if (keep && (flags & 1)) {
            if (pm_first == UINT64_MAX || i < pm_first || i >= pm_first + 512) {
                pm_first = i;
                uint64_t vpn = ((uintptr_t)g_ram_base) / PG + i;
                /* pread(2): 512 pagemap entries (8 bytes each) from this page on */
                ssize_t r = pread(g_pagemap_fd, pm, sizeof pm, (off_t)(vpn * 8));
                if (r != (ssize_t)sizeof pm) {
                    free(out);
                    return reply_err(fd, OP_LIST, r < 0 ? errno : EIO,
                                     "short read of /proc/self/pagemap");
                }
            }
            keep = !page_private(pm[i - pm_first]);
            if (keep && (g_track[i] & TRACK_BROKEN)) {
                /* reported broken, shows the store page again (QEMU discarded its copy with
                 * MADV_DONTNEED): merged again, as this list says; BREAKS reports its next
                 * write */
                g_track[i] &= ~TRACK_BROKEN;
                g_track_gen++;
            }
        }
        if (!keep) {
            have_prev = 0;
            continue;
        }
        uint64_t s = g_track[i] & ~TRACK_FLAGS;
        if (have_prev && out[3 * (cnt - 1)] + out[3 * (cnt - 1) + 2] * PG == i * PG &&
            out[3 * (cnt - 1) + 1] + out[3 * (cnt - 1) + 2] * PG == s) {
            out[3 * (cnt - 1) + 2]++;
            continue;
        }
        if (cnt == cap) {
            if (cap * 24 * 2 > MAX_PAYLOAD * 4ULL) {
                free(out);
                return reply_err(fd, OP_LIST, E2BIG, "too many ranges");
            }
            uint64_t *no = realloc(out, cap * 2 * 24);
            if (!no) {
                free(out);
                return reply_err(fd, OP_LIST, ENOMEM, "out of memory");
            }
            out = no;
            cap *= 2;
        }
        out[3 * cnt] = i * PG;
        out[3 * cnt + 1] = s;
        out[3 * cnt + 2] = 1;
        cnt++;
        have_prev = 1;
    }
    int r = reply(fd, OP_LIST, 0, out, cnt * 24);
    free(out);
    return r;
}

/* ------------------------------------ stats ------------------------------------ */

/* CPU time of the agent's threads (the request thread calls this) */
static uint64_t agent_cpu_ns(uint64_t *uffd_ns)
{
    struct timespec cpu;
    /* clock_gettime(2) CLOCK_THREAD_CPUTIME_ID: the request thread serves every request */
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
    uint64_t req = (uint64_t)cpu.tv_sec * 1000000000ULL + (uint64_t)cpu.tv_nsec, uf = 0;
    clockid_t cid;
    /* pthread_getcpuclockid(3) + clock_gettime(2): the uffd thread's CPU time */
    if (g_uffd_thread_ok && pthread_getcpuclockid(g_uffd_thread, &cid) == 0 &&
        clock_gettime(cid, &cpu) == 0)
        uf = (uint64_t)cpu.tv_sec * 1000000000ULL + (uint64_t)cpu.tv_nsec;
    *uffd_ns = uf;
    return req + uf;
}

static int do_stats(int fd, uint16_t op)
{
    struct tbuf b = {0};
    const char *why = "";
    find_ram(&why); /* best effort: ping and stats work before QEMU mapped RAM */
    tb_printf(&b, "version=%d\npid=%d\nops=%s\n", AGENT_VERSION, (int)getpid(), OPS_SERVED);
    tb_printf(&b, "mem_path=%s\nram_kind=%s\n", g_mem_path ? g_mem_path : "",
              g_mem_path ? "file" : (g_anon_size ? "anon" : "none"));
    tb_printf(&b, "wp=%d\nwp_error=%s\n", g_wp, g_wp ? "" : g_wp_error);
    if (op == OP_STATS) {
        uint64_t ranges = 0, pages = merged_pages_now(&ranges);
        tb_printf(&b, "ram_found=%d\nram_base=%" PRIu64 "\nram_size=%" PRIu64 "\n",
                  g_ram_base != NULL, (uint64_t)(uintptr_t)g_ram_base, g_ram_size);
        tb_printf(&b, "store_path=%s\nstore_size=%" PRIu64 "\n",
                  g_store_path ? g_store_path : "", g_store_view_size);
        tb_printf(&b,
                  "merged_total=%" PRIu64 "\nmismatched_total=%" PRIu64
                  "\nfailed_total=%" PRIu64 "\nmmap_calls=%" PRIu64 "\nmerge_ns=%" PRIu64
                  "\nmerge_requests=%" PRIu64 "\n",
                  st.merged, st.mismatched, st.failed, st.mmap_calls, st.merge_ns,
                  st.merge_requests);
        tb_printf(&b, "mmap_ns=%" PRIu64 "\nmadvise_ns=%" PRIu64 "\npunch_ns=%" PRIu64 "\n",
                  st.mmap_ns, st.madvise_ns, st.punch_ns);
        tb_printf(&b,
                  "unmerged_total=%" PRIu64 "\nunmerge_failed_total=%" PRIu64
                  "\nmerged_pages=%" PRIu64 "\nmerged_ranges=%" PRIu64 "\n",
                  st.unmerged, st.unmerge_failed, pages, ranges);
        uint64_t uffd_ns = 0, cpu_ns = agent_cpu_ns(&uffd_ns);
        tb_printf(&b, "thread_cpu_ns=%" PRIu64 "\nuffd_cpu_ns=%" PRIu64 "\n", cpu_ns, uffd_ns);
        tb_printf(&b,
                  "wp_chunks=%" PRIu64 "\nwp_ns=%" PRIu64 "\nwp_max_ns=%" PRIu64
                  "\nwp_faults=%" PRIu64 "\nwp_busy=%" PRIu64
                  "\nwp_errors=%" PRIu64 "\n",
                  st.wp_chunks, st.wp_ns, st.wp_max_ns,
                  __atomic_load_n(&g_wp_faults, __ATOMIC_RELAXED),
                  st.wp_busy, st.wp_errors);
        tb_printf(&b,
                  "breaks_looks=%" PRIu64 "\nbreaks_skipped=%" PRIu64
                  "\nbreaks_pages_checked=%" PRIu64 "\nbreaks_found=%" PRIu64
                  "\nbreaks_ns=%" PRIu64 "\npagemap_scan=%d\nmapped_queries=%" PRIu64 "\n",
                  st.breaks_looks, st.breaks_skipped, st.breaks_pages_checked, st.breaks_found,
                  st.breaks_ns, g_pagemap_scan, st.mapped_queries);
        tb_printf(&b,
                  "punch_errors=%" PRIu64 "\nmadvise_errors=%" PRIu64 "\nrepaired=%" PRIu64
                  "\nlast_errno=%" PRIu64 "\nrequests=%" PRIu64 "\nbad_requests=%" PRIu64 "\n",
                  st.punch_errors, st.madvise_errors, st.repaired, st.last_errno, st.requests,
                  st.bad_requests);
        tb_printf(&b, "discarded=%" PRIu64 "\ndiscard_failed=%" PRIu64 "\n", st.discarded,
                  st.discard_failed);
    }
    int r = b.p ? reply(fd, op, 0, b.p, b.len) : reply_err(fd, op, ENOMEM, "out of memory");
    free(b.p);
    return r;
}

/* --------------------------- discards (balloon, free pages) --------------------------- */
/*
 * QEMU discards guest pages the guest gave back (virtio-balloon inflation, free page reporting,
 * virtio-mem): ram_block_discard_range() punches the RAM file (fallocate PUNCH_HOLE) and drops
 * the range's pages (madvise MADV_DONTNEED). On a page this agent mapped from the store neither
 * frees anything: the RAM file there is already a hole, and MADV_DONTNEED only drops the page
 * table entry of the private store mapping, which stays. The page would still be listed as
 * merged (LIST), so the engine would never free its store page, and the accounting would count
 * it as a shared guest page: a balloon would take the page from the guest without giving its
 * frame back to the host.
 *
 * So both calls are interposed (this library is preloaded: QEMU's calls resolve here first).
 * Before the real call, every merged page of the range gets guest RAM mapped back as QEMU had
 * it (the RAM file, a hole there, or fresh anonymous memory: nothing is allocated, the page
 * reads as zeros like any discarded page) and leaves the table. Only QEMU's own threads are
 * looked at: the agent's thread punches and madvises pages it has just merged, and those must
 * stay merged. The table is shared with the agent's thread: g_state_lock (recursive, as the
 * agent's own calls come back through here) is held by every request and by this hook.
 */

/* Give the merged pages among the whole pages of [goff, goff+len) their RAM back and forget
 * them. Caller holds g_state_lock; g_track is set. */
static void forget_discarded(uint64_t goff, uint64_t len)
{
    if (goff >= g_ram_size)
        return;
    if (len > g_ram_size - goff)
        len = g_ram_size - goff;
    uint64_t i = (goff + PG - 1) / PG, last = (goff + len) / PG;
    while (i < last) {
        if (!g_track[i]) {
            i++;
            continue;
        }
        uint64_t j = i + 1;
        while (j < last && g_track[j])
            j++;
        uint8_t *hva = g_ram_base + i * PG;
        uint64_t l = (j - i) * PG;
        if (map_ram_back(hva, l, i * PG) == MAP_FAILED) {
            /* the store mapping stays (kernels before 6.12 may have left a hole: repaired) */
            st.discard_failed += j - i;
            st.last_errno = (uint64_t)errno;
            ensure_mapped(hva, l, i * PG);
        } else {
            apply_madvise(hva, l, 1); /* the RAM VMA can merge back into one */
            for (uint64_t k = i; k < j; k++) {
                /* no longer mapped from the store: the next BREAKS reports it */
                if ((g_track[k] & (TRACK_MAPPED | TRACK_BROKEN)) == TRACK_MAPPED)
                    ranges_add(&g_gone, k * PG, g_track[k] & ~TRACK_FLAGS);
                g_track[k] = 0;
            }
            g_track_gen++;
            st.discarded += j - i;
        }
        i = j;
    }
}

/* The hook: QEMU discards guest offsets [goff, goff+len). */
static void discard_hook(uint64_t goff, uint64_t len)
{
    pthread_mutex_lock(&g_state_lock);
    if (g_track && len)
        forget_discarded(goff, len);
    pthread_mutex_unlock(&g_state_lock);
}

/* Is fd the guest RAM file (same inode as the agent's own fd of it)? */
static int is_ram_fd(int fd)
{
    struct stat sb;
    /* fstat(2): compare the inode; QEMU's fd and the agent's may be different descriptions */
    return g_ram_ino && fstat(fd, &sb) == 0 && sb.st_ino == g_ram_ino && sb.st_dev == g_ram_dev;
}

typedef int (*madvise_fn)(void *, size_t, int);
typedef int (*fallocate_fn)(int, int, off_t, off_t);

int madvise(void *addr, size_t len, int advice)
{
    static madvise_fn real;
    if (!real) {
        /* dlsym(3) RTLD_NEXT: the C library's madvise, behind this interposer */
        real = (madvise_fn)dlsym(RTLD_NEXT, "madvise");
        if (!real) {
            errno = ENOSYS;
            return -1;
        }
    }
    if (!t_agent_thread && (advice == MADV_DONTNEED || advice == MADV_REMOVE) && g_ram_base) {
        uint8_t *a = addr, *b = g_ram_base;
        if (a < b + g_ram_size && a + len > b) {
            uint64_t lo = a > b ? (uint64_t)(a - b) : 0;
            uint64_t hi = (uint64_t)(a + len - b);
            discard_hook(lo, (hi > g_ram_size ? g_ram_size : hi) - lo);
        }
    }
    return real(addr, len, advice);
}

static int fallocate_hooked(const char *name, fallocate_fn *real, int fd, int mode, off_t off,
                            off_t len)
{
    if (!*real) {
        /* dlsym(3) RTLD_NEXT: the C library's fallocate, behind this interposer */
        *real = (fallocate_fn)dlsym(RTLD_NEXT, name);
        if (!*real) {
            errno = ENOSYS;
            return -1;
        }
    }
    if (!t_agent_thread && (mode & FALLOC_FL_PUNCH_HOLE) && off >= 0 && len > 0 && g_ram_base &&
        is_ram_fd(fd))
        discard_hook((uint64_t)off, (uint64_t)len);
    return (*real)(fd, mode, off, len);
}

int fallocate(int fd, int mode, off_t off, off_t len)
{
    static fallocate_fn real;
    return fallocate_hooked("fallocate", &real, fd, mode, off, len);
}

int fallocate64(int fd, int mode, off_t off, off_t len)
{
    static fallocate_fn real;
    return fallocate_hooked("fallocate64", &real, fd, mode, off, len);
}

/* ------------------------------------ server ----------------------------------- */

/* Serve one request. Returns 0 to keep the connection, -1 to close it. */
static int serve_one(int fd)
{
    struct req_hdr h;
    if (read_full(fd, &h, sizeof h) < 0)
        return -1; /* EOF, timeout or error: drop the client */
    st.requests++;
    if (h.magic != AGENT_MAGIC) {
        reply_err(fd, 0, EPROTO, "bad magic %#x (not a satori agent request)", h.magic);
        return -1;
    }
    if (h.len > MAX_PAYLOAD) {
        reply_err(fd, h.op, E2BIG, "payload of %u bytes exceeds %u", h.len, MAX_PAYLOAD);
        return -1;
    }
    uint8_t *p = malloc(h.len ? h.len : 1);
    if (!p) {
        reply_err(fd, h.op, ENOMEM, "out of memory for a %u-byte request", h.len);
        return -1;
    }
    if (h.len && read_full(fd, p, h.len) < 0) {
        free(p);
        return -1;
    }
    int r;
    /* QEMU's discards (discard_hook) wait meanwhile; a MERGE takes the lock per chunk */
    int whole = h.op != OP_MERGE;
    if (whole)
        pthread_mutex_lock(&g_state_lock);
    if (h.version != AGENT_VERSION) {
        r = reply_err(fd, h.op, EPROTONOSUPPORT, "protocol version %u, agent speaks %u",
                      h.version, AGENT_VERSION);
    } else {
        switch (h.op) {
        case OP_PING:
            r = do_stats(fd, OP_PING);
            break;
        case OP_OPEN_STORE:
            r = do_open_store(fd, p, h.len);
            break;
        case OP_MERGE:
            r = do_merge(fd, p, h.len, h.flags);
            break;
        case OP_BREAKS:
            r = do_breaks(fd, p, h.len);
            break;
        case OP_MAPPED:
            r = do_mapped(fd, p, h.len);
            break;
        case OP_UNMERGE:
            r = do_unmerge(fd, p, h.len);
            break;
        case OP_STATS:
            r = h.len ? reply_err(fd, h.op, EINVAL, "stats takes no payload")
                      : do_stats(fd, OP_STATS);
            break;
        case OP_LIST:
            r = do_list(fd, p, h.len);
            break;
        default:
            r = reply_err(fd, h.op, EOPNOTSUPP, "unknown op %u", h.op);
        }
    }
    if (whole)
        pthread_mutex_unlock(&g_state_lock);
    free(p);
    return r;
}

static void *agent_main(void *arg)
{
    (void)arg;
    t_agent_thread = 1; /* its own punches and madvises are not QEMU's discards */
    struct pollfd pf[1 + MAX_CLIENTS];
    int nclients = 0;
    pf[0].fd = g_listen_fd;
    pf[0].events = POLLIN;
    for (;;) {
        /* poll(2): wait for a new client or a request on any connected one */
        int r = poll(pf, 1 + (nfds_t)nclients, -1);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            logmsg("satori-agent: poll: %s\n", strerror(errno));
            sleep(1);
            continue;
        }
        for (int i = 1; i <= nclients; i++) {
            if (!(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            if (serve_one(pf[i].fd) < 0) {
                /* close(2): the client went away or broke the protocol */
                close(pf[i].fd);
                pf[i] = pf[nclients];
                nclients--;
                i--;
            }
        }
        if (pf[0].revents & POLLIN) {
            /* accept4(2): a new client; CLOEXEC so QEMU's children do not inherit it */
            int c = accept4(g_listen_fd, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0) {
                if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED)
                    usleep(10000); /* EMFILE and the like: do not spin */
                continue;
            }
            if (nclients == MAX_CLIENTS) {
                reply_err(c, 0, EMFILE, "too many agent clients (%d)", MAX_CLIENTS);
                close(c);
                continue;
            }
            struct timeval tv = {IO_TIMEOUT_S, 0};
            /* setsockopt(2) SO_RCVTIMEO/SO_SNDTIMEO: a stalled client cannot wedge the agent */
            setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
            setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
            nclients++;
            pf[nclients].fd = c;
            pf[nclients].events = POLLIN;
            pf[nclients].revents = 0;
        }
    }
    return NULL;
}

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
        if (strstr(t, "satori_agent"))
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

__attribute__((constructor)) static void satori_agent_init(void)
{
    const char *sock = getenv("SATORI_AGENT_SOCKET");
    if (!sock || !*sock)
        return; /* preloaded without a socket: stay inert */
    const char *mem = getenv("SATORI_AGENT_MEMPATH");
    g_sock_path = strdup(sock);
    g_mem_path = mem && *mem ? strdup(mem) : NULL;
    const char *anon = getenv("SATORI_AGENT_RAMSIZE");
    if (anon && *anon)
        g_anon_size = strtoull(anon, NULL, 0);
    const char *wp = getenv("SATORI_AGENT_WP");
    g_wp_off = wp && strcmp(wp, "0") == 0;
    /* the write tracker's descriptor, if its constructor has not removed the variable yet
     * (find_tracker checks it, or looks for the tracker's userfaultfd itself) */
    const char *trk = getenv("SATORI_TRACK_FD");
    if (trk && *trk)
        g_tracker_fd = atoi(trk);
    unsetenv("SATORI_AGENT_SOCKET");
    unsetenv("SATORI_AGENT_MEMPATH");
    unsetenv("SATORI_AGENT_RAMSIZE");
    unsetenv("SATORI_AGENT_WP");
    scrub_ld_preload();
    if (!g_sock_path)
        return;
    if (sysconf(_SC_PAGESIZE) != (long)PG) {
        logmsg("satori-agent: host page size is not 4096; agent disabled\n");
        return;
    }
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(g_sock_path) >= sizeof sa.sun_path) {
        logmsg("satori-agent: socket path too long: %s\n", g_sock_path);
        return;
    }
    strcpy(sa.sun_path, g_sock_path);
    struct stat sb;
    /* lstat(2)+unlink(2): remove a stale socket left by a killed QEMU (never another file) */
    if (lstat(g_sock_path, &sb) == 0 && S_ISSOCK(sb.st_mode))
        unlink(g_sock_path);
    /* socket(2): the agent's listening UNIX stream socket, CLOEXEC */
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        logmsg("satori-agent: socket: %s\n", strerror(errno));
        return;
    }
    /* bind(2)+listen(2): bound here, before QEMU's main, so the socket exists as soon as the
     * process does (the harness waits for it) */
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(fd, 8) < 0) {
        logmsg("satori-agent: bind/listen %s: %s\n", g_sock_path, strerror(errno));
        close(fd);
        return;
    }
    /* chmod(2): only the owner (root) may drive the agent */
    chmod(g_sock_path, 0600);
    if (stat(g_sock_path, &sb) == 0) {
        g_sock_dev = sb.st_dev;
        g_sock_ino = sb.st_ino;
    }
    g_listen_fd = fd;
    sigset_t all, old;
    sigfillset(&all);
    /* pthread_sigmask(3): the thread inherits a full mask, so QEMU's signals (SIGIO, SIGALRM,
     * SIG_IPI, SIGTERM...) are always delivered to QEMU's own threads */
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t;
    /* pthread_create(3): the one agent thread */
    int e = pthread_create(&t, &attr, agent_main, NULL);
    pthread_attr_destroy(&attr);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (e) {
        logmsg("satori-agent: pthread_create: %s\n", strerror(e));
        close(fd);
        g_listen_fd = -1;
        unlink(g_sock_path);
        return;
    }
    pthread_setname_np(t, "satori-agent");
}

__attribute__((destructor)) static void satori_agent_fini(void)
{
    struct stat sb;
    if (g_listen_fd < 0 || !g_sock_path)
        return;
    /* stat(2)+unlink(2): remove our socket at QEMU's normal exit, only if it is still ours */
    if (stat(g_sock_path, &sb) == 0 && sb.st_dev == g_sock_dev && sb.st_ino == g_sock_ino)
        unlink(g_sock_path);
}
