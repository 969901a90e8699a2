"""``deployq qat``: quantization-aware training of any model on a labelled image folder -> a saved quantized net.

The recipe is the demo's: every Conv2D/Dense quantized on the profile's grid (weights and inputs, fake BN with the
fp32 statistics frozen), input ranges started by a min-max calibration on the first training images, then SGD
(momentum 0.9, weight decay 1e-4, cosine learning rate). After every epoch the net is checkpointed
(``OUT.ckpt.params/.deployq.json`` + trainer state); ``--resume`` continues from the last one. ``--out Q`` writes the
saved quantized net every command takes as ``--qnet Q``.
``--launch N`` (or ``--kvstore dist_sync`` under MXNet's launcher) trains on N workers, quantization states kept
identical on all; rank 0 writes the checkpoints and the net (deployq.dist, docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import preprocess
from .config import load_config_list
from .errors import InputError, UsageError
from .images import add_data_arguments
from .modelargs import add_model_arguments

PROFILES = ("ncnn", "tengine", "onnx", "custom")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "qat", help="quantization-aware training on your labelled images -> a saved quantized net (--qnet)",
        description="Quantize a model on an engine's exact int8 grid and fine-tune it on a labelled image folder "
                    "(class subfolders, sorted names = class index). Writes OUT.params + OUT.deployq.json (the "
                    "saved quantized net, with its preprocessing), a checkpoint per epoch (--resume continues), "
                    "and prints loss and accuracy. Example: deployq qat --symbol net-symbol.json --params "
                    "net-0000.params --input-shape 1,3,224,224 --mean 123.675,116.28,103.53 --std "
                    "58.395,57.12,57.375 --resize 256 --data train/ --val val/ --epochs 1 --out qnet")
    add_model_arguments(p)
    add_data_arguments(p, help_text="training images: a folder with class subfolders (or an .npz with 'y')")
    preprocess.add_arguments(p)
    p.add_argument("--val", default=None, help="validation images (same forms as --data): accuracy after each epoch")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs over --data (fractions allowed; default 1)")
    p.add_argument("--lr", type=float, default=0.001, help="SGD learning rate, cosine decay to 1%% (default 0.001)")
    p.add_argument("--batch-size", type=int, default=32, help="training batch (default 32)")
    p.add_argument("--profile", default="ncnn", choices=PROFILES, help="engine grid to train on (default ncnn)")
    p.add_argument("--algorithm", default="qat", help="quantizer algorithm (default qat; naive, dorefa, lsq, bnn, "
                                                      "observer, or a registered user quantizer)")
    p.add_argument("--config", default=None, help="a deployq config list (JSON) instead of the demo's recipe")
    p.add_argument("--calib-images", type=int, default=256,
                   help="training images whose min-max ranges start the input ranges (default 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="saved quantized net to write: OUT.params + OUT.deployq.json")
    p.add_argument("--resume", action="store_true", help="continue from OUT's last checkpoint")
    p.add_argument("--json", dest="json_out", action="store_true", help="print a JSON summary at the end")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    g = p.add_argument_group("distributed training (docs/distributed.md)")
    g.add_argument("--kvstore", default=None, choices=("local", "device", "dist_sync", "dist_device_sync"),
                   help="train through this MXNet kvstore; dist_*: one worker of a launched run (each takes its part "
                        "of every --batch-size global batch; quantization ranges kept identical on all workers)")
    g.add_argument("--launch", type=int, default=None, metavar="N",
                   help="run N workers (and --servers) on this machine over loopback, --kvstore dist_sync")
    g.add_argument("--servers", type=int, default=1, metavar="S", help="kvstore servers of --launch (default 1)")
    g.add_argument("--dist-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="a worker waiting this long for the others stops the run (default 300)")
    p.set_defaults(func=run, _parser=p)


def _config(path: str | None) -> list | None:
    if path is None:
        from .demo import QAT_CONFIG

        return QAT_CONFIG
    return load_config_list(path)


def _check(args: argparse.Namespace) -> None:
    for name in ("epochs", "lr", "batch_size"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.data is None:
        raise UsageError("no --data: QAT trains on your labelled images", fix="pass --data DIR with class subfolders")


def _ckpt(out: Path) -> tuple[Path, Path]:
    return Path(f"{out}.ckpt"), Path(f"{out}.ckpt.json")


def _accuracy(net, x, y, batch: int) -> float:
    import numpy as np

    from .zoo import predict

    return float(np.mean(predict(net, x, batch).argmax(1) == y))


def _launch(args: argparse.Namespace) -> int:
    """``--launch N``: this command line as N ``--kvstore dist_sync`` workers (deployq.dist.launch)."""
    from . import dist

    if args.launch < 1 or args.servers < 1:
        raise UsageError(f"--launch and --servers must be positive, got {args.launch} and {args.servers}")
    if args.kvstore not in (None, "dist_sync", "dist_device_sync"):
        raise UsageError(f"--launch runs a distributed kvstore, not --kvstore {args.kvstore}")
    argv = ["--kvstore", args.kvstore or "dist_sync"]
    for a in args._parser._actions:
        v = getattr(args, a.dest, None)
        if not a.option_strings or a.dest in ("help", "launch", "servers", "kvstore") or v is None or v == a.default:
            continue
        argv += [a.option_strings[0]] if isinstance(a, argparse._StoreTrueAction) else [a.option_strings[0], str(v)]
    return dist.launch(args.launch, args.servers, [sys.executable, "-m", "deployq.cli", "qat", *argv])


def run(args: argparse.Namespace) -> int:
    if getattr(args, "launch", None) is not None:
        return _launch(args)
    import mxnet as mx
    import numpy as np
    from mxnet import autograd, gluon

    from . import api
    from .images import open_data
    from .modelargs import load_model
    from .progress import progress
    from .simulate import calibrate_ranges

    _check(args)
    from . import dist

    kv = dist.create_kvstore(args.kvstore, args.dist_timeout) if args.kvstore else None
    rank, workers = dist.rank_and_workers(kv) if kv is not None and "dist" in kv.type else (0, 1)
    lead = rank == 0  # rank 0 alone writes checkpoints, the saved net and the summary
    if not lead:
        args.quiet, args.json_out = True, False
    out = Path(args.out)
    ckpt, ckpt_meta = _ckpt(out)
    start_epoch, state = 0, None
    if args.resume:
        if not ckpt_meta.exists():
            raise UsageError(f"--resume: no checkpoint {ckpt_meta} (run without --resume first)")
        state = json.loads(ckpt_meta.read_text())
        args.qnet, args.model, args.symbol, args.params = str(ckpt), None, None, None
        start_epoch = int(state["epoch"])
    m = load_model(args, quiet=args.quiet)
    train = open_data(args.data, m.preprocess, limit=args.limit, skip_bad=args.skip_bad_images, quiet=args.quiet)
    if train.y is None:
        raise UsageError(f"--data {args.data} has no labels", fix="put the images in one subfolder per class")
    outputs = m.net(mx.nd.zeros((1, *m.preprocess.input_shape[1:])))
    n_out = int(outputs.shape[-1])
    if int(train.y.max()) >= n_out:
        raise InputError(f"{len(train.classes) or int(train.y.max()) + 1} classes, the model has {n_out} outputs",
                         where=args.data, fix="pass --classes N for a gluoncv --model")
    val = None
    if args.val:
        val = open_data(args.val, m.preprocess, skip_bad=args.skip_bad_images, quiet=args.quiet)
        if val.y is None:
            raise UsageError(f"--val {args.val} has no labels (class subfolders)")
    if m.quantized:
        qnet = m.net
    else:
        qnet = api.quantize(m.net, _config(args.config), args.profile, args.algorithm)
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.permutation(len(train))[:args.calib_images])
        calibrate_ranges(qnet, np.asarray(train.x[pick]), "minmax", seed=args.seed)
    qnet.hybridize(static_alloc=True)
    if args.batch_size < workers:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: at least one image per worker "
                         f"({workers} workers)")
    # global batches; a last one with fewer images than workers is dropped (deployq.dist.worker_batches)
    per_epoch = len(train) // args.batch_size + (len(train) % args.batch_size >= workers)
    total = max(1, int(round(args.epochs * per_epoch)))
    sched = mx.lr_scheduler.CosineScheduler(max_update=total, base_lr=args.lr, final_lr=args.lr * 0.01)
    opt = {"learning_rate": args.lr, "momentum": 0.9, "wd": 1e-4, "lr_scheduler": sched}
    if kv is None:
        trainer = api.Trainer(qnet.collect_params(), "sgd", opt)
    else:
        trainer = dist.DistTrainer(qnet, "sgd", opt, kvstore=kv, timeout=args.dist_timeout)
    if state is not None:
        trainer.load_states(str(ckpt) + ".states")
    done = start_epoch * per_epoch
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    history = list(state["history"]) if state else []
    epoch = start_epoch
    bar = progress(total=total, initial=min(done, total), desc="QAT", disable=args.quiet, unit="step")
    while done < total:
        loss_sum, correct, seen = 0.0, 0, 0
        for xb, yb in dist.worker_batches(train.x, train.y, args.batch_size, rank, workers, shuffle=True,
                                          seed=args.seed + 1000 + epoch):
            data, label = mx.nd.array(xb), mx.nd.array(yb)
            with autograd.record():
                logits = qnet(data)
                loss = loss_fn(logits, label)
            loss.backward()
            trainer.step(len(xb), ignore_stale_grad=True)
            lv = float(loss.mean().asscalar())
            if not np.isfinite(lv):
                raise InputError(f"the training loss became {lv} at step {done + 1}", where=args.data,
                                 fix="lower --lr, or check the images and --mean/--std")
            loss_sum += lv * len(xb)
            correct += int((logits.argmax(axis=1).asnumpy().astype(int) == yb).sum())
            seen += len(xb)
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{correct / seen:.3f}")
            if done >= total:
                break
        epoch += 1
        row = {"epoch": epoch, "loss": loss_sum / max(seen, 1), "train_accuracy": correct / max(seen, 1)}
        if val is not None and lead:
            row["val_accuracy"] = _accuracy(qnet, val.x, val.y, 100)
        history.append(row)
        if not lead:
            continue
        if not args.quiet:
            bar.write(f"epoch {epoch}: loss {row['loss']:.4f}  train top-1 {row['train_accuracy']:.4f}"
                      + (f"  val top-1 {row['val_accuracy']:.4f}" if "val_accuracy" in row else ""), file=sys.stderr)
        api.save(qnet, ckpt, m.name, preprocess=m.preprocess)
        trainer.save_states(str(ckpt) + ".states.tmp")
        os.replace(str(ckpt) + ".states.tmp", str(ckpt) + ".states")
        tmp = ckpt_meta.with_name(ckpt_meta.name + ".tmp")
        tmp.write_text(json.dumps({"epoch": epoch, "history": history, "steps": done}, indent=2))
        os.replace(tmp, ckpt_meta)
    bar.close()
    if isinstance(trainer, dist.DistTrainer):
        trainer.close()
    if not lead:
        return 0
    params, meta = api.save(qnet, out, m.name, preprocess=m.preprocess)
    summary = {"qnet": str(out), "model": m.name, "profile": qnet._deployq["profile"], "steps": done,
               "images": len(train), "classes": train.classes, "history": history}
    if args.json_out:
        print(json.dumps(summary, indent=2))
    elif not args.quiet:
        print(f"wrote {params} and {meta} ({done} steps on {len(train)} images; use --qnet {out})")
    return 0
