"""
The DeepSeek-V3 Mixture-of-Experts layer, in one file.

    python moe.py                   # a tour: the layer on 8 tokens, every step printed
    from moe import MoE, MoEConfig, update_bias
    layer = MoE(MoEConfig(dim=256, moe_inter_dim=128))
    y, aux_loss = layer(x)          # x: (B, L, dim)
    ...; optimizer.step(); update_bias(model)   # once per optimizer step

Math ([V3] = DeepSeek-V3 report, [LF] = aux-loss-free paper; see shared/reference):
    s_{i,t} = sigmoid(u_t . e_i)                               [V3 eq. 15]
    picked  = TopK_K(s_{i,t} + b_i), within the best M groups   [V3 eq. 16, 2.1.2]
    g_{i,t} = route_scale * s_{i,t} / sum_{j in picked} s_{j,t}  [V3 eq. 13-14]
    h_t     = sum_shared FFN(u_t) + sum_{i in picked} g_{i,t} FFN_i(u_t)   [V3 eq. 12]
    b_i    += gamma * sign(mean load - load_i), after each optimizer step  [LF Alg. 1]
    L_bal   = alpha * sum_i f_i P_i, per sequence, averaged     [V3 eq. 17-20]

Router families, by config (all take the bias, groups and balance loss alike):
    score_func  norm_topk_prob  groups rule (G > 1)     reproduces
    sigmoid     None (= True)   sum of top-2 per group  DeepSeek-V3 (route_scale 2.5, G=8, M=4)
    softmax     None (= False)  best score per group    DeepSeek-V2 / V2-Lite, DeepSeekMoE
    softmax     True            -                       Qwen3-MoE, Mixtral, OLMoE (G=1, no shared)

Design notes, each choice with its reason:
- Sigmoid scores (V3) are independent per expert, so the bias can shift one expert without
  moving the others. The bias only decides WHO is picked; gate values use the unbiased
  scores, or the balancer would also change how much each expert contributes (trap 1).
- Router math in float32, and the bias a float32 buffer that stays float32 (and exact) when
  the module is cast or loaded: bf16 cannot hold 1e-3 steps on a bias of order 1 (trap 3).
- Excluded groups are masked with -inf, never 0: with negative biases a 0 would win (trap 2).
- Top-1 with renormalisation is refused: every gate value would be route_scale, so the LM
  loss would never reach the router.
- Dropless: every token gets exactly K experts, so there are always T*K routed rows, no
  capacity factor, static shapes, and no grouped-GEMM row left uninitialised (trap 9).
- Dispatch "grouped": stable-sort the T*K (token, expert) pairs by expert, gather the rows,
  and run ONE grouped matmul per projection over per-expert segments whose int32 ends come
  from on-device counts. No .item(), nonzero or Python loop over experts: forward and
  backward compile to one graph that does not change when routing does. The layer reads no
  value on the host; torch's grouped matmul does, once per call, on CUDA unless the dtype is
  bf16 and the GPU is of compute capability 9.x or 10.x (grouped_mm_path says which).
- Grouped GEMM ignores autocast (trap 11): the layer casts to the autocast dtype itself.
  torch's native grouped matmul is bf16-only under compile; `grouped_mm` is the one place
  that chooses: native where it works, else a small custom op with a per-expert loop.
- Measured (bench.py; docs/gpu.md, docs/cpu-performance.md): on an H200, Qwen3-30B-A3B's
  layer at 32k tokens, compiled grouped fwd+bwd, runs at 406 TFLOP/s, 0.68 of the same
  matmuls done dense. On a CPU torch's grouped matmul is itself a loop over experts, no
  faster than the "loop" dispatch: the grouped one is for compile and the GPU.
- Dispatch "loop": the per-expert loop of the official inference code, the easiest thing to
  read; the oracle in the tests and the bench baseline.
- Balance state lives in buffers (bias, tokens_per_expert); the update is an explicit call
  from the training loop. Loads are counted only in training, summed over micro-batches and
  ranks, and not again when activation checkpointing re-runs the forward in the backward
  (but a recompute can flip a near-tie in the router: trap 12).
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class MoEConfig:
    dim: int = 256                   # model width D
    moe_inter_dim: int = 128         # width H of one routed expert (fine-grained: small)
    n_routed_experts: int = 16       # E
    n_activated_experts: int = 4     # K, experts per token (top-k)
    n_shared_experts: int = 1        # shared experts, fused into one MLP of width n*H
    n_expert_groups: int = 1         # G groups of experts (V3: 8, one per node)
    n_limited_groups: int = 1        # M groups a token may use (V3: 4)
    score_func: str = "sigmoid"      # "sigmoid" (V3) or "softmax" (V2, Qwen3-MoE, Mixtral)
    norm_topk_prob: bool | None = None  # renormalise over the picks; None: sigmoid yes, softmax no
    route_scale: float = 1.0         # V3 671B uses 2.5
    bias_update_speed: float = 1e-3  # gamma [LF, V3]
    seq_aux_alpha: float = 1e-4      # alpha of the sequence-wise balance loss [V3]
    aux_scope: str = "sequence"      # "sequence" (V3 eq. 17-20) or "batch": one forward's tokens
    dispatch: str = "grouped"        # "grouped" (sorted tokens + grouped GEMM) or "loop"

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"MoEConfig: {msg}")
        for name in ("dim", "moe_inter_dim", "n_routed_experts", "n_activated_experts",
                     "n_expert_groups", "n_limited_groups"):
            if getattr(self, name) < 1:
                bad(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("n_shared_experts", "route_scale", "bias_update_speed", "seq_aux_alpha"):
            if getattr(self, name) < 0:
                bad(f"{name}={getattr(self, name)} must be >= 0")
        E, K, G, M = (self.n_routed_experts, self.n_activated_experts,
                      self.n_expert_groups, self.n_limited_groups)
        if K > E:
            bad(f"n_activated_experts={K} exceeds n_routed_experts={E}")
        if E % G:
            bad(f"n_expert_groups={G} does not divide n_routed_experts={E}")
        if M > G:
            bad(f"n_limited_groups={M} exceeds n_expert_groups={G}")
        if M * (E // G) < K:
            bad(f"n_limited_groups={M} groups of {E // G} experts hold fewer than "
                f"n_activated_experts={K}")
        for name in ("dim", "moe_inter_dim"):  # grouped GEMM wants 16-byte strides (trap 10)
            if getattr(self, name) % 8:
                bad(f"{name}={getattr(self, name)} must be a multiple of 8 for grouped GEMM")
        for name, ok in (("score_func", ("sigmoid", "softmax")), ("dispatch", ("grouped", "loop")),
                         ("aux_scope", ("sequence", "batch")), ("norm_topk_prob", (None, True, False))):
            if getattr(self, name) not in ok:
                bad(f"{name}={getattr(self, name)!r} is not one of {ok}")
        if K == 1 and self.renormalize:
            bad(f"n_activated_experts=1 with norm_topk_prob={self.norm_topk_prob} ({self.score_func}) "
                "makes every gate value route_scale, so the router would get no gradient; "
                "set norm_topk_prob=False")

    @property
    def renormalize(self) -> bool:
        """Whether gate values are normalised over the K picks [V3 eq. 13]."""
        return self.score_func == "sigmoid" if self.norm_topk_prob is None else self.norm_topk_prob


class Gate(nn.Module):
    """Router: who is picked (biased scores, group-limited) and with what weight (unbiased)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # the aux-loss-free bias: float32, no gradient, saved in the state_dict
        self.register_buffer("bias", torch.empty(cfg.n_routed_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self):
        _fan_in_uniform(self.weight)
        nn.init.zeros_(self.bias)

    def _apply(self, fn, recurse=True):
        bias = self.bias  # .to(bf16) must not round the bias: redo a cast from the fp32 original
        super()._apply(fn, recurse)
        if self.bias.dtype != torch.float32:  # a meta tensor holds no value to keep
            meta = bias.is_meta or self.bias.is_meta
            self.bias = self.bias.float() if meta else bias.to(self.bias.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.bias = self.bias.float()  # load_state_dict(assign=True) may bring a bf16 bias

    def forward(self, x):
        """x (T, D) -> weights (T, K) fp32, indices (T, K) int64, scores (T, E) fp32."""
        cfg = self.cfg
        T, G = x.shape[0], cfg.n_expert_groups
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())                 # (T, E)
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(-1)
        biased = scores.detach() + self.bias                                  # selection only
        if G > 1:
            groups = biased.view(T, G, -1)                                    # (T, G, E/G)
            if cfg.score_func == "sigmoid":  # V3: the sum of each group's top-2 scores
                group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1).values.sum(-1)
            else:                            # V2: each group's highest affinity
                group_scores = groups.amax(-1)                                # (T, G)
            keep = group_scores.topk(cfg.n_limited_groups, dim=-1).indices    # (T, M)
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter(1, keep, False)
            biased = groups.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = biased.topk(cfg.n_activated_experts, dim=-1).indices       # (T, K)
        weights = scores.gather(1, indices)                                  # unbiased values
        if cfg.renormalize:  # tiny epsilon: picks that all underflow to 0 give 0, not NaN
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * cfg.route_scale, indices, scores


