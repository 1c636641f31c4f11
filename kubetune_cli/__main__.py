"""`python -m kubetune_cli`: the CLI where no `kubetune` script is installed."""

from kubetune_cli.entry import main

main()
