"""The preprocessing a model was trained with, and how each engine's app code and tools reproduce it.

One :class:`Preprocess` travels with a model: the CLI reads it from ``--mean/--std/--pixel-order/--resize/
--input-shape`` (or from a scale file, saved net or export manifest, where it was stored before), deployq applies it
to images (Pillow), and every export states it as the exact lines of app code (ncnn's ``from_pixels_resize`` +
``substract_mean_normalize``, Tengine's ``quant_tool_int8`` options) in its manifest and ``USAGE.txt``.
Mean and std are per net channel, in pixel units 0-255: ``value = (pixel - mean) / std``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .checks import check_input_shape
from .errors import InputError, UsageError

#: gluoncv's ImageNet normalisation in pixel units (RGB)
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes the net's input. ``resize``: shorter side first, then a center crop to H×W; None: a
    plain resize to H×W (what ncnn2table and quant_tool_int8 without ``-c`` do)."""

    input_shape: tuple[int, int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    pixel_order: str = "rgb"
    resize: int | None = None

    def __post_init__(self) -> None:
        shape = tuple(int(v) for v in self.input_shape)
        if len(shape) != 4 or min(shape) < 1:
            raise UsageError(f"input shape must be N,C,H,W of positive integers, got {self.input_shape}")
        check_input_shape(shape, "input shape")  # at most 8192 per side, 2**28 values
        c = shape[1]
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        mean, std = (mean * c if len(mean) == 1 else mean), (std * c if len(std) == 1 else std)
        if len(mean) != c or len(std) != c:
            raise UsageError(f"--mean/--std need 1 or {c} values (the net has {c} input channels), got "
                             f"{len(self.mean)} and {len(self.std)}")
        if not all(np.isfinite(mean)) or not all(np.isfinite(std)) or min(std) <= 0:
            raise UsageError(f"--std values must be positive and finite, --mean finite; got mean {mean} std {std}")
        if self.pixel_order not in ("rgb", "bgr"):
            raise UsageError(f"--pixel-order must be rgb or bgr, got {self.pixel_order!r}")
        if c not in (1, 3):
            raise UsageError(f"images give 1 (gray) or 3 (color) channels; the net input has {c}")
        if self.resize is not None and int(self.resize) < min(shape[2:]):
            raise UsageError(f"--resize {self.resize} is smaller than the {shape[2]}x{shape[3]} crop")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "resize", None if self.resize is None else int(self.resize))

    @property
    def norm(self) -> tuple[float, ...]:
        """ncnn's ``norm_vals`` / Tengine's ``-s``: 1/std."""
        return tuple(1.0 / s for s in self.std)

    @property
    def height(self) -> int:
        return self.input_shape[2]

    @property
    def width(self) -> int:
        return self.input_shape[3]

    # -------------------------------------------------------------- images

    def pixels(self, image: Any) -> np.ndarray:
        """The image (a ``PIL.Image``) resized/cropped, as uint8 H×W×C in the net's channel order."""
        from PIL import Image

        img = image.convert("L" if self.input_shape[1] == 1 else "RGB")
        h, w = self.height, self.width
        if self.resize is None:
            img = img.resize((w, h), Image.BILINEAR)
        else:
            s = self.resize
            iw, ih = img.size
            nw, nh = (s, max(1, round(ih * s / iw))) if iw <= ih else (max(1, round(iw * s / ih)), s)
            img = img.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - w) // 2, (nh - h) // 2
            img = img.crop((left, top, left + w, top + h))
        a = np.asarray(img, dtype=np.uint8)
        a = a[:, :, None] if a.ndim == 2 else a
        return a[:, :, ::-1] if self.pixel_order == "bgr" and a.shape[2] == 3 else a

    def normalize(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 H×W×C pixels (net channel order) -> float32 C×H×W: ``(pixel - mean) / std``."""
        x = pixels.astype(np.float32).transpose(2, 0, 1)
        return (x - np.asarray(self.mean, np.float32)[:, None, None]) / np.asarray(self.std, np.float32)[:, None, None]

    def apply(self, image: Any) -> np.ndarray:
        """A ``PIL.Image`` -> float32 C×H×W, ready for the net."""
        return self.normalize(self.pixels(image))

    # -------------------------------------------------------------- storing

    def to_dict(self) -> dict[str, Any]:
        return {"input_shape": list(self.input_shape), "mean": list(self.mean), "std": list(self.std),
                "norm": list(self.norm), "pixel_order": self.pixel_order, "resize": self.resize,
                "crop": [self.height, self.width] if self.resize is not None else None}

    @classmethod
    def from_dict(cls, d: Any, where: str = "preprocess") -> Preprocess:
        try:
            return cls(tuple(d["input_shape"]), tuple(d["mean"]), tuple(d["std"]), d.get("pixel_order", "rgb"),
                       d.get("resize"))
        except (KeyError, TypeError, ValueError, UsageError) as e:
            raise InputError(f"{where}: not a valid preprocess block ({e})") from None

    def with_shape(self, input_shape: tuple[int, ...]) -> Preprocess:
        return replace(self, input_shape=tuple(input_shape))

    # -------------------------------------------------------------- engines

    def ncnn(self) -> dict[str, Any]:
        """The app code's ``from_pixels_resize`` pixel types and ``substract_mean_normalize`` values, and the
        ``ncnn2table`` options of the table route."""
        gray = self.input_shape[1] == 1
        net = "GRAY" if gray else self.pixel_order.upper()
        from_rgb = "PIXEL_GRAY" if gray else ("PIXEL_RGB" if net == "RGB" else "PIXEL_RGB2BGR")
        from_bgr = "PIXEL_GRAY" if gray else ("PIXEL_BGR2RGB" if net == "RGB" else "PIXEL_BGR")
        fmt = ",".join
        return {"mean_vals": list(self.mean), "norm_vals": list(self.norm), "pixel_type_from_rgb": from_rgb,
                "pixel_type_from_bgr": from_bgr, "target_size": [self.width, self.height],
                "ncnn2table": f"mean=[{fmt(f'{v:g}' for v in self.mean)}] norm=[{fmt(f'{v:.9g}' for v in self.norm)}] "
                              f"shape=[{self.width},{self.height},{self.input_shape[1]}] pixel={net}"}

    def tengine(self) -> dict[str, Any]:
        """``quant_tool_int8``'s options: -g C,H,W, -w mean, -s scale (1/std), -b swap R/B (1: the net wants RGB from
        OpenCV's BGR), -c center crop (1 only means shorter side 256 then 224x224 in that tool)."""
        c, h, w = self.input_shape[1:]
        crop = 1 if (self.resize == 256 and (h, w) == (224, 224)) else 0
        return {"-g": f"{c},{h},{w}", "-w": ",".join(f"{v:g}" for v in self.mean),
                "-s": ",".join(f"{v:.9g}" for v in self.norm), "-b": 0 if self.pixel_order == "bgr" else 1,
                "-c": crop, "exact_crop": self.resize is None or bool(crop)}


# ------------------------------------------------------------------ command line

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--input-shape --mean --std --pixel-order --resize`` (all default None: stored or built-in values)."""
    g = parser.add_argument_group("input and preprocessing (default: what the scale file / saved net / export "
                                  "recorded, else the model's)")
    g.add_argument("--input-shape", default=None, metavar="N,C,H,W",
                   help="net input shape, e.g. 1,3,224,224 (N is the batch of the exported model, usually 1)")
    g.add_argument("--mean", default=None, metavar="M[,M,M]",
                   help="per-channel mean in pixel units 0-255, net channel order (ImageNet: 123.675,116.28,103.53)")
    g.add_argument("--std", default=None, metavar="S[,S,S]",
                   help="per-channel std in pixel units 0-255 (ImageNet: 58.395,57.12,57.375)")
    g.add_argument("--pixel-order", default=None, choices=("rgb", "bgr"),
                   help="channel order the net was trained on (default rgb)")
    g.add_argument("--resize", default=None, type=int, metavar="S",
                   help="resize the shorter side to S, then center-crop H×W (e.g. 256 for 224×224); default: "
                        "resize straight to H×W")


def parse_shape(text: str, flag: str = "--input-shape") -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(v) for v in str(text).split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise UsageError(f"{flag} must be N,C,H,W (four positive integers), got {text!r}")
    return check_input_shape(shape, flag)  # type: ignore[return-value]


def _floats(text: str, flag: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, got {text!r}") from None
    return vals


def from_args(args: argparse.Namespace, stored: Preprocess | None = None,
              default: Preprocess | None = None) -> Preprocess:
    """The preprocessing of the command line: each given option overrides ``stored`` (a scale file's, saved net's
    or manifest's), else ``default`` (the model's). UsageError when no input shape is known."""
    base = stored or default
    given = getattr(args, "input_shape", None)
    shape = parse_shape(given) if given else (base.input_shape if base else None)
    if shape is None:
        raise UsageError("no input shape: pass --input-shape N,C,H,W (e.g. 1,3,224,224)")
    c = shape[1]
    mean = _floats(args.mean, "--mean") if getattr(args, "mean", None) else (base.mean if base else (0.0,) * c)
    std = _floats(args.std, "--std") if getattr(args, "std", None) else (base.std if base else (1.0,) * c)
    if base is not None and len(base.mean) != c and not getattr(args, "mean", None):
        mean = (base.mean[0],)
    if base is not None and len(base.std) != c and not getattr(args, "std", None):
        std = (base.std[0],)
    order = getattr(args, "pixel_order", None) or (base.pixel_order if base else "rgb")
    resize = getattr(args, "resize", None)
    if resize is None and base is not None and base.input_shape[2:] == shape[2:]:
        resize = base.resize
    return Preprocess(shape, mean, std, order, resize)


def from_scale_file(path: str | None) -> Preprocess | None:
    """The preprocessing a scale file recorded (None: no file, or none recorded)."""
    if not path:
        return None
    from .calib import load

    sf = load(path)
    return Preprocess.from_dict(sf.preprocess, f"{path}: preprocess") if sf.preprocess else None


def imagenet(input_shape: tuple[int, ...] = (1, 3, 224, 224)) -> Preprocess:
    """gluoncv's ImageNet preprocessing (RGB, mean/std above; shorter side 256/224 of the crop)."""
    h = int(input_shape[2])
    return Preprocess(tuple(input_shape), IMAGENET_MEAN, IMAGENET_STD, "rgb", round(h * 256 / 224))


def mnist(input_shape: tuple[int, ...] = (1, 3, 32, 32)) -> Preprocess:
    """The built-in MNIST models' normalisation ((x/255 - 0.1307) / 0.3081), gray replicated to 3 channels."""
    from .data import MNIST_MEAN, MNIST_STD

    return Preprocess(tuple(input_shape), (MNIST_MEAN * 255,), (MNIST_STD * 255,), "rgb", None)


def usage_text(pre: Preprocess, engine: str, files: dict[str, str]) -> str:
    """The body of an export's ``USAGE.txt``: the app-side lines that feed the net what deployq calibrated on."""
    from importlib.resources import files as package_files
    from pathlib import Path

    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(package_files("deployq.templates"))), undefined=StrictUndefined,
                      keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    names = {k: Path(v).name for k, v in files.items()}
    return env.get_template("USAGE.txt.j2").render(pre=pre, engine=engine, files=names, ncnn=pre.ncnn(),
                                                   tengine=pre.tengine(),
                                                   vals=lambda v: ", ".join(f"{x:.9g}f" for x in v))
