"""Run a deployq Tengine export in Tengine's own tools and runtime (optional; nothing here is needed to export).

``convert_tool`` (MXNet json/params -> fp32 tmfile) and ``quant_tool_int8 -f <deployq table>`` (-> int8 tmfile),
then ``libtengine-lite.so`` through ctypes (the C API that pytengine wraps, without pytengine's prints and its
broken ``Tensor.shape`` getter). The tools are found through the variables ``../shared/engines/build.sh`` prints:
``TENGINE_CONVERT_TOOL``, ``TENGINE_QUANT_TOOL`` and ``TENGINE_LIB``.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ENV_VARS = ("TENGINE_CONVERT_TOOL", "TENGINE_QUANT_TOOL", "TENGINE_LIB")
TENGINE_MODE_INT8 = 4
TENGINE_DT_INT8 = 2


class TengineRuntimeError(RuntimeError):
    """A Tengine tool or the runtime failed on an export."""


@dataclass(frozen=True)
class TengineTools:
    """Paths of Tengine's converter, int8 quantizer and runtime library."""

    convert_tool: Path
    quant_tool: Path
    lib: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TengineTools:
        """The tools named by ``TENGINE_CONVERT_TOOL``/``TENGINE_QUANT_TOOL``/``TENGINE_LIB``; raises
        :class:`LookupError` naming what is missing."""
        env = os.environ if env is None else env
        missing = [v for v in ENV_VARS if not env.get(v)]
        if missing:
            raise LookupError(f"{', '.join(missing)} not set (bash ../shared/engines/build.sh prints them)")
        paths = [Path(env[v]) for v in ENV_VARS]
        absent = [f"{v}={p}" for v, p in zip(ENV_VARS, paths, strict=True) if not p.is_file()]
        if absent:
            raise LookupError(f"not found: {', '.join(absent)}")
        return cls(*paths)


def find_tools(env: Mapping[str, str] | None = None) -> tuple[TengineTools | None, str]:
    """``(tools, "")`` when Tengine's tools are available, else ``(None, reason)``."""
    try:
        return TengineTools.from_env(env), ""
    except LookupError as e:
        return None, str(e)


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        raise TengineRuntimeError(f"{what} failed (exit {r.returncode}): {' | '.join(tail)}")


def export_files(export_dir: str | Path) -> tuple[Path, Path, Path, tuple[int, ...]]:
    """(symbol json, params, scale table, input shape) of a deployq Tengine export folder."""
    d = Path(export_dir)
    man = json.loads((d / "deployq-export.json").read_text())
    files = man["files"]

    def path(kind: str) -> Path:
        f = files[kind]
        return d / (f["path"] if isinstance(f, dict) else f)

    return path("symbol"), path("params"), path("table"), tuple(man["input"]["shape"])


def build_int8_tmfile(export_dir: str | Path, out: str | Path, tools: TengineTools) -> Path:
    """``convert_tool`` + ``quant_tool_int8 -f <the export's table>``: write the int8 tmfile ``out``."""
    sym, params, table, shape = export_files(export_dir)
    out = Path(out).resolve()
    with tempfile.TemporaryDirectory(prefix="deployq-tengine-") as tmp:
        t = Path(tmp)
        (t / "images").mkdir()  # -i is required even with -f (calibration is skipped)
        fp32 = t / "model-fp32.tmfile"
        _run([str(tools.convert_tool), "-f", "mxnet", "-m", str(sym.resolve()), "-p", str(params.resolve()),
              "-o", str(fp32)], t, f"convert_tool on {sym}")
        _run([str(tools.quant_tool), "-m", str(fp32), "-i", str(t / "images"), "-o", str(out),
              "-f", str(table.resolve()), "-g", ",".join(map(str, shape[1:])), "-a", "0"], t,
             f"quant_tool_int8 on {fp32.name} with {table}")
    if not out.is_file():
        raise TengineRuntimeError(f"quant_tool_int8 wrote no {out}")
    return out


