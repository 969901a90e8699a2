"""Run the aarch64 ncnn / Tengine runners (``tests/engines/arm/build.sh``) under qemu-user on NumPy images."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from deployq.exporters.tengine.arm64 import find_arm_runner


def find_runner(var: str = "NCNN_ARM_RUNNER") -> tuple[list[str] | None, str]:
    """The command prefix that runs the aarch64 runner ``$var`` names (qemu + runner), or None and why not."""
    return find_arm_runner(var=var)


def write_images(x: np.ndarray, path: Path) -> None:
    """The runner's input file: int32 N C H W, then the float32 images."""
    x = np.ascontiguousarray(x, np.float32)
    with open(path, "wb") as f:
        np.asarray(x.shape, "<i4").tofile(f)
        x.astype("<f4").tofile(f)


def read_outputs(path: Path) -> np.ndarray:
    """The runner's output file (int32 N K, then N*K float32) as an (N, K) array."""
    raw = Path(path).read_bytes()
    n, k = np.frombuffer(raw[:8], "<i4")
    return np.frombuffer(raw[8:], "<f4").reshape(int(n), int(k)).copy()


def _run(args: list[str], cpu: str | None, what: str, extra_env: dict[str, str] | None = None) -> None:
    env = dict(os.environ, **({"QEMU_CPU": cpu} if cpu else {}), **(extra_env or {}))
    r = subprocess.run(args, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()}")


def run_arm(cmd: list[str], param: str | Path, bin_: str | Path, x: np.ndarray, input_blob: str = "data",
            output_blob: str = "output", packing: bool = True, cpu: str | None = None) -> np.ndarray:
    """Outputs of ``output_blob`` for NCHW images ``x`` from ncnn's aarch64 build under qemu (``cpu``: a
    ``QEMU_CPU`` model such as ``cortex-a53``; default qemu's ``max``, with dotprod and i8mm)."""
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "in.raw", Path(d) / "out.raw"
        write_images(x, src)
        args = [*cmd, str(param), str(bin_), str(src), str(dst), input_blob, output_blob]
        if not packing:
            args.append("--no-packing")
        _run(args, cpu, "ncnn_run")
        return read_outputs(dst)


def run_tengine_arm(cmd: list[str], tmfile: str | Path, x: np.ndarray, cpu: str | None = None,
                    reference_kernels: bool = False) -> tuple[np.ndarray, float]:
    """int8 output codes (N, K) and the output scale of an int8 tmfile for NCHW images ``x`` from Tengine's
    aarch64 build under qemu (:func:`deployq.exporters.tengine.arm64.run_arm_runner`); ``reference_kernels``:
    Tengine's portable C reference kernels (``TG_DEBUG_REF=1``) instead of the NEON/assembly ones."""
    from deployq.exporters.tengine.arm64 import run_arm_runner

    return run_arm_runner(cmd, tmfile, x, cpu=cpu, reference_kernels=reference_kernels)
