# Sourced by examples/cub/reproduce_*.sh: strict mode, named steps, a message naming the step where a run
# stops, optional steps skipped with a reason, and vlmtools commands run in batches (one process each).
set -euo pipefail

VLM=${VLMTOOLS:-vlmtools}  # may be several words ("python -m vlmtools")
PYTHON=${PYTHON:-python3}
BATCH=${BATCH:-1}
SCRIPT=$(basename "$0")
LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STEP="checking the arguments"
QUEUE=""
QUEUES=0
T0=$SECONDS

step() {  # in a batch, the step is queued with its commands: said when the batch reaches it
  STEP=$*
  if [ -n "$QUEUE" ] && [ "$BATCH" != 0 ]; then echo "# == $STEP" >> "$QUEUE"; else echo "== $SCRIPT: $STEP" >&2; fi
}
say() { echo "$SCRIPT: $*" >&2; }
skip() { echo "$SCRIPT: skipped: $*" >&2; }
die() { echo "$SCRIPT: error: $*" >&2; exit 2; }
_stopped() {
  local rc=$?
  if [ "$rc" -ne 0 ]; then echo "$SCRIPT: stopped (exit $rc) at step: $STEP" >&2; fi
}
trap _stopped EXIT

read -r -a _vlm_words <<< "$VLM"
if ! command -v "${_vlm_words[0]:-}" > /dev/null; then
  die "cannot run '$VLM' (install vlmtools, or set VLMTOOLS to its command)"
fi

need_dir() { if [ ! -d "$1" ]; then die "$2 $1: no such directory"; fi; }

# batch NAME: start a batch of vlmtools commands; `vlm ARGS...` adds one; `run_batch` runs them all in one
# `vlmtools batch` process (torch imports once, each model loads once). The batch is kept as
# OUT/commands/NN-NAME.txt, the record of what ran. BATCH=0 runs every command at once as its own process
# instead (to debug, or to measure what batching saves). A command ending in '>' FILE writes its stdout
# to FILE, and only if it succeeds.
batch() {
  QUEUES=$((QUEUES + 1))
  mkdir -p "$OUT/commands"
  QUEUE=$(printf '%s/commands/%02d-%s.txt' "$OUT" "$QUEUES" "$1")
  : > "$QUEUE"
}

_quoted() {  # the words, single-quoted for the batch file (POSIX shell quoting)
  local word line="" q="'" esc="'\\''"
  for word in "$@"; do line+="'${word//$q/$esc}' "; done
  printf '%s\n' "${line% }"
}

vlm() {
  [ -n "$QUEUE" ] || die "internal: vlm called before batch"
  _quoted "$@" >> "$QUEUE"
  if [ "$BATCH" != 0 ]; then return 0; fi
  local args=("$@") n=$#
  if [ "$n" -ge 2 ] && [ "${args[n-2]}" = ">" ]; then
    local to=${args[n-1]}
    if ! $VLM "${args[@]:0:n-2}" > "$to.tmp"; then rm -f "$to.tmp"; die "vlmtools ${args[*]:0:2} failed"; fi
    mv "$to.tmp" "$to"
  elif ! $VLM "$@"; then
    die "vlmtools ${args[*]:0:2} failed"
  fi
}

run_batch() {
  local queue=$QUEUE
  QUEUE=""
  if [ "$BATCH" = 0 ] || ! grep -qv '^#' "$queue"; then return 0; fi
  STEP="the batch $queue (its failing line and message are above)"
  if ! $VLM batch "$queue"; then exit 2; fi
}

# compare_table STUDY OURS TITLE: ours beside the study's -> OUT/table.tsv, OUT/table.txt, and stdout.
compare_table() {
  "$PYTHON" "$LIB_DIR/../compare.py" "$1" "$2" -o "$OUT/table.tsv" --text "$OUT/table.txt" --title "$3"
  say "wrote $OUT/table.tsv and $OUT/table.txt in $((SECONDS - T0)) s"
}
