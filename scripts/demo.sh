#!/usr/bin/env bash
# The demo: install if needed, train a noise-robust MNIST CNN and certify 100 test digits (about 2 minutes).
source "$(dirname "$0")/env.sh"
exec .venv/bin/smoothcert demo "$@"
