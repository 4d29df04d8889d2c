"""SpikingBrain causal LM: decoder blocks over per-layer mixers, HF-compatible.

Read top to bottom: a block is pre-norm residual ``h = x + mixer(norm1(x))``,
``out = h + ffn(norm2(h))``; the mixer is chosen by ``config.layer_types[i]`` and the FFN by
``config.mlp_layer_types[i]``. ``SpikingBrainModel`` turns ids into hidden states, keeping the
decode state in a ``SpikingBrainCache``; ``SpikingBrainForCausalLM`` adds the LM head, the loss
(plus the MoE auxiliary loss) and generation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import initialization as init
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from spikingbrain.cache import SpikingBrainCache
from spikingbrain.config import SpikingBrainConfig
from spikingbrain.errors import SpikingBrainError
from spikingbrain.hf_compat import CACHE_KWARG
from spikingbrain.layers.attention import SoftmaxAttention
from spikingbrain.layers.context import MixerContext, document_starts
from spikingbrain.layers.gla import GatedLinearAttention
from spikingbrain.layers.hybrid import ParallelHybrid
from spikingbrain.layers.mlp import SwiGLU
from spikingbrain.layers.norm import RMSNorm
from spikingbrain.layers.projections import QKV, project
from spikingbrain.layers.rope import RotaryEmbedding


def build_mixer(config: SpikingBrainConfig, layer_idx: int) -> nn.Module:
    kind = config.layer_types[layer_idx]
    if kind == "gla":
        return GatedLinearAttention(config, layer_idx)
    if kind == "swa":
        return SoftmaxAttention(config, layer_idx, window=config.sliding_window)
    if kind == "full":
        return SoftmaxAttention(config, layer_idx, window=None)
    if kind == "gla+swa":
        return ParallelHybrid(config, layer_idx, window=config.sliding_window)
    if kind == "gla+full":
        return ParallelHybrid(config, layer_idx, window=None)
    raise SpikingBrainError(f"unknown layer type {kind!r}")


def build_mlp(config: SpikingBrainConfig, layer_idx: int) -> nn.Module:
    if config.mlp_layer_types[layer_idx] == "moe":
        from spikingbrain.layers.moe import MoE

        return MoE(
            config.hidden_size,
            config.moe_intermediate_size or config.intermediate_size,
            num_experts=config.num_experts,
            top_k=config.num_experts_per_tok,
            num_shared_experts=config.num_shared_experts,
            router=config.router_type,
            aux_loss_coef=config.router_aux_loss_coef,
            router_z_loss_coef=config.router_z_loss_coef,
            norm_topk_prob=config.norm_topk_prob,
        )
    return SwiGLU(config.hidden_size, config.intermediate_size, config.hidden_act)


class SpikingBrainDecoderLayer(nn.Module):
    def __init__(self, config: SpikingBrainConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_type = config.layer_types[layer_idx]
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = build_mixer(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = build_mlp(config, layer_idx)

    def forward(self, x, ctx: MixerContext, cache=None, sink_kv=None):
        h = x + self.self_attn(self.input_layernorm(x), ctx, cache, sink_kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class SpikingBrainPreTrainedModel(PreTrainedModel):
    config_class = SpikingBrainConfig
    config: SpikingBrainConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SpikingBrainDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        # transformers.initialization's functions skip tensors already loaded from a checkpoint
        if isinstance(module, ParallelHybrid):
            init.constant_(module.merge, 0.5)
        if isinstance(module, RotaryEmbedding):  # a non-persistent buffer: rebuilt after loading
            inv_freq, _ = module.compute_inv_freq(module.config)
            init.copy_(module.inv_freq, inv_freq)
        if isinstance(module, SpikingBrainModel) and module.sink_tokens is not None:
            init.normal_(module.sink_tokens, 0.0, self.config.initializer_range)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own constant-size cache (see cache.py)

    def save_pretrained(self, *args, **kwargs):
        if any(hasattr(m, "fused_sizes") for m in self.modules()):
            # its weights would be saved under names from_pretrained does not know (qkv_proj...)
            raise SpikingBrainError("this model's projections were fused for inference "
                                    "(fuse_projections); save the model before fusing")
        return super().save_pretrained(*args, **kwargs)


class SpikingBrainModel(SpikingBrainPreTrainedModel):
    def __init__(self, config: SpikingBrainConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(SpikingBrainDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.sink_tokens = (
            nn.Parameter(torch.zeros(config.num_sink_tokens, config.hidden_size))
            if config.num_sink_tokens > 0 else None
        )
        self.gla_mode = "auto"
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    # ------------------------------------------------------------------ sink tokens
    def compute_sink_kv(self) -> list:
        """Run the sink tokens through the stack as their own short sequence and return, per
        layer, the ``(k, v)`` (``[1, Hkv, S, D]``) that real tokens attend to, or None for layers
        without a softmax branch. Sinks attend to each other without a causal mask and carry no
        RoPE (they have no position); in linear branches they form their own sequence, so they
        never enter the real tokens' recurrent state."""
        if self.sink_tokens is None:
            return [None] * len(self.layers)
        h = self.sink_tokens[None]
        S = h.shape[1]
        pos = torch.zeros(1, S, dtype=torch.long, device=h.device)
        hd = self.config.head_dim
        ctx = MixerContext(
            positions=pos, cos=h.new_ones(1, S, hd), sin=h.new_zeros(1, S, hd), gla_mode=self.gla_mode
        )
        out = []
        for layer in self.layers:
            x = layer.input_layernorm(h)
            mixer = layer.self_attn
            if isinstance(mixer, GatedLinearAttention):
                out.append(None)
                mix = mixer(x, ctx)
            else:
                zq, zk, zv = (t.view(1, S, -1, hd) for t in project(mixer, QKV, x))
                q, k, v = (t.transpose(1, 2) for t in (zq, zk, zv))
                if mixer.kv_quantizer is not None:
                    k, v = mixer.kv_quantizer(k, v)
                if mixer.q_quantizer is not None:
                    q = mixer.q_quantizer(q)
                out.append((k, v))
                o_soft = F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1]).transpose(1, 2)
                if isinstance(mixer, ParallelHybrid):
                    # as in ParallelHybrid.branches: the linear branch's own projections when
                    # separate, and keys/values from before the softmax branch's INT8-KV hook
                    # (this used the shared, quantized q/k/v whatever hybrid_separate_proj said)
                    o_lin = mixer.gla.linear_attention(x, *mixer.linear_inputs(x, zq, zk, zv), ctx)
                    o = mixer.merge[0] * o_lin + mixer.merge[1] * mixer.attn_norm(o_soft)
                else:
                    o = o_soft
                mix = mixer.o_proj(o.reshape(1, S, -1))
            h = h + mix
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return out

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SpikingBrainCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache: SpikingBrainCache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        past_key_values = _one_cache(cache, past_key_values)
        if (input_ids is None) == (inputs_embeds is None):
            raise SpikingBrainError("pass exactly one of input_ids or inputs_embeds")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise SpikingBrainError(f"input_ids must be [batch, seq_len], got shape {tuple(input_ids.shape)}")
            if input_ids.numel() and (int(input_ids.max()) >= self.config.vocab_size or int(input_ids.min()) < 0):
                raise SpikingBrainError(
                    f"input_ids contain ids outside the vocabulary [0, {self.config.vocab_size})"
                )
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        # Unlike HF's config.use_cache default, a plain scoring call builds no cache: filling
        # w-slot ring buffers for a forward that never decodes cost ~25% of an eval pass.
        # generate() and callers that pass a cache still get one.
        if use_cache is None:
            use_cache = past_key_values is not None
        if self.training and past_key_values is None:
            use_cache = False
        cache = past_key_values
        if cache is not None and not isinstance(cache, SpikingBrainCache):
            raise SpikingBrainError(
                f"past_key_values must be a SpikingBrainCache, got {type(cache).__name__}"
            )
        if cache is None and use_cache:
            cache = SpikingBrainCache(self.config)

        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] < T:
                raise SpikingBrainError(
                    f"attention_mask must be [batch, >= seq_len] = [{B}, >= {T}], got {tuple(attention_mask.shape)}"
                )
            valid = attention_mask[:, -T:].bool()
            if bool(valid.all()):
                valid = None
        real = valid if valid is not None else torch.ones(B, T, dtype=torch.bool, device=device)

        # Positions and packed-document starts (the rules: cache.py's docstring)
        reset = seg = None
        if position_ids is not None:
            if position_ids.shape != (B, T):
                position_ids = position_ids.expand(B, T) if position_ids.shape[-1] == T else None
                if position_ids is None:
                    raise SpikingBrainError(f"position_ids must be [batch, seq_len] = [{B}, {T}]")
            position_ids = position_ids.to(device=device, dtype=torch.long)
            last = cache.last_positions(B, device) if cache is not None else None
            reset = document_starts(position_ids, valid, last)
            if reset is not None:
                seg = reset.long().cumsum(1)
        elif cache is not None:
            position_ids = cache.positions_for(B, real, device)
        elif valid is not None:
            position_ids = valid.long().cumsum(1) - valid.long()
        else:
            position_ids = torch.arange(T, device=device)[None].expand(B, T)

        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        ctx = MixerContext(
            positions=position_ids, cos=cos, sin=sin, valid=valid, reset=reset, seg=seg, gla_mode=self.gla_mode,
        )
        sink_kv = self._sink_kv(cache)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            lc = cache.layers[i] if cache is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(layer, h, ctx, lc, sink_kv[i], use_reentrant=False)
            else:
                h = layer(h, ctx, lc, sink_kv[i])
        if cache is not None:
            cache.advance(position_ids, real)
        h = self.norm(h)
        return BaseModelOutputWithPast(last_hidden_state=h, **{CACHE_KWARG: cache if use_cache else None})

    def _sink_kv(self, cache):
        if self.sink_tokens is None:
            return [None] * len(self.layers)
        if cache is None or self.training:
            return self.compute_sink_kv()
        if cache.layers[0].sink_kv is None and not getattr(cache, "_sinks_ready", False):
            for lc, kv in zip(cache.layers, self.compute_sink_kv()):
                lc.sink_kv = kv
            cache._sinks_ready = True
        return [lc.sink_kv for lc in cache.layers]


