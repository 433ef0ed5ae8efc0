#!/usr/bin/env bash
# Mutation testing of the scientific core, one module at a time (issue 24; not in CI, it is slow).
#   benchmarks/mutation.sh [MODULE...]     e.g. benchmarks/mutation.sh vlmtools/classify.py
# Needs the `mutation` extra (pip install -e '.[mutation,test]'). Runs niced, one test process at a time, so
# that it fits beside other work on a 2-core machine; prints the score per module (see benchmarks/mutation.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec nice -n "${NICE:-10}" "$PYTHON" benchmarks/mutation.py "$@"
