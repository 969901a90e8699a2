"""``deployq demo``: fp32 vs PTQ vs QAT int8 on MNIST-5k under the ncnn profile, end to end in a few minutes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mxnet as mx
from mxnet import autograd, gluon

from . import api
from .data import batches, class_balanced_subset, load_mnist5k
from .progress import progress
from .simulate import calibrate_ranges
from .zoo import evaluate, get_trained, seed_everything

PROFILE = "ncnn"
#: the demo's QAT: weights and inputs of every Conv2D/Dense on the profile's grid, fake BN with the fp32 model's
#: running statistics frozen (``bn_freeze_step: 0``). Measured on MNIST-5k (ncnn int8 top-1, 2 epochs, cosine lr
#: from 1e-3, four shuffles): mobilenet0.25 0.886-0.890 (fp32 0.888), resnet20 0.980-0.981 (fp32 0.982); with the
#: statistics updated: 0.870-0.890 and 0.978-0.983
QAT_CONFIG = [{"op_types": ["Conv2D", "Dense"], "quant_types": ["weight", "input"], "bn_freeze_step": 0}]


def qat(qnet: gluon.HybridBlock, epochs: float = 2.0, lr: float = 0.001, batch_size: int = 64, seed: int = 0,
        quiet: bool = False) -> None:
    """Fine-tune a quantized net on MNIST-5k train: SGD (momentum 0.9, cosine lr), ``deployq.Trainer``."""
    train = load_mnist5k("train")
    per_epoch = (len(train) + batch_size - 1) // batch_size
    steps = max(1, int(round(epochs * per_epoch)))
    sched = mx.lr_scheduler.CosineScheduler(max_update=steps, base_lr=lr, final_lr=lr * 0.01)
    trainer = api.Trainer(qnet.collect_params(), "sgd",
                          {"learning_rate": lr, "momentum": 0.9, "wd": 1e-4, "lr_scheduler": sched})
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    bar = progress(total=steps, desc="QAT", disable=quiet)
    done, ep = 0, 0
    while done < steps:
        for xb, yb in batches(train.x, train.y, batch_size, shuffle=True, seed=seed + 1000 + ep):
            with autograd.record():
                loss = loss_fn(qnet(mx.nd.array(xb)), mx.nd.array(yb))
            loss.backward()
            trainer.step(len(xb), ignore_stale_grad=True)
            done += 1
            bar.update(1)
            if done >= steps:
                break
        ep += 1
    bar.close()


def _ncnn_step(qnet: gluon.HybridBlock, out_dir: Path, quiet: bool = False, model: str = "model") -> dict:
    """Export the QAT net for ncnn (Caffe pair + table, direct fp32/int8 .param/.bin) and run the int8 model in
    ncnn's runtime on the MNIST-5k test images; print its top-1 and its agreement with the simulation."""
    from deployq.exporters.ncnn.runtime import export_and_run

    test = load_mnist5k("test")
    res = export_and_run(qnet, out_dir / "ncnn", test.x, test.y, name=model)
    print(f"[ncnn] int8 model in ncnn's runtime: top-1 {100 * res['accuracy']:.2f}%, agrees with deployq's "
          f"simulation on {100 * res['agreement']:.1f}% of {len(test)} images "
          f"(max logit difference {res['max_logit_error']:.3g}); files in {out_dir / 'ncnn'}")
    return res


def run_demo(model: str = "mobilenet0.25", qat_epochs: float = 2.0, lr: float = 0.001, seed: int = 0,
             out: str | Path = "deployq-demo", quiet: bool = False, num_sample: int = 100) -> dict:
    """Print and return fp32, PTQ and QAT int8 top-1 (MNIST-5k test, ncnn profile); saves the QAT net in ``out``."""
    t0 = time.time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    test, train = load_mnist5k("test"), load_mnist5k("train")
    net = get_trained(model, verbose=not quiet)
    fp32 = evaluate(net, test)
    log = (lambda *a: None) if quiet else print
    log(f"[1/3] fp32 {model}: top-1 {100 * fp32:.2f}%")

    qnet = api.quantize(get_trained(model, verbose=False), QAT_CONFIG, PROFILE, "qat")
    calib_x = train.x[class_balanced_subset(train.y, num_sample, seed)]
    calibrate_ranges(qnet, calib_x, "minmax", seed=seed)  # the PTQ start of benchmarks/ncnn_accuracy.py
    qnet.hybridize(static_alloc=True)
    ptq = evaluate(qnet, test)
    log(f"[2/3] PTQ  (ncnn int8, min-max over {len(calib_x)} calibration images): top-1 {100 * ptq:.2f}%")

    qat(qnet, qat_epochs, lr, seed=seed, quiet=quiet)
    qat_acc = evaluate(qnet, test)
    log(f"[3/3] QAT  (ncnn int8, {qat_epochs:g} epoch, lr {lr:g}): top-1 {100 * qat_acc:.2f}%")
    api.save(qnet, out_dir / f"{model}-qat", model_name=model)
    result = {"model": model, "profile": PROFILE, "fp32_top1": fp32, "ptq_top1": ptq, "qat_top1": qat_acc,
              "seconds": round(time.time() - t0, 1)}
    (out_dir / "demo.json").write_text(json.dumps(result, indent=2))
    print(f"fp32 {100 * fp32:.2f}%   PTQ int8 {100 * ptq:.2f}%   QAT int8 {100 * qat_acc:.2f}%   "
          f"({result['seconds']:.0f} s; saved in {out_dir})")
    result["ncnn"] = _ncnn_step(qnet, out_dir, quiet, model)
    return result
