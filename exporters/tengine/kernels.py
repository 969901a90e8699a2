"""Which int8 Conv kernel Tengine's CPU runtime picks, and how that kernel requantizes (spec §5), per kernel family.

Tengine scores every registered kernel for a node and runs the best (``device/cpu/op/conv/``).

``x86`` (an x86-64 build; the default):

* ``direct``: ``x86/conv_direct_hcl_int8_x86.c``, one group, 3x3, stride 1/1 or 2/2, no dilation, symmetric pads;
* ``depthwise``: ``x86/conv_dw_hcl_x86.c``, one channel per group, same 3x3 conditions, batch 1;
* ``im2col``: ``x86/conv_hcl_x86.c`` + ``conv_kernel_x86.c`` (im2col + int8 GEMM), any other one-group conv;
* ``ref``: ``conv_kernel_ref_int8.c``, everything else (grouped convs with several channels per group,
  depthwise convs that are not 3x3 s1/s2).

The three x86 kernels compute ``((float)acc * s_in) * s_w[c]`` (two float32 products); the reference kernel
``(float)acc * (s_in * s_w[c])`` (one product of a precomputed float32 factor). The results differ by one float
rounding, which flips a requantized code now and then, so a bit-exact model must follow the kernel that runs.

``arm64`` (an aarch64 build, ``cortex-a/``, no fp16 vector arithmetic):

* ``arm_dw``: ``conv_dw_hcl_arm.c`` + ``conv_dw_kernel_int8_arm.c``, every depthwise conv (one channel per group)
  with symmetric pads and no dilation, except 7x7 stride 1 and 2x2 kernels. It calls the assembly kernels
  ``armv8/dw_k3s1p1_int8_a72.S`` (stride 1) or ``dw_k3s2p1_int8_a72.S`` (stride 2) whatever the kernel size and
  pad, so only 3x3 pad 1 is computed right (:func:`arm64_problem` lists what is not);
* ``arm_gemm``: ``conv_hcl_arm.c`` + ``conv_kernel_int8_arm.c`` (im2col + ``i8gemm_4x16/4x4_a72_int8.S``), every
  other conv, grouped convs included;
* ``ref``: ``conv_kernel_ref_int8.c``, depthwise convs the ``arm_dw`` kernel declines.

Both ``arm_*`` kernels requantize the int32 accumulator (bias added) in fixed point: per output channel
``(q, e) = frexp(float32(float32(s_in*s_w[c]) / s_out))``, ``M = round(q * 2**31)`` (``2**31`` -> ``2**30``,
``e + 1``), ``SQRDMULH(acc, M)``, a left shift by ``max(e, 0)`` (``sshl``, wraps), a rounding right shift by
``max(-e, 0)`` (``srshl``), clamp to ``[act_min, act_max]``: ``[-127, 127]``, ``[0, 127]`` with a fused ReLU,
``[0, min(127, round(6/s_out))]`` with ReLU6 (``exporters/tengine/arm64.py``). FC, pooling, eltwise, concat and
the activations run the same C code as on x86 (the NEON int8 FC is disabled in ``fc_hcl_arm.c``; the other ARM
kernels take float32 only).
"""

from __future__ import annotations

from typing import Any

#: kernel families modelled (the ``kernels`` entry of the tengine profile's ``extra``; x86 when absent)
FAMILIES = ("x86", "arm64")
TWO_STEP = ("direct", "depthwise", "im2col")
FIXED_POINT = ("arm_dw", "arm_gemm")


def check_family(family: str) -> str:
    """``family`` if modelled, else a ValueError naming the modelled ones."""
    if family not in FAMILIES:
        raise ValueError(f"tengine kernels {family!r}: modelled kernel families: {', '.join(FAMILIES)}")
    return family


def kernel_family(profile: Any) -> str:
    """The kernel family a tengine :class:`~deployq.profiles.Profile` names (``extra["kernels"]``, default x86)."""
    return check_family(str((getattr(profile, "extra", None) or {}).get("kernels", "x86")))


def _arm64_kernel(attrs: dict, in_channels: int, out_channels: int) -> str:
    groups = int(attrs["num_group"])
    kernel = tuple(attrs["kernel"])
    dilate = tuple(attrs.get("dilate") or (1, 1))
    depthwise = groups > 1 and in_channels // groups == 1 and out_channels // groups == 1
    if not depthwise:
        return "arm_gemm"
    declined = (kernel == (7, 7) and tuple(attrs["stride"]) == (1, 1)) or kernel == (2, 2) or dilate != (1, 1)
    return "ref" if declined else "arm_dw"  # MXNet pads are symmetric


