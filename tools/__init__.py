"""Development scripts: generated files of the repository, checked by `make lint`."""
