"""``python -m automl`` runs the CLI."""

from automl._cli import main

main()
