"""
A small DeepSeek-V3-style GPT: pre-norm blocks with RMSNorm, rotary attention, dense SwiGLU
MLPs in the first `n_dense_layers` blocks and the MoE layer of moe.py in the rest.

    from model import GPT, presets
    model = GPT(presets["cpu"])
    logits, loss, aux_loss = model(idx, targets)   # loss = cross-entropy + aux_loss

Attention is plain multi-head attention, not V3's multi-head latent attention: this repo is
about the MoE layer, and MLA would double the file without teaching anything about routing.
"""
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from moe import MLP, MoE, MoEConfig


@dataclass
class GPTConfig:
    block_size: int = 256        # context length, as in nanoGPT
    vocab_size: int = 256        # byte-level tokens by default (train.py's data="stdlib")
    n_layer: int = 4             # transformer blocks
    n_head: int = 4              # attention heads
    n_embd: int = 256            # model width; the MoE layers' dim follows it
    n_dense_layers: int = 1      # DeepSeek-V3 keeps its first 3 of 61 blocks dense
    inter_dim: int = 0           # dense MLP width; 0: (K + shared) * moe_inter_dim, as V3 (18432)
    rope_theta: float = 10000.0  # RoPE base, as in Llama and DeepSeek
    norm_eps: float = 1e-6       # RMSNorm epsilon, as in DeepSeek-V3
    init_std: float = 0.02       # nanoGPT's std (V3 uses 0.006 at width 7168)
    moe: MoEConfig = field(default_factory=MoEConfig)  # routed/shared experts, routing, balance

    def __post_init__(self):
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 2:
            raise ValueError(f"n_embd={self.n_embd} must split into n_head={self.n_head} "
                             "heads of even width (rotary embeddings)")
        if not 0 <= self.n_dense_layers <= self.n_layer:
            raise ValueError(f"n_dense_layers={self.n_dense_layers} must be in [0, n_layer={self.n_layer}]")
        self.moe = replace(self.moe, dim=self.n_embd)  # one width for the whole model
        if not self.inter_dim:
            m = self.moe
            self.inter_dim = (m.n_activated_experts + m.n_shared_experts) * m.moe_inter_dim


presets = {
    # a few seconds per run: tests and smoke runs
    "tiny": GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=32, n_dense_layers=1,
                      moe=MoEConfig(moe_inter_dim=16, n_routed_experts=8, n_activated_experts=2,
                                    n_shared_experts=1, n_expert_groups=2, n_limited_groups=1)),
    # learns visibly in a few minutes on 2 CPU cores: 1.7M parameters, 0.8M active per token
    "cpu": GPTConfig(block_size=256, n_layer=4, n_head=4, n_embd=128, n_dense_layers=1,
                     moe=MoEConfig(moe_inter_dim=64, n_routed_experts=16, n_activated_experts=4,
                                   n_shared_experts=1, n_expert_groups=4, n_limited_groups=2)),
    # one GPU: GPT-2-small width and depth, V3-like routing (8 groups, 4 kept, route_scale 2.5);
    # 456M parameters, 93M active per token
    "gpu": GPTConfig(block_size=1024, n_layer=12, n_head=12, n_embd=768, n_dense_layers=1,
                     moe=MoEConfig(moe_inter_dim=256, n_routed_experts=64, n_activated_experts=8,
                                   n_shared_experts=1, n_expert_groups=8, n_limited_groups=4,
                                   route_scale=2.5)),
    # DeepSeek-V2-Lite / Moonlight routing (64 routed, 6 active, 2 shared, 1 dense layer),
    # depth and width scaled down by 3 and 4
    "moonlight": GPTConfig(block_size=1024, n_layer=9, n_head=8, n_embd=512, n_dense_layers=1,
                           moe=MoEConfig(moe_inter_dim=352, n_routed_experts=64,
                                         n_activated_experts=6, n_shared_experts=2)),
}


