"""Which int8 Conv kernel Tengine's CPU runtime picks, and how that kernel dequantizes (x86 build, spec §5).

Tengine scores every registered kernel for a node and runs the best (``device/cpu/op/conv/``):

* ``direct``: ``x86/conv_direct_hcl_int8_x86.c``, one group, 3x3, stride 1/1 or 2/2, no dilation, symmetric pads;
* ``depthwise``: ``x86/conv_dw_hcl_x86.c``, one channel per group, same 3x3 conditions, batch 1;
* ``im2col``: ``x86/conv_hcl_x86.c`` + ``conv_kernel_x86.c`` (im2col + int8 GEMM), any other one-group conv;
* ``ref``: ``conv_kernel_ref_int8.c``, everything else (grouped convs with several channels per group,
  depthwise convs that are not 3x3 s1/s2).

The three x86 kernels compute ``((float)acc * s_in) * s_w[c]`` (two float32 products); the reference kernel
``(float)acc * (s_in * s_w[c])`` (one product of a precomputed float32 factor). The results differ by one float
rounding, which flips a requantized code now and then, so a bit-exact model must follow the kernel that runs.
"""

from __future__ import annotations

#: kernel families modelled (the ``kernels`` entry of the tengine profile's ``extra``)
FAMILIES = ("x86",)
TWO_STEP = ("direct", "depthwise", "im2col")


def conv_kernel(attrs: dict, in_channels: int, out_channels: int, batch: int = 1, family: str = "x86") -> str:
    """The x86 int8 kernel Tengine runs for an MXNet ``Convolution`` with these attrs."""
    if family not in FAMILIES:
        raise ValueError(f"tengine kernels {family!r}: modelled kernel families: {', '.join(FAMILIES)}")
    groups = int(attrs["num_group"])
    kernel, stride = tuple(attrs["kernel"]), tuple(attrs["stride"])
    dilate = tuple(attrs.get("dilate") or (1, 1))
    small = kernel == (3, 3) and stride in ((1, 1), (2, 2)) and dilate == (1, 1)  # MXNet pads are symmetric
    if groups == 1:
        return "direct" if small else "im2col"
    if in_channels // groups == 1 and out_channels // groups == 1 and small and batch == 1:
        return "depthwise"
    return "ref"


def two_step_dequant(kernel: str) -> bool:
    """True when the kernel dequantizes as ``(acc * s_in) * s_w[c]``, False for ``acc * (s_in * s_w[c])``."""
    return kernel in TWO_STEP
