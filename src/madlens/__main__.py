"""`python -m madlens` is the `madlens` command."""

from madlens.cli import main

main()
