// ncnn_run: run an ncnn .param/.bin on N float32 CHW images and write the raw outputs of one blob.
//
//   ncnn_run MODEL.param MODEL.bin IN.raw OUT.raw [INPUT_BLOB [OUTPUT_BLOB]] [--no-packing]
//
// IN.raw:  int32 N, C, H, W, then N*C*H*W float32 (little endian, CHW per image).
// OUT.raw: int32 N, K, then N*K float32 (each image's output blob, flattened CHW without padding).
// Options as deployq's ncnn runtime: one thread, fp16 and bf16 off, int8 on, packing layout on (ncnn's
// default on ARM) unless --no-packing; everything else is ncnn's default (winograd, sgemm, dispatch).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "net.h"

static int fail(const char* msg, const char* what) {
    std::fprintf(stderr, "ncnn_run: %s: %s\n", msg, what);
    return 1;
}

int main(int argc, char** argv) {
    std::vector<std::string> pos;
    bool packing = true;
    for (int i = 1; i < argc; i++) {
        if (std::strcmp(argv[i], "--no-packing") == 0) packing = false;
        else pos.push_back(argv[i]);
    }
    if (pos.size() < 4 || pos.size() > 6) {
        std::fprintf(stderr, "usage: ncnn_run MODEL.param MODEL.bin IN.raw OUT.raw [INPUT_BLOB [OUTPUT_BLOB]] [--no-packing]\n");
        return 2;
    }
    const std::string in_blob = pos.size() > 4 ? pos[4] : "data";

    ncnn::Net net;
    net.opt.num_threads = 1;
    net.opt.use_fp16_storage = false;
    net.opt.use_fp16_packed = false;
    net.opt.use_fp16_arithmetic = false;
    net.opt.use_bf16_storage = false;
    net.opt.use_packing_layout = packing;
    net.opt.use_int8_inference = true;
    if (net.load_param(pos[0].c_str()) != 0) return fail("cannot load param", pos[0].c_str());
    if (net.load_model(pos[1].c_str()) != 0) return fail("cannot load model", pos[1].c_str());
    const std::string out_blob = pos.size() > 5 ? pos[5] : std::string(net.output_names()[0]);

    FILE* fin = std::fopen(pos[2].c_str(), "rb");
    if (!fin) return fail("cannot open input", pos[2].c_str());
    int hdr[4];
    if (std::fread(hdr, sizeof(int), 4, fin) != 4 || hdr[0] < 0 || hdr[1] <= 0 || hdr[2] <= 0 || hdr[3] <= 0)
        return fail("bad header (want int32 N C H W)", pos[2].c_str());
    const int n = hdr[0], c = hdr[1], h = hdr[2], w = hdr[3];
    const size_t per = (size_t)c * h * w;
    std::vector<float> img(per), out;
    int k = -1;
    for (int i = 0; i < n; i++) {
        if (std::fread(img.data(), sizeof(float), per, fin) != per) return fail("input file too short", pos[2].c_str());
        ncnn::Mat in(w, h, c);
        for (int q = 0; q < c; q++) std::memcpy(in.channel(q), img.data() + (size_t)q * h * w, sizeof(float) * h * w);
        ncnn::Extractor ex = net.create_extractor();
        if (ex.input(in_blob.c_str(), in) != 0) return fail("no input blob", in_blob.c_str());
        ncnn::Mat m;
        if (ex.extract(out_blob.c_str(), m) != 0) return fail("extract failed for blob", out_blob.c_str());
        if (m.elempack != 1) {
            ncnn::Mat u;
            ncnn::convert_packing(m, u, 1, net.opt);
            m = u;
        }
        if (m.elemsize != 4) return fail("output blob is not float32", out_blob.c_str());
        const int plane = m.w * m.h * m.d;
        const int size = plane * m.c;
        if (k < 0) k = size;
        else if (k != size) return fail("output size changes between images", out_blob.c_str());
        for (int q = 0; q < m.c; q++) {
            const float* p = m.channel(q);
            out.insert(out.end(), p, p + plane);
        }
    }
    std::fclose(fin);
    FILE* fout = std::fopen(pos[3].c_str(), "wb");
    if (!fout) return fail("cannot write", pos[3].c_str());
    int ohdr[2] = {n, k < 0 ? 0 : k};
    std::fwrite(ohdr, sizeof(int), 2, fout);
    std::fwrite(out.data(), sizeof(float), out.size(), fout);
    std::fclose(fout);
    return 0;
}
