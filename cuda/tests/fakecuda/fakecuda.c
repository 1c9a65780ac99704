/*
 * fakecuda: a CPU stand-in for the part of the CUDA driver API that tensorstream calls, built
 * as libcuda.so so that cudarc's dynamic loading finds it (LD_LIBRARY_PATH). It exists to run
 * the GPU code paths (staging ring, events, streams, device arena, mapped route, readback) on
 * machines without a GPU, as a LOGIC test. It measures nothing: no figure obtained with it
 * says anything about a GPU.
 *
 * It is strict where the real driver is strict, and stricter where a real GPU would silently
 * give wrong bytes:
 *   - "device memory" is host memory filled with 0xA5 (device memory is not zeroed), and every
 *     copy or memset must lie inside one live allocation;
 *   - work on a stream runs later, on that stream's own thread (optionally after a delay,
 *     FAKECUDA_DELAY_US per operation), so host memory reused before the copy's event completed
 *     shows up as wrong bytes on the "device";
 *   - a copy from registered (page-locked) host memory reads its source when it runs; from
 *     pageable memory the source is taken at once (as the real driver stages it);
 *   - memory registered READ_ONLY (tensorstream registers mapped file pages so) is copied
 *     aside when registered, as the driver pins those pages: a file truncated afterwards
 *     leaves the pinned pages to the copy engine, where a CPU read of the mapping would fault
 *     (SIGBUS); pages that cannot be read at registration fail it, as pinning would;
 *   - calls that need a current context fail with CUDA_ERROR_INVALID_CONTEXT without one;
 *   - unregistering host memory, or freeing device memory, that a queued copy still uses is
 *     a violation: it is reported on stderr and the process aborts; so is asynchronous work
 *     on the legacy default stream, which it does not model;
 *   - an injected device fault (below) is sticky, as a real one is: every later call that
 *     takes new work, waits or frees fails with it.
 *
 * Settings (environment, read by cuInit):
 *   FAKECUDA_DEVICES   number of devices (default 1; 0: cuInit says CUDA_ERROR_NO_DEVICE)
 *   FAKECUDA_MEM       bytes of memory per device (default 8 GiB)
 *   FAKECUDA_DELAY_US  mean delay before each queued operation runs, drawn at random from
 *                      0..2×mean per operation so that streams finish out of order (default 0)
 *   FAKECUDA_REGISTER  "ok" (default), "refuse" (every cuMemHostRegister fails with
 *                      CUDA_ERROR_NOT_PERMITTED) or "refuse-readonly" (only READ_ONLY ones do)
 *   FAKECUDA_STATS     print counters on stderr at exit
 *   FAKECUDA_FAIL_H2D_AT=N    the Nth cuMemcpyHtoDAsync fails at once (CUDA_ERROR_INVALID_VALUE)
 *   FAKECUDA_FAIL_SYNC_AT=N   the Nth cuEventSynchronize / cuStreamSynchronize waits, then fails
 *                             (CUDA_ERROR_LAUNCH_FAILED, as after a device fault)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sys/uio.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef struct fake_ctx *CUcontext;
typedef struct fake_stream *CUstream;
typedef struct fake_event *CUevent;

enum {
    OK = 0,
    ERR_INVALID_VALUE = 1,
    ERR_OUT_OF_MEMORY = 2,
    ERR_NOT_INITIALIZED = 3,
    ERR_NO_DEVICE = 100,
    ERR_INVALID_DEVICE = 101,
    ERR_INVALID_CONTEXT = 201,
    ERR_INVALID_HANDLE = 400,
    ERR_NOT_READY = 600,
    ERR_ALREADY_REGISTERED = 712,
    ERR_NOT_REGISTERED = 713,
    ERR_LAUNCH_FAILED = 719,
    ERR_NOT_PERMITTED = 800,
    ERR_UNKNOWN = 999,
};

#define REGISTER_READ_ONLY 0x08
#define EVENT_DISABLE_TIMING 0x2
#define MAX_DEVICES 8

struct fake_ctx {
    int device;
    int retained;
};

enum op_kind { OP_H2D, OP_D2H, OP_MEMSET, OP_RECORD, OP_WAIT };

struct op {
    enum op_kind kind;
    unsigned char *dst;
    const unsigned char *src;
    const unsigned char *host_src; /* the caller's source address (src may be a pinned copy) */
    size_t n;
    unsigned char value;
    unsigned char *owned; /* staged copy of a pageable source, freed after the copy */
    CUevent event;
    unsigned long long gen;
    struct op *next;
};

