"""Where a run's progress goes: its FineTuneJob's status, Prometheus, JSON-lines logs, a terminal bar."""
