"""``python -m ulsam_inject`` runs the command-line interface."""

from ulsam_inject.cli.app import main

main()
