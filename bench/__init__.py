"""Benchmarks that print figures and write them under bench/results/ (never timed assertions in tests)."""
