"""``python -m engine.cli``: the same as the ``trakview`` command."""

from engine.cli.app import main

main()
