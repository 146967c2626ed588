"""``python -m looptune.tuner.cli`` runs the ``looptune`` command (tools and tests use it to run
the CLI of the interpreter at hand)."""
from looptune.tuner.cli import main

main(prog_name="looptune")
