/* classify: recognise a handwritten digit with the digits CNN compiled by lowbit, from C alone.
 *
 *     classify WEIGHTS.bin IMAGE
 *
 * IMAGE holds 28x28 float32 pixels, normalised as the model was trained (lowbit/examples/digit.npy):
 * a .npy file (little-endian float32, C order, any shape of 784 elements) or the 3136 raw bytes.
 * Works with any artifact of one float32 input of 784 values and one float32 output of scores. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "model.h"

#define PIXELS 784

/* The offset of the data in a .npy file, 0 for a raw file, -1 for a .npy file that is not float32. */
static long npy_data_offset(FILE *file) {
    unsigned char start[12];
    if (fread(start, 1, sizeof start, file) < 10 || memcmp(start, "\x93NUMPY", 6) != 0) return 0;
    /* Version 1 stores the header length in 2 bytes, versions 2 and 3 in 4. */
    long prefix = start[6] == 1 ? 10 : 12;
    long length = start[8] | start[9] << 8;
    if (start[6] != 1) length |= (long)start[10] << 16 | (long)start[11] << 24;
    char *header = malloc(length + 1);
    if (header == NULL || fseek(file, prefix, SEEK_SET) != 0 || fread(header, 1, length, file) != (size_t)length) {
        free(header);
        return -1;
    }
    header[length] = '\0';
    int ok = strstr(header, "'descr': '<f4'") != NULL && strstr(header, "'fortran_order': False") != NULL;
    free(header);
    return ok ? prefix + length : -1;
}

static int read_image(const char *path, float *pixels) {
    FILE *file = fopen(path, "rb");
    if (file == NULL) {
        perror(path);
        return 0;
    }
    long offset = npy_data_offset(file);
    int ok = offset >= 0 && fseek(file, offset, SEEK_SET) == 0 &&
             fread(pixels, sizeof(float), PIXELS + 1, file) == PIXELS;
    if (!ok) fprintf(stderr, "%s: expected %d float32 pixels (.npy '<f4' or raw)\n", path, PIXELS);
    fclose(file);
    return ok;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s WEIGHTS.bin IMAGE\n", argv[0]);
        return 2;
    }
    char err[256];
    lowbit_model *model = lowbit_model_load(argv[1], err, sizeof err);
    if (model == NULL) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    size_t classes = lowbit_model_output_bytes(model, 0) / sizeof(float);
    if (lowbit_model_num_inputs(model) != 1 || lowbit_model_input_dtype(model, 0) != LOWBIT_F32 ||
        lowbit_model_input_bytes(model, 0) != PIXELS * sizeof(float) ||
        lowbit_model_output_dtype(model, 0) != LOWBIT_F32 || classes == 0) {
        fprintf(stderr, "this model does not take one 28x28 float32 image and return float32 scores\n");
        return 1;
    }
    float pixels[PIXELS];
    float *scores = malloc(classes * sizeof(float));
    if (scores == NULL || !read_image(argv[2], pixels)) return 1;
    const void *inputs[] = {pixels};
    void *outputs[] = {scores};
    int status = lowbit_model_run(model, inputs, outputs);
    if (status != LOWBIT_OK) {
        fprintf(stderr, "run failed: %s\n", lowbit_status_string(status));
        return 1;
    }
    /* Softmax over the scores, for a probability beside the answer. */
    size_t best = 0;
    for (size_t i = 1; i < classes; i++)
        if (scores[i] > scores[best]) best = i;
    double total = 0;
    for (size_t i = 0; i < classes; i++) total += exp(scores[i] - scores[best]);
    printf("digit %zu (probability %.3f)\n", best, 1.0 / total);
    free(scores);
    lowbit_model_free(model);
    return 0;
}
