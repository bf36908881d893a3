"""Sensitivity analysis and the automatic partial-quantization mode.

One compiled FP32 module with markers serves every measurement: its markers call back into Python, which
returns either the tensor unchanged or its fake-quantized value, so any subset of layers can be quantized in
simulation without recompiling. Each layer's sensitivity is the model-output SQNR with that layer alone
quantized; the automatic mode then keeps the most sensitive layers in FP32, one at a time, until the output
SQNR with everything else quantized reaches the target.
"""

from __future__ import annotations

import itertools

import numpy as np

from .._io import flatten_outputs
from ..quant_math import fake_quantize
from .annotate import layers_of
from .calibrate import compile_vm, iter_batches, observing, run_vm


class _Simulator:
    def __init__(self, annotated, table, calib_data, inputs, max_batches: int, build=None):
        self.table = table
        self.inputs = inputs
        self.vm = compile_vm(annotated, build=build)
        self.batches = list(itertools.islice(iter_batches(calib_data, inputs), max_batches))
        self.reference = [self._run(batch, frozenset()) for batch in self.batches]

    def _run(self, batch, enabled: frozenset):
        def callback(name, array):
            if name in enabled:
                params = self.table[name]
                array[...] = fake_quantize(
                    array, params.scale, params.zero_point, params.qmin, params.qmax, params.axis
                )

        # Per-tensor parameters fake-quantize alike in any layout; per-channel ones (weights) need the plain one.
        def any_layout(name):
            return name not in enabled or self.table[name].axis is None

        with observing(callback, any_layout):
            result = run_vm(self.vm, batch, self.inputs)
        return flatten_outputs(result)

    def output_sqnr(self, enabled) -> float:
        """The SQNR of the worst output (each output's own signal and noise: a small output beside a large one
        would hide in their sum, as BERT's ``pooler_output`` beside ``last_hidden_state``)."""
        enabled = frozenset(enabled)
        signal: list = []
        noise: list = []
        for batch, reference in zip(self.batches, self.reference):
            for i, (ref, out) in enumerate(zip(reference, self._run(batch, enabled))):
                if i == len(signal):
                    signal.append(0.0)
                    noise.append(0.0)
                ref = ref.astype(np.float64)
                signal[i] += float(np.sum(ref * ref))
                noise[i] += float(np.sum((ref - out) ** 2))
        per_output = [float("inf") if n == 0 else float(10 * np.log10(s / n)) for s, n in zip(signal, noise)]
        return min(per_output, default=float("inf"))


def _layer_tensors(layer) -> list:
    names = [name for name in layer.inputs if not name.startswith("(")]
    return names + ([layer.weight] if layer.weight else [])


def layer_sensitivity(annotated, table, calib_data, inputs, max_batches: int = 4, build=None) -> dict:
    """Output SQNR (dB) with each quantized layer alone quantized, on up to ``max_batches`` batches."""
    simulator = _Simulator(annotated, table, calib_data, inputs, max_batches, build)
    return {
        layer.name: simulator.output_sqnr(_layer_tensors(layer))
        for layer in layers_of(annotated)
        if layer.quantized and _layer_tensors(layer)
    }


def choose_auto_skips(
    annotated, table, calib_data, inputs, auto, progress: bool = False, build=None, batches: int | None = None
) -> dict:
    """Layers to keep in FP32 so that the simulated output SQNR reaches ``auto.target_sqnr_db``.

    Measured on ``batches`` batches of ``calib_data`` at ``inputs``' batch size (``auto.batches`` by default).
    Returns ``{layer name: reason}``, most sensitive first; empty if the full model already reaches the target.
    """
    import logging
    import time

    simulator = _Simulator(annotated, table, calib_data, inputs, batches or auto.batches, build)
    layers = [layer for layer in layers_of(annotated) if layer.quantized and _layer_tensors(layer)]
    everything = {name for layer in layers for name in _layer_tensors(layer)}
    if simulator.output_sqnr(everything) >= auto.target_sqnr_db:
        return {}
    # One compiled module serves every candidate (its markers fake-quantize on request): no recalibration.
    start = time.perf_counter()
    sensitivity = {layer.name: simulator.output_sqnr(_layer_tensors(layer)) for layer in layers}
    per_layer = (time.perf_counter() - start) / max(len(layers), 1)
    message = f"auto-skip: measured {len(layers)} candidate layers, {per_layer:.3f} s each"
    logging.getLogger(__name__).info(message)
    if progress:
        import sys

        print(f"[tvmquant] {message}", file=sys.stderr)
    ranked = sorted(layers, key=lambda layer: sensitivity[layer.name])
    users: dict = {}
    for layer in layers:
        for name in _layer_tensors(layer):
            users.setdefault(name, set()).add(layer.name)
    skipped: dict = {}
    for layer in ranked[: auto.max_layers]:
        skipped[layer.name] = f"auto: most sensitive (alone: {sensitivity[layer.name]:.1f} dB output SQNR)"
        # a tensor stays quantized while any layer that reads it stays quantized
        enabled = {name for name in everything if not users[name] <= set(skipped)}
        if simulator.output_sqnr(enabled) >= auto.target_sqnr_db:
            break
    return skipped
