"""Tests of tvmquant.schedules.cuda: INT8 WMMA / dp4a rules for NVIDIA GPUs.

The build tests need no GPU: they sample schedules for ``nvidia/nvidia-h100`` (sm_90a), build them with
``tvm.compile`` and compile the CUDA source with ``nvcc`` (cubin, so ptxas accepts it, then PTX), and check
which instructions the PTX uses. They skip without ``nvcc``. The tests that run kernels are marked ``gpu``.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from tvmquant.schedules import cuda  # noqa: E402

needs_nvcc = pytest.mark.skipif(not cuda.have_nvcc(), reason="nvcc is not on PATH (CUDA toolkit not installed)")
needs_gpu = pytest.mark.skipif(not cuda.have_gpu(), reason="no CUDA device (tvm.cuda(0).exist is false)")

MATMUL = (128, 128, 128)
CONV = dict(batch=1, height=14, width=14, channels=64, out_channels=64, kernel=3, padding=1)


def matmul_reference(data, weight_nk):
    """Exact s8 x s8 -> s32 NT matmul."""
    return (data.astype(np.int64) @ weight_nk.astype(np.int64).T).astype(np.int32)


def conv_reference(data, weight, padding):
    """Exact NHWC x OHWI stride-1 conv2d in int64, returned as int32."""
    kernel = weight.shape[1]
    padded = np.pad(data.astype(np.int64), ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h, out_w = padded.shape[1] - kernel + 1, padded.shape[2] - kernel + 1
    out = np.zeros((data.shape[0], out_h, out_w, weight.shape[0]), np.int64)
    for dy in range(kernel):
        for dx in range(kernel):
            patch = padded[:, dy : dy + out_h, dx : dx + out_w, :]
            out += np.einsum("nhwc,kc->nhwk", patch, weight[:, dy, dx, :].astype(np.int64))
    return out.astype(np.int32)


@pytest.fixture(scope="module")
def target():
    return cuda.cuda_target("nvidia/nvidia-h100")


def _built(workload, target, kind):
    built = cuda.sample_and_build(workload, target, num_samples=1, kind=kind, seed=0)
    assert built, "no candidate was sampled"
    for candidate in built:
        assert candidate.ok, f"candidate {candidate.index} failed to build: {candidate.error}"
    return built


@pytest.fixture(scope="module")
def wmma_matmul(target):
    return _built(cuda.int8_matmul(*MATMUL), target, "wmma")


@pytest.fixture(scope="module")
def wmma_conv(target):
    return _built(cuda.int8_conv2d_nhwc(**CONV), target, "wmma")


@pytest.fixture(scope="module")
def dp4a_matmul(target):
    return _built(cuda.int8_matmul(*MATMUL), target, "dp4a")


def test_target_arch(target):
    assert str(target.attrs["arch"]).startswith("sm_90")
    assert cuda.nvcc_arch(target)[1].endswith("code=sm_90a")


def test_space_rejects_non_cuda_target():
    with pytest.raises(ValueError, match="needs a cuda target"):
        cuda.int8_space(tvm.target.Target({"kind": "llvm"}))


def test_rules_reject_unknown_kind():
    with pytest.raises(ValueError, match="not one of"):
        cuda.int8_rules("mma")


@needs_nvcc
@pytest.mark.parametrize("workload", ["wmma_matmul", "wmma_conv"])
def test_wmma_candidate_uses_tensor_cores(workload, request):
    for candidate in request.getfixturevalue(workload):
        assert "wmma::mma_sync" in candidate.source
        assert candidate.count("wmma.mma.sync") > 0, "the PTX has no wmma.mma.sync: tensor cores not used"
        # s8 x s8 -> s32 fragments, not a silent fallback to f16
        assert re.search(r"wmma\.mma\.sync\.aligned\.\w+\.\w+\.m16n16k16\.s32\.s8\.s8\.s32", candidate.ptx)


@needs_nvcc
def test_wmma_builds_for_sm80():
    """Ampere (sm_80) as well as Hopper: the same rules, PTX for compute_80."""
    a100 = cuda.cuda_target("nvidia/nvidia-a100")
    built = _built(cuda.int8_matmul(*MATMUL), a100, "wmma")
    assert ".target sm_80" in built[0].ptx and built[0].count("wmma.mma.sync") > 0


@needs_nvcc
def test_dp4a_candidate_uses_dp4a(dp4a_matmul):
    for candidate in dp4a_matmul:
        assert candidate.count("dp4a.s32.s32") > 0, "the PTX has no dp4a"
        assert candidate.count("wmma.mma.sync") == 0


# ----------------------------------------------------------------------------------------------------------
# On a GPU: the same candidates, run and checked exactly
def _run(lib, arrays, out_shape):
    device = tvm.cuda(0)
    args = [tvm.runtime.tensor(a, device) for a in arrays]
    out = tvm.runtime.tensor(np.zeros(out_shape, np.int32), device)
    lib["main"](*args, out)
    return out.numpy()


@pytest.mark.gpu
@needs_gpu
@needs_nvcc
def test_wmma_matmul_exact_on_gpu(wmma_matmul):
    rng = np.random.default_rng(0)
    m, n, k = MATMUL
    data = rng.integers(-128, 128, (m, k), dtype=np.int8)
    weight = rng.integers(-128, 128, (n, k), dtype=np.int8)
    for candidate in wmma_matmul:
        np.testing.assert_array_equal(_run(candidate.lib, [data, weight], (m, n)), matmul_reference(data, weight))


@pytest.mark.gpu
@needs_gpu
@needs_nvcc
def test_wmma_conv_exact_on_gpu(wmma_conv):
    rng = np.random.default_rng(0)
    data = rng.integers(-128, 128, (CONV["batch"], CONV["height"], CONV["width"], CONV["channels"]), dtype=np.int8)
    weight = rng.integers(
        -128, 128, (CONV["out_channels"], CONV["kernel"], CONV["kernel"], CONV["channels"]), dtype=np.int8
    )
    expected = conv_reference(data, weight, CONV["padding"])
    for candidate in wmma_conv:
        np.testing.assert_array_equal(_run(candidate.lib, [data, weight], expected.shape), expected)
