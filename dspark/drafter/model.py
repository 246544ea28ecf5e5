"""The DSpark drafter network: fused target taps -> a few decoder layers over one block ->
frozen target LM head, plus the Markov (semi-autoregressive) head and the confidence head.

Per block (anchor x0 at position a, K slots at positions a..a+K-1):

    H_ctx   = RMSNorm(W_fuse [f_1; ..; f_m])            context features, positions < a only
    x       = E([x0, MASK, .., MASK]) (+ W_d H_ctx[a-1])  target's frozen embeddings; MASK has
                                                        its own trained row; optional direct path
    h_1..K  = RMSNorm(layers(x | K/V(H_ctx<a), block bidirectional))
    U_k     = LM_head(h_k)                              target's frozen head (draft-vocab rows)
    Z_k     = U_k + W1[x_{k-1}] @ W2                     Markov bias, r = 0 -> none (DFlash)
    c_k     = sigmoid((w . [h_k; W1[x_{k-1}]] + b) / T_k + b_k)  confidence, fp32, T_k b_k calibrated

The embeddings and LM head are references to the target's modules, never registered here,
so `state_dict()` holds only what trains (plus small buffers).

Attention of the block slots is computed in two parts joined by one softmax: scores
against the context (masked to positions < a) and scores within the slot's own block. So a
training pass over N blocks costs N*K x (S + K) scores, never the (N*K)^2 block-to-block
matrix a single mask over [context ; all blocks] would need.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from dspark.drafter.config import DrafterConfig
from dspark.models.layers import MLP, RMSNorm, Rotary, apply_rotary
from dspark.models.transformer import CausalLM


class DrafterLayer(nn.Module):
    """Target-shaped decoder layer whose keys/values are [context features ; block]."""

    def __init__(self, cfg: DrafterConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps)
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, hd
        self.scale = hd ** -0.5

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        k = self.k_norm(self.k_proj(x).view(B, T, self.kv_heads, self.head_dim))
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim)
        return apply_rotary(k.transpose(1, 2), cos, sin), v.transpose(1, 2)  # (B, KVH, T, hd) each

    def context_kv(self, h_ctx: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of the (already normed) context features: this layer's own projections."""
        return self._kv(h_ctx, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx_k: torch.Tensor,
                ctx_v: torch.Tensor, ctx_mask: torch.Tensor, block_size: int) -> torch.Tensor:
        """x (B, N*K, d): N blocks of K slots; ctx_k/v (B, KVH, S, hd); ctx_mask (B, N*K, S)
        True = the slot may see that context position. Each slot also sees its own block's K
        slots (bidirectional) and nothing of other blocks."""
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_norm(self.q_proj(h).view(B, T, self.heads, self.head_dim))
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # (B, H, T, hd)
        k, v = self._kv(h, cos, sin)  # (B, KVH, T, hd)
        out = block_attention(q, k, v, ctx_k, ctx_v, ctx_mask, block_size, self.scale)  # (B, H, T, hd)
        x = x + self.o_proj(out.transpose(1, 2).reshape(B, T, -1))
        return x + self.mlp(self.post_attention_layernorm(x))


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor,
                    ctx_mask: torch.Tensor, K: int, scale: float) -> torch.Tensor:
    """q (B, H, N*K, hd); k, v (B, KVH, N*K, hd) block slots; ctx_k, ctx_v (B, KVH, S, hd);
    ctx_mask (B, N*K, S) bool -> (B, H, N*K, hd). One softmax over [context ; own block]."""
    B, H, T, hd = q.shape
    kvh, N = k.shape[1], T // K
    g = H // kvh
    qg = q.reshape(B, kvh, g, T, hd)  # query head h uses kv head h // g
    s_ctx = torch.einsum("bzgtd,bzsd->bzgts", qg, ctx_k).float() * scale  # (B, KVH, g, T, S)
    s_ctx = s_ctx.masked_fill(~ctx_mask[:, None, None], float("-inf"))
    qb = qg.reshape(B, kvh, g, N, K, hd)
    kb, vb = k.reshape(B, kvh, N, K, hd), v.reshape(B, kvh, N, K, hd)
    s_blk = torch.einsum("bzgnid,bznjd->bzgnij", qb, kb).float() * scale  # (B, KVH, g, N, K, K)
    probs = torch.softmax(torch.cat([s_ctx, s_blk.reshape(B, kvh, g, T, K)], dim=-1), dim=-1)
    p_ctx, p_blk = probs[..., :-K].to(v.dtype), probs[..., -K:].to(v.dtype)  # own block always seen: no NaN
    out = torch.einsum("bzgts,bzsd->bzgtd", p_ctx, ctx_v)
    out = out + torch.einsum("bzgnij,bznjd->bzgnid", p_blk.reshape(B, kvh, g, N, K, K), vb).reshape(out.shape)
    return out.reshape(B, H, T, hd)


