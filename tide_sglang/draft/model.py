"""`Eagle3Draft`: the EAGLE-3 draft in plain PyTorch, parameter for parameter SGLang's `LlamaForCausalLMEagle3`.

    fused = fc(aux)                                   # [.., K*Ht] -> [.., H]; skipped for the draft's own state
    x     = cat(input_layernorm(embed(ids)), hidden_norm(fused))           # [.., 2H]
    h     = fused + o_proj(attention(x))              # q/k/v read 2H, rope at the token's position
    out   = h + mlp(post_attention_layernorm(h))      # the state fed back at the next draft step
    logits = lm_head(norm(out))                       # [.., Vd] over the draft vocabulary; d2t maps to target ids

Saved names are the EAGLE-3 checkpoint names (`fc.weight`, `midlayer.*`, `norm.weight`, `lm_head.weight`,
`d2t`, `t2d`); SGLang maps `midlayer` to `layers.0` and prefixes `model.`. `embed_tokens` is the target's,
frozen and never saved: SGLang hands the draft the target's embedding at load time.

Two forwards share the layer: `unroll` (training-time test: the draft runs k steps on its own states, each step
attending to the real prefix plus its own earlier steps at the same row) and `step` (inference with a
position-indexed KV cache, as the reference engine drafts a chain).
"""

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from tide_sglang.draft.config import DraftConfig
from tide_sglang.draft.vocab import DraftVocab

NOT_SAVED = ("embed_tokens.weight",)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # normalise in fp32, as SGLang does
        return self.weight * h.to(x.dtype)


def rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, hd] for integer positions [B, T] (neox layout, as Llama)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq  # [B, T, hd/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
    return emb.cos()[:, None], emb.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.theta = (
            c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rope_theta)
        self.q_proj = nn.Linear(2 * c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(2 * c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, 2H], positions [B, T] -> q [B, nh, T, hd], k and v [B, nh, T, hd] (kv heads repeated)."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope(positions, self.head_dim, self.theta)
        group = self.heads // self.kv_heads
        k = apply_rope(k, cos, sin).repeat_interleave(group, dim=1)
        return apply_rope(q, cos, sin), k, v.repeat_interleave(group, dim=1)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))  # [B, T, H]


