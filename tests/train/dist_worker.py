"""torchrun entry for the distributed tests: runs several recipes in one process group.

    torchrun --nproc_per_node=2 dist_worker.py RECIPE[:MAX_STEPS] ...
"""
import sys

import torch.distributed as dist

from spikingbrain.train import load_recipe, train

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for arg in sys.argv[1:]:
        path, _, max_steps = arg.partition(":")
        train(load_recipe(path), progress=False, max_steps=int(max_steps) if max_steps else None)
    dist.destroy_process_group()
