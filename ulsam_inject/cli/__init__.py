"""The ``ulsam-inject`` command line: a thin typer layer over the public API."""