def conv_kernel(attrs: dict, in_channels: int, out_channels: int, batch: int = 1, family: str = "x86") -> str:
    """The int8 kernel Tengine runs for an MXNet ``Convolution`` with these attrs on the ``family``'s build."""
    if check_family(family) == "arm64":
        return _arm64_kernel(attrs, in_channels, out_channels)
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


def fixed_point(kernel: str) -> bool:
    """True when the kernel requantizes in fixed point (SQRDMULH + rounding shift: the arm64 kernels)."""
    return kernel in FIXED_POINT


def arm64_problem(attrs: dict, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str | None:
    """Why Tengine's aarch64 build (``c73708c``) miscomputes or crashes on this Convolution (NCHW shapes), None
    when it computes it as :mod:`~deployq.exporters.tengine.arm64` models. Each case was reproduced under qemu
    (``docs/arm.md``).

    * ``arm_gemm``: output channels past the last multiple of 16 (per group) go to ``i8gemm_4x4_a72_int8.S``,
      which loads ``act_min``/``act_max`` from ``[sp]``/``[sp+4]`` where AAPCS64 passes them at
      ``[sp]``/``[sp+8]``: those channels are clamped to a stale stack word (0 in the test build);
    * ``arm_dw`` (``conv_dw_kernel_int8_arm.c`` + ``armv8/dw_k3s{1,2}p1_int8_a72.S``): the 3x3 pad-1 assembly
      runs for every conv the kernel takes; ``(out_w - 2) >> 3`` (stride 1) / ``>> 2`` (stride 2) is unsigned,
      so a 1-wide output loops over memory until it faults; a 1-high output takes the last-row branch only; at
      stride 2 the bottom padding follows the parity of the input width ("assume input_h = input_w")."""
    kernel_name = _arm64_kernel(attrs, in_shape[1], out_shape[1])
    groups = int(attrs["num_group"])
    if kernel_name == "arm_gemm":
        per_group = out_shape[1] // groups
        if per_group % 16:
            return (f"Tengine's aarch64 i8gemm_4x4_a72_int8.S (conv_kernel_int8_arm.c, the {per_group % 16} of "
                    f"{per_group} output channels past the last multiple of 16) reads act_max from [sp+4] where "
                    "AAPCS64 passes it at [sp+8]: those channels get a stale clamp (positive outputs become 0); "
                    "use multiples of 16 output channels")
        return None
    if kernel_name != "arm_dw":
        return None
    kernel, stride, pad = tuple(attrs["kernel"]), tuple(attrs["stride"]), tuple(attrs["pad"] or (0, 0))
    asm = "dw_k3s2p1_int8_a72.S" if stride[0] == 2 else "dw_k3s1p1_int8_a72.S"
    geometry = f"{in_shape[2]}x{in_shape[3]} -> {out_shape[2]}x{out_shape[3]}"
    if kernel != (3, 3) or pad != (1, 1):
        bn = " (deployq's form of a per-channel scale: a BatchNorm after no conv, a lowered activation)" \
            if kernel == (1, 1) else ""
        return (f"Tengine's aarch64 depthwise kernel (conv_dw_kernel_int8_arm.c) runs its 3x3 pad-1 assembly for "
                f"this {kernel[0]}x{kernel[1]} pad {pad[0]} depthwise conv{bn}: wrong outputs")
    if stride not in ((1, 1), (2, 2)):
        return f"Tengine's aarch64 depthwise kernel writes no output for stride {stride[0]}x{stride[1]}"
    if out_shape[3] == 1:
        return f"{asm} computes (out_w - 2) unsigned: the 1-wide output ({geometry}) loops over memory and crashes"
    if out_shape[2] == 1:
        return f"{asm} runs a 1-high output ({geometry}) through its last-row branch only: wrong outputs"
    if stride == (2, 2) and in_shape[2] % 2 != in_shape[3] % 2:
        return (f"{asm} assumes input_h = input_w (bottom padding from the width's parity): {geometry} gets a "
                "wrong last row")
    return None
