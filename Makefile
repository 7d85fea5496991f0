# The two commands of the README. Each sets up what it needs first (scripts/setup.sh).
.PHONY: demo test lint setup bench

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/python -m crit_pageread.demo

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check crit_pageread tests hooks
	.venv/bin/mypy
