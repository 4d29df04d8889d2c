"""The dense SwiGLU feed-forward network: ``down(silu(gate(x)) * up(x))``."""
from torch import nn
from transformers.activations import ACT2FN

from spikingbrain.layers.projections import GATE_UP, project


class SwiGLU(nn.Module):
    fusable = (GATE_UP,)

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu") -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x):
        gate, up = project(self, GATE_UP, x)
        return self.down_proj(self.act_fn(gate) * up)
