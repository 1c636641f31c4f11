"""The `kubetune` script: the CLI, or a one-line fix when the package was installed without its `cli` extra."""

from __future__ import annotations

import sys

CLI_EXTRA_MODULES = frozenset({"click", "kubernetes"})


def main() -> None:
    """Run the click group; without the `cli` extra, say how to install it instead of a traceback."""
    try:
        from kubetune_cli.cli import main as cli_main
    except ModuleNotFoundError as error:
        if error.name not in CLI_EXTRA_MODULES:
            raise
        sys.exit(f"kubetune: the command line needs {error.name}: pip install 'kubetune[cli]'")
    cli_main(prog_name="kubetune")
