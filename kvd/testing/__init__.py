"""Helpers for tests and benchmarks (the real models they run on). The product path never imports this."""
