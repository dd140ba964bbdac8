/* model.h -- the C interface of a model compiled ahead of time by lowbit.
 *
 * An artifact is three files: the code (model.so, or model.o to link into a program), this header,
 * and weights.bin (the model's constants). The code depends on libc, libm and POSIX threads only:
 * link with -lm -pthread.
 *
 *     char err[256];
 *     lowbit_model *m = lowbit_model_load("weights.bin", err, sizeof err);
 *     if (!m) { fprintf(stderr, "%s\n", err); return 1; }
 *     const void *inputs[] = {image};     // one pointer per input, in the order listed below
 *     void *outputs[] = {logits};         // one pointer per output, caller-allocated
 *     int status = lowbit_model_run(m, inputs, outputs);   // LOWBIT_OK (0) on success
 *     lowbit_model_free(m);
 *
 * Tensors are dense, row-major (C order), in the native byte order; i4/u4 and bool values take one
 * byte each. Buffers need no particular alignment. A loaded model is immutable: any number of
 * threads may call lowbit_model_run on one model at the same time (each call has its own working
 * memory). Functions that take a model accept NULL and then fail as documented.
 *
 * A model compiled for N threads (LOWBIT_MODEL_THREADS) runs every call on the calling thread and
 * N - 1 threads the call starts (pthread_create) and joins before it returns; results are the same
 * bit for bit whatever the number of threads. Should a thread fail to start, the call goes on with
 * fewer. Nothing outlives a call: no pool, no global state.
 *
@MODEL_DESCRIPTION@
 */
#ifndef LOWBIT_MODEL_H
#define LOWBIT_MODEL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define LOWBIT_API __attribute__((visibility("default")))
#else
#define LOWBIT_API
#endif

/* The version of this interface and of the weights file format it reads. */
#define LOWBIT_ABI_VERSION 1
#define LOWBIT_WEIGHTS_FORMAT_VERSION 1

@MODEL_MACROS@

typedef struct lowbit_model lowbit_model;

/* Element types of inputs and outputs. */
typedef enum lowbit_dtype {
    LOWBIT_DTYPE_INVALID = 0, /* returned for an index out of range */
    LOWBIT_F32 = 1,
    LOWBIT_F64 = 2,
    LOWBIT_F16 = 3,
    LOWBIT_I64 = 4,
    LOWBIT_I32 = 5,
    LOWBIT_I16 = 6,
    LOWBIT_I8 = 7,
    LOWBIT_U64 = 8,
    LOWBIT_U32 = 9,
    LOWBIT_U16 = 10,
    LOWBIT_U8 = 11,
    LOWBIT_BOOL = 12,
    LOWBIT_I4 = 13,
    LOWBIT_U4 = 14
} lowbit_dtype;

/* Status codes of lowbit_model_run and lowbit_model_run_with_arena. */
#define LOWBIT_OK 0
#define LOWBIT_ERR_NULL 1  /* the model, the inputs or outputs table, or an entry of one, is NULL */
#define LOWBIT_ERR_NOMEM 2 /* the working memory (arena) could not be allocated */
#define LOWBIT_ERR_ARENA 3 /* run_with_arena: the arena is NULL or not 64-byte aligned */

/* Read and verify a weights file: magic number, format version, sizes, and a CRC-32 of the weights
 * (computed here), which must also be the one this code was compiled with. On failure returns NULL
 * and writes a one-line message to err (err_len bytes, truncated, always NUL-terminated; err may be
 * NULL). Never aborts on a corrupt, truncated or mismatched file. */
LOWBIT_API lowbit_model *lowbit_model_load(const char *weights_path, char *err, size_t err_len);

/* The same from the file's bytes in memory (e.g. weights.bin embedded in a firmware image); the
 * weights are copied, so data may be freed after the call. */
LOWBIT_API lowbit_model *lowbit_model_load_memory(const void *data, size_t size, char *err, size_t err_len);

/* Release a model (NULL is ignored). No run may be in progress on it. */
LOWBIT_API void lowbit_model_free(lowbit_model *m);

/* Run the model: inputs[i] points at input i, outputs[i] at the memory output i is written to.
 * Allocates the working memory for this call (lowbit_model_arena_bytes, freed before returning).
 * Returns LOWBIT_OK or an LOWBIT_ERR_* code. */
LOWBIT_API int lowbit_model_run(const lowbit_model *m, const void *const *inputs, void *const *outputs);

/* Bytes of working memory one run needs. */
LOWBIT_API size_t lowbit_model_arena_bytes(const lowbit_model *m);

/* lowbit_model_run without allocating: arena is caller memory of lowbit_model_arena_bytes bytes,
 * 64-byte aligned, used by one run at a time (e.g. one per thread). */
LOWBIT_API int lowbit_model_run_with_arena(const lowbit_model *m, const void *const *inputs,
                                           void *const *outputs, void *arena);

/* A short English description of a status code. */
LOWBIT_API const char *lowbit_status_string(int status);

/* The model's signature. Indices run from 0; an index out of range gives NULL, -1 or
 * LOWBIT_DTYPE_INVALID. *_shape writes rank dims (dims may be NULL) and returns the rank. */
LOWBIT_API int lowbit_model_num_inputs(const lowbit_model *m);
LOWBIT_API int lowbit_model_num_outputs(const lowbit_model *m);
LOWBIT_API const char *lowbit_model_input_name(const lowbit_model *m, int i);
LOWBIT_API const char *lowbit_model_output_name(const lowbit_model *m, int i);
LOWBIT_API int lowbit_model_input_rank(const lowbit_model *m, int i);
LOWBIT_API int lowbit_model_output_rank(const lowbit_model *m, int i);
LOWBIT_API int lowbit_model_input_shape(const lowbit_model *m, int i, int64_t *dims);
LOWBIT_API int lowbit_model_output_shape(const lowbit_model *m, int i, int64_t *dims);
LOWBIT_API lowbit_dtype lowbit_model_input_dtype(const lowbit_model *m, int i);
LOWBIT_API lowbit_dtype lowbit_model_output_dtype(const lowbit_model *m, int i);
/* Bytes of input / output i (elements times the element size); 0 for an index out of range. */
LOWBIT_API size_t lowbit_model_input_bytes(const lowbit_model *m, int i);
LOWBIT_API size_t lowbit_model_output_bytes(const lowbit_model *m, int i);

/* The name of an element type ("f32", "i8", ...), or "invalid". */
LOWBIT_API const char *lowbit_dtype_name(lowbit_dtype dtype);

#ifdef __cplusplus
}
#endif

#endif /* LOWBIT_MODEL_H */
