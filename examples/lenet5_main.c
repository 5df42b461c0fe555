/* Calls a cnnc-compiled LeNet-5 through its C ABI: no cnnc code at run time,
 * just the generated .so and the header `cnnc compile --header` wrote. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "lenet5.h"

int main(void) {
    const cnnc_model_desc* info = cnnc_model_info();
    if (info->abi_version != CNNC_ABI_VERSION) {
        fprintf(stderr, "ABI version %u, this program expects %u\n", info->abi_version, CNNC_ABI_VERSION);
        return 1;
    }
    printf("model %s for %s (needs CPU features: %s), workspace %llu bytes\n", info->model_name,
           info->target, info->cpu_features, (unsigned long long)info->workspace_size);

    /* The same digit-like image as examples/src/lenet5.rs: a diagonal stroke and a bar. */
    static float image[32 * 32];
    for (int y = 4; y < 28; y++)
        for (int x = 0; x < 32; x++)
            if (abs(x - (22 - (y - 4) / 2)) <= 1 || (y == 6 && x >= 8 && x < 24)) image[y * 32 + x] = 1.0f;
    float logits[10];
    size_t ws_size = (size_t)info->workspace_size;
    size_t align = (size_t)info->workspace_align;
    void* workspace = aligned_alloc(align, ((ws_size + align - 1) / align) * align + align);

    const void* inputs[1] = {image};
    void* outputs[1] = {logits};
    int status = cnnc_infer(NULL, inputs, outputs, workspace);
    if (status != CNNC_STATUS_OK) {
        fprintf(stderr, "cnnc_infer failed: %d\n", status);
        return 1;
    }
    int best = 0;
    for (int k = 0; k < 10; k++) {
        printf("logit[%d] = % .6f\n", k, logits[k]);
        if (logits[k] > logits[best]) best = k;
    }
    printf("predicted class: %d (random weights: the class is arbitrary, the numbers are checked by cnnc verify)\n", best);
    free(workspace);
    return 0;
}
