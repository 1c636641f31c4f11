"""The hosted backend: a FineTuneJob fine-tuned and evaluated on OpenAI's fine-tuning service."""
