"""Kiln's benchmarks: every figure is a ratio of two things measured in the same run (`make bench`)."""
