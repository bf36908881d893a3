"""Tutorial: find where a quantized model loses signal, and get it back.

Run from the repository root: ``python tutorials/recover_accuracy.py`` (a few minutes on 2 cores; the HTML
report needs ``pip install "tvmquant[report]"``). The model is the bundled Fashion-MNIST CNN.

The levers, cheapest first: the calibration method (how each activation's range is clipped), per-channel weight
scales, keeping the few most sensitive layers in FP32 (by hand from the report's sensitivity chart, or with
AutoSkip). Each quantize call below reports the output SQNR against FP32 on calibration data
(``summary().outputs``): it needs no compile, so comparing configurations is quick; only the final choice is
compiled and scored on the test images.
"""

import os
import tempfile

import numpy as np

import tvmquant
from tvmquant import AutoSkip, QuantConfig, TensorSpec
from tvmquant.config import MSE, Entropy, Max, Percentile, PerTensor
from tvmquant.examples import fmnist_model_path, load_fmnist_example

work = tempfile.mkdtemp(prefix="tvmquant-recover-")
calib, test_x, test_y = load_fmnist_example()
calib = calib[:64]
model = fmnist_model_path()


def output_sqnr(qmodel) -> float:
    return min(qmodel.summary().outputs.values())


# 1. A deliberately poor start: per-tensor weight scales and plain max calibration.
#    CLI: tvmquant quantize model.onnx --calib calib.npz --method max --per-tensor -o m.tvmq
per_tensor = TensorSpec("int8", "symmetric", PerTensor())
poor = QuantConfig(activation=TensorSpec("uint8", "affine", method=Max()), weight=per_tensor)
qmodel = tvmquant.quantize(model, poor, calib, progress=False)
print(f"max calibration, per-tensor weights: output SQNR {output_sqnr(qmodel):.1f} dB")

# 2. The calibration method. Outliers stretch a max range and waste levels on values that hardly occur;
#    percentile, entropy (KL) and MSE clip them. The report draws all four ranges on each histogram.
#    CLI: --method percentile --percentile 99.99 | --method entropy | --method mse
for method in (Percentile(99.99), Entropy(), MSE()):
    config = poor.replace(activation=TensorSpec("uint8", "affine", method=method))
    sqnr = output_sqnr(tvmquant.quantize(model, config, calib, progress=False))
    print(f"{type(method).__name__:>10}, per-tensor weights: {sqnr:.1f} dB")

# 3. Per-channel weight scales (the default): one scale per output channel, so a channel of small weights keeps
#    its resolution. The report's weight section shows, per layer, the bits a per-tensor scale would waste.
qmodel = tvmquant.quantize(model, QuantConfig(), calib, progress=False)
print(f"default (percentile 99.99, per-channel weights): {output_sqnr(qmodel):.1f} dB")

# 4. Look at it: tables, histograms, weight ranges and each layer's sensitivity in one HTML page.
#    CLI: tvmquant report m.tvmq --data calib.npz -o report.html
report = qmodel.report(os.path.join(work, "report.html"), data=calib, progress=False)
sensitivity = report["sensitivity_db"]
worst = min(sensitivity, key=sensitivity.get)
print(f"report: {report['path']}; most sensitive layer {worst} ({sensitivity[worst]:.1f} dB when alone quantized)")

# 5. Keep the most sensitive layer in FP32 by name (CLI: --skip NAME), or let AutoSkip choose (CLI: --auto-skip DB).
skipped = tvmquant.quantize(model, QuantConfig(skip=(worst,)), calib, progress=False)
print(f"skip {worst}: {output_sqnr(skipped):.1f} dB")
target = output_sqnr(qmodel) + 3.0
auto = tvmquant.quantize(
    model, QuantConfig(auto_skip=AutoSkip(target_sqnr_db=target, max_layers=3)), calib, progress=False
)
kept = [layer.name for layer in auto.layers if not layer.quantized]
print(f"AutoSkip to {target:.1f} dB kept {kept} in FP32: {output_sqnr(auto):.1f} dB")

# 6. Recover without giving up any INT8 layer. Bias correction (CLI: --bias-correction) subtracts, per output
#    channel, the mean error quantization adds to each conv/matmul. Fine-tuning (CLI: tvmquant finetune m.tvmq
#    --data calib.npz -o tuned.tvmq) trains the fake-quant model in TVM by distillation from FP32 on unlabelled
#    images: weights, biases, step sizes (LSQ) and zero points. Its summary SQNR is measured on the images it
#    trained on, so step 7 scores every choice on the test images.
corrected = tvmquant.quantize(model, QuantConfig(bias_correction=True), calib, progress=False)
print(f"bias correction: {output_sqnr(corrected):.1f} dB")
tuned = tvmquant.finetune(qmodel, calib, epochs=4, batch_size=16, progress=False)
print(f"finetune, 4 epochs on the 64 calibration images: {output_sqnr(tuned):.1f} dB (on those images)")

# 7. Score the final choice on the bundled test images against FP32.
best = max((qmodel, skipped, auto, corrected, tuned), key=output_sqnr)
int8, fp32 = best.compile(), best.compile(mode="fp32")
images, labels = test_x[:300], test_y[:300]
int8_pred = np.array([np.argmax(int8(x[None])) for x in images])
fp32_pred = np.array([np.argmax(fp32(x[None])) for x in images])
fp32_accuracy, int8_accuracy = np.mean(fp32_pred == labels), np.mean(int8_pred == labels)
print(
    f"chosen ({output_sqnr(best):.1f} dB): FP32 {fp32_accuracy:.3f}  INT8 {int8_accuracy:.3f}  "
    f"agreement {np.mean(int8_pred == fp32_pred):.3f}"
)
