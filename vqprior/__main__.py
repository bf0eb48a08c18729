"""``python -m vqprior``: the command line."""

from vqprior.cli import main

main()
