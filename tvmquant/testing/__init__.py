"""Helpers for tvmquant's tests and benchmarks (not part of the quantization API)."""
