"""The `kubetune` command line: validate manifests offline, train locally, read a job's status and logs."""
