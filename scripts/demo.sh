#!/usr/bin/env bash
# The demo: install if needed, then certify 100 MNIST test digits with the shipped noise-trained CNN (Cohen's
# CERTIFY, sigma 0.25, n0 100, n 2,000, alpha 0.001). --retrain trains the model again first; --n 10000 for more.
source "$(dirname "$0")/env.sh"
exec .venv/bin/smoothcert demo "$@"