struct fake_stream {
    pthread_t thread;
    struct op *head, *tail;
    int busy;
    int closing;
    unsigned int flags;
    unsigned int seed;
    struct fake_stream *next_live;
};

struct fake_event {
    unsigned long long recorded, done;
    unsigned int flags;
    double done_at;
    int refs;       /* queued operations that name it */
    int destroyed;  /* freed by the last operation when it was destroyed with work pending */
};

struct region {
    uintptr_t base;
    size_t len;
    unsigned int flags;
    unsigned char *pinned; /* READ_ONLY registrations: the pages' bytes when pinned */
    struct region *next;
};

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int initialised;
static int n_devices = 1;
static unsigned long long mem_total = 8ULL << 30, mem_used;
static long delay_us;
static int register_mode; /* 0 ok, 1 refuse all, 2 refuse read-only */
static struct fake_ctx contexts[MAX_DEVICES];
static struct region *allocations, *registered;
static struct fake_stream *streams;
static __thread CUcontext current;
static unsigned long long n_h2d, n_h2d_pageable, bytes_h2d, n_d2h, n_memset, n_events, max_queue;
static unsigned long long fail_h2d_at, fail_sync_at, n_h2d_calls, n_sync_calls;
/* After an injected device fault: the error every later call returns, as a real context's
 * sticky error (the work already queued still runs; nothing more is accepted). */
static CUresult sticky;

/* Fault injection: true when this call is the one to fail (callers hold mu). */
static int inject(unsigned long long *calls, unsigned long long at) {
    return ++*calls == at && at != 0;
}

static void violation(const char *what) {
    fprintf(stderr, "fakecuda: VIOLATION: %s\n", what);
    fflush(stderr);
    abort();
}

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void print_stats(void) {
    fprintf(stderr,
            "fakecuda: %llu host->device copies (%llu from pageable memory, %llu bytes), "
            "%llu device->host copies, %llu memsets, %llu events, longest stream queue %llu\n",
            n_h2d, n_h2d_pageable, bytes_h2d, n_d2h, n_memset, n_events, max_queue);
}

/* --- bookkeeping (callers hold mu) --- */

static struct region *find(struct region *list, uintptr_t p, size_t n) {
    for (struct region *r = list; r; r = r->next)
        if (p >= r->base && n <= r->len && p - r->base <= r->len - n)
            return r;
    return NULL;
}

static int pending_use(uintptr_t base, size_t len, int host);

/* The link that points at the region starting at `base` (at the list's end: none does). */
static struct region **link_of(struct region **list, uintptr_t base) {
    while (*list && (*list)->base != base)
        list = &(*list)->next;
    return list;
}

/* Takes the region starting at `base` out of `list`, unless a queued operation still uses it
 * (a violation: `what` says which call); NULL when there is no such region. */
static struct region *unlink_unused(struct region **list, uintptr_t base, int host,
                                    const char *what) {
    struct region **at = link_of(list, base);
    struct region *reg = *at;
    if (!reg)
        return NULL;
    if (pending_use(reg->base, reg->len, host))
        violation(what);
    *at = reg->next;
    return reg;
}

static int overlaps(struct region *list, uintptr_t p, size_t n) {
    for (struct region *r = list; r; r = r->next)
        if (p < r->base + r->len && r->base < p + n)
            return 1;
    return 0;
}

/* Whether a queued operation still uses [base, base+len): host memory (`host`: a copy's
 * host source or destination) or device memory (a copy's or memset's device side). */
