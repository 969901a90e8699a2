"""Images for calibration, training and verification: a folder, an ``.npz`` or the built-in MNIST-5k.

A folder holds images directly (unlabelled: agreement, SQNR and cosine only) or in class subfolders (ImageNet
layout, the sorted folder names are the class indices: accuracy too). JPEG/PNG/BMP, gray or RGBA converted by
:class:`deployq.preprocess.Preprocess`. Every image is decoded once, with a progress bar, into an array that is
file-backed (a memory map in a temporary file) above ``IN_MEMORY_BYTES``, so memory does not grow with the folder;
the array works wherever a NumPy array does. A file that cannot be decoded is reported by name.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError, UsageError
from .preprocess import Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
#: decoded sets larger than this go to a memory-mapped temporary file
IN_MEMORY_BYTES = 256 << 20


@dataclass
class ImageData:
    """Decoded images ``x`` (float32 NCHW, preprocessed) with labels ``y`` (None when unlabelled)."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    classes: list[str] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def labelled(self) -> bool:
        return self.y is not None

    def __len__(self) -> int:
        return len(self.x)


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_folder(folder: Path) -> tuple[list[Path], list[int] | None, list[str]]:
    """(files, labels or None, class names): class subfolders when there are any, else the images inside."""
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    by_class = [(d.name, sorted(p for p in d.rglob("*") if _is_image(p))) for d in subdirs]
    by_class = [(n, f) for n, f in by_class if f]
    loose = sorted(p for p in folder.iterdir() if _is_image(p))
    if by_class and loose:
        raise InputError(f"{folder}: holds both images ({loose[0].name}, ...) and class subfolders "
                         f"({by_class[0][0]}/, ...)", fix="put every image in a class subfolder, or none")
    if by_class:
        # round robin over the classes: any prefix (--limit) stays class-balanced
        classes = [n for n, _ in by_class]
        files, labels = [], []
        longest = max(len(f) for _, f in by_class)
        for k in range(longest):
            for ci, (_, f) in enumerate(by_class):
                if k < len(f):
                    files.append(f[k])
                    labels.append(ci)
        return files, labels, classes
    if not loose:
        raise InputError(f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)} directly inside or in class "
                         "subfolders)")
    return loose, None, []


