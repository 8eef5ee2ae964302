#!/usr/bin/env bash
# Each measured check of the lessons must fail when the world is wrong: this script runs a lesson in quick mode
# with one deliberate fault (a sed expression applied to a copy of it) and prints the checks that failed.
# Usage: docs/lessons/sabotage.sh 01_forward_process.py 's/old/new/'   (from the repository root)
# The faults tried and what they broke are listed in docs/lessons/CHECKS.md.
set -euo pipefail
lesson=$1
fault=$2
copy=$(mktemp -d)/$lesson
sed "$fault" "docs/lessons/$lesson" > "$copy"
if cmp -s "docs/lessons/$lesson" "$copy"; then echo "the fault changed nothing in $lesson" >&2; exit 2; fi
export LDM_LITE_LESSON_OUT=${LDM_LITE_LESSON_OUT:-$(mktemp -d)}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if "${PYTHON:-python}" "$copy" --quick > "$copy.log" 2>&1; then
  echo "no check failed"; exit 1
fi
grep "\[FAIL\]" "$copy.log" || tail -3 "$copy.log"
