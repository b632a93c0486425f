"""Command-line tools that are not one of the top-level scripts: `python -m tools.<job>`."""
