/* The C part of a lowbit artifact: loading and checking the weights file, the model's signature and
 * running the generated code. Compiled once per model with the generated "model.h" and
 * "lowbit_model_desc.inc" (the signature and the weights' expected size and checksum) on the include
 * path; depends on libc only.
 *
 * weights.bin (all integers little-endian):
 *   0  magic "LOWBITWT"       16 u64 weights bytes       32 u64 arena bytes
 *   8  u32 format version     24 u32 CRC-32 of weights   40 zeros up to the header length
 *   12 u32 header length (a multiple of 64)     28 u32 zero
 * then the weights: the blob the generated code reads, at a 64-byte aligned offset.
 */
#define _POSIX_C_SOURCE 200112L

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

typedef struct {
    const char *name;
    int rank;
    const int64_t *shape;
    lowbit_dtype dtype;
    size_t bytes;
} tensor_desc;

/* Defines NUM_INPUTS, NUM_OUTPUTS, INPUTS[], OUTPUTS[], WEIGHTS_BYTES, WEIGHTS_CRC32, ARENA_BYTES, USES_AMX. */
#include "lowbit_model_desc.inc"

/* The generated code: one call runs the whole model, on the calling thread and the threads it starts
 * and joins for the call (a model compiled for more than one). It keeps no state of its own. */
void lowbit_run(void **inputs, void **outputs, void *arena, void *weights);

#define MAGIC "LOWBITWT"
#define HEADER_BYTES 64
#define MAX_HEADER_BYTES 65536
#define ALIGNMENT 64

struct lowbit_model {
    void *weights;
};

static void fail(char *err, size_t err_len, const char *format, ...) {
    if (err == NULL || err_len == 0) return;
    va_list args;
    va_start(args, format);
    vsnprintf(err, err_len, format, args);
    va_end(args);
}

static uint32_t read_u32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t read_u64(const unsigned char *p) {
    return (uint64_t)read_u32(p) | (uint64_t)read_u32(p + 4) << 32;
}

/* CRC-32 as zlib computes it (reflected polynomial 0xEDB88320), four bits at a time. */
static uint32_t crc32(const unsigned char *data, size_t size) {
    static const uint32_t table[16] = {
        0x00000000u, 0x1DB71064u, 0x3B6E20C8u, 0x26D930ACu, 0x76DC4190u, 0x6B6B51F4u,
        0x4DB26158u, 0x5005713Cu, 0xEDB88320u, 0xF00F9344u, 0xD6D6A3E8u, 0xCB61B38Cu,
        0x9B64C2B0u, 0x86D3D2D4u, 0xA00AE278u, 0xBDBDF21Cu};
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < size; i++) {
        crc ^= data[i];
        crc = (crc >> 4) ^ table[crc & 15];
        crc = (crc >> 4) ^ table[crc & 15];
    }
    return crc ^ 0xFFFFFFFFu;
}

/* Check the fixed part of the header against this model; on success *header_bytes is its length. */
static int check_header(const unsigned char *h, const char *what, uint64_t *header_bytes, char *err,
                        size_t err_len) {
    if (memcmp(h, MAGIC, 8) != 0) {
        fail(err, err_len, "%s is not a lowbit weights file (bad magic number)", what);
        return 0;
    }
    uint32_t version = read_u32(h + 8);
    if (version != LOWBIT_WEIGHTS_FORMAT_VERSION) {
        fail(err, err_len, "%s has weights format version %lu; this model reads version %d", what,
             (unsigned long)version, LOWBIT_WEIGHTS_FORMAT_VERSION);
        return 0;
    }
    *header_bytes = read_u32(h + 12);
    if (*header_bytes < HEADER_BYTES || *header_bytes % ALIGNMENT != 0 || *header_bytes > MAX_HEADER_BYTES) {
        fail(err, err_len, "%s is corrupt: invalid header length %llu", what,
             (unsigned long long)*header_bytes);
        return 0;
    }
    uint64_t blob = read_u64(h + 16), arena = read_u64(h + 32);
    uint32_t checksum = read_u32(h + 24);
    if (blob != WEIGHTS_BYTES || arena != ARENA_BYTES || checksum != WEIGHTS_CRC32) {
        fail(err, err_len,
             "%s belongs to another model: it holds %llu bytes of weights (CRC-32 %08lx, arena %llu "
             "bytes), this model needs %llu (CRC-32 %08lx, arena %llu bytes)",
             what, (unsigned long long)blob, (unsigned long)checksum, (unsigned long long)arena,
             (unsigned long long)WEIGHTS_BYTES, (unsigned long)WEIGHTS_CRC32,
             (unsigned long long)ARENA_BYTES);
        return 0;
    }
    return 1;
}

/* AMX (lowbit_model_desc.inc's USES_AMX: compiled for a target with tiles): Linux hands a process tile state
 * only on request, before its first tile instruction (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA). */
