"""`python -m crit_pageread` runs the command line."""

from .cli.main import run

run()
