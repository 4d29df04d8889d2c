"""Attention transfer's teacher pass: what it records for a layer is that layer's normed input and
its attention output, checked against the teacher's hidden states and the decoder-layer equation
``h_next = h + y + mlp(post_norm(h + y))`` (an independent reading, not the same hook again)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from spikingbrain.convert.attention_transfer import collect_teacher_io
from testutils import assert_close_rel


def test_teacher_pass_records_each_layers_normed_input_and_attention_output():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    teacher = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 64, (3, 20))
    io = collect_teacher_io(teacher, ids.split(2), [0, 2], dtype=torch.float32, progress=False)
    assert sorted(io) == [0, 2]
    with torch.no_grad():
        hs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        for i in (0, 2):
            X, Y = io[i]
            assert X.shape == Y.shape == (3, 20, 32)
            layer = teacher.model.layers[i]
            assert_close_rel(X, layer.input_layernorm(hs[i]), 1e-5, f"layer {i} input")
            mid = hs[i] + Y
            h_next = mid + layer.mlp(layer.post_attention_layernorm(mid))
            assert_close_rel(h_next, hs[i + 1], 1e-5, f"layer {i} output")  # (hs[4] is after the final norm)
        # the default storage is bf16
        x16, _ = collect_teacher_io(teacher, [ids], [1], progress=False)[1]
        assert x16.dtype == torch.bfloat16
