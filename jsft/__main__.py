"""`python -m jsft train ...`: the `jsft` command (jsft.command) without the console script."""

from jsft.command import main

main()
