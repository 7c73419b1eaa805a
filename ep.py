"""
Expert parallelism (EP) for moe.py's layer: each of R ranks holds E/R of every MoE layer's
routed experts; tokens travel by all-to-all to the ranks holding their picks, and back. The
router, its bias and counts, the balance loss and the shared experts run as in moe.py on each
rank's own tokens; in training all but the experts is data-parallel (DDP).

    torchrun --standalone --nproc_per_node=2 train.py --ep=True     # train with EP
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 study.py --study=traffic

Design notes, each choice with its reason:
- Rank r holds experts [r*E/R, (r+1)*E/R), contiguous as in the official code: a rank (or a
  node of ranks) holds whole expert groups when R (the node count) divides G, so the router's
  group limit M bounds the ranks (nodes) a token reaches [V3 2.1.2].
- Once per destination rank (DeepEP's rule; torchtitan sends once per pick): a token with
  several picks on one rank travels there once, with its (local expert, weight) pairs, and
  returns once as their weighted sum. A row carries all K slots (-1: a pick held elsewhere),
  so every shape is static but the number of rows.
- One host sync per layer call, in `dispatch`: all_to_all_single takes its split sizes as
  Python ints, so the row and pair counts (first exchanged by a small equal-split all-to-all)
  are copied to the host once. Nothing else syncs. The exchange runs eagerly
  (torch.compiler.disable): its sizes change with every batch.
- Precision: a rank adds a row's weighted expert outputs in fp32 and returns the sum in the
  compute dtype (under bf16 autocast that halves the return trip, as in DeepEP); the source
  adds the sums in fp32. In fp32 the layer equals one process up to the order of its sums.
- Gradients: an all-to-all's backward is the same all-to-all with the splits swapped, so an
  expert's gradient sums every rank's tokens: the gradient of the SUM of the R ranks' losses,
  where DDP makes the others that of their MEAN. keep_experts_out_of_ddp keeps the experts
  out of DDP and scales their gradients by 1/R: every gradient is then the single-process
  gradient of the mean loss over all ranks' tokens. clip_grad_norm_ counts every shard once.
- Checkpoints hold full expert tensors (gather_experts on save; shard_experts and
  shard_optimizer_state on load), so one process can sample or resume from an EP checkpoint.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from moe import MoE, _compute_dtype, grouped_mm


class _AllToAll(torch.autograd.Function):
    """dist.all_to_all_single with a backward: each received row's gradient returns to the rank
    that sent it, by the same all-to-all with the split sizes swapped. (torch's own,
    torch.distributed.nn.functional.all_to_all_single, warns that it is deprecated in 2.13.)"""

    @staticmethod
    def forward(ctx, x, send, recv):
        ctx.send, ctx.recv = send, recv
        out = x.new_empty(sum(recv), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv, send)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.recv, ctx.send), None, None


def dispatch(x, weights, indices, n_local_experts):
    """Send every token once to each rank that holds one of its picks.

    x (T, D), weights (T, K) fp32, indices (T, K) expert ids -> what this rank receives:
    rows (N, D); local (N, K) int32, the pick's expert id on this rank or -1 where the pick is
    held elsewhere; w (N, K) fp32, 0 where local is -1; P, the number of local >= 0; and the
    route that `combine` takes back. R ranks, S rows sent, N rows received."""
    T, K = indices.shape
    R = dist.get_world_size()
    dest = indices // n_local_experts                                         # (T, K) holder's rank
    hit = torch.zeros(T, R, dtype=torch.bool, device=x.device).scatter_(1, dest, True)  # (T, R)
    pairs = torch.zeros(R, dtype=torch.long, device=x.device).scatter_add_(
        0, dest.flatten(), torch.ones_like(dest.flatten()))                   # (R,) picks per rank
    send_counts = torch.stack([hit.sum(0), pairs], 1)                         # (R, 2) rows, pairs
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)                          # (R, 2) from each
    # the one host sync of the layer: all_to_all_single takes its split sizes as Python ints
    sizes = torch.cat([send_counts[:, 0], recv_counts[:, 0], recv_counts[:, 1].sum(0, True)])
    sizes = sizes.tolist()
    send, recv, P = sizes[:R], sizes[R:2 * R], sizes[-1]
    rank, token = torch.nonzero_static(hit.T, size=sum(send)).unbind(1)      # (S,) rank-major
    mine = dest[token] == rank[:, None]                                       # (S, K) held there
    local = torch.where(mine, indices[token] - rank[:, None] * n_local_experts, -1).int()
    w = torch.where(mine, weights[token], 0.0)                                # (S, K)
    rows = _AllToAll.apply(x[token], send, recv)                              # (N, D)
    local, w = _AllToAll.apply(local, send, recv), _AllToAll.apply(w, send, recv)
    return rows, local, w, P, (token, send, recv)


def combine(y, route, T):
    """The way back: y (N, D), one weighted sum per received row -> (T, D) fp32, each token's
    sums from every rank it visited, added in fp32."""
    token, send, recv = route
    back = _AllToAll.apply(y, recv, send)                                     # (S, D)
    return back.new_zeros(T, y.shape[1], dtype=torch.float32).index_add(0, token, back.float())


class EPMoE(MoE):
    """A MoE layer that holds n_local_experts routed experts, from experts_start_idx on (the
    official code's names); made by shard_experts. Only the routed part of forward differs."""

    @torch.compiler.disable
    def _grouped(self, x, weights, indices, counts):
        """x (T, D) -> (T, D): dispatch, the local experts, combine. T tokens, K picks, El local
        experts, N rows received, P (row, pick) pairs for local experts, D = dim, H =
        moe_inter_dim. `counts` (per global expert) is unused: the rows received set the
        local segments. One grouped matmul per projection, as in MoE._grouped."""
        T, K = indices.shape
        El = self.n_local_experts
        w1, w3, w2 = self._expert_weights(_compute_dtype(x))
        rows, local, w, P, route = dispatch(x.to(w1.dtype), weights, indices, El)  # (N, D) (N, K)
        key = torch.where(local < 0, El, local).flatten().long()              # (N*K,) others last
        order = key.argsort(stable=True)[:P]                                  # (P,) by local expert
        seg = torch.zeros(El + 1, dtype=torch.long, device=x.device).scatter_add_(
            0, key, torch.ones_like(key))                                     # (El + 1,)
        offs = seg[:El].cumsum(0).to(torch.int32)                             # (El,) segment ends
        row = order // K                                                      # (P,) its row
        xs = rows[row]                                                        # (P, D)
        h = F.silu(grouped_mm(xs, w1.mT, offs)) * grouped_mm(xs, w3.mT, offs)  # (P, H)
        out = grouped_mm(h, w2.mT, offs)                                      # (P, D)
        y = out.new_zeros(rows.shape, dtype=torch.float32).index_add(
            0, row, out.float() * w.flatten()[order, None])                   # (N, D) fp32 sums
        return combine(y.to(out.dtype), route, T).to(out.dtype)


def shard_experts(model: nn.Module) -> nn.Module:
    """Keep this rank's E/R routed experts of every MoE layer in model (in place; every rank
    calls it on the same model) and turn the layers into EPMoE. Returns model."""
    R, r = dist.get_world_size(), dist.get_rank()
    for m in model.modules():
        if not isinstance(m, MoE):
            continue
        E = m.cfg.n_routed_experts
        if E % R:
            raise ValueError(f"n_routed_experts={E} does not split evenly over {R} ranks")
        if m.cfg.dispatch != "grouped":
            raise ValueError(f"expert parallelism needs dispatch='grouped', not {m.cfg.dispatch!r}")
        m.__class__ = EPMoE  # the same module, a different routed part (fully_shard does this too)
        m.n_local_experts, m.experts_start_idx = E // R, r * E // R
        for name, w in m.experts.items():
            m.experts[name] = nn.Parameter(w.detach()[r * E // R:(r + 1) * E // R].clone())
    return model


def _expert_params(module):
    """(name, layer, parameter) of every expert shard; names as in module.named_parameters()."""
    return [(f"{prefix}.experts.{n}".lstrip("."), m, p) for prefix, m in module.named_modules()
            if isinstance(m, EPMoE) for n, p in m.experts.items()]


def keep_experts_out_of_ddp(module: nn.Module) -> nn.Module:
    """Before DDP(module): DDP must not broadcast the expert shards at start (rank 0's would
    overwrite the others') nor average their gradients. Those already hold the sum over every
    rank's tokens (the all-to-all's backward brings them home), the gradient of the SUM of the
    R ranks' losses; times 1/R, it is the gradient of their mean, as DDP makes the others."""
    R, names = dist.get_world_size(), []
    for name, _, p in _expert_params(module):
        p.register_hook(lambda grad: grad / R)
        names.append(name)
    DDP._set_params_and_buffers_to_ignore_for_model(module, names)
    return module


def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ for a model with sharded experts: the norm of the whole gradient,
    each expert shard counted once, the same on every rank (a local norm would clip the ranks'
    replicated weights differently, and they would drift apart)."""
    experts = {id(p) for _, _, p in _expert_params(model)}
    grads = lambda sharded: [p.grad for p in model.parameters()
                             if p.grad is not None and (id(p) in experts) == sharded]
    sq = torch.nn.utils.get_total_norm(grads(True)) ** 2
    dist.all_reduce(sq)                                                       # all ranks' shards
    norm = (torch.nn.utils.get_total_norm(grads(False)) ** 2 + sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), max_norm, norm)
    return norm


def _gather(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts).cpu()


def gather_experts(model, optimizer, model_state, optim_state):
    """Put full expert tensors and their AdamW moments into full state dicts (from
    torch.distributed.checkpoint's get_*_state_dict), where they hold this rank's shards or
    nothing (ranks other than 0). Collective: every rank calls it."""
    for name, _, p in _expert_params(model):
        full = _gather(p.detach())
        if name in model_state:
            model_state[name] = full
        for key, value in sorted(optimizer.state[p].items()):  # the same order on every rank
            if torch.is_tensor(value) and value.shape == p.shape:  # moments, not the step
                full = _gather(value)
                if name in optim_state.get("state", {}):
                    optim_state["state"][name][key] = full


def shard_optimizer_state(model, optim_state):
    """A full optimizer state dict with this rank's slice of every expert moment, in place: for
    set_optimizer_state_dict after shard_experts. Returns optim_state."""
    for name, m, p in _expert_params(model):
        lo, hi = m.experts_start_idx, m.experts_start_idx + m.n_local_experts
        for key, value in optim_state["state"].get(name, {}).items():
            if torch.is_tensor(value) and value.shape == (m.cfg.n_routed_experts, *p.shape[1:]):
                optim_state["state"][name][key] = value[lo:hi].clone()
    return optim_state

