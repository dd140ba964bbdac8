/* Test driver for lowbit artifacts: aot_driver WEIGHTS IN.bin OUT.bin [THREADS]
 * Reads every input's bytes, in order, from IN.bin, runs the model, writes every output's bytes to
 * OUT.bin and prints the signature. With THREADS > 1 the model also runs on that many threads at once,
 * each result checked against the first. Exit status: 0 ok, 2 bad files, 3 load failed (message on
 * stderr), 4 run failed, 5 threads disagreed. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

typedef struct {
    const lowbit_model *model;
    const void **inputs;
    const unsigned char *expected;
    size_t output_bytes;
    int ok;
} job;

static size_t total_bytes(const lowbit_model *m, int count, size_t (*bytes)(const lowbit_model *, int)) {
    size_t total = 0;
    for (int i = 0; i < count; i++) total += bytes(m, i);
    return total;
}

/* Point table[i] at consecutive tensors of `data`. */
static void split(const lowbit_model *m, int count, size_t (*bytes)(const lowbit_model *, int),
                  unsigned char *data, void **table) {
    for (int i = 0; i < count; i++) {
        table[i] = data;
        data += bytes(m, i);
    }
}

static void *worker(void *arg) {
    job *j = arg;
    int outputs = lowbit_model_num_outputs(j->model);
    unsigned char *data = malloc(j->output_bytes + 1);
    void **table = malloc(sizeof(void *) * (outputs + 1));
    split(j->model, outputs, lowbit_model_output_bytes, data, table);
    j->ok = 1;
    for (int repeat = 0; repeat < 3; repeat++) {
        if (lowbit_model_run(j->model, (const void *const *)j->inputs, table) != LOWBIT_OK ||
            memcmp(data, j->expected, j->output_bytes) != 0)
            j->ok = 0;
    }
    free(table);
    free(data);
    return NULL;
}

static void print_signature(const lowbit_model *m) {
    for (int kind = 0; kind < 2; kind++) {
        int count = kind ? lowbit_model_num_outputs(m) : lowbit_model_num_inputs(m);
        for (int i = 0; i < count; i++) {
            int64_t dims[16];
            int rank = kind ? lowbit_model_output_shape(m, i, dims) : lowbit_model_input_shape(m, i, dims);
            lowbit_dtype dtype = kind ? lowbit_model_output_dtype(m, i) : lowbit_model_input_dtype(m, i);
            printf("%s %d %s %s [", kind ? "output" : "input", i,
                   kind ? lowbit_model_output_name(m, i) : lowbit_model_input_name(m, i), lowbit_dtype_name(dtype));
            for (int d = 0; d < rank; d++) printf("%s%lld", d ? "," : "", (long long)dims[d]);
            printf("]\n");
        }
    }
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: %s WEIGHTS IN.bin OUT.bin [THREADS]\n", argv[0]);
        return 2;
    }
    char err[512];
    lowbit_model *m = lowbit_model_load(argv[1], err, sizeof err);
    if (m == NULL) {
        fprintf(stderr, "load failed: %s\n", err);
        return 3;
    }
    print_signature(m);
    int num_inputs = lowbit_model_num_inputs(m), num_outputs = lowbit_model_num_outputs(m);
    size_t in_bytes = total_bytes(m, num_inputs, lowbit_model_input_bytes);
    size_t out_bytes = total_bytes(m, num_outputs, lowbit_model_output_bytes);
    unsigned char *in = malloc(in_bytes + 1), *out = malloc(out_bytes + 1);
    const void **inputs = malloc(sizeof(void *) * (num_inputs + 1));
    void **outputs = malloc(sizeof(void *) * (num_outputs + 1));
    FILE *file = fopen(argv[2], "rb");
    if (file == NULL || fread(in, 1, in_bytes + 1, file) != in_bytes) {
        fprintf(stderr, "%s: expected %zu bytes of inputs\n", argv[2], in_bytes);
        return 2;
    }
    fclose(file);
    split(m, num_inputs, lowbit_model_input_bytes, in, (void **)inputs);
    split(m, num_outputs, lowbit_model_output_bytes, out, outputs);
    int status = lowbit_model_run(m, (const void *const *)inputs, outputs);
    if (status != LOWBIT_OK) {
        fprintf(stderr, "run failed: %s\n", lowbit_status_string(status));
        return 4;
    }
    if (lowbit_model_run(NULL, (const void *const *)inputs, outputs) != LOWBIT_ERR_NULL ||
        lowbit_model_run(m, NULL, outputs) != LOWBIT_ERR_NULL) {
        fprintf(stderr, "NULL arguments were not rejected\n");
        return 4;
    }
    int threads = argc > 4 ? atoi(argv[4]) : 1;
    if (threads > 1) {
        pthread_t ids[64];
        job jobs[64];
        if (threads > 64) threads = 64;
        for (int t = 0; t < threads; t++) {
            jobs[t] = (job){m, inputs, out, out_bytes, 0};
            pthread_create(&ids[t], NULL, worker, &jobs[t]);
        }
        for (int t = 0; t < threads; t++) {
            pthread_join(ids[t], NULL);
            if (!jobs[t].ok) {
                fprintf(stderr, "thread %d disagreed\n", t);
                return 5;
            }
        }
    }
    file = fopen(argv[3], "wb");
    if (file == NULL || fwrite(out, 1, out_bytes, file) != out_bytes) {
        fprintf(stderr, "cannot write %s\n", argv[3]);
        return 2;
    }
    fclose(file);
    lowbit_model_free(m);
    free(in);
    free(out);
    free((void *)inputs);
    free(outputs);
    return 0;
}
