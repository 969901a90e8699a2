"""Run the aarch64 ncnn runner (``tests/engines/arm/build.sh``) under qemu-user on NumPy images."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

SYSROOT = "/usr/aarch64-linux-gnu"


def find_runner() -> tuple[list[str] | None, str]:
    """The command prefix that runs the aarch64 ncnn runner (qemu + runner), or None and why not."""
    runner = os.environ.get("NCNN_ARM_RUNNER")
    if not runner:
        return None, "NCNN_ARM_RUNNER not set (bash tests/engines/arm/build.sh prints it)"
    if not Path(runner).is_file():
        return None, f"NCNN_ARM_RUNNER={runner} does not exist"
    qemu = shutil.which("qemu-aarch64")
    if qemu is None:
        return None, "qemu-aarch64 not found (apt-get install qemu-user)"
    return [qemu, "-L", SYSROOT, runner], ""


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
        env = dict(os.environ, **({"QEMU_CPU": cpu} if cpu else {}))
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"ncnn_run failed ({r.returncode}): {r.stderr.strip()}")
        return read_outputs(dst)
