"""What differs per backend: training here (local) or on a hosted fine-tuning service (hosted)."""
