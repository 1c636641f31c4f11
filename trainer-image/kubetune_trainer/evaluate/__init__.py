"""The evaluation stage: every arm's answers on the held-out rows, scored, gated and reported."""
