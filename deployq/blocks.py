"""Fake-quantized Gluon layers: QuantConv2D and QuantDense (subclasses of Conv2D / Dense) and the BatchNorm
bypass used when a BatchNorm is folded into the preceding convolution during training ("fake BN").

Each quantized layer keeps the original parameters (same structural names) and adds:

- ``quantizer``: the algorithm (a ``deployq.quantizers.Quantizer`` bound to the layer): how the weight, input
  and output are quantized, the algorithm's parameters and which forward paths it runs on; the layer holds no
  algorithm-specific code;
- ``input_state`` ``[lo, hi, initialized, steps]``: the tracked input range (moving average initialised from the
  first training batch, updated automatically in training) and the number of training steps seen (for
  ``quant_start_step``);
- ``output_state`` when outputs are quantized (after the layer's own activation, or after the ReLU that follows
  it when ``layer_config.output_relu``: the layer then applies that ReLU itself); an output range never trained
  nor calibrated leaves the output unquantized in inference; the quantizer's own parameters (LSQ's
  ``weight_lsq_step`` / ``input_lsq_step``).

Weights are quantized after BatchNorm folding when the layer trains with fake BN (running statistics, the
BatchNorm's own eps; batch statistics of the raw, unfolded convolution update the running statistics).

How state is updated inside a hybridized graph: MXNet's BatchNorm assigns
``moving_mean <- momentum * moving_mean + (1 - momentum) * batch_mean`` in its *backward* pass, and only in
training. A BatchNorm with ``momentum=0`` over a ``(1, K)`` tensor therefore writes that tensor into its moving
mean exactly. deployq computes the new state in the forward (``_assign``), and the write happens in the
backward, after every read. An ``*_anchor`` parameter (``fix_gamma``: never used, lr/wd multipliers 0) keeps
that BatchNorm on the gradient path, and ``*_scratch`` receives its (unused) moving variance. No custom
operator, no host synchronisation.
"""

from __future__ import annotations

import mxnet as mx
import numpy as np
from mxnet import gluon
from mxnet.gluon import nn

from . import native
from .config import LayerConfig
from .fakequant import round_half_even
from .profiles import Profile, TensorGrid
from .quantizers import Quantizer, get_quantizer, reduce_absmax


class _Bypass:
    """A block whose work a quantized layer does: identity while quantized (``_dq_bypass``), the original block
    in ``deployq.float_mode``. ``from_float`` takes over a block's state and parameters."""

    _dq_bypass = True

    @classmethod
    def from_float(cls, blk: gluon.HybridBlock):
        b = cls.__new__(cls)
        b.__dict__.update(blk.__dict__)
        b._dq_bypass = True
        return b


class BypassBatchNorm(_Bypass, nn.BatchNorm):
    """A BatchNorm folded into the preceding QuantConv2D: identity while quantized, a plain BatchNorm in
    ``deployq.float_mode``."""

    def hybrid_forward(self, F, x, gamma, beta, running_mean, running_var):
        if self._dq_bypass:
            return x
        return super().hybrid_forward(F, x, gamma, beta, running_mean, running_var)


class BypassActivation(_Bypass, nn.Activation):
    """A ReLU block whose consumers (quantized layers only) apply the ReLU in their input quantizer: identity
    while quantized, the ReLU in ``deployq.float_mode``. Same values either way (the quantizer computes
    ``q(max(x, 0))``); one operator and its backward fewer per layer in training."""

    def hybrid_forward(self, F, x):
        if self._dq_bypass:
            return x
        return super().hybrid_forward(F, x)


def _assign(F, state, value, scratch, anchor):
    """Schedule ``state <- value`` for the backward pass of a training step (see the module docstring);
    returns a float32 zero that must be added into the gradient path. State is float64: MXNet then runs its
    native BatchNorm kernel (its oneDNN kernel, float32 only, crashed on these tiny inputs after another
    BatchNorm of the same channel count had run)."""
    # a 1-D (K,) input with axis=0: one element per channel. 1-D keeps MXNet's native kernel: its oneDNN
    # kernel crashed on 2-D inputs whose channel count matched a BatchNorm that had run before
    fed = F.BlockGrad(value)
    b = F.BatchNorm(fed, anchor, F.zeros_like(anchor), state, scratch, momentum=0.0, fix_gamma=True,
                    use_global_stats=False, eps=1e-5, axis=0)
    return F.cast(F.sum(b) * 0, "float32")


def _is_train(F, like):
    """1 in a training forward, 0 in inference (Dropout is the identity outside training)."""
    return F.Dropout(F.ones_like(like), p=0.5) != 1


_TRAIN_FLAG: list = []