class _Options(ctypes.Structure):
    _fields_ = [("num_thread", ctypes.c_int), ("cluster", ctypes.c_int), ("precision", ctypes.c_int),
                ("affinity", ctypes.c_uint64)]


_LIBS: dict[str, ctypes.CDLL] = {}


def _lib(path: Path) -> ctypes.CDLL:
    key = str(path)
    if key not in _LIBS:
        lib = ctypes.CDLL(key)
        vp, cp, ip = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        sigs = {"init_tengine": (ip, []), "create_graph": (vp, [vp, cp, cp]), "destroy_graph": (ip, [vp]),
                "get_graph_input_tensor": (vp, [vp, ip, ip]), "get_graph_output_tensor": (vp, [vp, ip, ip]),
                "set_tensor_shape": (ip, [vp, ctypes.POINTER(ip), ip]),
                "get_tensor_shape": (ip, [vp, ctypes.POINTER(ip), ip]),
                "set_tensor_buffer": (ip, [vp, vp, ip]), "get_tensor_buffer": (vp, [vp]),
                "get_tensor_buffer_size": (ip, [vp]), "get_tensor_data_type": (ip, [vp]),
                "get_tensor_quant_param": (ip, [vp, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ip), ip]),
                "get_tensor_name": (cp, [vp]), "prerun_graph_multithread": (ip, [vp, _Options]),
                "run_graph": (ip, [vp, ip]), "postrun_graph": (ip, [vp]), "get_graph_node_num": (ip, [vp]),
                "get_graph_node_by_idx": (vp, [vp, ip]), "get_node_output_number": (ip, [vp]),
                "get_node_output_tensor": (vp, [vp, ip]), "get_node_op": (cp, [vp]),
                "get_node_input_number": (ip, [vp]), "get_node_input_tensor": (vp, [vp, ip])}
        for name, (res, args) in sigs.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
        if lib.init_tengine() != 0:
            raise TengineRuntimeError(f"{path}: init_tengine failed")
        _LIBS[key] = lib
    return _LIBS[key]