static int pending_use(uintptr_t base, size_t len, int host) {
    for (struct fake_stream *s = streams; s; s = s->next_live)
        for (struct op *o = s->head; o; o = o->next) {
            uintptr_t p = 0;
            if (o->kind == OP_H2D)
                p = host ? (o->owned ? 0 : (uintptr_t)o->host_src) : (uintptr_t)o->dst;
            else if (o->kind == OP_D2H)
                p = host ? (uintptr_t)o->dst : (uintptr_t)o->src;
            else if (o->kind == OP_MEMSET && !host)
                p = (uintptr_t)o->dst;
            if (p && p < base + len && base < p + o->n)
                return 1;
        }
    return 0;
}

static int queue_empty_all(void) {
    for (struct fake_stream *s = streams; s; s = s->next_live)
        if (s->head || s->busy)
            return 0;
    return 1;
}

static void release_event(CUevent e) {
    if (--e->refs == 0 && e->destroyed)
        free(e);
}

/* --- stream threads --- */

static void run(struct op *o) {
    switch (o->kind) {
    case OP_H2D:
    case OP_D2H:
        memcpy(o->dst, o->owned ? o->owned : o->src, o->n);
        break;
    case OP_MEMSET:
        memset(o->dst, o->value, o->n);
        break;
    default:
        break;
    }
}

static void *stream_main(void *arg) {
    struct fake_stream *s = arg;
    pthread_mutex_lock(&mu);
    for (;;) {
        while (!s->head && !s->closing)
            pthread_cond_wait(&cv, &mu);
        if (!s->head)
            break;
        struct op *o = s->head;
        s->busy = 1;
        if (o->kind == OP_WAIT) {
            while (o->event->done < o->gen)
                pthread_cond_wait(&cv, &mu);
        } else {
            pthread_mutex_unlock(&mu);
            if (delay_us > 0)
                usleep((useconds_t)(rand_r(&s->seed) % (unsigned)(2 * delay_us + 1)));
            run(o);
            pthread_mutex_lock(&mu);
        }
        if (o->kind == OP_RECORD && o->event->done < o->gen) {
            o->event->done = o->gen;
            o->event->done_at = now_ms();
        }
        s->head = o->next;
        if (!s->head)
            s->tail = NULL;
        s->busy = 0;
        if (o->event)
            release_event(o->event);
        free(o->owned);
        free(o);
        pthread_cond_broadcast(&cv);
    }
    /* Unlink and free: destroyed and drained. */
    for (struct fake_stream **p = &streams; *p; p = &(*p)->next_live)
        if (*p == s) {
            *p = s->next_live;
            break;
        }
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    free(s);
    return NULL;
}

/* Queues `o` on `s` (NULL: the legacy default stream, which runs it at once: tensorstream's
 * streams are all non-blocking, so it waits for none of them). Caller holds mu. */
static void submit(CUstream s, struct op *o) {
    if (!s) {
        pthread_mutex_unlock(&mu);
        run(o);
        pthread_mutex_lock(&mu);
        if (o->kind == OP_RECORD && o->event->done < o->gen) {
            o->event->done = o->gen;
            o->event->done_at = now_ms();
        }
        if (o->event)
            release_event(o->event);
        free(o->owned);
        free(o);
        pthread_cond_broadcast(&cv);
        return;
    }
    o->next = NULL;
    if (s->tail)
        s->tail->next = o;
    else
        s->head = o;
    s->tail = o;
    unsigned long long depth = 0;
    for (struct op *q = s->head; q; q = q->next)
        depth++;
    if (depth > max_queue)
        max_queue = depth;
    pthread_cond_broadcast(&cv);
}

static struct op *new_op(enum op_kind k) {
    struct op *o = calloc(1, sizeof *o);
    if (o)
        o->kind = k;
    return o;
}

/* Callers must not hold mu: `sticky` and a context's `retained` count are written under it by
 * other threads (a primary context released while another thread queues work on it). */
static CUresult need_ctx(void) {
    if (!initialised)
        return ERR_NOT_INITIALIZED;
    pthread_mutex_lock(&mu);
    CUresult r = sticky ? sticky
                 : current && current->retained > 0 ? OK
                                                    : ERR_INVALID_CONTEXT;
    pthread_mutex_unlock(&mu);
    return r;
}

/* --- initialisation, devices, contexts --- */

