"""`python -m diffsr.app.cli`: the `diffsr` command."""

from diffsr.app.cli.main import main

main()
