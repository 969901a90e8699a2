"""Peer baselines shared by the benchmarks: onnxruntime ``quantize_static`` of the same BN-folded model."""

from __future__ import annotations

from pathlib import Path

import mxnet as mx
import numpy as np

from deployq.data import batches
from deployq.zoo import get_trained


def ort_static(name, calib, test, tmp: Path, method: str = "MinMax") -> float:
    """onnxruntime ``quantize_static`` (QDQ, per-channel int8, ``method`` calibration) of the BN-folded fp32
    model, calibrated on ``calib``; top-1 on ``test``."""
    import onnx
    import onnxruntime as ort
    from deployq.exporters.ir import mxnet_lower
    from deployq.exporters.ir.frontend import from_gluon
    from deployq.exporters.ir.passes import optimize
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    g = optimize(from_gluon(get_trained(name, verbose=False)))  # BN folded (peers.md §3: needed per-channel)
    sym, args, aux = mxnet_lower.to_symbol(g)
    fp32 = tmp / f"{name}.onnx"
    if not fp32.exists():
        mx.onnx.export_model(sym, {**args, **aux}, in_shapes=[(1, 3, 32, 32)], in_types=[np.float32],
                             onnx_file_path=str(fp32), dynamic=True, dynamic_input_shapes=[(None, 3, 32, 32)])
        m = onnx.load(str(fp32))
        inits = {i.name for i in m.graph.initializer}
        keep = [i for i in m.graph.input if i.name not in inits]
        del m.graph.input[:]
        m.graph.input.extend(keep)
        onnx.save(m, str(fp32))
    in_name = next(i.name for i in onnx.load(str(fp32)).graph.input)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{in_name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.it, None)

    q = tmp / f"{name}-{method}-int8.onnx"
    quantize_static(str(fp32), str(q), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    out = np.concatenate([sess.run(None, {in_name: xb})[0] for xb, _ in batches(test.x, None, 250)])
    return float(np.mean(out.argmax(1) == test.y))
