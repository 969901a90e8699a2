#!/usr/bin/env bash
# Cross-build ncnn and Tengine (libraries only) for aarch64 and the static runners
# ncnn_run / tengine_run that tests/engines/test_arm_*.py run under qemu-user.
#
#   tests/engines/arm/build.sh [--ncnn-only|--tengine-only] [DEST]
#
# DEST defaults to ${XDG_CACHE_HOME:-$HOME/.cache}/deployq-engines; the sources are
# expected in DEST/src/{ncnn,Tengine} (unpacked by ../shared/engines/build.sh).
# Needs gcc/g++-aarch64-linux-gnu (apt); qemu-user (qemu-aarch64) runs the result.
# Compiler output goes to stderr; stdout carries only the final export lines, so
#   eval "$(bash tests/engines/arm/build.sh)"   works.  Re-running only relinks what changed.
# JOBS=N sets the make parallelism (default 2).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
DO_NCNN=1
DO_TENGINE=1
DEST=""
for arg in "$@"; do
    case "$arg" in
        --ncnn-only) DO_TENGINE=0 ;;
        --tengine-only) DO_NCNN=0 ;;
        -*) echo "usage: build.sh [--ncnn-only|--tengine-only] [DEST]" >&2; exit 2 ;;
        *) DEST="$arg" ;;
    esac
done
DEST="${DEST:-${XDG_CACHE_HOME:-$HOME/.cache}/deployq-engines}"
JOBS="${JOBS:-2}"
OUT="$DEST/arm64"
CC=aarch64-linux-gnu-gcc
CXX=aarch64-linux-gnu-g++

log() { printf '[arm/build.sh] %s\n' "$*" >&2; }
die() { printf '[arm/build.sh] error: %s\n' "$*" >&2; exit 1; }

command -v "$CXX" >/dev/null || die "$CXX not found (apt-get install gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)"
mkdir -p "$OUT"

CROSS_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DCMAKE_SYSTEM_NAME=Linux
    -DCMAKE_SYSTEM_PROCESSOR=aarch64
    -DCMAKE_C_COMPILER="$CC"
    -DCMAKE_CXX_COMPILER="$CXX"
    -DCMAKE_FIND_ROOT_PATH=/usr/aarch64-linux-gnu
    -DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER
    -DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY
    -DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY
)

cmake_build() {  # source dir, build dir, make target, output file, cmake args...
    local src="$1" bld="$2" target="$3" out="$4"; shift 4
    local key
    key="$(printf '%s\n' "$@" | sha256sum | cut -d' ' -f1)"
    if [ -f "$bld/.deployq-stamp" ] && [ "$(cat "$bld/.deployq-stamp")" = "$key" ] && [ -f "$out" ]; then
        log "$target for aarch64 already built in $bld"
        return 0
    fi
    log "configuring $target for aarch64 in $bld"
    cmake -S "$src" -B "$bld" "$@" >&2
    log "building $target (make -j$JOBS)"
    make --no-print-directory -C "$bld" -j"$JOBS" "$target" >&2
    [ -f "$out" ] || die "$out was not built"
    echo "$key" > "$bld/.deployq-stamp"
}

needs_link() {  # runner, inputs...
    local r="$1" f; shift
    [ -x "$r" ] || return 0
    for f in "$@"; do [ "$r" -ot "$f" ] && return 0; done
    return 1
}

