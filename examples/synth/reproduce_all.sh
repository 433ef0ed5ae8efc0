#!/usr/bin/env bash
# Every study's table (000, 001, 003, 004) on the cub-like offline world with the photo-only micro CLIPs,
# mean ± std over world seeds, with paired tests; see examples/synth/reproduce_all.py for what runs.
#
#   examples/synth/reproduce_all.sh [OUT_DIR] [--quick] [--seeds N] [--threads T] [--studies 000,001,003,004]
#                                   [--tables-only] [--dry-run]
#
# OUT_DIR defaults to reproduce-synth. --quick (2 seeds, a small world; 3–5 min on a busy 2-core machine) is
# what CI smoke-runs; the full run (5 seeds) took about 80 min of one core. Rerunning resumes: finished
# steps are skipped; --tables-only prints the tables of the seeds that have finished. No network, no GPU.
# PYTHON picks the interpreter [python3].
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
exec "${PYTHON:-python3}" "$HERE/reproduce_all.py" "$@"