def rope_cache(cfg: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (block_size, head_dim / 2) for rotary embeddings."""
    half = cfg.n_embd // cfg.n_head // 2
    freqs = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer(torch.arange(cfg.block_size, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate the two halves of each head (B, h, L, d) by position-dependent angles."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.wqkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=False)
        self.wo = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin):
        q, k, v = rearrange(self.wqkv(x), "b l (three h d) -> three b h l d",
                            three=3, h=self.n_head)                            # (B, h, L, d)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)            # (B, h, L, d)
        return self.wo(rearrange(y, "b h l d -> b l (h d)"))                   # (B, L, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_id: int):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        dense = layer_id < cfg.n_dense_layers
        self.ffn = MLP(cfg.n_embd, cfg.inter_dim) if dense else MoE(cfg.moe)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        if isinstance(self.ffn, MoE):
            h, aux_loss = self.ffn(self.ffn_norm(x))
        else:
            h, aux_loss = self.ffn(self.ffn_norm(x)), x.new_zeros((), dtype=torch.float32)
        return x + h, aux_loss


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        half = cfg.n_embd // cfg.n_head // 2
        self.register_buffer("rope_cos", torch.empty(cfg.block_size, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.block_size, half), persistent=False)
        self.reset_parameters()

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "GPT":
        """The model a train.py checkpoint holds (data.load_checkpoint reads the file)."""
        saved = ckpt["model_cfg"]
        model = cls(GPTConfig(**{**saved, "moe": MoEConfig(**saved["moe"])}))
        model.load_state_dict(ckpt["model"])
        return model

    @torch.no_grad()
    def reset_parameters(self):
        """Every value from scratch: Normal(0, init_std) for every matrix, residual outputs
        scaled by 1/sqrt(2 n_layer); RMSNorm weights 1; router biases and counts 0; the rotary
        tables. A model built under torch.device("meta") gets its values this way after
        to_empty(device=...)."""
        for m in self.modules():
            if isinstance(m, nn.RMSNorm):
                m.reset_parameters()
            elif isinstance(m, MoE):  # balance state starts at zero; its matrices are below
                m.gate.bias.zero_()
                m.tokens_per_expert.zero_()
        cos, sin = rope_cache(self.cfg)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            out_proj = name.endswith(("wo.weight", "w2.weight", "experts.w2"))
            nn.init.normal_(p, std=std / math.sqrt(2 * self.cfg.n_layer) if out_proj else std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, L) int64 -> logits (B, L, V), loss () or None, aux_loss () float32.

        loss = cross-entropy + aux_loss (the sum over MoE layers of the balance loss); it is
        returned separately so training can log both parts."""
        B, L = idx.shape
        if L > self.cfg.block_size:
            raise ValueError(f"sequence length {L} exceeds block_size={self.cfg.block_size}")
        cos, sin = self.rope_cos[:L], self.rope_sin[:L]
        x = self.embed(idx)                                                    # (B, L, C)
        aux_loss = torch.zeros((), device=idx.device)
        for layer in self.layers:
            x, aux = layer(x, cos, sin)
            aux_loss = aux_loss + aux
        if targets is None:  # inference: only the last position's logits are needed
            return self.head(self.norm(x[:, [-1]])).float(), None, aux_loss
        logits = self.head(self.norm(x)).float()                               # (B, L, V)
        ce = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, ce + aux_loss, aux_loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None):
        """Append max_new_tokens sampled tokens to idx (B, L); greedy when temperature == 0.
        Runs in eval mode, so sampling never adds to the experts' training counts."""
        was_training = self.training
        self.eval()
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.cfg.block_size:])[0][:, -1]             # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), num_samples=1)
            idx = torch.cat([idx, nxt], dim=1)
        self.train(was_training)
        return idx

    def count_eval_loads(self) -> torch.Tensor:
        """(n_moe_layers, E) int64 counts of the experts each MoE layer picks in eval-mode
        forwards (train.py's val heatmaps), added by a forward hook on every gate. Static
        shapes, so it compiles into the same graph; nothing is counted in training, where MoE
        itself counts for the bias. Zero it before each evaluation."""
        gates = [m.gate for m in self.modules() if isinstance(m, MoE)]
        loads = torch.zeros(len(gates), self.cfg.moe.n_routed_experts if gates else 0,
                            dtype=torch.long, device=self.head.weight.device)
        def count(i, gate, out):  # out = (weights, indices, scores) of gate i
            if not gate.training:
                picked = out[1].flatten()
                loads[i].index_add_(0, picked, torch.ones_like(picked))
        for i, g in enumerate(gates):
            g.register_forward_hook(lambda gate, inp, out, i=i: count(i, gate, out))
        return loads

    def num_params(self, active: bool = False) -> int:
        """Parameters, without the embedding table (a lookup, not a matmul). With active=True,
        only the K of E routed experts a token uses count: what a token actually costs."""
        n, m = sum(p.numel() for p in self.parameters()) - self.embed.weight.numel(), self.cfg.moe
        for layer in self.layers:
            if isinstance(layer.ffn, MoE):
                routed = 3 * m.n_routed_experts * m.dim * m.moe_inter_dim
                n += routed - sum(p.numel() for p in layer.ffn.experts.values())  # ep.py: a shard
                if active:
                    n -= routed * (m.n_routed_experts - m.n_activated_experts) // m.n_routed_experts
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token: 6 per active parameter (forward 2, backward 4) plus the
        attention scores and their weighted sum, which PaLM counts as 12 * n_layer * n_embd * L.
        Attention here is causal: query t sees t + 1 keys, (L + 1) / 2 on average, not L."""
        c, L = self.cfg, seq_len or self.cfg.block_size
        return 6 * self.num_params(active=True) + 6 * c.n_layer * c.n_embd * (L + 1)