build_ncnn() {
    local src="$DEST/src/ncnn" bld="$OUT/ncnn-build" runner="$OUT/ncnn_run"
    [ -f "$src/CMakeLists.txt" ] || die "ncnn sources not found in $src (run ../shared/engines/build.sh --ncnn-only)"
    # Only the layers deployq's ncnn exports (and ncnn's own int8 helpers) use.
    local keep=" Input Convolution ConvolutionDepthWise InnerProduct Pooling ReLU Clip Eltwise BinaryOp Split
        Flatten Reshape Softmax Concat Padding Packing Cast Quantize Dequantize Requantize Noop Dropout Crop
        BatchNorm Bias Scale Sigmoid HardSigmoid HardSwish ShuffleChannel Slice Permute Interp Swish PReLU
        UnaryOp Reduction TanH ELU Deconvolution DeconvolutionDepthWise Normalize "
    local layers=() l
    for l in $(grep -oE '^ncnn_add_layer\([A-Za-z0-9]+' "$src/src/CMakeLists.txt" | sed 's/ncnn_add_layer(//'); do
        case "$keep" in *" $l "*|*" $l"$'\n'*) on=ON ;; *) on=OFF ;; esac
        layers+=("-DWITH_LAYER_$(echo "$l" | tr '[:upper:]' '[:lower:]')=$on")
    done
    local args=("${CROSS_ARGS[@]}"
        -DNCNN_BUILD_TOOLS=OFF -DNCNN_BUILD_EXAMPLES=OFF -DNCNN_BUILD_BENCHMARK=OFF -DNCNN_BUILD_TESTS=OFF
        -DNCNN_VULKAN=OFF -DNCNN_OPENMP=OFF -DNCNN_SHARED_LIB=OFF -DNCNN_PYTHON=OFF
        -DNCNN_PIXEL=OFF -DNCNN_PIXEL_ROTATE=OFF -DNCNN_PIXEL_AFFINE=OFF -DNCNN_PIXEL_DRAWING=OFF -DNCNN_C_API=OFF
        -DNCNN_ARM82FP16FML=OFF -DNCNN_ARM84BF16=OFF
        -DNCNN_ARM86SVE=OFF -DNCNN_ARM86SVE2=OFF -DNCNN_ARM86SVEBF16=OFF -DNCNN_ARM86SVEI8MM=OFF
        -DNCNN_ARM86SVEF32MM=OFF "${layers[@]}")
    cmake_build "$src" "$bld" ncnn "$bld/src/libncnn.a" "${args[@]}"
    if needs_link "$runner" "$HERE/ncnn_run.cpp" "$bld/src/libncnn.a"; then
        log "linking $runner"
        "$CXX" -O2 -std=c++11 -static -I"$src/src" -I"$bld/src" "$HERE/ncnn_run.cpp" "$bld/src/libncnn.a" \
            -lpthread -o "$runner.tmp"
        mv "$runner.tmp" "$runner"
    fi
    printf 'export NCNN_ARM_RUNNER=%q\n' "$runner"
}

build_tengine() {
    local src="$DEST/src/Tengine" bld="$OUT/tengine-build" runner="$OUT/tengine_run"
    [ -f "$src/CMakeLists.txt" ] || die "Tengine sources not found in $src (run ../shared/engines/build.sh --tengine-only)"
    local args=("${CROSS_ARGS[@]}"
        -DTENGINE_OPENMP=OFF -DTENGINE_BUILD_BENCHMARK=OFF -DTENGINE_BUILD_EXAMPLES=OFF -DTENGINE_BUILD_DEMO=OFF
        -DTENGINE_BUILD_TESTS=OFF -DTENGINE_BUILD_CONVERT_TOOL=OFF -DTENGINE_BUILD_QUANT_TOOL=OFF
        -DTENGINE_ONLINE_REPORT=OFF)
    local lib="$bld/source/libtengine-lite-static.a"
    cmake_build "$src" "$bld" tengine-lite-static "$lib" "${args[@]}"
    if needs_link "$runner" "$HERE/tengine_run.c" "$lib"; then
        log "linking $runner"
        "$CC" -O2 -static -I"$src/source/api" "$HERE/tengine_run.c" "$lib" -lm -lpthread -ldl -o "$runner.tmp"
        mv "$runner.tmp" "$runner"
    fi
    printf 'export TENGINE_ARM_RUNNER=%q\n' "$runner"
}

[ "$DO_NCNN" = 1 ] && build_ncnn
[ "$DO_TENGINE" = 1 ] && build_tengine
exit 0
