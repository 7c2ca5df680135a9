"""``python -m ditdeploy``: run the ``ditdeploy`` command line."""

from ditdeploy.cli import main

main()
