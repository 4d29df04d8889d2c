"""SpikingBrain for vLLM's V1 engine: decoder blocks over GLA (state), sliding-window and full
softmax attention (paged KV cache, vLLM's attention backend), dense SwiGLU FFNs.

A block is pre-norm residual ``h = x + mixer(norm1(x))``, ``out = h + ffn(norm2(h))``. Weight
names follow the main package (Llama/Qwen2 names, ``self_attn.gk_proj.{0,1}``,
``self_attn.o_norm``); the released ``gla_swa`` checkpoints are renamed on load
(``GLASWA_RENAMES``). Loading is strict: a missing or unexpected tensor is an error naming it.
"""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from vllm.config import VllmConfig
from vllm.model_executor.layers.activation import SiluAndMul
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid

from spikingbrain_vllm.config import SpikingBrainConfigError, _validate
from spikingbrain_vllm.gla_layer import SpikingBrainGLA


class SoftmaxAttention(nn.Module):
    """The Transformer's attention with RoPE over the full head dim; ``window`` keys per query
    (current token included) or None for full causal attention."""

    def __init__(self, config, vllm_config: VllmConfig, prefix: str, window: int | None) -> None:
        super().__init__()
        H, Hkv, D = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_size, self.kv_size = H * D, Hkv * D
        self.qkv_proj = QKVParallelLinear(config.hidden_size, D, H, Hkv, bias=config.attention_bias,
                                          prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(H * D, config.hidden_size, bias=config.attention_out_bias,
                                        prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(D, max_position=config.max_position_embeddings,
                                   rope_parameters=config.rope_parameters)
        self.attn = Attention(H, D, D**-0.5, num_kv_heads=Hkv, cache_config=vllm_config.cache_config,
                              per_layer_sliding_window=window, prefix=f"{prefix}.attn")

    def forward(self, hidden_states: torch.Tensor, output: torch.Tensor, positions: torch.Tensor) -> None:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        output.copy_(out)


class SwiGLU(nn.Module):
    def __init__(self, config, prefix: str) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise SpikingBrainConfigError(f"hidden_act {config.hidden_act!r}: only silu/swish FFNs are supported")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2,
                                                       bias=False, prefix=f"{prefix}.gate_up_proj")
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size, bias=False,
                                           prefix=f"{prefix}.down_proj")
        self.act = SiluAndMul()

    def forward(self, x):
        h, _ = self.gate_up_proj(x)
        out, _ = self.down_proj(self.act(h))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config, vllm_config: VllmConfig, prefix: str, layer_type: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if layer_type == "gla":
            self.self_attn = SpikingBrainGLA(config, vllm_config, prefix=f"{prefix}.self_attn")
        else:
            window = config.window_keys if layer_type == "swa" else None
            self.self_attn = SoftmaxAttention(config, vllm_config, f"{prefix}.self_attn", window)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SwiGLU(config, f"{prefix}.mlp")

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        mixed = torch.empty_like(x)
        self.self_attn(self.input_layernorm(x), mixed, positions)
        h = x + mixed
        return h + self.mlp(self.post_attention_layernorm(h))


class SpikingBrainModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, vllm_config, f"{prefix}.layers.{i}", t) for i, t in enumerate(config.layer_types))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, positions, inputs_embeds=None):
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            h = layer(h, positions)
        return self.norm(h)


# released SpikingBrain-7B names -> this project's names (SPEC.md section 7)
GLASWA_RENAMES = [
    (r"^model\.embeddings\.", "model.embed_tokens."),
    (r"\.attn_norm\.", ".input_layernorm."),
    (r"\.mlp_norm\.", ".post_attention_layernorm."),
    (r"\.attn\.g_norm\.", ".self_attn.o_norm."),
    (r"\.attn\.", ".self_attn."),
]
# checkpoint projection -> (fused vLLM parameter, shard)
STACKED = [(".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
           (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1)]


class SpikingBrainForCausalLM(nn.Module, HasInnerState, IsHybrid):
    """vLLM model class for ``SpikingBrainForCausalLM`` (native) and ``GLAswaForCausalLM``
    (released 7B) checkpoints."""

    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        _validate(config)  # also catches hf_overrides that made the config unservable
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise NotImplementedError("spikingbrain-vllm: pipeline parallelism is not supported yet")
        self.config = config
        self.model = SpikingBrainModel(vllm_config=vllm_config, prefix="model")
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix="lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.logits_processor(self.lm_head, hidden_states)

    # ---- the state cache, as the engine sizes it before building the model
    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        c = vllm_config.model_config.hf_config
        return ((c.num_attention_heads, c.head_dim, c.head_dim),)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return (torch.float32,)

    @classmethod
    def get_mamba_state_copy_func(cls):
        return MambaStateCopyFuncCalculator.linear_attention_state_copy_func()

    # ---- weights
    def _rename(self, name: str) -> str | None:
        if self.config.model_type == "gla_swa":
            for pattern, repl in GLASWA_RENAMES:
                name = re.sub(pattern, repl, name)
        if "rotary_emb.inv_freq" in name:
            return None  # recomputed
        if self.config.tie_word_embeddings and name == "lm_head.weight":
            return None  # the embedding matrix is used
        return name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for ckpt_name, tensor in weights:
            name = self._rename(ckpt_name)
            if name is None:
                continue
            for old, new, shard in STACKED:
                if old in name and name.replace(old, new) in params:
                    target = name.replace(old, new)
                    params[target].weight_loader(params[target], tensor, shard)
                    loaded.add(target)
                    break
            else:
                if name not in params:
                    unexpected.append(ckpt_name)
                    continue
                param = params[name]
                if tuple(param.shape) != tuple(tensor.shape):
                    raise SpikingBrainConfigError(
                        f"{ckpt_name}: shape {tuple(tensor.shape)} in the checkpoint, {tuple(param.shape)} expected")
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)
                loaded.add(name)
        if unexpected:
            hint = (" (a W8ASpike checkpoint has a full-rank attn.gk_proj: not supported)"
                    if any(n.endswith("gk_proj.weight") for n in unexpected) else "")
            raise SpikingBrainConfigError(f"unexpected tensors in the checkpoint{hint}: {unexpected[:8]}"
                                          + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))
        missing = sorted(set(params) - loaded)
        if missing:
            raise SpikingBrainConfigError(f"tensors missing from the checkpoint: {missing[:8]}"
                                          + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
        return loaded
