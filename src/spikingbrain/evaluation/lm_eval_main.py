"""The lm-eval command line with SpikingBrain registered and the shipped tasks on the path:

    python -m spikingbrain.evaluation.lm_eval_main run --model hf \
        --model_args pretrained=path/to/model,dtype=float32 --tasks spikingbrain_cloze,hellaswag

Identical to ``lm_eval ...`` except that (1) ``import spikingbrain`` runs first, so a SpikingBrain
model directory loads through ``--model hf`` without ``trust_remote_code``, and (2) when no
``--include_path`` is given, the package's ``evaluation/tasks`` folder is added.
"""
from __future__ import annotations

import sys

from spikingbrain.evaluation.harness import TASKS_DIR

COMMANDS_WITH_TASKS = {"run", "ls", "list", "validate"}


def main(argv: list[str] | None = None) -> None:
    import spikingbrain  # noqa: F401  (registers the architecture with the Auto classes)
    from spikingbrain.evaluation.harness import _import_lm_eval

    _import_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    first = argv[0] if argv else ""
    takes_tasks = first in COMMANDS_WITH_TASKS or first.startswith("-")
    if takes_tasks and not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
        argv += ["--include_path", str(TASKS_DIR)]
    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