class TengineGraph:
    """An int8 tmfile prerun in Tengine's CPU runtime at a fixed input shape (batch 1 per run).

    With ``keep_all`` every node output gets its own buffer (Tengine's memory pool would reuse them), so
    :meth:`run` can return every tensor's int8 codes, for per-layer comparisons.
    """

    def __init__(self, tmfile: str | Path, input_shape: tuple[int, ...], lib: str | Path, threads: int = 1,
                 keep_all: bool = False):
        self.lib = _lib(Path(lib))
        self.tmfile = str(tmfile)
        self.graph = self.lib.create_graph(None, b"tengine", self.tmfile.encode())
        if not self.graph:
            raise TengineRuntimeError(f"{tmfile}: Tengine cannot load it")
        shape = (1,) + tuple(input_shape[1:])
        self.inp = self.lib.get_graph_input_tensor(self.graph, 0, 0)
        dims = (ctypes.c_int * 4)(*shape)
        if self.lib.set_tensor_shape(self.inp, dims, len(shape)) != 0:
            raise TengineRuntimeError(f"{tmfile}: cannot set input shape {shape}")
        self.in_buf = np.zeros(int(np.prod(shape)), np.int8)
        self.lib.set_tensor_buffer(self.inp, self.in_buf.ctypes.data, self.in_buf.nbytes)
        if self.lib.prerun_graph_multithread(self.graph, _Options(threads, 0, TENGINE_MODE_INT8, 0)) != 0:
            raise TengineRuntimeError(f"{tmfile}: prerun failed at input shape {shape}")
        if self.lib.get_tensor_data_type(self.inp) != TENGINE_DT_INT8:
            raise TengineRuntimeError(f"{tmfile}: the input tensor is not int8 (not a quant_tool_int8 model)")
        self.in_step = self.quant_param(self.inp)
        self.out = self.lib.get_graph_output_tensor(self.graph, 0, 0)
        self.tensors: dict[str, tuple[int, np.ndarray]] = {}  # name -> (tensor handle, own buffer)
        if keep_all:
            self._own_buffers()

    def _own_buffers(self) -> None:
        """Give every int8 node output its own buffer; an output that the pool placed on its input's memory
        (in-place ops such as Flatten, which then copy nothing) shares that input's new buffer."""
        lib, nodes = self.lib, [self.lib.get_graph_node_by_idx(self.graph, i)
                                for i in range(self.lib.get_graph_node_num(self.graph))]
        outs = {n: [lib.get_node_output_tensor(n, j) for j in range(lib.get_node_output_number(n))] for n in nodes}
        ins = {n: [lib.get_node_input_tensor(n, k) for k in range(lib.get_node_input_number(n))] for n in nodes}
        orig = {t: lib.get_tensor_buffer(t) for n in nodes for t in outs[n] + ins[n]}
        new: dict[int, np.ndarray] = {self.inp: self.in_buf}
        for n in nodes:
            if lib.get_node_op(n) in (b"Const", b"InputOp"):  # weights/biases are Const node outputs
                continue
            for t in outs[n]:
                if t == self.inp or lib.get_tensor_data_type(t) != TENGINE_DT_INT8:
                    continue
                size = lib.get_tensor_buffer_size(t)
                buf = next((new[i] for i in ins[n] if i in new and orig[i] == orig[t] and new[i].nbytes == size),
                           None)
                new[t] = np.zeros(size, np.int8) if buf is None else buf
                lib.set_tensor_buffer(t, new[t].ctypes.data, size)
                self.tensors[lib.get_tensor_name(t).decode()] = (t, new[t])

    def quant_param(self, t: int) -> float:
        scale, zp = ctypes.c_float(), ctypes.c_int()
        self.lib.get_tensor_quant_param(t, ctypes.byref(scale), ctypes.byref(zp), 1)
        return float(scale.value)

    def shape(self, t: int) -> tuple[int, ...]:
        dims = (ctypes.c_int * 8)()
        n = self.lib.get_tensor_shape(t, dims, 8)
        return tuple(dims[:max(n, 0)])

    def _codes(self, t: int) -> np.ndarray:
        shape = self.shape(t)
        if t in {h for h, _ in self.tensors.values()}:
            buf = next(b for h, b in self.tensors.values() if h == t)
            return buf.copy().reshape(shape)
        n = self.lib.get_tensor_buffer_size(t)
        ptr = self.lib.get_tensor_buffer(t)
        return np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_int8)), (n,)).copy().reshape(shape)

    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        """The caller's input quantization (``examples/tm_classification_int8.c``): round half away, clamp."""
        v = np.asarray(x, np.float32) / np.float32(self.in_step)
        return np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int8)

    def run_codes(self, xq: np.ndarray) -> dict[str, np.ndarray]:
        """int8 codes of the output (key ``""``) and, with ``keep_all``, of every node output, for one image."""
        self.in_buf[:] = np.asarray(xq, np.int8).ravel()
        if self.lib.run_graph(self.graph, 1) != 0:
            raise TengineRuntimeError(f"{self.tmfile}: run_graph failed")
        res = {name: buf.copy().reshape(self.shape(t)) for name, (t, buf) in self.tensors.items()}
        res[""] = self._codes(self.out)
        return res

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """int8 output codes (N, ...) of the float images ``x`` (N, C, H, W), one run per image."""
        xq = self.quantize_input(x)
        return np.stack([self.run_codes(xq[i:i + 1])[""][0] for i in range(len(xq))])

    @property
    def out_step(self) -> float:
        return self.quant_param(self.out)

    def close(self) -> None:
        if self.graph:
            self.lib.postrun_graph(self.graph)
            self.lib.destroy_graph(self.graph)
            self.graph = None

    def __enter__(self) -> TengineGraph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
