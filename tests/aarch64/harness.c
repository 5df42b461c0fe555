/* Runs a cnnc-compiled model through its C ABI alone: no cnnc code at run time.
 * Built for the target (aarch64-linux-gnu-gcc) and run under qemu-aarch64 by
 * tests/aarch64.rs, but plain C99 + POSIX, so it also builds for the host.
 *
 *   harness MODEL.so OUT_DIR THREADS INPUT_0.bin [INPUT_1.bin ...]
 *
 * Each input file holds the raw little-endian bytes of one graph input, in graph
 * order. THREADS = 0 passes a NULL host (everything on the calling thread); THREADS
 * >= 1 lends a pthread-based parallel_for, so generated code calling back into the
 * caller is exercised too. Writes OUT_DIR/output_K.bin per output and prints one
 * line per tensor on stdout:
 *   input K NAME DTYPE d0,d1,...      output K NAME DTYPE d0,d1,...
 * (DTYPE is the ONNX code; "scalar" for rank 0), then `infer_ms T` (emulated
 * time of the call) and `parallel_for_calls N`. Exit status 0 on success, 1 when
 * the model refuses to run or a file is wrong, with a message on stderr.
 *
 * The ABI types come from the header cnnc writes (`cnnc compile --header`, the
 * model-independent part is cnnc_runtime::abi::C_HEADER), given as cnnc_model.h. */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cnnc_model.h"

typedef const cnnc_model_desc* (*model_info_fn)(void);
typedef int32_t (*infer_fn)(const cnnc_host*, const void* const*, void* const*, void*);

static int fail(const char* fmt, const char* a, const char* b) {
    fprintf(stderr, "harness: ");
    fprintf(stderr, fmt, a, b);
    fputc('\n', stderr);
    return 1;
}

static size_t dtype_size(uint32_t dtype) {
    switch (dtype) {
    case CNNC_DTYPE_F32: return 4;
    case CNNC_DTYPE_I32: return 4;
    case CNNC_DTYPE_I64: return 8;
    case CNNC_DTYPE_BOOL: return 1;
    default: return 0;
    }
}

static size_t tensor_bytes(const cnnc_tensor_desc* d) {
    size_t n = dtype_size(d->dtype);
    for (uint32_t i = 0; i < d->rank; i++) n *= (size_t)d->shape[i];
    return n;
}

static void describe(const char* kind, uint32_t k, const cnnc_tensor_desc* d) {
    printf("%s %u %s %u ", kind, k, d->name, d->dtype);
    if (d->rank == 0) printf("scalar");
    for (uint32_t i = 0; i < d->rank; i++) printf(i ? ",%llu" : "%llu", (unsigned long long)d->shape[i]);
    putchar('\n');
}

/* Reads exactly `size` bytes from `path` into a fresh buffer (NULL on any mismatch). */
static void* read_exact(const char* path, size_t size) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "harness: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    void* buf = malloc(size ? size : 1);
    size_t got = buf ? fread(buf, 1, size, f) : 0;
    int extra = fgetc(f);
    fclose(f);
    if (!buf || got != size || extra != EOF) {
        fprintf(stderr, "harness: %s must hold exactly %zu bytes\n", path, size);
        free(buf);
        return NULL;
    }
    return buf;
}

static int write_all(const char* path, const void* data, size_t size) {
    FILE* f = fopen(path, "wb");
    if (!f) return fail("cannot create %s: %s", path, strerror(errno));
    size_t put = fwrite(data, 1, size, f);
    if (fclose(f) != 0 || put != size) return fail("cannot write %s%s", path, "");
    return 0;
}

/* A minimal parallel_for: `num_threads` workers (the caller included) pull indices
 * from a shared counter. Threads are started per call: simple, and cheap enough
 * for a test. */
struct pool {
    uint32_t num_threads;
    uint64_t calls; /* parallel_for calls, reported so a test can see the host was used */
};

struct job {
    uint64_t n;
    cnnc_task_fn task;
    void* ctx;
    uint64_t next; /* guarded by __atomic builtins */
};

static void* worker(void* arg) {
    struct job* j = arg;
    for (;;) {
        uint64_t i = __atomic_fetch_add(&j->next, 1, __ATOMIC_RELAXED);
        if (i >= j->n) break;
        j->task(j->ctx, i);
    }
    return NULL;
}

static void parallel_for(void* user, uint64_t n, cnnc_task_fn task, void* ctx) {
    struct pool* p = user;
    __atomic_fetch_add(&p->calls, 1, __ATOMIC_RELAXED);
    struct job j = {n, task, ctx, 0};
    pthread_t extra[64];
    uint32_t started = 0;
    uint32_t want = p->num_threads > 64 ? 64 : p->num_threads;
    for (uint32_t t = 1; t < want && t < n; t++) {
        if (pthread_create(&extra[started], NULL, worker, &j) != 0) break;
        started++;
    }
    worker(&j);
    for (uint32_t t = 0; t < started; t++) pthread_join(extra[t], NULL);
}

