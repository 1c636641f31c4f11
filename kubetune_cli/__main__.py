"""`python -m kubetune`: the CLI where no `kubetune` script is installed (the images put the package on PYTHONPATH)."""

from kubetune.cli import main

main(prog_name="kubetune")
