#!/usr/bin/env bash
# Cross-build ncnn (library only) for aarch64 and the static ncnn_run runner.
#
#   tests/engines/arm/build.sh [DEST]
#
# DEST defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/deployq-engines; ncnn's
# sources are expected in DEST/src/ncnn (unpacked by ../shared/engines/build.sh).
# Needs gcc/g++-aarch64-linux-gnu (apt); qemu-user runs the result.
# Compiler output goes to stderr; stdout carries only the final export line,
# so   eval "$(bash tests/engines/arm/build.sh)"   works.  Idempotent.
# JOBS=N sets the make parallelism (default 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DEST="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/deployq-engines}"
JOBS="${JOBS:-2}"
SRC="$DEST/src/ncnn"
BLD="$DEST/arm64/ncnn-build"
RUNNER="$DEST/arm64/ncnn_run"
CXX=aarch64-linux-gnu-g++

log() { printf '[arm/build.sh] %s\n' "$*" >&2; }
die() { printf '[arm/build.sh] error: %s\n' "$*" >&2; exit 1; }

[ -f "$SRC/CMakeLists.txt" ] || die "ncnn sources not found in $SRC (run ../shared/engines/build.sh --ncnn-only first)"
command -v "$CXX" >/dev/null || die "$CXX not found (apt-get install g++-aarch64-linux-gnu)"

# Only the layers deployq's ncnn exports (and ncnn's own int8 layers) use.
LAYERS=(Input Convolution ConvolutionDepthWise InnerProduct Pooling ReLU Clip Eltwise BinaryOp
        Split Flatten Reshape Softmax Concat Padding Packing Cast Quantize Dequantize Requantize
        Noop Dropout Crop BatchNorm Bias Scale Sigmoid HardSigmoid HardSwish Flatten)
ALL_LAYERS=$(grep -oE '^ncnn_add_layer\([A-Za-z0-9]+' "$SRC/src/CMakeLists.txt" | sed 's/ncnn_add_layer(//')
LAYER_ARGS=()
for l in $ALL_LAYERS; do
    on=OFF
    for k in "${LAYERS[@]}"; do [ "$k" = "$l" ] && on=ON; done
    LAYER_ARGS+=("-DWITH_LAYER_$(echo "$l" | tr '[:upper:]' '[:lower:]')=$on")
done

CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_SYSTEM_NAME=Linux
    -DCMAKE_SYSTEM_PROCESSOR=aarch64
    -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc
    -DCMAKE_CXX_COMPILER="$CXX"
    -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu
    -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER
    -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY
    -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY
    -DNCNN_BUILD_TOOLS=OFF -DNCNN_BUILD_EXAMPLES=OFF -DNCNN_BUILD_BENCHMARK=OFF -DNCNN_BUILD_TESTS=OFF
    -DNCNN_VULKAN=OFF -DNCNN_OPENMP=OFF -DNCNN_SHARED_LIB=OFF -DNCNN_PYTHON=OFF
    -DNCNN_PIXEL=OFF -DNCNN_PIXEL_ROTATE=OFF -DNCNN_PIXEL_AFFINE=OFF -DNCNN_PIXEL_DRAWING=OFF -DNCNN_C_API=OFF
    -DNCNN_ARM82FP16FML=OFF -DNCNN_ARM84BF16=OFF
    -DNCNN_ARM86SVE=OFF -DNCNN_ARM86SVE2=OFF -DNCNN_ARM86SVEBF16=OFF -DNCNN_ARM86SVEI8MM=OFF -DNCNN_ARM86SVEF32MM=OFF
    "${LAYER_ARGS[@]}"
)
KEY="$(printf '%s\n' "${CMAKE_ARGS[@]}" | sha256sum | cut -d' ' -f1)"
LIB="$BLD/src/libncnn.a"

if [ -f "$BLD/.deployq-stamp" ] && [ "$(cat "$BLD/.deployq-stamp")" = "$KEY" ] && [ -f "$LIB" ]; then
    log "ncnn for aarch64 already built in $BLD"
else
    log "configuring ncnn for aarch64 in $BLD"
    cmake -S "$SRC" -B "$BLD" "${CMAKE_ARGS[@]}" >&2
    log "building libncnn.a (make -j$JOBS)"
    make --no-print-directory -C "$BLD" -j"$JOBS" ncnn >&2
    echo "$KEY" > "$BLD/.deployq-stamp"
fi

if [ ! -x "$RUNNER" ] || [ "$RUNNER" -ot "$HERE/ncnn_run.cpp" ] || [ "$RUNNER" -ot "$LIB" ]; then
    log "linking $RUNNER"
    "$CXX" -O2 -std=c++11 -static -I"$SRC/src" -I"$BLD/src" "$HERE/ncnn_run.cpp" "$LIB" -lpthread -o "$RUNNER.tmp"
    mv "$RUNNER.tmp" "$RUNNER"
fi
printf 'export NCNN_ARM_RUNNER=%q\n' "$RUNNER"
