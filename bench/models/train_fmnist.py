"""Train the bundled Fashion-MNIST CNN and export it, with its example data, to ``tvmquant/examples``.

The network is a small ResNet-style CNN chosen to exercise what an INT8 quantizer must handle:
Conv + BatchNorm (folded by the exporter), residual adds, a depthwise conv (``groups == channels``),
ReLU and ReLU6 (ONNX ``Clip``), max and global-average pooling, and a final Linear (ONNX ``Gemm``).

Input: float32 ``(N, 1, 28, 28)`` named ``"input"``, pixels normalised as
``(x / 255 - 0.2860) / 0.3530`` (the training-set mean and standard deviation); output: float32
``(N, 10)`` logits named ``"logits"``. The batch axis is dynamic. The normalisation is also written
into the ONNX file's ``metadata_props``.

Training is seeded and deterministic on the CPU (``torch.manual_seed``, deterministic algorithms,
two threads), so rerunning the script gives the same weights. It runs a few epochs of SGD with
a one-cycle learning rate and horizontal flips: about 100 s an epoch on two idle CPU cores (three
epochs reach 91.45% test accuracy), several times longer on a loaded machine.

Outputs
-------
``tvmquant/examples/fmnist_cnn.onnx``
    The trained model, legacy exporter, opset 17, BatchNorm folded into Conv.
``tvmquant/examples/fmnist_data.npz``
    ``calib_u8`` (256 training images, uint8 ``(256, 28, 28)``), ``test_u8`` (the first 1000 test
    images, uint8 ``(1000, 28, 28)``) and ``test_labels`` (uint8 ``(1000,)``). Raw pixels keep the
    file small; ``tvmquant.examples.load_fmnist_example`` normalises them.

Usage::

    pip install torch==2.13.0 onnxruntime
    apt-get install -y dataset-fashion-mnist
    python bench/models/train_fmnist.py [--epochs 3]
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from tvmquant.examples import FMNIST_MEAN, FMNIST_STD, load_fashion_mnist, normalize_fmnist

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "tvmquant" / "examples"
SEED = 20240601
NUM_CALIB = 256
NUM_TEST_BUNDLED = 1000


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 Conv + BN with an identity shortcut added before the last ReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class DepthwiseBlock(nn.Module):
    """MobileNet-style residual block: depthwise 3x3 + BN + ReLU6, pointwise 1x1 + BN, identity add.

    ReLU6 puts an ONNX ``Clip`` in the graph, and the add after a Conv with no activation is the
    pattern MobileNetV2 uses, so both appear in the small test model.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.pointwise = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu6(self.bn1(self.depthwise(x)))
        return x + self.bn2(self.pointwise(out))


class FashionCNN(nn.Module):
    """Small ResNet-style classifier for 28x28 grey images.

    28x28 stem conv -> max-pool to 14x14 -> basic block (32 ch) -> strided conv to 7x7 (64 ch) ->
    depthwise block -> basic block -> global average pool -> Linear(64, 10).
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.block1 = BasicBlock(32)
        self.down = nn.Sequential(
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.block2 = DepthwiseBlock(64)
        self.block3 = BasicBlock(64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.block1(x)
        x = self.down(x)
        x = self.block2(x)
        x = self.block3(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Return the top-1 accuracy of ``model`` on normalised ``images``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start : start + batch_size])
            correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def train(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """Train ``model`` in place with SGD + Nesterov momentum and a one-cycle learning rate."""
    steps_per_epoch = len(train_x) // batch_size
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    # One-cycle reaches a good optimum in a handful of epochs, which keeps the CPU budget small.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.2, epochs=epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    for epoch in range(epochs):
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_x), generator=generator)
        running_loss = 0.0
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            images = train_x[index]
            # Horizontal flips are label-preserving for clothes and cost nothing.
            flip = torch.rand(len(images), generator=generator) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(3), images)
            loss = F.cross_entropy(model(images), train_y[index], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            running_loss += float(loss.detach())
        print(
            f"epoch {epoch + 1}/{epochs}: loss {running_loss / steps_per_epoch:.4f} "
            f"({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


def export_onnx(model: nn.Module, path: Path) -> None:
    """Export ``model`` with the legacy exporter (which folds BatchNorm in eval mode) and annotate it."""
    model.eval()
    dummy = torch.zeros(1, 1, 28, 28)
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
    onnx.helper.set_model_props(
        onnx_model,
        {
            "normalization": f"(x / 255 - {FMNIST_MEAN:.4f}) / {FMNIST_STD:.4f}",
            "input_layout": "NCHW, 1x28x28 grey, float32",
            "dataset": "Fashion-MNIST",
            "classes": "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot",
            "trained_by": "bench/models/train_fmnist.py",
        },
    )
    onnx_model.doc_string = (
        "Small ResNet-style Fashion-MNIST CNN for tvmquant tests; input 'input' (N,1,28,28) float32 "
        f"normalised as (x/255 - {FMNIST_MEAN:.4f}) / {FMNIST_STD:.4f}, output 'logits' (N,10)."
    )
    onnx.checker.check_model(onnx_model)
    onnx.save(onnx_model, str(path))


def write_example_data(path: Path, train_u8: np.ndarray, test_u8: np.ndarray, test_labels: np.ndarray) -> None:
    """Write the bundled calibration and test slice as raw uint8 pixels."""
    # Any 256 training images do for calibration; a seeded draw avoids the first ones' class order.
    calib_index = np.sort(np.random.default_rng(SEED).choice(len(train_u8), NUM_CALIB, replace=False))
    np.savez_compressed(
        path,
        calib_u8=train_u8[calib_index],
        test_u8=test_u8[:NUM_TEST_BUNDLED],
        test_labels=test_labels[:NUM_TEST_BUNDLED].astype(np.uint8),
    )


def check_with_onnxruntime(path: Path, test_x: np.ndarray, test_labels: np.ndarray) -> float:
    """Return the ONNX Runtime top-1 accuracy of the exported model, as an export check."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = np.concatenate(
        [session.run(["logits"], {"input": test_x[i : i + 1000]})[0] for i in range(0, len(test_x), 1000)]
    )
    return float((logits.argmax(1) == test_labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=EXAMPLES_DIR)
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(SEED)

    train_u8, train_labels = load_fashion_mnist("train", normalize=False)
    test_u8, test_labels = load_fashion_mnist("test", normalize=False)
    train_x, test_x = (
        torch.from_numpy(normalize_fmnist(train_u8)),
        torch.from_numpy(normalize_fmnist(test_u8)),
    )
    train_y, test_y = torch.from_numpy(train_labels), torch.from_numpy(test_labels)

    model = FashionCNN()
    started = time.perf_counter()
    train(model, train_x, train_y, args.epochs, args.batch_size, generator)
    accuracy = evaluate(model, test_x, test_y)
    print(f"trained in {time.perf_counter() - started:.0f} s; torch test accuracy {accuracy:.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / "fmnist_cnn.onnx"
    data_path = args.out_dir / "fmnist_data.npz"
    export_onnx(model, onnx_path)
    write_example_data(data_path, train_u8, test_u8, test_labels)
    ort_accuracy = check_with_onnxruntime(onnx_path, test_x.numpy(), test_labels)
    print(
        f"wrote {onnx_path} ({onnx_path.stat().st_size / 1024:.0f} KiB) and {data_path} "
        f"({data_path.stat().st_size / 1024:.0f} KiB); onnxruntime test accuracy {ort_accuracy:.4f}"
    )


if __name__ == "__main__":
    main()
