#!/usr/bin/env bash
# The test suite (fast tests; add -m slow for the long ones). Sets itself up on a fresh machine.
source "$(dirname "$0")/setup.sh"
exec python -m pytest -q "$@"
