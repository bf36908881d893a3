"""Helpers for tvmquant's tests and benchmarks (not part of the quantization API)."""


def library_source(executable, fmt: str = "asm") -> str:
    """The ``fmt`` source (``"asm"``, ``"ll"``) of every LLVM module of a built executable or library
    (:func:`tvmquant.threads.llvm_modules`): which kernel lands in which module depends on timing."""
    from ..threads import llvm_modules

    return "\n".join(module.inspect_source(fmt) for module in llvm_modules(executable))
