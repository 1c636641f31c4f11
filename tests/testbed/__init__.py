"""Shared parts of the local test bed: control plane, S3, Prometheus, models and processes."""
