"""Decoder-only transformers built from a shape config with `transformers` (no download).

Models are trained from scratch, so only the shape is needed; weights are initialised by
transformers' own ``_init_weights``. Attention uses PyTorch SDPA. Dropout is 0 (usual
for pretraining, and it keeps per-sample gradients deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from dograph.config import ModelConfig


def hf_config(cfg: ModelConfig, vocab_size: int, *, bos_id: int, eos_id: int):
    """The transformers config for a shape; ``vocab_size`` comes from the tokenizer."""
    if cfg.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_positions=cfg.max_position_embeddings, n_embd=cfg.d_model,
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff, activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
            bos_token_id=bos_id, eos_token_id=eos_id, use_cache=False,
        )
    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head, max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=cfg.init_std, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        bos_token_id=bos_id, eos_token_id=eos_id, use_cache=False,
    )


def build_model(cfg: ModelConfig, vocab_size: int, *, bos_id: int = 0, eos_id: int = 0,
                seed: int = 0) -> PreTrainedModel:
    """A freshly initialised causal LM of the configured shape (same seed, same weights)."""
    config = hf_config(cfg, vocab_size, bos_id=bos_id, eos_id=eos_id)
    config._attn_implementation = "sdpa"
    model_cls = GPT2LMHeadModel if cfg.family == "gpt2" else LlamaForCausalLM
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters, counting tied embeddings once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def per_token_loss(model: nn.Module, input_ids: Tensor, targets: Tensor) -> Tensor:
    """[B, T] next-token cross-entropy of every position (nats), computed in float32."""
    logits = model(input_ids=input_ids).logits  # [B, T, V]
    token_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    return token_loss.view(targets.shape)


def per_sample_loss(model: nn.Module, input_ids: Tensor, targets: Tensor) -> Tensor:
    """[B] mean next-token cross-entropy of each sequence (nats), computed in float32."""
    return per_token_loss(model, input_ids, targets).mean(dim=1)


def format_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)
