"""The kubetune operator: kopf handlers that turn FineTuneJobs into trainer Jobs and report how they run."""