def _train_flag(F):
    """(1,) float32: 1 in a training forward, 0 in inference, for the fused operators. Traced graphs share one
    flag: the symbol has no inputs, so every layer of every trace may read the same one node (one Dropout per
    graph instead of one per layer)."""
    if F is not mx.sym:
        return F.Dropout(F.ones(shape=(1,)), p=0.5) != 1
    if not _TRAIN_FLAG:
        _TRAIN_FLAG.append(mx.sym.Dropout(mx.sym.ones(shape=(1,), name="dq_train_ones"), p=0.5,
                                          name="dq_train_dropout") != 1)
    # a BlockGrad per reader: without it MXNet runs the backward of every operator that reads the shared node
    return mx.sym.BlockGrad(_TRAIN_FLAG[0])


class _ActivationQuant:
    """Range tracking and fake quantization of one activation tensor (a layer's input or output, a block's
    output), shared by the quantized layers and :class:`OutputQuantizer`. Needs ``layer_config``
    (``input_mode``, ``quant_start_step``, ``output``), ``profile``, ``quantizer`` and ``_dq_momentum``."""

    layer_config: LayerConfig
    profile: Profile
    algorithm: str
    quantizer: Quantizer

    def _add_param(self, name: str, shape: tuple[int, ...], init, **kw):
        prm = self.params.get(name, shape=shape, init=init, **kw)
        setattr(self, name, prm)
        return prm

    def _bind_quantizer(self, algorithm: str) -> None:
        """Build this layer's quantizer for ``algorithm`` and let it register its parameters."""
        self.algorithm = algorithm
        self.quantizer = get_quantizer(algorithm)(self)
        self.quantizer.create_params()

    # ------------------------------------------------------------------ activations
    def _quant_activation(self, F, x, state, scratch, anchor, grid: TensorGrid | None, p, output: bool = False):
        """Track the range of ``x`` and fake-quantize it (the quantizer's input or, with ``output``, output
        quantization; ``p``: the layer's parameters); returns (x̂, steps_before, is_train)."""
        bl = F.cast(F.BlockGrad(F.reshape(F.min(x), (1,))), "float64")
        bh = F.cast(F.BlockGrad(F.reshape(F.max(x), (1,))), "float64")
        old_lo, old_hi = F.slice_axis(state, axis=0, begin=0, end=1), F.slice_axis(state, axis=0, begin=1, end=2)
        init = F.slice_axis(state, axis=0, begin=2, end=3) > 0.5
        steps = F.slice_axis(state, axis=0, begin=3, end=4)
        new_lo, new_hi = self.quantizer.update_range(F, old_lo, old_hi, bl, bh, self._dq_momentum)
        new_lo, new_hi = F.where(init, new_lo, bl), F.where(init, new_hi, bh)
        pin = _assign(F, state, F.concat(new_lo, new_hi, F.ones_like(bl), steps + 1, dim=0), scratch, anchor)
        is_train = _is_train(F, bl)
        lo = F.cast(F.where(is_train, new_lo, F.where(init, old_lo, bl)), "float32")
        hi = F.cast(F.where(is_train, new_hi, F.where(init, old_hi, bh)), "float32")
        steps, is_train = F.cast(steps, "float32"), F.cast(is_train, "float32")
        bl, bh = F.cast(bl, "float32"), F.cast(bh, "float32")
        self._pins.append(pin)
        if grid is None:
            return x, steps, is_train
        if self.layer_config.input_mode == "online":
            lo, hi = F.BlockGrad(bl), F.BlockGrad(bh)
        q = self.quantizer
        if not output:
            lo, hi = q.input_quant_range(F, lo, hi, p)
        self._dq_range = (lo, hi)  # the range this forward quantizes with (int32 bias grid)
        xq = q.quantize_output(F, x, lo, hi, p) if output else q.quantize_input(F, x, lo, hi, p)
        return xq, steps, is_train

    # ------------------------------------------------------------------ fused operators (deployq.native)
    @property
    def use_native(self) -> bool | None:
        """Use the fused operators of ``deployq.native`` (None: when they load; False: MXNet operators)."""
        return self._dq_use_native

    @use_native.setter
    def use_native(self, value: bool | None) -> None:
        self._dq_use_native = value
        # the MXNet-operator formulation keeps its state updates on the gradient path through the anchors;
        # the fused operators update state themselves, and an anchor without gradient would be a stale one
        req = "null" if self._native() else "write"
        frozen = self.layer_config.bn_freeze_step == 0  # no statistics updates at all
        for name, prm in self._reg_params.items():
            if name.endswith("_anchor"):
                prm.grad_req = "null" if frozen and name.startswith("fakebn") else req

    def _native(self) -> bool:
        return self._dq_use_native is not False and self.quantizer.fused and native.available()

    def _native_activation(self, F, x, state, grid: TensorGrid | None, is_train, relu: bool = False):
        """(x̂, gate): ``dq_act_quant`` tracks the range of ``x`` and fake-quantizes it; ``gate`` (1,) is 1 where
        the weights are quantized too (after ``quant_start_step``, and not while an observer trains)."""
        prof = self.profile
        kw = dict(quant=0, qmin=-127, qmax=127)
        if grid is not None:
            kw = dict(quant=1 if grid.symmetric else 2, signed=int(grid.signed), qmin=grid.qmin, qmax=grid.qmax)
        y, used = F.dq_act_quant(x, state, is_train, rounding=prof.rounding, convention=prof.scale_convention,
                                 momentum=repr(float(self._dq_momentum)), observer=int(self.quantizer.observer),
                                 online=int(self.layer_config.input_mode == "online"),
                                 mask_clipped=int(self.quantizer.mask_clipped),
                                 start_step=self.layer_config.quant_start_step, relu=int(relu), **kw)
        used = F.BlockGrad(used)  # read-only bookkeeping: no gradient flows into it
        self._dq_range = (F.slice_axis(used, axis=0, begin=0, end=1), F.slice_axis(used, axis=0, begin=1, end=2))
        self._dq_used = used  # [lo, hi, quantized, gate, steps before this one, training]: read by index
        return y, F.slice_axis(used, axis=0, begin=3, end=4)

    def _known_output(self, F, yq, y, state, is_train):
        """``yq`` (the quantized output) in a training forward or when the output range is set (trained or
        calibrated), else ``y``: an output point without a range is not applied, and exporters write none
        there. Selection by 0/1 weights, exact in float32."""
        init = F.cast(F.slice_axis(state, axis=0, begin=2, end=3) > 0.5, "float32")
        keep = F.broadcast_maximum(init, is_train)
        return F.broadcast_mul(keep, yq) + F.broadcast_mul(1 - keep, y)


    def output_range(self) -> tuple[float, float] | None:
        """The output range (lo, hi) the simulation quantizes the output with; None when the layer has no
        output grid or its range was never trained nor calibrated (then the output is not quantized)."""
        if self.layer_config.output is None:
            return None
        st = self.output_state.data().asnumpy()
        if st[2] <= 0.5:
            return None
        return float(np.float32(st[0])), float(np.float32(st[1]))

    def set_output_range(self, lo: float, hi: float) -> None:
        """Set a calibrated output range (marks it initialised; keeps its step count)."""
        if self.layer_config.output is None:
            raise ValueError(f"layer {self.layer_config.name}: its output is not quantized")
        for arr in self.output_state.list_data():
            st = arr.asnumpy()
            arr[:] = mx.nd.array([lo, hi, 1.0, st[3]], ctx=arr.context, dtype=arr.dtype)