def decode(path: Path, pre: Preprocess) -> np.ndarray:
    """One image file -> float32 C×H×W; InputError naming the file when it cannot be decoded."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    # a truncated file is an error even where an imported library (gluoncv.data.mhp) set Pillow's global flag
    tolerant, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as img:
            img.load()
            return pre.apply(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"cannot decode image ({type(e).__name__}: {str(e)[:120]})", where=path,
                         fix="remove the file or pass --skip-bad-images") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = tolerant


def _buffer(n: int, shape: tuple[int, ...]) -> np.ndarray:
    nbytes = n * int(np.prod(shape)) * 4
    if nbytes <= IN_MEMORY_BYTES:
        return np.empty((n, *shape), np.float32)
    f = tempfile.TemporaryFile(prefix="deployq-images-")  # unlinked: freed when the array is
    f.truncate(nbytes)
    return np.memmap(f, dtype=np.float32, mode="w+", shape=(n, *shape))


def open_folder(folder: Path, pre: Preprocess, *, limit: int | None = None, skip_bad: bool = False,
                quiet: bool = False) -> ImageData:
    from .progress import progress

    files, labels, classes = list_folder(folder)
    if limit:
        files, labels = files[:limit], (labels[:limit] if labels is not None else None)
    shape = tuple(pre.input_shape[1:])
    x = _buffer(len(files), shape)
    keep, skipped = [], []
    with progress(total=len(files), desc=f"decode {folder.name}", disable=quiet, unit="img") as bar:
        for i, p in enumerate(files):
            try:
                x[len(keep)] = decode(p, pre)
                keep.append(i)
            except InputError as e:
                if not skip_bad:
                    raise
                skipped.append(str(p))
                print(f"deployq: warning: skipped {p}: {e.message}", file=sys.stderr)
            bar.update(1)
    if not keep:
        raise InputError(f"{folder}: none of its {len(files)} images could be decoded")
    y = None if labels is None else np.asarray([labels[i] for i in keep], np.int32)
    return ImageData(x[:len(keep)], y, str(folder), classes, [files[i] for i in keep], skipped)


def open_npz(path: Path, input_shape: tuple[int, ...], limit: int | None = None) -> ImageData:
    """An .npz with preprocessed float images ``x`` (or ``data``), N×C×H×W, and optional integer labels ``y``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            key = "x" if "x" in keys else "data" if "data" in keys else None
            if key is None:
                raise InputError(f"no array 'x' or 'data' (it has: {', '.join(sorted(keys)) or 'nothing'})",
                                 where=path)
            x = z[key][:limit] if limit else z[key]
            y = (z["y"][:limit] if limit else z["y"]) if "y" in keys else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"not a readable .npz ({type(e).__name__}: {str(e)[:120]})", where=path) from None
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(input_shape[1:]):
        raise InputError(f"images have shape {x.shape}; the net takes N x {'x'.join(map(str, input_shape[1:]))}",
                         where=path, fix="store preprocessed float images NxCxHxW, or pass --input-shape")
    if len(x) == 0:
        raise InputError("holds no images (an empty array)", where=path)
    if not np.issubdtype(x.dtype, np.number):
        raise InputError(f"images of dtype {x.dtype} are not numbers", where=path)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.all(np.isfinite(x)):
        raise InputError(f"images hold NaN or Inf values (first at image {int(np.argwhere(~np.isfinite(x))[0, 0])})",
                         where=path)
    if y is not None:
        if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"labels 'y' must be {len(x)} integers (one per image), got shape {y.shape} "
                             f"dtype {y.dtype}", where=path)
        y = y.astype(np.int32)
    return ImageData(x, y, str(path))


def open_data(spec: str, pre: Preprocess, *, split: str = "train", limit: int | None = None,
              skip_bad: bool = False, quiet: bool = False) -> ImageData:
    """Images named by ``--data``: a folder, an .npz, or ``builtin`` (MNIST-5k ``split``, 32×32, 3 channels)."""
    if spec == "builtin":
        from .data import load_mnist5k

        d = load_mnist5k(split)
        if tuple(d.x.shape[1:]) != tuple(pre.input_shape[1:]):
            raise UsageError(f"--data builtin: MNIST-5k images are {'x'.join(map(str, d.x.shape[1:]))}, the net "
                             f"takes {'x'.join(map(str, pre.input_shape[1:]))}",
                             fix="pass --data with a folder of your images or an .npz")
        n = limit or len(d.x)
        return ImageData(d.x[:n], d.y[:n], f"builtin MNIST-5k {split}", [str(c) for c in range(10)])
    path = Path(spec)
    if not path.exists():
        raise InputError("no such file or folder", where=path, fix="pass --data DIR (an image folder) or FILE.npz")
    if path.is_dir():
        return open_folder(path, pre, limit=limit, skip_bad=skip_bad, quiet=quiet)
    if path.suffix.lower() == ".npz":
        return open_npz(path, pre.input_shape, limit)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return ImageData(decode(path, pre)[None], None, str(path), files=[path])
    raise InputError("not an image folder, .npz or image file", where=path)


def add_data_arguments(parser: argparse.ArgumentParser, *, help_text: str | None = None,
                       default: str | None = None) -> None:
    """``--data``, ``--limit``, ``--skip-bad-images``."""
    parser.add_argument("--data", default=default, metavar="DIR|FILE.npz|builtin",
                        help=help_text or "images: a folder (class subfolders = labelled, sorted names = class "
                                          "index; or images directly inside), an .npz of preprocessed NxCxHxW "
                                          "'x' (+ labels 'y'), or builtin (MNIST-5k, built-in models only)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--skip-bad-images", action="store_true",
                        help="skip images that cannot be decoded (warning per file) instead of stopping")