int main(int argc, char** argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s MODEL.so OUT_DIR THREADS INPUT_0.bin [INPUT_1.bin ...]\n", argv[0]);
        return 2;
    }
    const char* so = argv[1];
    const char* out_dir = argv[2];
    char* end = NULL;
    long threads = strtol(argv[3], &end, 10);
    if (*argv[3] == '\0' || *end != '\0' || threads < 0 || threads > 64)
        return fail("THREADS must be 0..64, got '%s'%s", argv[3], "");

    void* lib = dlopen(so, RTLD_NOW | RTLD_LOCAL);
    if (!lib) return fail("dlopen %s: %s", so, dlerror());
    model_info_fn info_fn = (model_info_fn)dlsym(lib, "cnnc_model_info");
    infer_fn infer = (infer_fn)dlsym(lib, "cnnc_infer");
    if (!info_fn || !infer) return fail("%s lacks cnnc_model_info or cnnc_infer%s", so, "");

    const cnnc_model_desc* info = info_fn();
    if (info->abi_version != CNNC_ABI_VERSION) return fail("%s has another ABI version than this harness%s", so, "");
    if (!(info->entry_flags & CNNC_ENTRY_INFER)) return fail("%s has no inference entry point%s", so, "");
    printf("model %s target %s features %s workspace %llu align %llu\n", info->model_name, info->target,
           info->cpu_features, (unsigned long long)info->workspace_size,
           (unsigned long long)info->workspace_align);
    if ((uint32_t)(argc - 4) != info->num_inputs) {
        fprintf(stderr, "harness: the model takes %u input(s), %d given\n", info->num_inputs, argc - 4);
        return 1;
    }

    const void** inputs = calloc(info->num_inputs + 1, sizeof(void*));
    void** outputs = calloc(info->num_outputs + 1, sizeof(void*));
    if (!inputs || !outputs) return fail("out of memory%s%s", "", "");
    for (uint32_t k = 0; k < info->num_inputs; k++) {
        const cnnc_tensor_desc* d = &info->inputs[k];
        describe("input", k, d);
        if (!dtype_size(d->dtype)) return fail("input %s has an unknown dtype%s", d->name, "");
        inputs[k] = read_exact(argv[4 + k], tensor_bytes(d));
        if (!inputs[k]) return 1;
    }
    for (uint32_t k = 0; k < info->num_outputs; k++) {
        const cnnc_tensor_desc* d = &info->outputs[k];
        describe("output", k, d);
        if (!dtype_size(d->dtype)) return fail("output %s has an unknown dtype%s", d->name, "");
        size_t bytes = tensor_bytes(d);
        /* Poison the outputs so that an element the model never writes shows up. */
        outputs[k] = malloc(bytes ? bytes : 1);
        if (!outputs[k]) return fail("out of memory%s%s", "", "");
        memset(outputs[k], 0xA5, bytes);
    }

    size_t align = (size_t)info->workspace_align;
    if (align < sizeof(void*)) align = sizeof(void*);
    if (align & (align - 1)) return fail("workspace_align is not a power of two%s%s", "", "");
    size_t ws_bytes = ((size_t)info->workspace_size + align - 1) / align * align;
    void* workspace = NULL;
    if (posix_memalign(&workspace, align, ws_bytes ? ws_bytes : align) != 0)
        return fail("cannot allocate the workspace%s%s", "", "");
    memset(workspace, 0x5A, ws_bytes);

    struct pool pool = {(uint32_t)threads, 0};
    cnnc_host host = {&pool, parallel_for, (uint32_t)threads, 0};
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int32_t status = infer(threads ? &host : NULL, inputs, (void* const*)outputs, workspace);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (status != CNNC_STATUS_OK) {
        fprintf(stderr, "harness: cnnc_infer returned %d\n", status);
        return 1;
    }
    printf("infer_ms %.3f\n", (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) / 1e6);
    printf("parallel_for_calls %llu\n", (unsigned long long)pool.calls);

    for (uint32_t k = 0; k < info->num_outputs; k++) {
        char path[4096];
        if (snprintf(path, sizeof path, "%s/output_%u.bin", out_dir, k) >= (int)sizeof path)
            return fail("output path too long under %s%s", out_dir, "");
        if (write_all(path, outputs[k], tensor_bytes(&info->outputs[k]))) return 1;
    }
    return 0;
}