class _QuantMixin(_ActivationQuant):
    """The fake-quantized forward shared by QuantConv2D and QuantDense."""

    layer_config: LayerConfig
    profile: Profile
    algorithm: str
    #: True: fake BN trains with batch statistics (Krishnamoorthi's correction: output rescaled, weights folded
    #: with running statistics). Default False: the folded conv alone, running statistics in training too (as
    #: Quantization.MXNet). Measured on MNIST-5k (2 QAT epochs, lr 5e-3, ncnn): mobilenet0.25 0.879 vs 0.876,
    #: resnet20 0.953 vs 0.976, so the correction is opt-in (``blk.fake_bn_correction = True``; docs/simulate.md)
    fake_bn_correction: bool = False

    def _dq_init(self, cfg: LayerConfig, profile: Profile, algorithm: str, momentum: float,
                 bn: nn.BatchNorm | None, bn_path: str | None) -> None:
        self.layer_config, self.profile = cfg, profile
        self._dq_float = False
        self._dq_momentum = momentum
        self.bn_path = bn_path
        self._dq_bn_kwargs = dict(bn._kwargs) if bn is not None else None
        ctx = self.weight.list_ctx() if self.weight._data is not None else None
        states = [("input_state", 4)] + ([("output_state", 4)] if cfg.output is not None else [])
        if bn is not None:
            c = int(bn.running_mean.shape[0])
            states += [("fakebn_mean", c), ("fakebn_var", c)]
            object.__setattr__(self, "_dq_bn_block", bn)  # a reference, not a child block
        new = []
        with self.name_scope():
            for name, k in states:
                if not name.startswith("fakebn"):
                    new.append(self._add_param(name, (k,), mx.init.Zero(), grad_req="null", differentiable=False,
                                               dtype="float64"))
                new.append(self._add_param(name + "_scratch", (k,), mx.init.Zero(), grad_req="null",
                                           differentiable=False, dtype="float64"))
                new.append(self._add_param(name + "_anchor", (k,), mx.init.One(), lr_mult=0.0, wd_mult=0.0,
                                           dtype="float64"))
            if bn is not None:
                # the running statistics the fake-BN layer trains; copied into the BatchNorm by
                # deployq.float_mode (MXNet's oneDNN BatchNorm must not share arrays with the state updates)
                for name, src in (("fakebn_mean", bn.running_mean), ("fakebn_var", bn.running_var)):
                    prm = self._add_param(name, src.shape, mx.init.Zero(), grad_req="null", differentiable=False,
                                          dtype="float64")
                    prm.initialize(ctx=ctx)
                    prm.set_data(mx.nd.array(src.data().asnumpy(), dtype="float64"))
        for prm in new:
            if prm._data is None and prm._deferred_init == ():
                prm.initialize(ctx=ctx)
        if bn is not None:
            for src, dst in (("gamma", "bn_gamma"), ("beta", "bn_beta")):
                self._reg_params[dst] = getattr(bn, src)
        self._bind_quantizer(algorithm)
        self.use_native = None

    # ------------------------------------------------------------------ properties used by the forward
    @property
    def _groups(self) -> int:
        return int(self._kwargs.get("num_group", 1)) if hasattr(self, "_kwargs") else 1

    @property
    def _out_channels(self) -> int:
        return int(self.weight.shape[0])

    # ------------------------------------------------------------------ fake BN
    def _fold(self, F, x, weight, bias, p, steps):
        kw = self._dq_bn_kwargs
        freeze = self.layer_config.bn_freeze_step
        old_m, old_v = p["fakebn_mean"], p["fakebn_var"]
        if freeze == 0:  # frozen from the start: no batch statistics at all
            rm, rv = F.cast(old_m, "float32"), F.cast(old_v, "float32")
            self._dq_bn_batch = (rv, rm, rv)
            return self._fold_with(F, weight, bias, p, rm, rv)
        y = F.Convolution(F.BlockGrad(x), F.BlockGrad(weight), None if bias is None else F.BlockGrad(bias),
                          **{**self._kwargs, "no_bias": bias is None})
        y = F.cast(F.BlockGrad(y), "float64")  # batch statistics in float64, as deployq.native computes them
        mean = F.mean(y, axis=(0, 2, 3))
        var = F.mean(F.square(F.broadcast_sub(y, F.reshape(mean, (1, -1, 1, 1)))), axis=(0, 2, 3))
        m = kw.get("momentum", 0.9)
        new_m = m * old_m + (1 - m) * mean
        new_v = m * old_v + (1 - m) * var
        mean, var = F.cast(mean, "float32"), F.cast(var, "float32")
        update = _is_train(F, F.slice_axis(old_m, axis=0, begin=0, end=1))
        if freeze is not None:  # updates stop once ``freeze`` training steps were seen
            update = F.broadcast_mul(update, F.cast(steps < freeze, "float64"))
            keep = F.broadcast_like(update, old_m)
            new_m, new_v = F.where(keep, new_m, old_m), F.where(keep, new_v, old_v)
        self._pins.append(_assign(F, old_m, new_m, p["fakebn_mean_scratch"], p["fakebn_mean_anchor"]))
        self._pins.append(_assign(F, old_v, new_v, p["fakebn_var_scratch"], p["fakebn_var_anchor"]))
        rm = F.broadcast_add(F.broadcast_mul(update, new_m - old_m), old_m)
        rv = F.cast(F.broadcast_add(F.broadcast_mul(update, new_v - old_v), old_v), "float32")
        rm = F.cast(rm, "float32")
        if freeze is not None:  # frozen: the "batch" statistics of the correction are the running ones
            upd = F.broadcast_like(F.cast(update, "float32"), mean)
            mean, var = F.where(upd, mean, rm), F.where(upd, var, rv)
        self._dq_bn_batch = (rv, F.BlockGrad(mean), F.BlockGrad(var))
        return self._fold_with(F, weight, bias, p, rm, rv)

    def _bn_correct(self, F, wq, b_used, bias, p, is_train):
        """Training with batch statistics (Krishnamoorthi 2018, §3.2): the conv with weights folded with the
        running statistics (what is deployed) is rescaled per channel by ``c = sqrt(var_run + eps) /
        sqrt(var_B + eps)`` and gets the batch-statistics bias ``b_B = beta + (b - mean_B) * gamma /
        sqrt(var_B + eps)``, so its output equals BatchNorm with the batch's statistics. ``c`` is applied to the
        (small) weight tensor, ``conv(x, W_q) * c = conv(x, W_q * c)``; ``c`` and the batch statistics are
        constants for the gradient. Returns (weight, bias) for the conv; in inference exactly (wq, b_used)."""
        kw = self._dq_bn_kwargs
        rv, bm, bv = self._dq_bn_batch
        eps = kw.get("eps", 1e-5)
        gamma = F.ones_like(p["bn_gamma"]) if kw.get("fix_gamma", False) else p["bn_gamma"]
        inv_b = F.rsqrt(bv + eps)
        c = F.BlockGrad(F.sqrt(rv + eps) * inv_b)
        b_b = p["bn_beta"] + (0 - bm if bias is None else bias - bm) * gamma * inv_b
        scale = 1 + F.broadcast_mul(is_train, c - 1)
        wq = F.broadcast_mul(wq, F.reshape(scale, (-1, 1, 1, 1)))
        return wq, b_used + F.broadcast_mul(is_train, b_b - b_used)

    def _fold_with(self, F, weight, bias, p, rm, rv):
        kw = self._dq_bn_kwargs
        gamma = F.ones_like(p["bn_gamma"]) if kw.get("fix_gamma", False) else p["bn_gamma"]
        k = gamma / F.sqrt(rv + kw.get("eps", 1e-5))
        w = F.broadcast_mul(weight, F.reshape(k, (-1, 1, 1, 1)))
        b = p["bn_beta"] + (0 - rm if bias is None else bias - rm) * k
        return w, b

    # ------------------------------------------------------------------ int32 bias (profile "bias": "int32")
    def _int32_bias(self) -> bool:
        cfg = self.layer_config
        return (getattr(self.profile, "bias", "float") == "int32" and cfg.input is not None
                and cfg.weight is not None and self.quantizer.int32_bias)

    def _round_bias(self, F, b, w, lo, hi, gate=None):
        """The bias on the grid ``input_step * weight_step[c]`` (float32, the profile's rounding), as an engine
        that adds int32 bias codes to its accumulator computes it (onnxruntime's QLinearConv: half to even;
        Tengine's quant tool: half away from zero); the gradient
        passes straight through. ``lo``/``hi``: the input range this forward quantizes with; ``gate`` (1,): 0
        where the layer computes in fp32 (before ``quant_start_step``, an observer in training)."""
        gi, gw = self.layer_config.input, self.layer_config.weight
        # the grid is a constant for the gradient; cut a learned range (PACT's clip) off here already: MXNet's
        # imperative backward crashed (SetDependency) on the where/ones_like below when ``lo`` had a gradient
        lo, hi = F.BlockGrad(lo), F.BlockGrad(hi)
        if gi.symmetric:
            thr = F.maximum(F.abs(lo), F.abs(hi)) if gi.signed else F.relu(hi)
            x_step = F.where(thr > 0, thr, F.ones_like(thr)) / gi.qmax
        else:
            span = F.maximum(hi, F.zeros_like(hi)) - F.minimum(lo, F.zeros_like(lo))
            x_step = F.where(span > 0, span, F.ones_like(span)) / (gi.qmax - gi.qmin)
        ndim = 4 if isinstance(self, QuantConv2D) else 2
        amax = F.reshape(F.BlockGrad(reduce_absmax(F, w, gw.granularity, self._groups, self._out_channels, ndim)),
                         (-1,))
        if gw.granularity == "layer":
            amax = F.broadcast_like(amax, b)
        w_step = F.where(amax > 0, amax / gw.qmax, F.ones_like(amax))  # a dead channel: codes 0, step 1
        grid = F.BlockGrad(F.broadcast_mul(w_step, x_step))
        v = F.broadcast_div(b, grid)
        q = round_half_even(F, v) if self.profile.rounding == "half_to_even" else F.round(v)
        delta = F.BlockGrad(F.broadcast_mul(q, grid) - b)
        return b + (delta if gate is None else F.broadcast_mul(gate, delta))

    # ------------------------------------------------------------------ fused operators (deployq.native)
    def _native_weight(self, F, w, gate, p):
        """The weight quantized by ``dq_weight_quant`` where the quantizer's weight math is the fused one, else
        by the quantizer on MXNet operators (gated by ``quant_start_step``)."""
        grid, q = self.layer_config.weight, self.quantizer
        if not q.fused_weight:
            wq = q.quantize_weight(F, w, p)
            return w + F.broadcast_mul(gate, wq - w) if self.layer_config.quant_start_step > 0 else wq
        return F.dq_weight_quant(w, self._dq_used, gate_index=3, units=q.units(), qmin=grid.qmin,
                                 qmax=grid.qmax,
                                 rounding=self.profile.rounding, convention=self.profile.scale_convention)

    def _native_fold(self, F, x, weight, bias, p, is_train):
        kw = self._dq_bn_kwargs
        freeze = self.layer_config.bn_freeze_step
        if freeze == 0:  # frozen from the start: no statistics conv, the running statistics as they are
            rm, rv = F.cast(p["fakebn_mean"], "float32"), F.cast(p["fakebn_var"], "float32")
            if self.fake_bn_correction:
                self._dq_bn_batch = (rv, rm, rv)
        else:
            # the statistics conv reads the raw weights; BlockGrad on its inputs keeps it out of the backward
            y = F.Convolution(F.BlockGrad(x), F.BlockGrad(weight), None if bias is None else F.BlockGrad(bias),
                              **{**self._kwargs, "no_bias": bias is None})
            # the training flag and step count as dq_act_quant saw them (reading the graph's shared flag here
            # makes MXNet run this operator's backward)
            stats = F.dq_bn_stats(y, p["fakebn_mean"], p["fakebn_var"], self._dq_used, train_index=5, steps_index=4,
                                  freeze_step=-1 if freeze is None else int(freeze),
                                  momentum=repr(float(kw.get("momentum", 0.9))))
            rm, rv = F.BlockGrad(stats[0]), F.BlockGrad(stats[1])
            if self.fake_bn_correction:
                self._dq_bn_batch = (rv, F.BlockGrad(stats[2]), F.BlockGrad(stats[3]))
        args = [weight, p["bn_gamma"], p["bn_beta"], rm, rv] + ([] if bias is None else [bias])
        folded = F.dq_bn_fold(*args, eps=repr(float(kw.get("eps", 1e-5))), fix_gamma=int(kw.get("fix_gamma", False)),
                              has_bias=int(bias is not None))
        return folded[0], folded[1]

    def _native_forward(self, F, x, weight, bias, p):
        cfg = self.layer_config
        state = p["input_state"]
        is_train = _train_flag(F)
        xq, gate = self._native_activation(F, x, state, cfg.input, is_train, relu=cfg.input_relu)
        if self._dq_bn_kwargs is not None:
            w, b = self._native_fold(F, xq, weight, bias, p, is_train)
        else:
            w, b = weight, bias
        wq = self._native_weight(F, w, gate, p) if cfg.weight is not None else w
        if b is not None and self._int32_bias():
            b = self._round_bias(F, b, w, *self._dq_range, gate=gate)
        out = self._compute(F, xq, wq, b, bias, p, is_train)
        if cfg.output is not None:
            yq, _ = self._native_activation(F, out, p["output_state"], cfg.output, is_train)
            out = self._known_output(F, yq, out, p["output_state"], is_train)
        return out

    # ------------------------------------------------------------------ forward
    def _layer(self, F, x, w, b):
        raise NotImplementedError

    def _compute(self, F, xq, wq, b, bias, p, is_train):
        """The layer on quantized input and weights (with the fake-BN correction when enabled), its own
        activation, and the following ReLU when the layer quantizes its output after it."""
        if self._dq_bn_kwargs is not None and self.fake_bn_correction:
            wq, b = self._bn_correct(F, wq, b, bias, p, is_train)
        out = self._layer(F, xq, wq, b)
        if self.act is not None:
            out = self.act(out)
        if self.layer_config.output is not None and self.layer_config.output_relu:
            out = F.Activation(out, act_type="relu")
        return out

    def hybrid_forward(self, F, x, weight, bias=None, **p):
        if self._dq_float:
            return super().hybrid_forward(F, x, weight, bias)
        if self._native():
            return self._native_forward(F, x, weight, bias, p)
        cfg = self.layer_config
        if cfg.input_relu:  # the ReLU block before this layer is bypassed (BypassActivation)
            x = F.relu(x)
        self._pins = []
        observer = self.quantizer.observer
        xq, steps, is_train = self._quant_activation(F, x, p["input_state"], p["input_state_scratch"],
                                                     p["input_state_anchor"], cfg.input, p)
        # before quant_start_step, and while an observer trains, the layer computes in fp32 (BN statistics too)
        active = steps >= cfg.quant_start_step if cfg.quant_start_step > 0 else None
        if active is not None:
            xq = x + F.broadcast_mul(active, xq - x)
        if observer:
            xq = xq + F.broadcast_mul(is_train, x - xq)
        if self._dq_bn_kwargs is not None:
            w, b = self._fold(F, xq, weight, bias, p, steps)
        else:
            w, b = weight, bias
        wq = self.quantizer.quantize_weight(F, w, p) if cfg.weight is not None else w
        if active is not None:
            wq = w + F.broadcast_mul(active, wq - w)
        if observer:
            wq = wq + F.broadcast_mul(is_train, w - wq)
        wq = F.broadcast_add(wq, F.add_n(*self._pins))  # adds 0; keeps the state updates on the gradient path
        if b is not None and self._int32_bias():
            gate = None if active is None else active
            if observer:
                gate = 1 - is_train if gate is None else F.broadcast_mul(gate, 1 - is_train)
            b = self._round_bias(F, b, w, *self._dq_range, gate=gate)
        out = self._compute(F, xq, wq, b, bias, p, is_train)
        if cfg.output is not None:
            self._pins = []
            yq, _, is_train = self._quant_activation(F, out, p["output_state"], p["output_state_scratch"],
                                                     p["output_state_anchor"], cfg.output, p, output=True)
            yq = F.broadcast_add(yq, self._pins[0])
            out = self._known_output(F, yq, out, p["output_state"], is_train)
        return out

    def sync_batchnorm(self) -> None:
        """Copy the fake-BN running statistics into the folded BatchNorm block (fresh arrays)."""
        bn = getattr(self, "_dq_bn_block", None)
        if bn is None or self._dq_bn_kwargs is None:
            return
        for src, dst in ((self.fakebn_mean, bn.running_mean), (self.fakebn_var, bn.running_var)):
            dst._data = [mx.nd.array(a.asnumpy(), ctx=a.context, dtype="float32") for a in src.list_data()]

    # ------------------------------------------------------------------ NumPy views for exporters
    def input_range(self) -> tuple[float, float]:
        """The input range (lo, hi) the simulation uses (tracked, calibrated or LSQ-learned)."""
        st = self.input_state.data().asnumpy()
        # the simulation reads them as float32
        return self.quantizer.input_range(float(np.float32(st[0])), float(np.float32(st[1])))

    def input_threshold(self) -> float:
        lo, hi = self.input_range()
        return max(abs(lo), abs(hi)) if self.layer_config.input is None or self.layer_config.input.signed \
            else max(hi, 0.0)

    def set_input_range(self, lo: float, hi: float) -> None:
        """Set a calibrated input range (marks the tracker initialised; keeps its step count)."""
        for arr in self.input_state.list_data():
            st = arr.asnumpy()
            arr[:] = mx.nd.array([lo, hi, 1.0, st[3]], ctx=arr.context, dtype=arr.dtype)
        self.quantizer.set_input_range(lo, hi)

    def folded_weight_bias(self) -> tuple[np.ndarray, np.ndarray]:
        """(W_f, b_f) as float32 NumPy, BN folded with running statistics when the layer trains with fake BN,
        computed with the same MXNet ops as the simulation."""
        w = self.weight.data()
        b = self.bias.data() if self.bias is not None else None
        if self._dq_bn_kwargs is None:
            bb = b.asnumpy() if b is not None else np.zeros(w.shape[0], np.float32)
            return w.asnumpy(), bb
        p = {k: self._reg_params[k].data() for k in ("bn_gamma", "bn_beta", "fakebn_mean", "fakebn_var")}
        wf, bf = self._fold_with(mx.nd, w, b, p, p["fakebn_mean"].astype("float32"),
                                 p["fakebn_var"].astype("float32"))
        return wf.asnumpy(), bf.asnumpy()

    def quantized_weight(self) -> tuple[np.ndarray, np.ndarray]:
        """(W_q, unit_step): the simulated (dequantized) weight and the per-output-channel grid step, so that
        ``W_q / unit_step`` are the integer codes."""
        wf, _ = self.folded_weight_bias()
        w = mx.nd.array(wf)
        p = {k: v.data() for k, v in self._reg_params.items()}
        with mx.autograd.predict_mode():
            wq = self.quantizer.quantize_weight(mx.nd, w, p).asnumpy() if self.layer_config.weight is not None \
                else wf
        return wq, self.quantizer.weight_step(w, p)


