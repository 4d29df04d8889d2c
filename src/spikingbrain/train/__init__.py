"""Training: data packing, YAML recipes, the loop, checkpoints and torchrun/FSDP support.

``spikingbrain train RECIPE.yaml`` (``cli.py``) or, from Python::

    from spikingbrain.train import load_recipe, train
    result = train(load_recipe("recipes/tiny-cpu.yaml"))

Spike-aware fine-tuning (``recipes/spike-aware-cpu.yaml``): a ``spiking:`` section
(``recipe.SpikingSection``: ``k``, ``weight_bits``, ``group_size``, ``kv_bits``, ``clip``,
``exclude``) makes the student train through its spiking forward, ``spikify(..., ste=True)``:
every block projection's input is spike-coded (adaptive threshold, integer counts) and its
weight fake-quantized (symmetric, per output row per group), with straight-through gradients, so
the float master weights train (QAT) and the quality lost to spiking can be recovered. The
forward equals ``spikify``'s inference form of the same weights; evaluation reports the spiking
model's loss. It composes with ``trainable.params`` and with LoRA (``dropout: 0``; the adapter is
quantized as part of the weight it merges into), runs on one process or DDP (not FSDP), and
checkpoints/exports plain float weights under the plain model's names (resume works as usual;
``spikify`` the export with the same settings to run it spiking).
"""
from spikingbrain.train.loop import TrainResult, train
from spikingbrain.train.recipe import Recipe, load_recipe, parse_recipe

__all__ = ["Recipe", "TrainResult", "load_recipe", "parse_recipe", "train"]
