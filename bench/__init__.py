"""Benchmarks: camserve's explained prediction against a plain prediction and the alternatives."""
