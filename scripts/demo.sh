#!/usr/bin/env bash
# The main job from a fresh clone: set up (idempotent), then `spikingbrain demo` on the embedded
# default teacher. Extra arguments go to `spikingbrain demo` (e.g. --from-scratch, --delta FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m spikingbrain.cli demo "$@"
