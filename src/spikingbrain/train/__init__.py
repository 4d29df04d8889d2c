"""Training: data packing, YAML recipes, the loop, checkpoints and torchrun/FSDP support.

``spikingbrain train RECIPE.yaml`` (``cli.py``) or, from Python::

    from spikingbrain.train import load_recipe, train
    result = train(load_recipe("recipes/tiny-cpu.yaml"))
"""
from spikingbrain.train.loop import TrainResult, train
from spikingbrain.train.recipe import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "TrainResult", "load_recipe", "parse_recipe", "train"]