class QuantConv2D(_QuantMixin, nn.Conv2D):
    """A Conv2D whose input and weight are fake-quantized (see module docstring)."""

    @classmethod
    def from_float(cls, conv: nn.Conv2D, cfg: LayerConfig, profile: Profile, algorithm: str, momentum: float,
                   bn: nn.BatchNorm | None = None, bn_path: str | None = None) -> QuantConv2D:
        q = cls.__new__(cls)
        q.__dict__.update(conv.__dict__)
        q._dq_bn_kwargs = None
        q._dq_init(cfg, profile, algorithm, momentum, bn, bn_path)
        return q

    def _layer(self, F, x, w, b):
        return F.Convolution(x, w, b, name="fwd", **{**self._kwargs, "no_bias": b is None})


class QuantDense(_QuantMixin, nn.Dense):
    """A Dense layer whose input and weight are fake-quantized (group granularity = channel)."""

    @classmethod
    def from_float(cls, dense: nn.Dense, cfg: LayerConfig, profile: Profile, algorithm: str,
                   momentum: float, bn=None, bn_path=None) -> QuantDense:
        q = cls.__new__(cls)
        q.__dict__.update(dense.__dict__)
        q._dq_bn_kwargs = None
        q._dq_init(cfg, profile, algorithm, momentum, None, None)
        return q

    def _layer(self, F, x, w, b):
        return F.FullyConnected(x, w, b, no_bias=b is None, num_hidden=self._units, flatten=self._flatten,
                                name="fwd")


