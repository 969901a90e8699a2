"""Run ncnn models with the ncnn Python runtime (PyPI ``ncnn``), and export-then-run for a quick check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from deployq.exporters.ir.graph import GraphError


def run(param: str | Path, bin_: str | Path, x: np.ndarray, input_blob: str = "data", output_blob: str | None = None,
        packing: bool = False, threads: int = 1) -> np.ndarray:
    """Run an ncnn model on NCHW images ``x`` (one at a time), fp16/bf16 off; returns flattened outputs of
    ``output_blob`` (default: the model's first output blob)."""
    import ncnn

    net = ncnn.Net()
    opt = net.opt
    opt.use_fp16_storage = opt.use_fp16_packed = opt.use_fp16_arithmetic = False
    opt.use_bf16_storage = False
    opt.use_packing_layout = packing
    opt.use_int8_inference = True
    opt.num_threads = threads
    if net.load_param(str(param)) != 0 or net.load_model(str(bin_)) != 0:
        raise GraphError(f"ncnn could not load {param} / {bin_}")
    output_blob = output_blob or net.output_names()[0]
    outs = []
    for img in np.asarray(x, np.float32):
        ex = net.create_extractor()
        ex.input(input_blob, ncnn.Mat(np.ascontiguousarray(img)).clone())
        ret, mat = ex.extract(output_blob)
        if ret != 0:
            raise GraphError(f"ncnn extract({output_blob!r}) failed with {ret}")
        outs.append(np.array(mat).reshape(-1).copy())
        del mat, ex
    return np.stack(outs)


def export_and_run(qnet: Any, out_dir: str | Path, x: np.ndarray, y: np.ndarray, name: str = "model"
                   ) -> dict[str, Any]:
    """Export ``qnet`` (all ncnn files) into ``out_dir``, run the int8 model in ncnn on ``x`` and return its
    top-1 accuracy on ``y``, top-1 agreement with deployq's simulation and the max logit difference."""
    from deployq.exporters.ncnn.export import export_qnet

    from deployq.zoo import predict

    files = export_qnet(qnet, out_dir, name)
    logits = run(files["int8_param"], files["int8_bin"], x)
    sim = predict(qnet, x)
    return {"files": {k: str(v) for k, v in files.items()},
            "accuracy": float(np.mean(logits.argmax(1) == y)),
            "agreement": float(np.mean(logits.argmax(1) == sim.argmax(1))),
            "max_logit_error": float(np.abs(logits - sim).max())}
