#!/usr/bin/env bash
# Rebuilds the pictures in README.md from the quick start, so they always show what the current
# defaults do. Run from the repository root after a change to the defaults or to the plots:
#     bash docs/make_figures.sh
# About 3 minutes on a 2-core CPU. The run goes to a temporary folder; only docs/*.png change.
set -euo pipefail
cd "$(dirname "$0")/.."
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
python train.py --img-size 64 --epochs 6 --no-hflip --output-dir "$run/quick-start" --log-interval 1000 \
    | tee "$run/log"
cp "$run/quick-start/mistakes.png" docs/mistakes.png
cp "$run/quick-start/curves.png" docs/curves.png
grep "^done:" "$run/log"
