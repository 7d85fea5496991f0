# The two commands of the README. Each sets up what it needs first (scripts/setup.sh).
.PHONY: demo test lint setup bench fuzz

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/python -m crit_pageread.demo

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check crit_pageread tests hooks benchmarks fuzz
	.venv/bin/mypy
	.venv/bin/mypy fuzz
	@out=$$(.venv/bin/lint-imports --no-cache 2>&1) || { echo "$$out"; exit 1; }; echo "lint-imports: $$(echo "$$out" | tail -n 1)"

# Benchmarks on large real checkpoints (cached in ~/.cache/crit-pageread/bench); not part of the tests.
bench: setup
	@.venv/bin/python -c 'import matplotlib' 2>/dev/null || .venv/bin/python -m pip install -q -e '.[dev,bench]' --config-settings editable_mode=compat
	.venv/bin/python -m benchmarks.run $(BENCH_ARGS)

# The long reliability campaign (issue 11): real checkpoints made with CRIU, 4,000 seeded mutants through the
# library and one command each, 1,000 hostile page-server requests; exit 1 on any non-clean outcome.
fuzz: setup
	.venv/bin/python -m fuzz $(FUZZ_ARGS)
