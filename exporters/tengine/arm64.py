"""deployq's NumPy model of Tengine's aarch64 int8 kernels (kernel family ``arm64``, ``kernels.py``), the layers an
aarch64 build cannot run, and the emulated aarch64 runtime (``tests/engines/arm/build.sh`` + qemu-user).

The model is :class:`~deployq.exporters.tengine.reference.TengineReference` with one step replaced: convolutions
the ``arm_dw``/``arm_gemm`` kernels run requantize in fixed point (:func:`fixed_point_requant`, spec §5); every
other op (FC, pooling, eltwise, concat, activations) runs the same C code as on x86 and keeps the x86 model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from deployq.exporters.ir.graph import Graph, Node
from deployq.exporters.tengine.kernels import arm64_problem, conv_kernel, fixed_point
from deployq.exporters.tengine.lower import round_half_away
from deployq.exporters.tengine.reference import TengineReference, _float_act, _requant

F32 = np.float32
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
SYSROOT = "/usr/aarch64-linux-gnu"


def requant_multipliers(s_in: float, s_w: np.ndarray, s_out: float) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel ``(M, e)`` as ``conv_kernel_int8_arm.c`` / ``conv_dw_kernel_int8_arm.c`` prerun them:
    ``(q, e) = frexp(float32(float32(s_in * s_w[c]) / s_out))``, ``M = round(q * 2**31)``, ``2**31`` -> ``2**30``
    with ``e + 1``."""
    scale = (F32(s_in) * np.asarray(s_w, F32)) / F32(s_out)
    q, e = np.frexp(scale.astype(np.float64))
    m = np.floor(q * 2.0 ** 31 + 0.5).astype(np.int64)  # q >= 0: C round
    top = m == 2 ** 31
    return np.where(top, m // 2, m), np.where(top, e + 1, e).astype(np.int64)


def sqrdmulh(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """AArch64 ``SQRDMULH`` on int32 lanes: ``sat32((2*a*m + 2**31) >> 32)``, computed as the equal
    ``(a*m + 2**30) >> 31``, exact in int64 (``a*m`` is at most ``2**62``)."""
    a, m = np.asarray(a, np.int64), np.asarray(m, np.int64)
    return np.clip((a * m + (1 << 30)) >> 31, INT32_MIN, INT32_MAX)


def shift_round(y: np.ndarray, e: np.ndarray) -> np.ndarray:
    """``sshl`` by ``max(e, 0)`` (int32, wraps) then ``srshl`` by ``min(e, 0)`` (rounding right shift)."""
    y, e = np.asarray(y, np.int64), np.asarray(e, np.int64)
    left = np.maximum(e, 0)
    y = np.where(left >= 32, 0, ((y << np.minimum(left, 31)) + 2 ** 31) % 2 ** 32 - 2 ** 31)  # int32, wraps
    right = np.minimum(np.maximum(-e, 0), 62)
    half = np.where(right > 0, np.int64(1) << np.maximum(right - 1, 0), 0)
    return (y + half) >> right


def fixed_point_requant(acc: np.ndarray, s_in: float, s_w: np.ndarray, s_out: float, lo: int = -127,
                        hi: int = 127) -> np.ndarray:
    """int8 codes of int32 accumulators ``acc`` (N, C, ...; bias added) requantized per channel in fixed point
    and clamped to ``[lo, hi]``, as Tengine's aarch64 conv kernels do."""
    m, e = requant_multipliers(s_in, s_w, s_out)
    shape = (1, -1) + (1,) * (acc.ndim - 2)
    acc32 = (np.asarray(acc, np.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31  # int32 registers
    y = shift_round(sqrdmulh(acc32, m.reshape(shape)), e.reshape(shape))
    return np.clip(y, lo, hi).astype(np.int8)


def activation_bounds(act: Node | None, s_out: float) -> tuple[int, int]:
    """``[act_min, act_max]`` of a conv with fused ``act`` (the prerun's ``activation`` 0 = ReLU, 6 = ReLU6)."""
    if act is None:
        return -127, 127
    if act.op == "clip":  # ReLU6: round(6.0 / output_scale) in double, at most 127
        return 0, min(127, int(round_half_away(np.float64(6.0) / np.float64(F32(s_out)))))
    return 0, 127


class Arm64TengineReference(TengineReference):
    """Tengine int8 inference over exported files as an aarch64 build computes it (batch-1 runs)."""

    def _conv_requant(self, n: Node, acc: np.ndarray, s_in: float, s_w: np.ndarray, s_out: float,
                      in_channels: int) -> np.ndarray:
        act = self.fused.get(n.name)
        if fixed_point(conv_kernel(n.attrs, in_channels, acc.shape[1], family="arm64")):
            return fixed_point_requant(acc, s_in, s_w, s_out, *activation_bounds(act, s_out))
        v = acc.astype(F32) * (F32(s_in) * s_w)[None, :, None, None]  # conv_kernel_ref_int8.c
        return _requant(_float_act(act, v) if act is not None else v, s_out)


def arm64_problems(graph: Graph) -> list[tuple[str, str]]:
    """``(layer, why)`` for every Convolution of ``graph`` that Tengine's aarch64 build miscomputes or crashes
    on (:func:`~deployq.exporters.tengine.kernels.arm64_problem`)."""
    from deployq.exporters.ir.mxnet_lower import tensor_shapes

    shapes = tensor_shapes(graph)
    out = []
    for n in graph.nodes:
        if n.op == "Convolution":
            why = arm64_problem(n.attrs, tuple(shapes[n.inputs[0]]), tuple(shapes[n.output]))
            if why:
                out.append((n.name, why))
    return out


# ------------------------------------------------------------------------------ the emulated aarch64 runtime

def find_arm_runner(env: Mapping[str, str] | None = None, var: str = "TENGINE_ARM_RUNNER"
                    ) -> tuple[list[str] | None, str]:
    """The command prefix (qemu-aarch64 + the aarch64 runner ``$var`` names: Tengine's by default) that runs an
    engine's aarch64 build, or ``(None, why not)``."""
    env = os.environ if env is None else env
    runner = env.get(var)
    if not runner:
        return None, f"{var} not set (bash tests/engines/arm/build.sh prints it)"
    if not Path(runner).is_file():
        return None, f"{var}={runner} does not exist"
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        return None, "qemu-aarch64 not found (apt-get install qemu-user)"
    return [qemu, "-L", SYSROOT, runner], ""


def run_arm_runner(cmd: list[str], tmfile: str | Path, x: np.ndarray, cpu: str | None = None,
                   reference_kernels: bool = False) -> tuple[np.ndarray, float]:
    """int8 output codes (N, K) and the output step of an int8 tmfile on NCHW images ``x`` in the aarch64 runner
    (``tengine_run``: batch-1 runs, one thread). ``cpu``: a ``QEMU_CPU`` model (default qemu's ``max``);
    ``reference_kernels``: Tengine's portable C kernels (``TG_DEBUG_REF=1``). Raises RuntimeError on failure."""
    env = dict(os.environ)
    if cpu:
        env["QEMU_CPU"] = cpu
    if reference_kernels:
        env["TG_DEBUG_REF"] = "1"
    with tempfile.TemporaryDirectory(prefix="deployq-arm64-") as d:
        src, dst = Path(d) / "in.raw", Path(d) / "out.raw"
        xs = np.ascontiguousarray(x, "<f4")
        with open(src, "wb") as f:
            np.asarray(xs.shape, "<i4").tofile(f)
            xs.tofile(f)
        r = subprocess.run([*cmd, str(tmfile), str(src), str(dst)], capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"tengine_run (aarch64, qemu) on {Path(tmfile).name} failed (exit {r.returncode})"
                               f"{': ' + r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
        raw = dst.read_bytes()
    n, k = np.frombuffer(raw[:8], "<i4")
    step = float(np.frombuffer(raw[8:12], "<f4")[0])
    return np.frombuffer(raw[12:], np.int8).reshape(int(n), int(k)).copy(), step