class SpikingBrainForCausalLM(SpikingBrainPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: SpikingBrainConfig) -> None:
        super().__init__(config)
        self.model = SpikingBrainModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a model directory strictly and streamed (``spikingbrain.loader``): this package's
        format or the released ``gla_swa`` checkpoints (options ``window_convention``,
        ``down_proj``). Missing, unused or misshapen weights, a truncated file, an unknown model
        type or a config lacking a field are errors naming the problem; nothing is loaded then."""
        from spikingbrain.loader import from_pretrained_call

        return from_pretrained_call(pretrained_model_name_or_path, model_args, kwargs)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def set_gla_mode(self, mode: str) -> None:
        """Force a GLA computation (``auto``/``chunk``/``recurrent``/``naive``/``fla``)."""
        self.model.gla_mode = mode

    def new_cache(self) -> SpikingBrainCache:
        return SpikingBrainCache(self.config)

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE layers' auxiliary losses from the last forward (coefficients applied)."""
        losses = [m.last_aux_loss for m in self.modules() if getattr(m, "last_aux_loss", None) is not None]
        return sum(losses) if losses else None

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: SpikingBrainCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        cache: SpikingBrainCache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        past_key_values = _one_cache(cache, past_key_values)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        )
        h = out.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            h = h[:, logits_to_keep]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
            if "moe" in self.config.mlp_layer_types:
                aux = self.aux_loss()
                if aux is not None:
                    loss = loss + aux
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_KWARG: getattr(out, CACHE_KWARG)})

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None,
                                      inputs_embeds=None, use_cache=True, next_sequence_length=None,
                                      cache=None, **kwargs):
        """Feed only the tokens the cache has not seen yet; positions come from the cache.

        ``generate()`` hands the decode state over as ``cache`` (transformers >= 5.24) or
        ``past_key_values`` (5.23); we return it under the name the installed version reads
        back from ``model_inputs``, or generation would silently run without a cache."""
        past_key_values = _one_cache(cache, past_key_values)
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache()
        seen = past_key_values.get_seq_length() if past_key_values is not None else 0
        model_inputs = {CACHE_KWARG: past_key_values, "use_cache": use_cache,
                        "attention_mask": attention_mask}
        if inputs_embeds is not None and seen == 0:
            model_inputs["inputs_embeds"] = inputs_embeds
        elif next_sequence_length and past_key_values is not None and inputs_embeds is not None:
            # prompt given as embeddings: input_ids holds only the generated tokens, so slicing
            # by what the cache has seen (prompt included) left nothing; take transformers' count
            model_inputs["input_ids"] = input_ids[:, -next_sequence_length:]
        else:
            model_inputs["input_ids"] = input_ids[:, seen:]
        if "logits_to_keep" in kwargs and kwargs["logits_to_keep"] is not None:
            model_inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return model_inputs


def _one_cache(cache, past_key_values):
    """The decode state passed under either name (``cache`` is transformers 5.24's)."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise SpikingBrainError("pass the decode state once, as cache= or past_key_values=, not both")
    return cache if cache is not None else past_key_values


AutoConfig.register("spikingbrain", SpikingBrainConfig, exist_ok=True)
AutoModelForCausalLM.register(SpikingBrainConfig, SpikingBrainForCausalLM, exist_ok=True)


def count_parameters(config: SpikingBrainConfig | str) -> dict[str, int]:
    """Count parameters without allocating weights (the model is built on the meta device).

    Returns ``{"total": int, "active": int}``; ``active`` counts, per token, the shared experts
    and ``num_experts_per_tok`` routed experts of every MoE layer instead of all of them.
    """
    if isinstance(config, str):
        config = SpikingBrainConfig.from_preset(config)
    with torch.device("meta"):
        model = SpikingBrainForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for layer in model.model.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None and len(experts) > 0:
            per_expert = sum(p.numel() for p in experts[0].parameters())
            inactive += per_expert * (len(experts) - config.num_experts_per_tok)
    return {"total": total, "active": total - inactive}
