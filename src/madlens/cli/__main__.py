"""`python -m madlens.cli` is the `madlens` command."""

from madlens.cli import main

main()
