"""`python -m kubetune_trainer`: the trainer image's entry point (see kubetune_trainer.main)."""

from kubetune_trainer.main import cli

if __name__ == "__main__":
    cli(prog_name="python -m kubetune_trainer")
