"""The training stage: the (q)LoRA or full fine-tune, checkpoints to S3 and resume, live progress."""
