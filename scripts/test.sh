#!/usr/bin/env bash
# The tests: install if needed, then run the whole test suite.
source "$(dirname "$0")/env.sh"
exec .venv/bin/python -m pytest -q "$@"