class MLP(nn.Module):
    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """SGLang's EAGLE-3 input layer: attention reads the normed embedding and normed fused state side by side."""

    def __init__(self, c: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def finish(self, attn_out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = attn_out + residual  # [B, T, H]
        return h + self.mlp(self.post_attention_layernorm(h))


class DraftOutput(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    logits: torch.Tensor  # [B, T, Vd] over the draft vocabulary
    hidden: torch.Tensor  # [B, T, H] pre-norm state: the `hidden` input of the next draft step


def ttt_attention(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor],
                  valid: torch.Tensor) -> torch.Tensor:
    """Training-time-test attention at unroll step j = len(keys) - 1.

    q [B, nh, T, hd]; keys[0]/values[0] [B, nh, T, hd] are step 0's (the real prefix, causal); keys[i>0] are the
    draft's own step-i states *at the same row*, which is what the draft's KV cache holds at inference when it
    drafts i tokens past row t. valid [B, T] masks padded rows out of the keys.
    """
    t = q.shape[2]
    scale = 1.0 / math.sqrt(q.shape[-1])
    causal = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()  # [T, T]
    mask = causal[None, None] & valid[:, None, None, :]  # [B, 1, T, T]
    prefix = (q @ keys[0].transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))  # [B, nh, T, T]
    own = [(q * k).sum(-1, keepdim=True) * scale for k in keys[1:]]  # j x [B, nh, T, 1]
    p = torch.softmax(torch.cat([prefix, *own], dim=-1).float(), dim=-1).to(q.dtype)  # [B, nh, T, T+j]
    o = p[..., :t] @ values[0]  # [B, nh, T, hd]
    for i, v in enumerate(values[1:]):
        o = o + p[..., t + i : t + i + 1] * v
    return o


class DraftCache:
    """Position-indexed KV cache for chain drafting: slot p holds the key/value of the token at position p.

    Re-running positions after a verify overwrites rejected draft slots, so no rollback is needed. Positions < 0
    mark padding rows, which are neither written nor attended to.
    """

    def __init__(self, config: DraftConfig, batch: int, max_len: int, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        shape = (batch, config.num_attention_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # [B, nh, S, hd]
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.filled = torch.zeros(batch, max_len, device=device, dtype=torch.bool)  # [B, S]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Write k/v [B, nh, T, hd] at positions [B, T], then attend q to every filled slot <= its position."""
        if int(positions.max()) >= self.k.shape[2]:
            raise ValueError(f"position {int(positions.max())} is beyond the cache length {self.k.shape[2]}")
        b_idx, t_idx = (positions >= 0).nonzero(as_tuple=True)
        slots = positions[b_idx, t_idx]
        self.k[b_idx, :, slots] = k[b_idx, :, t_idx].to(self.k.dtype)
        self.v[b_idx, :, slots] = v[b_idx, :, t_idx].to(self.v.dtype)
        self.filled[b_idx, slots] = True
        slot_pos = torch.arange(self.k.shape[2], device=q.device)  # [S]
        mask = (slot_pos[None, None] <= positions[..., None]) & self.filled[:, None]  # [B, T, S]
        mask = mask | (positions[..., None] < 0)  # padding rows: any finite output, ignored by the caller
        scale = 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ self.k.to(q.dtype).transpose(-1, -2) * scale).masked_fill(~mask[:, None], float("-inf"))
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ self.v.to(q.dtype)  # [B, nh, T, hd]


class Eagle3Draft(nn.Module):
    def __init__(self, config: DraftConfig, vocab: DraftVocab) -> None:
        super().__init__()
        if vocab.size != config.draft_vocab_size or vocab.vocab_size != config.vocab_size:
            raise ValueError(f"vocabulary ({vocab.size} of {vocab.vocab_size}) does not match the config "
                             f"({config.draft_vocab_size} of {config.vocab_size})")
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.requires_grad_(False)  # the target's embedding, shared by SGLang: never trained
        self.fc = nn.Linear(config.aux_layers * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = DecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", vocab.d2t)  # [Vd] int64
        self.register_buffer("t2d", vocab.t2d)  # [V] bool
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    @property
    def vocab(self) -> DraftVocab:
        return DraftVocab.from_d2t(self.d2t.cpu(), self.config.vocab_size)

    def draft_index(self) -> torch.Tensor:
        """[V] int64 on the draft's device: the draft id of each target token, -1 where the draft cannot propose
        it (built from d2t where it lives: `vocab` would read d2t back to the host)."""
        ids = torch.arange(self.d2t.numel(), device=self.d2t.device)
        index = torch.full((self.config.vocab_size,), -1, dtype=torch.int64, device=self.d2t.device)
        return index.index_put_((ids + self.d2t,), ids)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def _begin(self, hidden: torch.Tensor, input_ids: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fuse (project aux states when they are K*Ht wide, as SGLang does) and compute q/k/v."""
        if hidden.shape[-1] != self.config.hidden_size:
            hidden = self.fc(hidden.to(self.fc.weight.dtype))  # [B, T, K*Ht] -> [B, T, H]
        layer = self.midlayer
        embeds = self.embed_tokens(input_ids).to(hidden.dtype)  # [B, T, H]
        x = torch.cat([layer.input_layernorm(embeds), layer.hidden_norm(hidden)], dim=-1)  # [B, T, 2H]
        q, k, v = layer.self_attn.qkv(x, positions)
        return q, k, v, hidden

    def _end(self, o: torch.Tensor, residual: torch.Tensor) -> DraftOutput:
        hidden = self.midlayer.finish(self.midlayer.self_attn.out(o), residual)  # [B, T, H]
        return DraftOutput(logits=self.lm_head(self.norm(hidden)), hidden=hidden)

    def unroll(self, aux: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, steps: int,
               valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Training-time test over captured rows; returns the logits [B, T, Vd] of each of `steps` steps.

        aux [B, T, K*Ht]: the target's state at positions [B, T]; input_ids [B, T]: the token the target emitted
        after each row. Step j at row t reads token input_ids[t+j] and (for j > 0) its own step j-1 state, so its
        logits predict input_ids[t+j+1]. Rows past the end read a pad token; the loss masks them.
        """
        valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid
        hidden, keys, values, logits = aux, [], [], []
        for j in range(steps):
            ids = F.pad(input_ids[:, j:], (0, j))  # [B, T]: the token j rows ahead, 0 past the end
            q, k, v, residual = self._begin(hidden, ids, positions + j)
            keys.append(k)
            values.append(v)
            out = self._end(ttt_attention(q, keys, values, valid), residual)
            hidden = out.hidden
            logits.append(out.logits)
        return logits

    def forward(self, aux: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor, steps: int,
                valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        """`unroll`: the training forward, so that DistributedDataParallel can wrap the draft."""
        return self.unroll(aux, input_ids, positions, steps, valid)

    def step(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
             cache: DraftCache) -> DraftOutput:
        """One inference forward with the KV cache.

        After a verify: hidden = the target's aux states [B, T, K*Ht] of the accepted rows, input_ids [B, T] the
        tokens the target emitted after them, positions [B, T] (-1 pads). Then, per chain step: hidden = the last
        row's `DraftOutput.hidden` [B, 1, H], input_ids = its drafted token (a target id), positions + 1.
        """
        q, k, v, residual = self._begin(hidden, input_ids, positions)
        return self._end(cache.attend(q, k, v, positions), residual)

    def new_cache(self, batch: int, max_len: int) -> DraftCache:
        return DraftCache(self.config, batch, max_len, device=self.fc.weight.device, dtype=self.fc.weight.dtype)

    def draft_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: SGLang's names, weights in the config's dtype, maps as int64/bool."""
        dtype = self.config.dtype
        return {
            name: (t if name in ("d2t", "t2d") else t.to(dtype)).detach().cpu().contiguous()
            for name, t in self.state_dict().items()
            if name not in NOT_SAVED
        }

    @classmethod
    def from_tensors(cls, config: DraftConfig, tensors: dict[str, torch.Tensor],
                     embed: torch.Tensor) -> "Eagle3Draft":
        """Rebuild a draft from checkpoint tensors and the target's embedding [V, H]."""
        draft = cls(config, DraftVocab.from_d2t(tensors["d2t"], config.vocab_size))
        draft.load_state_dict({**tensors, "embed_tokens.weight": embed}, strict=True)
        return draft


def init_draft(config: DraftConfig, vocab: DraftVocab, embed: torch.Tensor, lm_head: torch.Tensor,
               norm: torch.Tensor) -> Eagle3Draft:
    """A fresh draft that starts from its target: embedding [V, H] (frozen), lm_head [V, H] rows of the draft
    vocabulary, and the final norm [H] those rows were trained behind. The rest is randomly initialised."""
    draft = Eagle3Draft(config, vocab)
    with torch.no_grad():
        draft.embed_tokens.weight.copy_(embed)
        draft.lm_head.weight.copy_(lm_head[vocab.token_ids])
        draft.norm.weight.copy_(norm)
    return draft


def checkpoint_shapes(c: DraftConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config holds, by SGLang/EAGLE-3 name (the verify() contract)."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    layer = "midlayer."
    return {
        "d2t": (c.draft_vocab_size,),
        "t2d": (c.vocab_size,),
        "fc.weight": (h, c.aux_layers * c.target_hidden_size),
        layer + "input_layernorm.weight": (h,),
        layer + "hidden_norm.weight": (h,),
        layer + "self_attn.q_proj.weight": (q, 2 * h),
        layer + "self_attn.k_proj.weight": (kv, 2 * h),
        layer + "self_attn.v_proj.weight": (kv, 2 * h),
        layer + "self_attn.o_proj.weight": (h, q),
        layer + "post_attention_layernorm.weight": (h,),
        layer + "mlp.gate_proj.weight": (c.intermediate_size, h),
        layer + "mlp.up_proj.weight": (c.intermediate_size, h),
        layer + "mlp.down_proj.weight": (h, c.intermediate_size),
        "norm.weight": (h,),
        "lm_head.weight": (c.draft_vocab_size, h),
    }


def checkpoint_dtype(name: str, c: DraftConfig) -> torch.dtype:
    return {"d2t": torch.int64, "t2d": torch.bool}.get(name, c.dtype)
