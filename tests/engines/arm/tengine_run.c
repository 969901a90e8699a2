/* tengine_run: run an int8 tmfile (convert_tool + quant_tool_int8) on N float32 CHW images and write the raw
 * int8 output codes.
 *
 *   tengine_run MODEL.tmfile IN.raw OUT.raw
 *
 * IN.raw:  int32 N, C, H, W, then N*C*H*W float32 (little endian, CHW per image).
 * OUT.raw: int32 N, K, float32 output scale, then N*K int8 codes.
 * The input is quantized as Tengine's examples do (and deployq's TengineGraph.quantize_input): x / scale,
 * rounded half away from zero, clamped to [-127, 127]. One thread, TENGINE_MODE_INT8.
 * TENGINE_RUN_TENSOR=NAME in the environment writes that tensor's codes instead of the graph output.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "c_api.h"

static int fail(const char* msg, const char* what)
{
    fprintf(stderr, "tengine_run: %s: %s\n", msg, what);
    return 1;
}

int main(int argc, char** argv)
{
    if (argc != 4)
    {
        fprintf(stderr, "usage: tengine_run MODEL.tmfile IN.raw OUT.raw\n");
        return 2;
    }
    FILE* fin = fopen(argv[2], "rb");
    if (!fin) return fail("cannot open input", argv[2]);
    int32_t hdr[4];
    if (fread(hdr, sizeof(int32_t), 4, fin) != 4 || hdr[0] < 0 || hdr[1] <= 0 || hdr[2] <= 0 || hdr[3] <= 0)
        return fail("bad header (want int32 N C H W)", argv[2]);
    const int n = hdr[0];
    const size_t per = (size_t)hdr[1] * hdr[2] * hdr[3];

    if (init_tengine() != 0) return fail("init_tengine failed", argv[1]);
    graph_t graph = create_graph(NULL, "tengine", argv[1]);
    if (!graph) return fail("cannot load", argv[1]);
    tensor_t in = get_graph_input_tensor(graph, 0, 0);
    int dims[4] = {1, hdr[1], hdr[2], hdr[3]};
    if (set_tensor_shape(in, dims, 4) != 0) return fail("cannot set the input shape", argv[1]);
    int8_t* qin = (int8_t*)malloc(per);
    float* img = (float*)malloc(per * sizeof(float));
    if (set_tensor_buffer(in, qin, (int)per) != 0) return fail("cannot set the input buffer", argv[1]);
    struct options opt = {1, TENGINE_CLUSTER_ALL, TENGINE_MODE_INT8, 0};
    if (prerun_graph_multithread(graph, opt) != 0) return fail("prerun failed", argv[1]);
    if (get_tensor_data_type(in) != TENGINE_DT_INT8) return fail("the input tensor is not int8", argv[1]);
    float in_scale = 0, out_scale = 0;
    int zp = 0;
    get_tensor_quant_param(in, &in_scale, &zp, 1);
    tensor_t out = get_graph_output_tensor(graph, 0, 0);
    const char* dump = getenv("TENGINE_RUN_TENSOR");
    int8_t* own = NULL;
    if (dump && *dump)
    {
        out = get_graph_tensor(graph, dump);
        if (!out) return fail("no such tensor", dump);
        own = (int8_t*)calloc((size_t)get_tensor_buffer_size(out), 1);
        if (set_tensor_buffer(out, own, get_tensor_buffer_size(out)) != 0) return fail("cannot own buffer", dump);
    }

    FILE* fout = fopen(argv[3], "wb");
    if (!fout) return fail("cannot write", argv[3]);
    int32_t ohdr[2] = {n, 0};
    fwrite(ohdr, sizeof(int32_t), 2, fout);
    fwrite(&out_scale, sizeof(float), 1, fout);
    int k = -1;
    for (int i = 0; i < n; i++)
    {
        if (fread(img, sizeof(float), per, fin) != per) return fail("input file too short", argv[2]);
        for (size_t j = 0; j < per; j++)
        {
            float v = img[j] / in_scale;
            float r = v < 0 ? -floorf(-v + 0.5f) : floorf(v + 0.5f);
            qin[j] = (int8_t)(r > 127.f ? 127.f : (r < -127.f ? -127.f : r));
        }
        if (run_graph(graph, 1) != 0) return fail("run_graph failed", argv[1]);
        const int size = get_tensor_buffer_size(out);
        if (k < 0) k = size;
        else if (k != size) return fail("output size changes between images", argv[1]);
        fwrite(get_tensor_buffer(out), 1, (size_t)size, fout);
    }
    get_tensor_quant_param(out, &out_scale, &zp, 1);
    ohdr[1] = k < 0 ? 0 : k;
    fseek(fout, 0, SEEK_SET);
    fwrite(ohdr, sizeof(int32_t), 2, fout);
    fwrite(&out_scale, sizeof(float), 1, fout);
    fclose(fout);
    fclose(fin);
    postrun_graph(graph);
    destroy_graph(graph);
    release_tengine();
    free(own);
    free(qin);
    free(img);
    return 0;
}