class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). Shared experts and dense layers."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)  # gate projection
        self.w2 = nn.Linear(inter_dim, dim, bias=False)  # down projection
        self.w3 = nn.Linear(dim, inter_dim, bias=False)  # up projection

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Shared experts on every token + K of E fine-grained routed experts, dropless."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        E, D, H = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.gate = Gate(cfg)
        self.experts = nn.ParameterDict({  # stacked like nn.Linear weights: (E, out, in)
            "w1": nn.Parameter(_fan_in_uniform(torch.empty(E, H, D))),
            "w3": nn.Parameter(_fan_in_uniform(torch.empty(E, H, D))),
            "w2": nn.Parameter(_fan_in_uniform(torch.empty(E, D, H))),
        })
        self.shared_experts = MLP(D, cfg.n_shared_experts * H) if cfg.n_shared_experts else None
        # loads since the last bias update: int64, so casting the module never rounds them
        self.register_buffer("tokens_per_expert", torch.zeros(E, dtype=torch.long),
                             persistent=False)

    @torch.no_grad()
    def reset_parameters(self):
        """Initialise every parameter and buffer again: how a layer built on the meta device
        (then moved with to_empty) gets its values."""
        self.gate.reset_parameters()
        for w in self.experts.values():
            _fan_in_uniform(w)
        if self.shared_experts is not None:
            for lin in self.shared_experts.children():
                lin.reset_parameters()
        self.tokens_per_expert.zero_()

    def forward(self, x: torch.Tensor):
        """x (B, L, D) -> y (B, L, D), aux_loss (). T = B*L tokens, K = top-k, E = experts."""
        cfg = self.cfg
        if x.dim() != 3 or x.shape[-1] != cfg.dim:
            raise ValueError(f"MoE expects x of shape (B, L, dim={cfg.dim}), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"MoE expects a floating-point x, got {x.dtype}")
        B, L, D = x.shape
        E, K = cfg.n_routed_experts, cfg.n_activated_experts
        xf = x.reshape(B * L, D)                                              # (T, D)
        weights, indices, scores = self.gate(xf)                             # (T, K) (T, K) (T, E)
        # per-sequence expert counts: the offsets, the balance loss and the bias all use them
        counts = torch.zeros(B, E, dtype=torch.long, device=x.device)
        counts.scatter_add_(1, indices.view(B, L * K), torch.ones_like(indices.view(B, L * K)))
        if cfg.dispatch == "grouped":
            y = self._grouped(xf, weights, indices, counts.sum(0))
        else:
            y = self._loop(xf, weights, indices)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        if self.training and not _recomputing():
            with torch.no_grad():
                self.tokens_per_expert += counts.sum(0)
        return y.view(B, L, D), self.balance_loss(scores.view(B, L, E), counts)

    def _expert_weights(self, dtype):
        return [self.experts[n].to(dtype) for n in ("w1", "w3", "w2")]

    def _grouped(self, x, weights, indices, counts):
        """Sort the T*K routed rows by expert; one grouped matmul per projection."""
        T, K = indices.shape
        w1, w3, w2 = self._expert_weights(_compute_dtype(x))
        order = indices.view(-1).argsort(stable=True)                        # (T*K,)
        offs = counts.cumsum(0).to(torch.int32)                              # (E,) segment ends
        xs = x.to(w1.dtype)[order // K]                                      # (T*K, D) gathered
        h = F.silu(grouped_mm(xs, w1.mT, offs)) * grouped_mm(xs, w3.mT, offs)  # (T*K, H)
        out = grouped_mm(h, w2.mT, offs)                                     # (T*K, D) sorted
        out = torch.empty_like(out).index_copy(0, order, out)                # (T*K, D) unsorted
        y = (out.view(T, K, -1) * weights.unsqueeze(-1)).sum(1)              # (T, D) fp32 sum
        return y.to(out.dtype)

    def _loop(self, x, weights, indices):
        """The per-expert loop of the official inference code: readable, but its shapes depend
        on the routing, so it compiles only with graph breaks (and recompiles)."""
        # unbound once: indexing w1[e] per expert would make each index's backward fill a
        # zero tensor the size of the whole stack, so fwd+bwd would cost E x the stack
        dtype = _compute_dtype(x)
        w1, w3, w2 = (w.unbind(0) for w in self._expert_weights(dtype))
        y = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        for e in range(self.cfg.n_routed_experts):
            token, slot = torch.where(indices == e)                           # who picked e
            if token.numel() == 0:
                continue
            xe = x[token].to(dtype)
            out = F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
            y.index_add_(0, token, out * weights[token, slot, None])
        return y.to(dtype)

    def balance_loss(self, scores, counts):
        """Complementary sequence-wise balance loss [V3 eq. 17-20]. scores (B, L, E), counts (B, E)."""
        cfg = self.cfg
        if not self.training or cfg.seq_aux_alpha == 0:
            return scores.new_zeros(())
        if cfg.aux_scope == "batch":  # the whole batch as one sequence [V3 4.5.3]
            scores, counts = scores.flatten(0, 1).unsqueeze(0), counts.sum(0, keepdim=True)
        E, K, L = cfg.n_routed_experts, cfg.n_activated_experts, scores.shape[1]
        P = (scores / scores.sum(-1, keepdim=True)).mean(1)                 # (B, E) eq. 19
        f = counts.float() * (E / (K * L))                                   # (B, E) eq. 18
        return cfg.seq_aux_alpha * (f * P).sum(-1).mean()                    # eq. 17

    @torch.no_grad()
    def update_bias(self, gamma: float | None = None, load: torch.Tensor | None = None):
        """b += gamma * sign(mean load - load) [LF Alg. 1], then zero the counts.

        load defaults to this layer's tokens_per_expert; update_bias(model) passes the sum
        over ranks. Returns the load it used (E,) float64 and its MaxVio (). Call once per
        optimizer step."""
        gamma = self.cfg.bias_update_speed if gamma is None else gamma
        load = (self.tokens_per_expert if load is None else load).double()
        self.gate.bias += gamma * torch.sign(load.mean() - load).float()
        self.tokens_per_expert.zero_()
        return load, max_vio(load)


@torch.no_grad()
def update_bias(model: nn.Module, gamma: float | None = None) -> torch.Tensor:
    """Update every MoE layer of model in place; returns the loads used, (n_moe_layers, E).

    Counts are summed over data-parallel ranks first (one all_reduce for all layers), so
    every rank applies the same update and keeps the same biases."""
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    if not layers:
        return torch.zeros(0, 0)
    load = torch.stack([m.tokens_per_expert for m in layers])               # (n_layers, E)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(load)
    return torch.stack([m.update_bias(gamma, l)[0] for m, l in zip(layers, load)])


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio [LF eq. 4] along the last dim: (max load - mean load) / mean load."""
    load = load.double()
    mean = load.mean(-1)
    return (load.amax(-1) - mean) / mean.clamp_min(1e-12)


# =======================================================================================
# Machinery the layer above calls, which a first reading can skip: helpers, the grouped
# matmul's custom ops, and what torch's kernel does on which GPU.

def _recomputing() -> bool:
    """True while autograd's backward re-runs a forward (activation checkpointing): its tokens
    were counted the first time. Compiled graphs never run forward code inside backward."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


def _fan_in_uniform(w):
    """nn.Linear's default init range, U(-1/sqrt(in), 1/sqrt(in)), for (..., out, in) weights."""
    return nn.init.uniform_(w, -w.shape[-1] ** -0.5, w.shape[-1] ** -0.5)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


# ---------------------------------------------------------------------------------------
# Grouped matmul: out[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]   (one swappable spot)
# F.grouped_mm (torch >= 2.10) is differentiable and compiles in bf16. Other dtypes run
# eagerly (a per-group fallback), but its compile-time shape rule refuses them: the two
# custom ops below hide the call from the compiler, and give float32 its backward.

@torch.library.custom_op("moe::grouped_mm", mutates_args=())
def _grouped_mm_op(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return F.grouped_mm(x.contiguous(), w, offs=offs)


@_grouped_mm_op.register_fake
def _(x, w, offs):
    return x.new_empty(x.shape[0], w.shape[-1])


@torch.library.custom_op("moe::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """dw[e] = x[seg e]^T @ dy[seg e] (zero for an empty segment): grouped over the rows."""
    return F.grouped_mm(x.t(), dy, offs=offs)


@_grouped_mm_wgrad.register_fake
def _(x, dy, offs):
    return x.new_empty(offs.shape[0], x.shape[1], dy.shape[1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dy = dy.contiguous()
    return _grouped_mm_op(dy, w.transpose(-2, -1), offs), _grouped_mm_wgrad(x, dy, offs), None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(R, D) rows sorted by group, (G, D, H) weights, (G,) int32 segment ends -> (R, H)."""
    if x.dtype == torch.bfloat16:
        if _empty_groups_get_garbage_wgrad(x.device):
            w = _ZeroEmptyGroupGrad.apply(w, offs)
        return F.grouped_mm(x, w, offs=offs)  # native, differentiable, compiles
    return _grouped_mm_op(x, w, offs)


def grouped_mm_path(device: torch.device, dtype: torch.dtype) -> str:
    """What torch runs for grouped_mm on this device and dtype. Its fast CUDA kernel exists for
    bf16 on compute capability 9.x and 10.x (H100, H200, B200) only; on other GPUs, and in
    fp32 or fp16 everywhere, it runs one matmul per group after copying offs to the host: a
    sync per call (9 per MoE layer per training step), no CUDA graphs, and no error."""
    if device.type != "cuda":
        return f"one matmul per expert on the {device.type}, no sync"
    major, minor = torch.cuda.get_device_capability(device)
    if dtype == torch.bfloat16 and major in (9, 10):
        return f"torch's grouped-GEMM kernel (bf16, compute capability {major}.{minor}), no sync"
    return (f"per-expert fallback ({str(dtype).removeprefix('torch.')}, compute capability "
            f"{major}.{minor}): one matmul per expert and a host sync per call")


@torch.compiler.assume_constant_result
def _empty_groups_get_garbage_wgrad(device: torch.device) -> bool:
    """On compute capability 10.x, torch's kernel leaves the weight gradient of a group with
    no rows uninitialised (pytorch#172439)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 10


class _ZeroEmptyGroupGrad(torch.autograd.Function):
    """The identity on w (G, D, H); its backward zeroes the gradient of the groups that got no
    rows. Applied only where the kernel needs it (_empty_groups_get_garbage_wgrad)."""

    @staticmethod
    def forward(ctx, w, offs):
        ctx.save_for_backward(offs)
        return w.view_as(w)

    @staticmethod
    def backward(ctx, dw):
        (offs,) = ctx.saved_tensors
        rows = torch.diff(offs, prepend=offs.new_zeros(1))                  # (G,) per group
        return torch.where((rows > 0)[:, None, None], dw, 0.0), None



# =======================================================================================
# python moe.py: one tiny batch through the layer, each step printed under the names above.

def _show(name, t, why):
    print(f"\n{name} {tuple(t.shape)}: {why}")
    v = t.detach().double()
    fmt = "4.0f" if not t.is_floating_point() else "8.4f" if v.abs().max() > 1e-2 else "10.3e"
    for row in v.reshape(-1, t.shape[-1] if t.dim() else 1).tolist():
        print("  " + " ".join(f"{x:{fmt}}" for x in row))


@torch.no_grad()
def tour(seed: int = 0):
    """Print the tour; return its input x and a copy of the layer as it was before the step."""
    import copy
    torch.manual_seed(seed)
    cfg = MoEConfig(dim=8, moe_inter_dim=8, n_routed_experts=8, n_activated_experts=2,
                    n_expert_groups=4, n_limited_groups=2, route_scale=2.5, bias_update_speed=0.01)
    (B, L, D), E, K, G, M = (2, 4, 8), 8, 2, 4, 2
    layer, x = MoE(cfg).train(), torch.randn(B, L, D)
    layer.gate.bias.copy_(torch.randint(-2, 3, (E,)) * 0.01)  # as if after a few updates
    start = copy.deepcopy(layer)
    print(f"{cfg}\nx: B={B} sequences of L={L} tokens (T={B * L}), {E} experts in {G} groups, "
          f"each token K={K} of them from its best M={M} groups, plus 1 shared expert")
    xf = x.view(B * L, D)                                                    # (T, D)
    weights, indices, scores = layer.gate(xf)
    _show("scores", scores, "s = sigmoid(u_t . e_i), one row per token t [V3 eq. 15]")
    _show("bias", layer.gate.bias, "b: decides who is picked, never the gate values")
    groups = (scores + layer.gate.bias).view(B * L, G, E // G)              # biased (T, G, E/G)
    group_scores = groups.topk(2, dim=-1).values.sum(-1)                     # (T, G)
    _show("group_scores", group_scores, "sum of the top-2 biased scores s + b in each group")
    _show("keep", group_scores.topk(M, dim=-1).indices.sort(-1).values, "the groups kept")
    _show("indices", indices, "the K experts with the highest s + b in the kept groups [eq. 16]")
    _show("weights", weights, "g = route_scale * s / sum of the picks' s, unbiased [eq. 13-14]")
    counts = F.one_hot(indices.view(B, L * K), E).sum(1)                     # (B, E)
    _show("counts", counts, "how many of each sequence's tokens picked each expert")
    order = indices.view(-1).argsort(stable=True)                            # (T*K,)
    _show("order", order, "the T*K (token, pick) rows stably sorted by expert; token = order // K")
    _show("offs", counts.sum(0).cumsum(0), "each expert's segment end in the sorted rows")
    y, aux_loss = layer(x)                                                   # counts the loads
    loop = layer._loop(xf, weights, indices) + layer.shared_experts(xf)
    _show("y", y.view(B * L, D), "shared expert + sum of g * FFN_i: the grouped matmuls' output")
    _show("grouped_minus_loop", (y.view(B * L, D) - loop).abs().amax(), "max |difference|")
    f = counts * E / (K * L)                                                 # (B, E) eq. 18
    P = (scores / scores.sum(-1, keepdim=True)).view(B, L, E).mean(1)        # (B, E) eq. 19
    _show("f", f, "E/(K L) * count per sequence [eq. 18]")
    _show("P", P, "mean normalised score per sequence [eq. 19]")
    _show("fP", (f * P).sum(-1), "sum_i f_i P_i per sequence: 1 when balanced, up to E/K")
    _show("aux_loss", aux_loss, f"alpha * mean of fP, alpha = {cfg.seq_aux_alpha:g} [eq. 17]")
    load, vio = layer.update_bias()
    _show("load", load.long(), "tokens per expert this step, summed over the sequences")
    _show("bias_after", layer.gate.bias,
          f"b + gamma * sign(mean load - load), gamma = {cfg.bias_update_speed:g} [LF Alg. 1]")
    _show("MaxVio", vio, "(max load - mean load) / mean load [LF eq. 4]")
    return x, start


if __name__ == "__main__":
    tour()