@dataclasses.dataclass
class BlockOutput:
    hidden: torch.Tensor  # (B, N, K, d) final-normed block states h_k
    logits: torch.Tensor  # (B, N, K, Vd) Markov-corrected draft logits Z (teacher forced; bf16 under autocast)
    conf_logits: torch.Tensor | None  # (B, N, K) float32 raw confidence logits (before T_k)


class Drafter(nn.Module):
    def __init__(self, cfg: DrafterConfig, target: CausalLM) -> None:
        super().__init__()
        cfg.check_target(target.cfg)
        self.cfg = cfg
        object.__setattr__(self, "target", target)  # frozen reference, not a submodule
        d, m, r = cfg.hidden_size, len(cfg.taps), cfg.markov_rank
        self.fc = nn.Linear(m * d, d, bias=False)
        self.ctx_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        vd = cfg.num_draft_vocab
        if r > 0:
            self.markov_w1 = nn.Embedding(cfg.vocab_size, r)
            self.markov_w2 = nn.Linear(r, vd, bias=False)
            nn.init.normal_(self.markov_w1.weight, std=0.02)
            nn.init.zeros_(self.markov_w2.weight)  # start as the parallel drafter
        if cfg.confidence_head:
            self.conf = nn.Linear(d + r, 1)
        if cfg.dedicated_mask:  # its own row, set to the mean target embedding at training start
            self.mask_embedding = nn.Parameter(torch.zeros(d))
        if cfg.direct_path:
            self.direct = nn.Linear(d, d, bias=False)
        # Calibration (T_k, b_k) per position, fitted separately on sampled (T = 1) and greedy
        # rounds: acceptance at T = 0 is a different event from acceptance at T = 1.
        self.register_buffer("conf_temperature", torch.ones(cfg.block_size))
        self.register_buffer("conf_offset", torch.zeros(cfg.block_size))
        self.register_buffer("conf_temperature_greedy", torch.ones(cfg.block_size))
        self.register_buffer("conf_offset_greedy", torch.zeros(cfg.block_size))
        ids = torch.arange(vd) if cfg.draft_vocab_size is None else torch.zeros(vd, dtype=torch.long)
        self.register_buffer("draft_vocab_ids", ids)  # (Vd,) target ids of the draft vocabulary
        self.rope = Rotary(cfg.head_dim, cfg.rope_theta, cfg.max_position_embeddings)
        self._init_weights()

    def _init_weights(self) -> None:
        for mod in self.modules():
            if isinstance(mod, nn.Linear) and mod is not getattr(self, "markov_w2", None):
                nn.init.normal_(mod.weight, std=0.02)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
        if self.cfg.direct_path:
            nn.init.zeros_(self.direct.weight)  # starts as the paper's drafter
        if self.cfg.dedicated_mask:
            with torch.no_grad():
                self.mask_embedding.copy_(self.target.model.embed_tokens.weight.float().mean(0))

    @torch.no_grad()
    def init_layer_from_target(self, i: int, target_layer: int, identity: bool = True) -> None:
        """Start drafter layer `i` from target layer `target_layer`: its q/k/v, gate/up
        projections and pre-norms are copied (fused target projections split; biases, qk-norms
        and Gemma's extra norms have no counterpart and keep their defaults). With `identity`
        the layer's two residual outputs (`o_proj`, `down_proj`) start at zero, so the layer
        adds nothing until it trains: a drafter grown by such a layer drafts exactly as before
        (the stable way to add depth to a trained drafter); without it they are copied too."""
        src, dst = self.target.model.layers[target_layer], self.layers[i]
        attn = src.self_attn
        q, k, v = attn.qkv_proj.weight.split(attn.split, dim=0)
        gate, up = src.mlp.gate_up_proj.weight.chunk(2, dim=0)
        copies = [(dst.q_proj, q), (dst.k_proj, k), (dst.v_proj, v),
                  (dst.mlp.gate_proj, gate), (dst.mlp.up_proj, up)]
        if not identity:
            copies += [(dst.o_proj, attn.o_proj.weight), (dst.mlp.down_proj, src.mlp.down_proj.weight)]
        for mod, w in copies:
            mod.weight.copy_(w)
        for norm, tnorm in ((dst.input_layernorm, src.input_layernorm),
                            (dst.post_attention_layernorm,
                             src.pre_feedforward_layernorm if src.gemma else src.post_attention_layernorm)):
            norm.weight.copy_(tnorm.weight.float() + 1.0 if tnorm.gemma else tnorm.weight)
        if identity:
            dst.o_proj.weight.zero_()
            dst.mlp.down_proj.weight.zero_()

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def _rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope.cos.device != positions.device:
            self.rope.to(positions.device)
        return self.rope.tables(positions, self.dtype)

    # -- pieces shared by training and inference ------------------------------------------
    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, S, m, d) tapped target outputs -> H_ctx (B, S, d)."""
        return self.ctx_norm(self.fc(features.flatten(-2).to(self.dtype)))

    def context_kv(self, h_ctx: torch.Tensor,
                   positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each (B, KVH, S, hd), for context features at `positions` (B, S)."""
        cos, sin = self._rope(positions)
        return [layer.context_kv(h_ctx, cos, sin) for layer in self.layers]

    def embed_block(self, block_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) block ids -> (B, T, d): the target's frozen embeddings; a dedicated MASK
        id (>= vocab size, so no text produces it) takes the drafter's own trained row."""
        if not self.cfg.dedicated_mask:
            with torch.no_grad():
                return self.target.embed(block_ids).to(self.dtype)
        is_mask = block_ids == self.cfg.mask_token_id
        with torch.no_grad():
            x = self.target.embed(block_ids.masked_fill(is_mask, 0)).to(self.dtype)
        return torch.where(is_mask[..., None], self.mask_embedding.to(x.dtype), x)

    def backbone(self, block_ids: torch.Tensor, positions: torch.Tensor,
                 ctx_kv: list[tuple[torch.Tensor, torch.Tensor]], ctx_mask: torch.Tensor,
                 last_ctx: torch.Tensor | None = None) -> torch.Tensor:
        """block_ids/positions (B, N*K); ctx_mask (B, N*K, S); last_ctx (B, N, d) the fused
        feature at a_n - 1 (direct path only) -> final-normed h (B, N*K, d)."""
        K = self.cfg.block_size
        x = self.embed_block(block_ids)
        if self.cfg.direct_path:
            B, T, d = x.shape
            x = (x.view(B, T // K, K, d) + self.direct(last_ctx.to(x.dtype))[:, :, None]).view(B, T, d)
        cos, sin = self._rope(positions)
        for layer, (k, v) in zip(self.layers, ctx_kv, strict=True):
            x = layer(x, cos, sin, k, v, ctx_mask, K)
        return self.norm(x)

    def head_weight(self) -> torch.Tensor:
        """(Vd, d) rows of the target's frozen LM head (a view when the vocab is full).

        A restricted head is gathered once and reused while neither the target weight nor
        the id list changes (gathering it every round would cost a full head read)."""
        w = self.target.lm_head.weight.detach()
        if self.cfg.draft_vocab_size is None:
            return w
        ids = self.draft_vocab_ids
        key = (w.data_ptr(), w._version, w.dtype, ids.data_ptr(), ids._version)
        cached = self.__dict__.get("_head_rows")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # a normal tensor, usable with autograd
                cached = (key, w[self.draft_vocab_ids.clone()])
            self.__dict__["_head_rows"] = cached
        return cached[1]

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """U = LM_head(h): (..., d) -> (..., Vd) float32."""
        w = self.head_weight()
        return (h.to(w.dtype) @ w.T).float()

    def markov_bias(self, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """B = W1[x_prev] @ W2: (...) -> (..., Vd) float32; None when r = 0."""
        if self.cfg.markov_rank == 0:
            return None
        return self.markov_w2(self.markov_w1(prev_ids)).float()

    def confidence_logits(self, h: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor | None:
        """z = w . [h; W1[x_prev]] + b in float32: (..., d), (...) -> (...)."""
        if not self.cfg.confidence_head:
            return None
        parts = [h.float()]
        if self.cfg.markov_rank > 0:
            parts.append(self.markov_w1(prev_ids).float())
        feats = torch.cat(parts, dim=-1)
        return nn.functional.linear(feats, self.conf.weight.float(), self.conf.bias.float()).squeeze(-1)

    def calibrated(self, conf_logits: torch.Tensor, greedy: bool | torch.Tensor = False) -> torch.Tensor:
        """c_k = sigmoid(z_k / T_k + b_k); conf_logits (..., k) with k <= K; `greedy` (bool, or
        (...) bool per row) picks the calibration fitted on greedy rounds."""
        k = conf_logits.shape[-1]
        g = torch.as_tensor(greedy, device=conf_logits.device)[..., None]  # (..., 1)
        t = torch.where(g, self.conf_temperature_greedy[:k], self.conf_temperature[:k]).float()
        b = torch.where(g, self.conf_offset_greedy[:k], self.conf_offset[:k]).float()
        return torch.sigmoid(conf_logits / t + b)

    def to_full_vocab(self, z: torch.Tensor) -> torch.Tensor:
        """(..., Vd) -> (..., V) with -inf for tokens outside the draft vocabulary (p_d = 0)."""
        if self.cfg.draft_vocab_size is None:
            return z
        full = z.new_full((*z.shape[:-1], self.cfg.vocab_size), float("-inf"))
        return full.index_copy(-1, self.draft_vocab_ids, z)

    def to_full_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> target token ids."""
        return idx if self.cfg.draft_vocab_size is None else self.draft_vocab_ids[idx]

    def block_ids(self, anchors: torch.Tensor) -> torch.Tensor:
        """anchors (...) token ids -> (..., K) = [x0, MASK, .., MASK]."""
        K = self.cfg.block_size
        ids = anchors.new_full((*anchors.shape, K), self.cfg.mask_token_id)
        ids[..., 0] = anchors
        return ids

    # -- training: many anchors per sequence in one pass ----------------------------------
    def forward_train(self, features: torch.Tensor, input_ids: torch.Tensor,
                      anchors: torch.Tensor) -> BlockOutput:
        """features (B, S, m, d); input_ids (B, S); anchors (B, N) sorted positions.

        Block n's queries see context positions p < a_n and the K slots of block n only.
        Every row sees its own block, so no attention row is fully masked. Autocast (bf16)
        applies to the matmuls; logits, softmax and losses stay float32.
        """
        B, S = input_ids.shape
        N, K = anchors.shape[1], self.cfg.block_size
        dev = input_ids.device
        pos_ctx = torch.arange(S, device=dev).expand(B, S)
        h_ctx = self.fuse(features)  # (B, S, d)
        ctx_kv = self.context_kv(h_ctx, pos_ctx)
        j = torch.arange(K, device=dev)
        block_pos = anchors[:, :, None] + j  # (B, N, K): slot j sits at a_n + j
        anchor_ids = input_ids.gather(1, anchors)  # (B, N)
        block = self.block_ids(anchor_ids)  # (B, N, K)
        see_ctx = pos_ctx[:, None, :] < anchors[:, :, None]  # (B, N, S)
        see_ctx = see_ctx[:, :, None, :].expand(B, N, K, S).reshape(B, N * K, S)
        last = None
        if self.cfg.direct_path:  # H_ctx at a_n - 1 (anchors are >= 1: the prompt comes first)
            rows = (anchors - 1).clamp(min=0)[:, :, None].expand(B, N, h_ctx.shape[-1])
            last = h_ctx.gather(1, rows)  # (B, N, d)
        h = self.backbone(block.view(B, N * K), block_pos.view(B, N * K), ctx_kv, see_ctx, last)
        h = h.view(B, N, K, -1)  # (B, N, K, d)
        prev = input_ids.gather(1, block_pos.clamp(max=S - 1).view(B, N * K)).view(B, N, K)  # x at a+j
        return BlockOutput(hidden=h, logits=self.teacher_forced_logits(h, prev),
                           conf_logits=self.confidence_logits(h, prev))

    def teacher_forced_logits(self, h: torch.Tensor, prev_ids: torch.Tensor) -> torch.Tensor:
        """Z = U + W1[x_prev] @ W2 for every slot at once, as ONE matmul of [h ; W1[x_prev]]
        against [head rows ; W2^T]: (..., d), (...) -> (..., Vd) in the compute dtype (bf16
        under autocast); the loss upcasts chunk by chunk."""
        w = self.head_weight()
        if self.cfg.markov_rank == 0:
            return nn.functional.linear(h if torch.is_autocast_enabled() else h.to(w.dtype), w)
        dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled() else self.markov_w2.weight.dtype
        feats = torch.cat([h.to(dtype), self.markov_w1(prev_ids).to(dtype)], dim=-1)  # (..., d + r)
        weight = torch.cat([w.to(dtype), self.markov_w2.weight.to(dtype)], dim=-1)  # (Vd, d + r)
        return nn.functional.linear(feats, weight)