#if USES_AMX && defined(__x86_64__) && defined(__linux__)
long syscall(long number, ...); /* libc's: <unistd.h> declares it only with _DEFAULT_SOURCE */
static int enable_tiles(char *err, size_t err_len) {
    if (syscall(158 /* SYS_arch_prctl */, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0) return 1;
    fail(err, err_len, "the operating system refused this process AMX tile state (arch_prctl: %s); export the "
         "model for a target without amx-tile", strerror(errno));
    return 0;
}
#else
static int enable_tiles(char *err, size_t err_len) { (void)err; (void)err_len; return 1; }
#endif

static lowbit_model *new_model(char *err, size_t err_len) {
    if (!enable_tiles(err, err_len)) return NULL;
    lowbit_model *m = malloc(sizeof *m);
    void *weights = NULL;
    /* One byte at least: a model without constants still gets a valid pointer. */
    if (m == NULL || posix_memalign(&weights, ALIGNMENT, WEIGHTS_BYTES ? (size_t)WEIGHTS_BYTES : 1) != 0) {
        free(m);
        fail(err, err_len, "out of memory allocating %llu bytes of weights", (unsigned long long)WEIGHTS_BYTES);
        return NULL;
    }
    m->weights = weights;
    return m;
}

/* The weights were read completely: verify their checksum (corruption anywhere in the blob). */
static lowbit_model *finish(lowbit_model *m, const char *what, char *err, size_t err_len) {
    uint32_t computed = crc32(m->weights, (size_t)WEIGHTS_BYTES);
    if (computed != WEIGHTS_CRC32) {
        fail(err, err_len, "%s is corrupt: the CRC-32 of its weights is %08lx, expected %08lx", what,
             (unsigned long)computed, (unsigned long)WEIGHTS_CRC32);
        lowbit_model_free(m);
        return NULL;
    }
    return m;
}

static void truncated(const char *what, uint64_t expected, uint64_t found, char *err, size_t err_len) {
    fail(err, err_len, "%s is truncated: %llu bytes expected, %llu found", what,
         (unsigned long long)expected, (unsigned long long)found);
}

lowbit_model *lowbit_model_load(const char *weights_path, char *err, size_t err_len) {
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (weights_path == NULL) {
        fail(err, err_len, "no weights file given (NULL path)");
        return NULL;
    }
    FILE *file = fopen(weights_path, "rb");
    if (file == NULL) {
        fail(err, err_len, "cannot open weights file '%s': %s", weights_path, strerror(errno));
        return NULL;
    }
    char what[512];
    snprintf(what, sizeof what, "weights file '%s'", weights_path);
    unsigned char header[HEADER_BYTES];
    uint64_t header_bytes = 0;
    lowbit_model *m = NULL;
    size_t got = fread(header, 1, HEADER_BYTES, file);
    if (got < HEADER_BYTES) {
        truncated(what, HEADER_BYTES, got, err, err_len);
    } else if (check_header(header, what, &header_bytes, err, err_len)) {
        /* Skip the rest of a longer header by reading it: the file may be a pipe. */
        uint64_t skipped = HEADER_BYTES;
        while (skipped < header_bytes && fgetc(file) != EOF) skipped++;
        if (skipped < header_bytes) {
            truncated(what, header_bytes + WEIGHTS_BYTES, skipped, err, err_len);
        } else if ((m = new_model(err, err_len)) != NULL) {
            got = fread(m->weights, 1, (size_t)WEIGHTS_BYTES, file);
            if (got < WEIGHTS_BYTES) {
                truncated(what, header_bytes + WEIGHTS_BYTES, header_bytes + got, err, err_len);
                lowbit_model_free(m);
                m = NULL;
            } else if (fgetc(file) != EOF) {
                fail(err, err_len, "%s is corrupt: it has data after its %llu bytes of weights", what,
                     (unsigned long long)WEIGHTS_BYTES);
                lowbit_model_free(m);
                m = NULL;
            } else {
                m = finish(m, what, err, err_len);
            }
        }
    }
    if (m == NULL && ferror(file)) fail(err, err_len, "cannot read %s: %s", what, strerror(errno));
    fclose(file);
    return m;
}

lowbit_model *lowbit_model_load_memory(const void *data, size_t size, char *err, size_t err_len) {
    const char *what = "weights in memory";
    const unsigned char *bytes = data;
    uint64_t header_bytes = 0;
    if (err != NULL && err_len > 0) err[0] = '\0';
    if (data == NULL) {
        fail(err, err_len, "no weights given (NULL data)");
        return NULL;
    }
    if (size < HEADER_BYTES) {
        truncated(what, HEADER_BYTES, size, err, err_len);
        return NULL;
    }
    if (!check_header(bytes, what, &header_bytes, err, err_len)) return NULL;
    if (size != header_bytes + WEIGHTS_BYTES) {
        if (size < header_bytes + WEIGHTS_BYTES)
            truncated(what, header_bytes + WEIGHTS_BYTES, size, err, err_len);
        else
            fail(err, err_len, "%s are corrupt: %llu bytes after the %llu bytes of weights", what,
                 (unsigned long long)(size - header_bytes - WEIGHTS_BYTES), (unsigned long long)WEIGHTS_BYTES);
        return NULL;
    }
    lowbit_model *m = new_model(err, err_len);
    if (m == NULL) return NULL;
    memcpy(m->weights, bytes + header_bytes, (size_t)WEIGHTS_BYTES);
    return finish(m, what, err, err_len);
}

void lowbit_model_free(lowbit_model *m) {
    if (m == NULL) return;
    free(m->weights);
    free(m);
}

size_t lowbit_model_arena_bytes(const lowbit_model *m) {
    return m == NULL ? 0 : (size_t)ARENA_BYTES;
}

static int check_tables(const lowbit_model *m, const void *const *inputs, void *const *outputs) {
    if (m == NULL || (NUM_INPUTS > 0 && inputs == NULL) || (NUM_OUTPUTS > 0 && outputs == NULL))
        return LOWBIT_ERR_NULL;
    for (int i = 0; i < NUM_INPUTS; i++)
        if (inputs[i] == NULL) return LOWBIT_ERR_NULL;
    for (int i = 0; i < NUM_OUTPUTS; i++)
        if (outputs[i] == NULL) return LOWBIT_ERR_NULL;
    return LOWBIT_OK;
}

int lowbit_model_run_with_arena(const lowbit_model *m, const void *const *inputs, void *const *outputs,
                                void *arena) {
    int status = check_tables(m, inputs, outputs);
    if (status != LOWBIT_OK) return status;
    if (arena == NULL || (uintptr_t)arena % ALIGNMENT != 0) return LOWBIT_ERR_ARENA;
    /* The generated code reads inputs and writes only outputs and the arena. */
    lowbit_run((void **)inputs, (void **)outputs, arena, m->weights);
    return LOWBIT_OK;
}

int lowbit_model_run(const lowbit_model *m, const void *const *inputs, void *const *outputs) {
    int status = check_tables(m, inputs, outputs);
    if (status != LOWBIT_OK) return status;
    void *arena = NULL;
    if (posix_memalign(&arena, ALIGNMENT, ARENA_BYTES ? (size_t)ARENA_BYTES : 1) != 0) return LOWBIT_ERR_NOMEM;
    status = lowbit_model_run_with_arena(m, inputs, outputs, arena);
    free(arena);
    return status;
}

const char *lowbit_status_string(int status) {
    switch (status) {
    case LOWBIT_OK: return "success";
    case LOWBIT_ERR_NULL: return "a NULL model, tensor table or tensor pointer";
    case LOWBIT_ERR_NOMEM: return "out of memory for the working arena";
    case LOWBIT_ERR_ARENA: return "the arena is NULL or not 64-byte aligned";
    default: return "unknown status";
    }
}

/* -- signature ------------------------------------------------------------------------------------ */
static const tensor_desc *tensor(const lowbit_model *m, const tensor_desc *table, int count, int i) {
    return m != NULL && i >= 0 && i < count ? &table[i] : NULL;
}

static int shape_of(const tensor_desc *t, int64_t *dims) {
    if (t == NULL) return -1;
    if (dims != NULL)
        for (int d = 0; d < t->rank; d++) dims[d] = t->shape[d];
    return t->rank;
}

int lowbit_model_num_inputs(const lowbit_model *m) { return m == NULL ? -1 : NUM_INPUTS; }
int lowbit_model_num_outputs(const lowbit_model *m) { return m == NULL ? -1 : NUM_OUTPUTS; }

#define SIGNATURE(kind, TABLE, COUNT)                                                                   \
    const char *lowbit_model_##kind##_name(const lowbit_model *m, int i) {                              \
        const tensor_desc *t = tensor(m, TABLE, COUNT, i);                                              \
        return t == NULL ? NULL : t->name;                                                              \
    }                                                                                                   \
    int lowbit_model_##kind##_rank(const lowbit_model *m, int i) {                                      \
        const tensor_desc *t = tensor(m, TABLE, COUNT, i);                                              \
        return t == NULL ? -1 : t->rank;                                                                \
    }                                                                                                   \
    int lowbit_model_##kind##_shape(const lowbit_model *m, int i, int64_t *dims) {                      \
        return shape_of(tensor(m, TABLE, COUNT, i), dims);                                              \
    }                                                                                                   \
    lowbit_dtype lowbit_model_##kind##_dtype(const lowbit_model *m, int i) {                            \
        const tensor_desc *t = tensor(m, TABLE, COUNT, i);                                              \
        return t == NULL ? LOWBIT_DTYPE_INVALID : t->dtype;                                             \
    }                                                                                                   \
    size_t lowbit_model_##kind##_bytes(const lowbit_model *m, int i) {                                  \
        const tensor_desc *t = tensor(m, TABLE, COUNT, i);                                              \
        return t == NULL ? 0 : t->bytes;                                                                \
    }

SIGNATURE(input, INPUTS, NUM_INPUTS)
SIGNATURE(output, OUTPUTS, NUM_OUTPUTS)

const char *lowbit_dtype_name(lowbit_dtype dtype) {
    static const char *const names[] = {"invalid", "f32", "f64", "f16", "i64", "i32", "i16", "i8",
                                        "u64", "u32", "u16", "u8", "bool", "i4", "u4"};
    return (int)dtype > 0 && (int)dtype < (int)(sizeof names / sizeof names[0]) ? names[dtype] : names[0];
}
