"""What the x86 and CUDA kernel pipelines share: the scheduled-kernel test and the legalize-and-fuse passes."""

from __future__ import annotations


def is_scheduled(func) -> bool:
    """Whether a PrimFunc already carries a schedule (``tirx.is_scheduled``): tuning and fallbacks skip it."""
    attrs = func.attrs
    return attrs is not None and "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"])


def fusion_passes() -> list:
    """Legalize to TIR and fuse (the sequence of meta-schedule's ``compile_relax``), shared by the x86 and
    CUDA pipelines so that tuning and building see the same fused kernels."""
    from tvm import relax

    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]
