"""The gluoncv classification zoo as a user's json/params: one case per family (its smallest member at the input
size where MXNet builds it), random weights and BatchNorm statistics, generated images.

Used by ``tests/exporters/test_zoo.py`` (a fast subset by default) and ``benchmarks/zoo_coverage.py`` (all).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: ImageNet mean/std of gluoncv's preprocessing: the generated images are uniform pixels normalised with them
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
GN_REASON = "MXNet 1.9.1 cannot export GroupNorm (resnet50_v1b_gn): nothing to convert"


@dataclass(frozen=True)
class Family:
    """One gluoncv family: its smallest member, the input size, the class count and why it cannot run (if so)."""

    name: str
    size: int
    classes: int = 1000
    unexportable: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        return (1, 3, self.size, self.size)


def _fams(size: int, *names: str) -> list[Family]:
    return [Family(n, size, 10 if n.startswith("cifar_") else 1000) for n in names]


#: the 37 families (the input sizes are the smallest where MXNet builds each; 32 already has the 3x3/s2/pad1
#: first pooling whose output MXNet floors and Caffe ceils)
FAMILIES: tuple[Family, ...] = (
    *_fams(32, "resnet18_v1", "resnet18_v2", "resnest14", "se_resnet18_v1", "se_resnet18_v2", "vgg11", "vgg11_bn",
           "shufflenet_v1", "shufflenet_v2", "xception", "mobilenet0.25", "mobilenetv2_0.25", "mobilenetv3_small",
           "cifar_resnet20_v1", "cifar_resnet20_v2", "cifar_wideresnet16_10", "cifar_resnext29_32x4d", "resnet18_v1b",
           "resnet50_v1c", "resnet50_v1d", "resnet50_v1e", "resnet50_v1s", "resnext50_32x4d", "se_resnext50_32x4d",
           "senet_154", "darknet53", "nasnet_4_1056", "cifar_residualattentionnet56", "dla34",
           "hrnet_w18_small_v1_c"),
    *_fams(64, "alexnet"),
    *_fams(224, "densenet121", "squeezenet1.1", "googlenet", "residualattentionnet56"),
    *_fams(299, "inceptionv3"),
    Family("resnet50_v1b_gn", 32, unexportable=GN_REASON),
)
BY_NAME = {f.name: f for f in FAMILIES}

#: small families that the default test suite runs (the rest: benchmarks/zoo_coverage.py or DEPLOYQ_ZOO=all)
FAST = ("cifar_resnet20_v1", "cifar_resnet20_v2", "mobilenet0.25", "cifar_resnext29_32x4d", "se_resnet18_v1")


@dataclass(frozen=True)
class ZooFiles:
    """A family exported as a user would have it: MXNet json/params and an .npz of preprocessed images."""

    family: Family
    symbol: Path
    params: Path
    data: Path


def images(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """``n`` NCHW images: uniform pixels in [0, 1) normalised with ImageNet's mean/std (values in about
    [-2.1, 2.6], the range of a natural image after gluoncv's preprocessing)."""
    rng = np.random.default_rng(seed)
    px = rng.uniform(0.0, 1.0, (n, size, size, 3)).astype(np.float32)
    return np.ascontiguousarray(((px - MEAN) / STD).transpose(0, 3, 1, 2))


def _batchnorms(block) -> list:
    from mxnet.gluon import nn

    found = [block] if isinstance(block, nn.BatchNorm) else []
    for child in block._children.values():
        found += _batchnorms(child)
    return found


def build_net(family: Family, seed: int = 0):
    """The gluoncv net with Xavier weights and random BatchNorm affine (gamma U(0.5, 1.5), beta U(-0.3, 0.3));
    its running statistics are those of one training-mode batch of generated images (momentum 0), so that
    activations stay O(1) through the depth. Hybridized, run once in inference mode (ready to export)."""
    import mxnet as mx
    from gluoncv.model_zoo import get_model
    from mxnet import autograd

    mx.random.seed(seed)
    rng = np.random.default_rng(seed)
    net = get_model(family.name, classes=family.classes, pretrained=False)
    net.initialize(mx.init.Xavier(magnitude=2.0))
    bns = _batchnorms(net)
    for bn in bns:
        bn._kwargs["momentum"] = 0.0
    x = mx.nd.array(images(family.size, 4, seed + 1))
    net(x)  # deferred shapes
    for bn in bns:
        c = bn.gamma.shape[0]
        bn.gamma.set_data(mx.nd.array(rng.uniform(0.5, 1.5, c)))
        bn.beta.set_data(mx.nd.array(rng.uniform(-0.3, 0.3, c)))
    with autograd.record(train_mode=True):
        net(x)  # running statistics := this batch's statistics
    net.hybridize(static_alloc=False)
    net(x[:1])
    return net


def export(family: Family, out_dir: str | Path, seed: int = 0, n_images: int = 4) -> ZooFiles:
    """Build ``family`` (:func:`build_net`) and write ``<name>-symbol.json``, ``<name>-0000.params`` and
    ``<name>.npz`` (``x``: ``n_images`` generated images) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = build_net(family, seed)
    stem = out / family.name
    net.export(str(stem), epoch=0)
    data = out / f"{family.name}.npz"
    np.savez(data, x=images(family.size, n_images, seed + 2))
    return ZooFiles(family, Path(f"{stem}-symbol.json"), Path(f"{stem}-0000.params"), data)


def mxnet_forward(files: ZooFiles, x: np.ndarray) -> np.ndarray:
    """MXNet's own fp32 forward of the exported json/params (the parity reference; the first output of a net
    with auxiliary heads), flattened per image."""
    import warnings

    import mxnet as mx
    from mxnet import gluon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = gluon.SymbolBlock.imports(str(files.symbol), ["data"], str(files.params))
    out = net(mx.nd.array(x))
    if isinstance(out, list | tuple):  # auxiliary heads (nasnet): the main output comes first
        out = out[0]
    return out.asnumpy().reshape(len(x), -1)
