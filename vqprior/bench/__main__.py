"""``python -m vqprior.bench``: the same as ``vqprior bench``."""

from vqprior.bench import main

main()
