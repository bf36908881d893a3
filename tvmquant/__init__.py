"""tvmquant: INT8 quantization for Apache TVM (Relax)."""

__version__ = "0.1.0"