CUresult cuInit(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&mu);
    if (!initialised) {
        const char *v;
        if ((v = getenv("FAKECUDA_DEVICES")))
            n_devices = atoi(v) < 0 ? 0 : atoi(v) > MAX_DEVICES ? MAX_DEVICES : atoi(v);
        if ((v = getenv("FAKECUDA_MEM")))
            mem_total = strtoull(v, NULL, 10);
        if ((v = getenv("FAKECUDA_DELAY_US")))
            delay_us = atol(v);
        if ((v = getenv("FAKECUDA_REGISTER")))
            register_mode = !strcmp(v, "refuse") ? 1 : !strcmp(v, "refuse-readonly") ? 2 : 0;
        if ((v = getenv("FAKECUDA_FAIL_H2D_AT")))
            fail_h2d_at = strtoull(v, NULL, 10);
        if ((v = getenv("FAKECUDA_FAIL_SYNC_AT")))
            fail_sync_at = strtoull(v, NULL, 10);
        if ((v = getenv("FAKECUDA_STATS")) && *v && strcmp(v, "0"))
            atexit(print_stats);
        for (int i = 0; i < MAX_DEVICES; i++)
            contexts[i].device = i;
        initialised = 1;
    }
    pthread_mutex_unlock(&mu);
    return n_devices == 0 ? ERR_NO_DEVICE : OK;
}

CUresult cuDriverGetVersion(int *v) {
    if (!v)
        return ERR_INVALID_VALUE;
    *v = 12080;
    return OK;
}

CUresult cuDeviceGetCount(int *n) {
    if (!initialised)
        return ERR_NOT_INITIALIZED;
    if (!n)
        return ERR_INVALID_VALUE;
    *n = n_devices;
    return OK;
}

CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (!initialised)
        return ERR_NOT_INITIALIZED;
    if (!d)
        return ERR_INVALID_VALUE;
    if (ordinal < 0 || ordinal >= n_devices)
        return ERR_INVALID_DEVICE;
    *d = ordinal;
    return OK;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    if (!name || len <= 0)
        return ERR_INVALID_VALUE;
    if (d < 0 || d >= n_devices)
        return ERR_INVALID_DEVICE;
    snprintf(name, (size_t)len, "fakecuda CPU stand-in %d (not a GPU)", d);
    return OK;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice d) {
    if (!bytes)
        return ERR_INVALID_VALUE;
    if (d < 0 || d >= n_devices)
        return ERR_INVALID_DEVICE;
    *bytes = mem_total;
    return OK;
}

CUresult cuDeviceGetUuid(unsigned char *uuid, CUdevice d) {
    if (!uuid)
        return ERR_INVALID_VALUE;
    memset(uuid, 0, 16);
    uuid[0] = (unsigned char)d;
    return OK;
}

CUresult cuDeviceGetUuid_v2(unsigned char *uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }

CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    if (!v)
        return ERR_INVALID_VALUE;
    if (d < 0 || d >= n_devices)
        return ERR_INVALID_DEVICE;
    switch (attr) {
    case 40: /* ASYNC_ENGINE_COUNT */
        *v = 2;
        break;
    case 75: /* COMPUTE_CAPABILITY_MAJOR */
        *v = 9;
        break;
    case 91:  /* CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM */
    case 99:  /* HOST_REGISTER_SUPPORTED */
    case 113: /* READ_ONLY_HOST_REGISTER_SUPPORTED */
        *v = register_mode == 1 ? 0 : (attr == 113 && register_mode == 2) ? 0 : 1;
        break;
    case 115: /* MEMORY_POOLS_SUPPORTED: no, so cudarc allocates with cuMemAlloc */
        *v = 0;
        break;
    default:
        *v = 0;
    }
    return OK;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *c, CUdevice d) {
    if (!initialised)
        return ERR_NOT_INITIALIZED;
    if (!c)
        return ERR_INVALID_VALUE;
    if (d < 0 || d >= n_devices)
        return ERR_INVALID_DEVICE;
    pthread_mutex_lock(&mu);
    contexts[d].retained++;
    pthread_mutex_unlock(&mu);
    *c = &contexts[d];
    return OK;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) {
    if (d < 0 || d >= n_devices)
        return ERR_INVALID_DEVICE;
    pthread_mutex_lock(&mu);
    if (contexts[d].retained > 0)
        contexts[d].retained--;
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuCtxSetCurrent(CUcontext c) {
    current = c;
    return OK;
}

CUresult cuCtxGetCurrent(CUcontext *c) {
    if (!c)
        return ERR_INVALID_VALUE;
    *c = current;
    return OK;
}

CUresult cuCtxGetDevice(CUdevice *d) {
    if (!current)
        return ERR_INVALID_CONTEXT;
    *d = current->device;
    return OK;
}

CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }

