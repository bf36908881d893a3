"""Helpers for tvmquant's tests and benchmarks (not part of the quantization API)."""


def library_source(executable, fmt: str = "asm") -> str:
    """The ``fmt`` source (``"asm"``, ``"ll"``) of every module of a built executable or library, its imports
    walked to any depth: the x86 build links the kernels as several LLVM modules, some imported by others
    (:func:`tvmquant.schedules.x86.build`), and which kernel lands in which module depends on timing."""
    sources, stack = [], [getattr(executable, "mod", executable)]
    while stack:
        module = stack.pop()
        stack.extend(module.imports)
        if module.kind == "llvm":
            sources.append(module.inspect_source(fmt))
    return "\n".join(sources)
