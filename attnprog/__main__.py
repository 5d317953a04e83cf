"""`python -m attnprog`: the same commands as the `attnprog` script."""

from attnprog.cli import main

main()
