"""`python -m kubetune_trainer`: the trainer image's entry point (see kubetune_trainer.commands)."""

from kubetune_trainer.commands import cli

if __name__ == "__main__":
    cli(prog_name="python -m kubetune_trainer")