CUresult cuCtxPopCurrent_v2(CUcontext *c) {
    if (c)
        *c = current;
    current = NULL;
    return OK;
}

CUresult cuCtxSynchronize(void) {
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&mu);
    while (!queue_empty_all())
        pthread_cond_wait(&cv, &mu);
    pthread_mutex_unlock(&mu);
    return OK;
}

/* --- memory --- */

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&mu);
    if (free_bytes)
        *free_bytes = mem_total - mem_used;
    if (total)
        *total = mem_total;
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    CUresult r = need_ctx();
    if (r)
        return r;
    if (!p || n == 0)
        return ERR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    if (n > mem_total - mem_used) {
        pthread_mutex_unlock(&mu);
        return ERR_OUT_OF_MEMORY;
    }
    mem_used += n;
    pthread_mutex_unlock(&mu);
    void *mem = NULL;
    struct region *reg = malloc(sizeof *reg);
    if (!reg || posix_memalign(&mem, 256, n)) {
        free(reg);
        pthread_mutex_lock(&mu);
        mem_used -= n;
        pthread_mutex_unlock(&mu);
        return ERR_OUT_OF_MEMORY;
    }
    memset(mem, 0xA5, n); /* device memory is not zeroed */
    pthread_mutex_lock(&mu);
    reg->base = (uintptr_t)mem;
    reg->len = n;
    reg->flags = 0;
    reg->next = allocations;
    allocations = reg;
    pthread_mutex_unlock(&mu);
    *p = (CUdeviceptr)(uintptr_t)mem;
    return OK;
}

CUresult cuMemFree_v2(CUdeviceptr p) {
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&mu);
    struct region *reg = unlink_unused(
        &allocations, (uintptr_t)p, 0,
        "cuMemFree of device memory that a queued copy or memset still uses");
    if (!reg) {
        pthread_mutex_unlock(&mu);
        return ERR_INVALID_VALUE;
    }
    mem_used -= reg->len;
    pthread_mutex_unlock(&mu);
    free((void *)reg->base);
    free(reg);
    return OK;
}

CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned int flags) {
    CUresult r = need_ctx();
    if (r)
        return r;
    if (!p || n == 0)
        return ERR_INVALID_VALUE;
    if (register_mode == 1 || (register_mode == 2 && (flags & REGISTER_READ_ONLY)))
        return ERR_NOT_PERMITTED;
    pthread_mutex_lock(&mu);
    if (overlaps(registered, (uintptr_t)p, n)) {
        pthread_mutex_unlock(&mu);
        return ERR_ALREADY_REGISTERED;
    }
    struct region *reg = calloc(1, sizeof *reg);
    if (!reg) {
        pthread_mutex_unlock(&mu);
        return ERR_OUT_OF_MEMORY;
    }
    if (flags & REGISTER_READ_ONLY) {
        /* Pin: take the pages' bytes now. process_vm_readv on ourselves returns EFAULT where a
         * plain read would raise SIGBUS (a mapping past the end of its file). */
        reg->pinned = malloc(n);
        CUresult why = reg->pinned ? OK : ERR_OUT_OF_MEMORY;
        for (size_t at = 0; why == OK && at < n;) {
            size_t step = n - at < (1u << 30) ? n - at : (1u << 30);
            struct iovec local = {reg->pinned + at, step}, remote = {(char *)p + at, step};
            ssize_t got = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
            if (got > 0) {
                at += (size_t)got;
            } else if (got == 0 || errno == EFAULT) {
                why = ERR_INVALID_VALUE; /* pages that cannot be read: pinning fails too */
            } else if (errno != EINTR) {
                fprintf(stderr, "fakecuda: process_vm_readv: %s\n", strerror(errno));
                violation("cannot emulate pinning here (process_vm_readv refused)");
            }
        }
        if (why != OK) {
            pthread_mutex_unlock(&mu);
            free(reg->pinned);
            free(reg);
            return why;
        }
    }
    reg->base = (uintptr_t)p;
    reg->len = n;
    reg->flags = flags;
    reg->next = registered;
    registered = reg;
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuMemHostUnregister(void *p) {
    CUresult r = need_ctx();
    if (r)
        return r;
    pthread_mutex_lock(&mu);
    struct region *reg = unlink_unused(
        &registered, (uintptr_t)p, 1,
        "cuMemHostUnregister of host memory that a queued copy still uses");
    if (!reg) {
        pthread_mutex_unlock(&mu);
        return ERR_NOT_REGISTERED;
    }
    pthread_mutex_unlock(&mu);
    free(reg->pinned);
    free(reg);
    return OK;
}

static CUresult check_device_range(CUdeviceptr p, size_t n, const char *what) {
    if (!find(allocations, (uintptr_t)p, n)) {
        fprintf(stderr, "fakecuda: %s: device range 0x%llx+%zu is not inside one allocation\n",
                what, p, n);
        return ERR_INVALID_VALUE;
    }
    return OK;
}

/* A new operation of `kind` on `n` bytes of device memory at `p` (checked to lie inside one
 * allocation), or NULL with *r set. Caller holds mu. */
static struct op *device_op(enum op_kind kind, CUdeviceptr p, size_t n, const char *what,
                            CUresult *r) {
    if ((*r = check_device_range(p, n, what)))
        return NULL;
    struct op *o = new_op(kind);
    if (!o)
        *r = ERR_OUT_OF_MEMORY;
    return o;
}

/* The copies and memsets, on stream `s` (NULL: the legacy default stream, which only the
 * synchronous entry points below use: it runs the work at once). */
static CUresult h2d_on(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
    CUresult r = need_ctx();
    if (r)
        return r;
    if (n == 0)
        return OK;
    if (!src)
        return ERR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    if (inject(&n_h2d_calls, fail_h2d_at)) {
        pthread_mutex_unlock(&mu);
        return ERR_INVALID_VALUE;
    }
    struct op *o = device_op(OP_H2D, dst, n, "cuMemcpyHtoDAsync", &r);
    if (!o) {
        pthread_mutex_unlock(&mu);
        return r;
    }
    o->dst = (unsigned char *)(uintptr_t)dst;
    o->src = src;
    o->host_src = src;
    o->n = n;
    n_h2d++;
    bytes_h2d += n;
    struct region *reg = find(registered, (uintptr_t)src, n);
    if (reg && reg->pinned)
        o->src = reg->pinned + ((uintptr_t)src - reg->base);
    if (!reg) {
        /* Pageable: the driver takes the bytes before returning. */
        n_h2d_pageable++;
        o->owned = malloc(n);
        if (!o->owned) {
            free(o);
            pthread_mutex_unlock(&mu);
            return ERR_OUT_OF_MEMORY;
        }
        memcpy(o->owned, src, n);
    }
    submit(s, o);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    return h2d_on(dst, src, n, NULL);
}

/* Asynchronous work on the legacy default stream is not modelled (tensorstream queues its
 * copies on its own streams): refused loudly rather than run with the wrong ordering. */
static void no_legacy_stream(CUstream s, const char *call) {
    if (!s) {
        fprintf(stderr, "fakecuda: %s on the legacy default stream\n", call);
        violation("asynchronous work on the legacy default stream (not modelled by fakecuda)");
    }
}

CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
    no_legacy_stream(s, "cuMemcpyHtoDAsync");
    return h2d_on(dst, src, n, s);
}

static CUresult d2h_on(void *dst, CUdeviceptr src, size_t n, CUstream s) {
    CUresult r = need_ctx();
    if (r)
        return r;
    if (n == 0)
        return OK;
    if (!dst)
        return ERR_INVALID_VALUE;
    pthread_mutex_lock(&mu);
    struct op *o = device_op(OP_D2H, src, n, "cuMemcpyDtoH", &r);
    if (!o) {
        pthread_mutex_unlock(&mu);
        return r;
    }
    o->dst = dst;
    o->src = (const unsigned char *)(uintptr_t)src;
    o->n = n;
    n_d2h++;
    submit(s, o);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    return d2h_on(dst, src, n, NULL);
}

CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s) {
    no_legacy_stream(s, "cuMemcpyDtoHAsync");
    return d2h_on(dst, src, n, s);
}

static CUresult memset_on(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    CUresult r = need_ctx();
    if (r)
        return r;
    if (n == 0)
        return OK;
    pthread_mutex_lock(&mu);
    struct op *o = device_op(OP_MEMSET, dst, n, "cuMemsetD8", &r);
    if (!o) {
        pthread_mutex_unlock(&mu);
        return r;
    }
    o->dst = (unsigned char *)(uintptr_t)dst;
    o->value = v;
    o->n = n;
    n_memset++;
    submit(s, o);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    return memset_on(dst, v, n, NULL);
}

CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    no_legacy_stream(s, "cuMemsetD8Async");
    return memset_on(dst, v, n, s);
}

/* --- streams --- */

CUresult cuStreamCreate(CUstream *out, unsigned int flags) {
    CUresult r = need_ctx();
    if (r)
        return r;
    if (!out)
        return ERR_INVALID_VALUE;
    struct fake_stream *s = calloc(1, sizeof *s);
    if (!s)
        return ERR_OUT_OF_MEMORY;
    s->flags = flags;
    pthread_mutex_lock(&mu);
    s->seed = (unsigned)(uintptr_t)s ^ (unsigned)n_events;
    if (pthread_create(&s->thread, NULL, stream_main, s)) {
        pthread_mutex_unlock(&mu);
        free(s);
        return ERR_OUT_OF_MEMORY;
    }
    pthread_detach(s->thread);
    s->next_live = streams;
    streams = s;
    pthread_mutex_unlock(&mu);
    *out = s;
    return OK;
}

CUresult cuStreamCreateWithPriority(CUstream *out, unsigned int flags, int priority) {
    (void)priority;
    return cuStreamCreate(out, flags);
}

CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) {
    if (least)
        *least = 0;
    if (greatest)
        *greatest = 0;
    return OK;
}

CUresult cuStreamDestroy_v2(CUstream s) {
    if (!s)
        return ERR_INVALID_HANDLE;
    /* Like the driver: returns at once; queued work still runs, then the stream is freed. */
    pthread_mutex_lock(&mu);
    s->closing = 1;
    pthread_cond_broadcast(&cv);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuStreamSynchronize(CUstream s) {
    if (!s)
        return cuCtxSynchronize();
    pthread_mutex_lock(&mu);
    while (s->head || s->busy)
        pthread_cond_wait(&cv, &mu);
    if (inject(&n_sync_calls, fail_sync_at))
        sticky = ERR_LAUNCH_FAILED;
    CUresult r = sticky;
    pthread_mutex_unlock(&mu);
    return r;
}

CUresult cuStreamQuery(CUstream s) {
    if (!s)
        return OK;
    pthread_mutex_lock(&mu);
    int idle = !s->head && !s->busy;
    pthread_mutex_unlock(&mu);
    return idle ? OK : ERR_NOT_READY;
}

CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned int flags) {
    (void)flags;
    if (!e)
        return ERR_INVALID_HANDLE;
    pthread_mutex_lock(&mu);
    if (sticky) {
        pthread_mutex_unlock(&mu);
        return sticky;
    }
    if (!s) {
        while (e->done < e->recorded)
            pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
        return OK;
    }
    struct op *o = new_op(OP_WAIT);
    if (!o) {
        pthread_mutex_unlock(&mu);
        return ERR_OUT_OF_MEMORY;
    }
    o->event = e;
    o->gen = e->recorded;
    e->refs++;
    submit(s, o);
    pthread_mutex_unlock(&mu);
    return OK;
}

/* --- events --- */

