"""Benchmarks of crit-pageread on large real CRIU checkpoints (`make bench`; not part of the tests)."""
