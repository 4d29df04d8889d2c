"""Conversion: teachers in, SpikingBrain models out (weight mapping, calibration, upcycling)."""
from spikingbrain.convert.mapping import calibrate_output_norms, config_from_teacher, convert_from_transformer
from spikingbrain.convert.teacher import default_teacher_path, load_teacher

__all__ = [
    "calibrate_output_norms",
    "config_from_teacher",
    "convert_from_transformer",
    "default_teacher_path",
    "load_teacher",
]