CUresult cuEventCreate(CUevent *out, unsigned int flags) {
    CUresult r = need_ctx();
    if (r)
        return r;
    if (!out)
        return ERR_INVALID_VALUE;
    struct fake_event *e = calloc(1, sizeof *e);
    if (!e)
        return ERR_OUT_OF_MEMORY;
    e->flags = flags;
    pthread_mutex_lock(&mu);
    n_events++;
    pthread_mutex_unlock(&mu);
    *out = e;
    return OK;
}

CUresult cuEventRecord(CUevent e, CUstream s) {
    if (!e)
        return ERR_INVALID_HANDLE;
    if (!s)
        violation("cuEventRecord on the legacy default stream (not modelled by fakecuda)");
    pthread_mutex_lock(&mu);
    if (sticky) {
        pthread_mutex_unlock(&mu);
        return sticky;
    }
    struct op *o = new_op(OP_RECORD);
    if (!o) {
        pthread_mutex_unlock(&mu);
        return ERR_OUT_OF_MEMORY;
    }
    o->event = e;
    o->gen = ++e->recorded;
    e->refs++;
    submit(s, o);
    pthread_mutex_unlock(&mu);
    return OK;
}

CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned int flags) {
    (void)flags;
    return cuEventRecord(e, s);
}

CUresult cuEventQuery(CUevent e) {
    if (!e)
        return ERR_INVALID_HANDLE;
    pthread_mutex_lock(&mu);
    int done = e->done >= e->recorded;
    CUresult r = sticky ? sticky : done ? OK : ERR_NOT_READY;
    pthread_mutex_unlock(&mu);
    return r;
}

CUresult cuEventSynchronize(CUevent e) {
    if (!e)
        return ERR_INVALID_HANDLE;
    pthread_mutex_lock(&mu);
    while (e->done < e->recorded)
        pthread_cond_wait(&cv, &mu);
    if (inject(&n_sync_calls, fail_sync_at))
        sticky = ERR_LAUNCH_FAILED;
    CUresult r = sticky;
    pthread_mutex_unlock(&mu);
    return r;
}

CUresult cuEventElapsedTime(float *ms, CUevent start, CUevent end) {
    if (!ms || !start || !end)
        return ERR_INVALID_VALUE;
    if ((start->flags | end->flags) & EVENT_DISABLE_TIMING)
        return ERR_INVALID_HANDLE;
    pthread_mutex_lock(&mu);
    int ready = start->recorded && end->recorded && start->done >= start->recorded &&
                end->done >= end->recorded;
    double d = end->done_at - start->done_at;
    pthread_mutex_unlock(&mu);
    if (!ready)
        return ERR_NOT_READY;
    *ms = (float)d;
    return OK;
}

CUresult cuEventElapsedTime_v2(float *ms, CUevent start, CUevent end) {
    return cuEventElapsedTime(ms, start, end);
}

CUresult cuEventDestroy_v2(CUevent e) {
    if (!e)
        return ERR_INVALID_HANDLE;
    pthread_mutex_lock(&mu);
    if (e->refs == 0) {
        pthread_mutex_unlock(&mu);
        free(e);
        return OK;
    }
    e->destroyed = 1; /* freed when its last queued operation has run */
    pthread_mutex_unlock(&mu);
    return OK;
}

/* --- errors --- */

static const char *error_name(CUresult r) {
    switch (r) {
    case OK: return "CUDA_SUCCESS";
    case ERR_INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case ERR_OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case ERR_NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case ERR_NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case ERR_INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case ERR_INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case ERR_INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case ERR_NOT_READY: return "CUDA_ERROR_NOT_READY";
    case ERR_ALREADY_REGISTERED: return "CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED";
    case ERR_NOT_REGISTERED: return "CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED";
    case ERR_LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case ERR_NOT_PERMITTED: return "CUDA_ERROR_NOT_PERMITTED";
    default: return NULL;
    }
}

CUresult cuGetErrorName(CUresult r, const char **s) {
    if (!s)
        return ERR_INVALID_VALUE;
    *s = error_name(r);
    return *s ? OK : ERR_INVALID_VALUE;
}

CUresult cuGetErrorString(CUresult r, const char **s) {
    if (!s)
        return ERR_INVALID_VALUE;
    *s = error_name(r);
    return *s ? OK : ERR_INVALID_VALUE;
}