class OutputQuantizer(_ActivationQuant, nn.HybridBlock):
    """Fake quantization of a block's output, e.g. a residual block's ``relu(body(x) + shortcut)``, so that every
    reader of that tensor (the next block's convolution and its shortcut Add) reads it on one grid, as an engine
    that runs the Add on integers does (onnxruntime's QLinearAdd). A child ``dq_output`` of that block, which
    :func:`with_output_quantizer` makes apply it to the block's output. Identity in ``deployq.float_mode``, and
    in inference while its range was never trained nor calibrated. ``tensor``: the quantized tensor's name in
    the exporters' graph IR."""

    def __init__(self, cfg: LayerConfig, profile: Profile, algorithm: str, momentum: float, tensor: str,
                 ctx=None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.layer_config, self.profile = cfg, profile
        self._dq_momentum = momentum
        self._dq_float = False
        self.tensor = tensor
        with self.name_scope():
            self._add_param("output_state", (4,), mx.init.Zero(), grad_req="null", differentiable=False,
                            dtype="float64")
            self._add_param("output_state_scratch", (4,), mx.init.Zero(), grad_req="null", differentiable=False,
                            dtype="float64")
            self._add_param("output_state_anchor", (4,), mx.init.One(), lr_mult=0.0, wd_mult=0.0, dtype="float64")
        self.collect_params().initialize(ctx=ctx)
        self._bind_quantizer(algorithm)
        self.use_native = None

    def hybrid_forward(self, F, x, output_state, output_state_scratch, output_state_anchor, **p):
        if self._dq_float:
            return x
        grid = self.layer_config.output
        if self._native():
            is_train = _train_flag(F)
            yq, _ = self._native_activation(F, x, output_state, grid, is_train)
        else:
            self._pins = []
            yq, _, is_train = self._quant_activation(F, x, output_state, output_state_scratch, output_state_anchor,
                                                     grid, p, output=True)
            yq = F.broadcast_add(yq, self._pins[0])
        return self._known_output(F, yq, x, output_state, is_train)


class _OutputQuantHook:
    """Mixed into a block's class by :func:`with_output_quantizer`: the block's output goes through its
    ``dq_output`` child."""

    def hybrid_forward(self, F, x, *args, **kwargs):
        return self.dq_output(super().hybrid_forward(F, x, *args, **kwargs))


_HOOKED: dict[type, type] = {}


def can_quantize_output(blk: gluon.Block) -> bool:
    """Whether :func:`with_output_quantizer` applies: a HybridBlock computing in its own ``hybrid_forward``
    (containers such as HybridSequential, and blocks overriding ``forward``, are not)."""
    cls = type(blk)
    return (isinstance(blk, gluon.HybridBlock) and not isinstance(blk, nn.HybridSequential)
            and cls.forward is gluon.HybridBlock.forward
            and cls.hybrid_forward is not gluon.HybridBlock.hybrid_forward)


def with_output_quantizer(blk: gluon.HybridBlock, quantizer: OutputQuantizer) -> gluon.HybridBlock:
    """``blk`` (same state, parameters and children) with ``quantizer`` as child ``dq_output`` applied to its
    output; the class is a subclass of ``blk``'s (same name) with :class:`_OutputQuantHook` mixed in."""
    if not can_quantize_output(blk):
        raise TypeError(f"{type(blk).__name__}: cannot hook its output (see can_quantize_output)")
    cls = type(blk)
    if cls not in _HOOKED:
        _HOOKED[cls] = type(cls.__name__, (_OutputQuantHook, cls), {"__module__": cls.__module__})
    new = _HOOKED[cls].__new__(_HOOKED[cls])
    new.__dict__.update(blk.__dict__)
    new.dq_output = quantizer
    return new


QUANT_TYPES: dict[type, type] = {nn.Conv2D: QuantConv2D, nn.Dense: QuantDense}


def is_quant_block(b: gluon.Block) -> bool:
    return isinstance(b, _QuantMixin)


def is_output_quantizer(b: gluon.Block) -> bool:
    return isinstance(b, OutputQuantizer)
