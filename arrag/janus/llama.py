"""A compact decoder-only Llama with a preallocated static KV cache and one FAiD hook point per layer.

Parameter names are transformers' Llama names, so Janus-Pro's `language_model.model.*` weights load
unchanged. Attention is grouped-query through scaled_dot_product_attention. The cache is allocated
once per generation; each step writes one slot per row and attends over a view, never concatenating.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from arrag.janus.config import LlamaConfig

# hook(hidden after attention [B,T,D], normed layer input [B,T,D], layer index, the forward's context)
# -> new hidden [B,T,D]. The context is whatever the caller passed to LlamaModel.forward (FAiD: its
# retrieved candidates); a hook given None does nothing.
AfterAttentionHook = Callable[[torch.Tensor, torch.Tensor, int, object], torch.Tensor]


class DecodeLinear(nn.Linear):
    """nn.Linear with a faster CPU path for the few rows of a decode step.

    For x with <= 16 rows, MKL's sgemm for [rows, K] @ W^T is 2-3x slower than W @ x^T when W does not
    fit in cache (measured on a 2-core x86 machine: a 16384x512 head takes 12.2 ms as F.linear and
    5.7 ms as W @ x^T). Same parameters and names; other devices and shapes use F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.numel() else 0
        if x.device.type != "cpu" or rows == 0 or rows > 16:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        y = torch.mm(self.weight, flat.T) if self.bias is None else torch.addmm(self.bias[:, None], self.weight, flat.T)
        # Back to row-major: attention kernels need a unit last-dim stride (else SDPA falls back to its slow path).
        return y.T.contiguous().reshape(*x.shape[:-1], self.out_features)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryTable:
    """cos and sin of every rotary position, [positions, head_dim] each, computed once per device and dtype.

    Llama's 'default' rope, as transformers computes it: inv_freq and the angles position * inv_freq in fp32;
    then cos and sin in float64 with NumPy, rounded once to the model's dtype. Not torch.cos: on CPUs, torch's
    cos runs MKL's vector math on several OpenMP threads, and the first such call in a process sometimes gives
    one thread's share at ~1e-4 error (tests/test_llama.py: the same seed gave other images about one call in
    eight in the suite). A table makes the angles' cos exact and independent of the thread count; each step
    then indexes it (no host sync, so a CUDA graph can replay it).
    """

    def __init__(self, head_dim: int, theta: float):
        self.head_dim, self.theta = head_dim, theta
        self.length = 0
        self.tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def _compute(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        inv_freq = (1.0 / (self.theta ** exponent)).numpy()  # fp32, as transformers' LlamaRotaryEmbedding
        angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq  # fp32 products, as its matmul's
        angles = np.concatenate([angles, angles], axis=1).astype(np.float64)
        return np.cos(angles), np.sin(angles)

    def get(self, length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [>= length, head_dim] on `device` in `dtype`."""
        if length > self.length:  # grows in powers of two: a few recomputations over a model's life at most
            self.length = max(length, 2 * self.length, 256)
            self.tables.clear()
        key = (torch.device(device), dtype)
        if key not in self.tables:
            cos, sin = self._compute(self.length)
            self.tables[key] = tuple(torch.from_numpy(a).to(device=device, dtype=dtype) for a in (cos, sin))
        return self.tables[key]

    def __call__(self, positions: torch.Tensor, length: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [B, 1, T, head_dim] for integer positions [B, T], all < length."""
        cos, sin = self.get(length, positions.device, dtype)
        return cos[positions][:, None], sin[positions][:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values for every layer, preallocated: [layers, B, kv_heads, max_len, head_dim].

    `key_mask[b, s]` says whether slot s of row b holds a real token (left padding does not);
    `next_pos[b]` is the rotary position of row b's next real token.
    """

    def __init__(self, cfg: LlamaConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = 0
        self.padded = False  # any masked slot so far: decode steps can skip the mask when False

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = DecodeLinear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = DecodeLinear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = DecodeLinear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = DecodeLinear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, layer_idx: int,
                slot: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if slot is not None:  # static decode step: write slot `slot`, attend over every slot through the mask
            cache.k[layer_idx].index_copy_(2, slot, k)
            cache.v[layer_idx].index_copy_(2, slot, v)
            k, v = cache.k[layer_idx], cache.v[layer_idx]
        elif cache is not None:
            s0 = cache.length
            cache.k[layer_idx, :, :, s0:s0 + t] = k
            cache.v[layer_idx, :, :, s0:s0 + t] = v
            k, v = cache.k[layer_idx, :, :, :s0 + t], cache.v[layer_idx, :, :, :s0 + t]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False,
                                             enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = DecodeLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = DecodeLinear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = DecodeLinear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        # The hook point: called after attention and before the MLP. FAiD adds its features here.
        self.after_attention: AfterAttentionHook | None = None

    def forward(self, x, cos, sin, attn_mask, cache, context=None, slot=None):
        normed = self.input_layernorm(x)
        h = x + self.self_attn(normed, cos, sin, attn_mask, cache, self.layer_idx, slot)
        if self.after_attention is not None and context is not None:
            h = self.after_attention(h, normed, self.layer_idx, context)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    """Token embeddings, decoder layers and the final norm; returns final-normed hidden states."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryTable(cfg.head_dim, cfg.rope_theta)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        w = self.embed_tokens.weight
        self.rotary.get(max_len, w.device, w.dtype)  # now, not inside a CUDA graph's capture
        return KVCache(self.config, batch, max_len, w.device, w.dtype)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, context: object = None) -> torch.Tensor:
        """inputs_embeds [B, T, D], attention_mask bool [B, T] (False = left padding) -> hidden [B, T, D].

        With a cache, the T tokens go to the next T slots and attend to everything cached before them.
        Rotary positions count only real tokens, so a left-padded row equals the same prompt run alone.
        `context` goes to every layer's after-attention hook for this pass only (FAiD's candidates).
        """
        b, t, _ = inputs_embeds.shape
        dev = inputs_embeds.device
        mask = torch.ones(b, t, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        start = cache.next_pos[:, None] if cache is not None else 0
        positions = (start + mask.long().cumsum(1) - 1).clamp_min(0)
        s0 = cache.length if cache is not None else 0
        if cache is not None:
            if s0 + t > cache.max_len:
                raise RuntimeError(f"KV cache full: {s0} + {t} tokens > {cache.max_len} slots")
            cache.key_mask[:, s0:s0 + t] = mask
            cache.next_pos += mask.long().sum(1)
            cache.padded = cache.padded or attention_mask is not None and not bool(mask.all())
            key_mask, padded = cache.key_mask[:, :s0 + t], cache.padded
        else:
            key_mask, padded = mask, attention_mask is not None and not bool(mask.all())
        attn_mask = None
        if t > 1 or padded:
            # Causal over slots, masked keys dropped; each query always sees itself (no empty softmax rows).
            q_slot = torch.arange(s0, s0 + t, device=dev)[:, None]
            k_slot = torch.arange(s0 + t, device=dev)[None, :]
            attn_mask = ((k_slot <= q_slot)[None] & key_mask[:, None, :]) | (k_slot == q_slot)[None]
            attn_mask = attn_mask[:, None]  # [B, 1, T, S]
        # every position is below the slot count: rows count only their real tokens
        cos, sin = self.rotary(positions, s0 + t, inputs_embeds.dtype)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache, context)
        if cache is not None:
            cache.length += t
        return self.norm(h)

    def decode_static(self, inputs_embeds: torch.Tensor, cache: KVCache, slot: torch.Tensor,
                      context: object = None) -> torch.Tensor:
        """One token per row [B, 1, D] into cache slot `slot` (Long [1], a tensor) -> hidden [B, 1, D].

        Every shape is fixed and no value is read back to the host: each layer writes its key and value with
        index_copy_ and attends over all max_len slots through the key mask (slots not yet written are
        masked), so the step can be captured as a CUDA graph and replayed. The same numbers as forward()
        on the same cache, up to float rounding. cache.length is left alone: the caller owns `slot`.
        """
        # this token's rotary position (a left-padded row's own), taken before the counter moves on
        cos, sin = self.rotary(cache.next_pos[:, None], cache.max_len, inputs_embeds.dtype)
        cache.key_mask.index_fill_(1, slot, True)
        cache.next_pos += 1
        attn_mask = cache.key_mask[:, None, None, :]  # [B, 1, 1, S]
        h = inputs_embeds
        for layer in self.layers:
            h = layer(h, cos, sin, attn_mask, cache, context, slot)
        return self.norm(h)


class LlamaCausalLM(nn.Module):
    """Holder that gives the decoder Janus's key prefix `language_model.model.*` (lm_head is not used for T2I)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.model = LlamaModel(cfg)
