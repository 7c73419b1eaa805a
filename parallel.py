"""
Several processes under torchrun: what train.py calls so that one process's run reads alone.

    torchrun --standalone --nproc_per_node=8 train.py --preset=gpu              # DDP
    torchrun --standalone --nproc_per_node=8 train.py --preset=gpu --fsdp=True  # FSDP2
    torchrun --standalone --nproc_per_node=4 train.py --ep=True                 # experts sharded

- DDP: every rank holds the whole model and averages gradients.
- FSDP2 (--fsdp=True): weights, gradients and AdamW state sharded over the ranks, each block
  gathered for its forward and backward.
- Expert parallelism (--ep=True, ep.py): each rank holds E/R routed experts and the tokens
  travel to them; the rest of the model is DDP.
In one process every function here is the plain single-process operation or does nothing.
Checkpoints always hold full tensors, so any run, of any number of processes, loads them.
"""
import gc
import inspect
import os
import sys

import torch
import torch.distributed as dist
# Imported before init_process_group, on purpose: this module binds the process group that is
# current at import as a default argument, and bound after init it would keep the group alive
# past destroy_process_group; a gloo worker still freeing tensors at interpreter exit then
# aborts the process. DCP imports it too; this line makes the order explicit.
import torch.distributed.nn.functional  # noqa: F401
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import ep
from model import GPT
from startup import resolve_device


def check(fsdp, use_ep, n_routed_experts):
    """One line, not a traceback, for settings that several processes need or forbid."""
    world = int(os.environ.get("WORLD_SIZE", 0))
    if fsdp and not world:
        sys.exit("--fsdp=True shards over ranks: start it with torchrun")
    if use_ep and (fsdp or not world or n_routed_experts % world):
        sys.exit(f"--ep=True shards the {n_routed_experts} routed experts evenly over torchrun's "
                 "ranks and keeps the rest DDP: start it with torchrun, a rank count that divides "
                 f"{n_routed_experts}, and without --fsdp=True")


def init(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK -> (distributed, rank, world, device)."""
    distributed = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device)
    if distributed:
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
        if dev.startswith("cuda"):
            dev = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(dev)
    return distributed, rank, world, dev


def teardown():
    """Destroy the process group after everything that holds it. torch binds DDP's C++
    Reducer so that its destructor keeps the GIL; if the Reducer held the last reference to
    the group, that destructor joins the group's worker threads while a worker, freeing a
    finished collective's tensors, waits for the GIL: a hang at exit (gloo, 1 run in 8).
    Freed first, DDP only drops one reference; destroy_process_group then frees the group
    through the group's own binding, which lets go of the GIL while it joins."""
    gc.collect()  # DDP and FSDP objects caught in reference cycles
    dist.destroy_process_group()


def fsdp_model(cfg, state, dev):
    """GPT(cfg) sharded with FSDP2 (each block, then the root) over all ranks, filled from a
    full state dict every rank holds on the CPU (state=None: a fresh init, the same as one
    process's). Built on the meta device, so no rank ever holds the whole model. FSDP2 keeps
    fp32 weights and the run's autocast does the bf16 casts, as in one process: its own bf16
    MixedPrecisionPolicy would round the router weight (trap 3) and, by casting every block's
    inputs, the residual stream and the rotary tables. The price: all-gathers of fp32 weights."""
    state = state if state is not None else GPT(cfg).state_dict()
    mesh = init_device_mesh(dev.split(":")[0], (dist.get_world_size(),))  # gloo on a CPU
    with torch.device("meta"):
        model = GPT(cfg)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=dev)
    model.reset_parameters()  # buffers outside the state dict: rotary tables, expert counts
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
    return model


shard_experts = ep.shard_experts  # expert parallelism: this rank's E/R experts, in place


def compile_model(model, distributed, use_ep):
    """torch.compile of the whole model in one process. Under DDP or FSDP2, one compile per
    block instead, of its forward only: DDP can then all-reduce a block's gradients as soon as
    that block's backward ends, while the blocks below run theirs (one graph for the whole
    model ends its backward with every gradient at once, and DDP wrapping it gets no
    DDPOptimizer), and FSDP2's hooks, which gather and free each block's weights, stay
    outside the graphs. Same-shaped blocks share their graphs."""
    fullgraph = model.cfg.moe.dispatch == "grouped" and not use_ep  # ep.py's exchange is eager
    if not distributed:
        return torch.compile(model, fullgraph=fullgraph)
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=fullgraph)
    return model


def wrap(module, distributed, fsdp, use_ep):
    """The module that runs forward and backward: DDP's wrapper under torchrun without FSDP2
    (the experts kept out of it under EP), else the module itself. No buffer sync: DDP would
    broadcast rank 0's buffers before every forward, when they are equal on all ranks anyway
    (biases move by all-reduced counts, counts are zero after update_bias). torch 2.13
    renamed that switch and warns on every rank for the old name."""
    if not distributed or fsdp:
        return module
    if use_ep:  # before DDP: the expert shards stay out of its broadcast and all-reduce
        ep.keep_experts_out_of_ddp(module)
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return DDP(module, forward_sync_buffers=False)
    return DDP(module, broadcast_buffers=False)


def sync_gradients(fwd, model, now):
    """Gradient accumulation: reduce the gradients over the ranks only with the last
    micro-batch's backward (now=True)."""
    if isinstance(fwd, DDP):
        fwd.require_backward_grad_sync = now
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(now)


def clip_grad_norm_(model, max_norm, use_ep):
    """torch's clip_grad_norm_; under EP over every rank's expert shards too, under FSDP2 over
    the shards. Returns the whole gradient's norm, the same on every rank."""
    if use_ep:
        return ep.clip_grad_norm_(model, max_norm)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def sum_over_ranks(t):
    """t summed over the ranks, in place (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def full_state(model, optimizer, use_ep, gen, dev):
    """The model's and optimizer's state as full tensors on the CPU, and every rank's data
    generator state. Collective: every rank calls it; the state dicts are complete on rank 0."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)
    if use_ep:  # the experts are plain tensors, sharded by ep.py: gather them too
        ep.gather_experts(model, optimizer, model_state, optim_state)
    state = gen.get_state().to(dev)
    states = [torch.empty_like(state) for _ in range(dist.get_world_size()
                                                     if dist.is_initialized() else 1)]
    if dist.is_initialized():
        dist.all_gather(states, state)
    else:
        states[0].copy_(state)
    return model_state, optim_state, [s.cpu() for s in states]


def load_optimizer_state(model, optimizer, state, use_ep):
    """A full optimizer state dict into optimizer, each rank taking its shards."""
    if use_ep:
        state = ep.shard_optimizer_state(model, state)
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
