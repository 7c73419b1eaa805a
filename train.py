"""
Train a small DeepSeek-V3-style MoE GPT, offline, with aux-loss-free balancing.

    python train.py                                  # CPU default: Python's own stdlib as bytes
    python train.py --data=notes.txt                 # a text file or a folder of text files
    python train.py --data='fineweb10B/*.bin' --vocab_size=50304   # llm.c / modded-nanogpt shards
    python train.py --init_from=resume               # continue out_dir/ckpt.pt
    python train.py --sample --prompt='def '         # sample from out_dir/ckpt.pt
    python train.py --balance=aux                    # none | aux | aux_batch | bias | v3
    torchrun --standalone --nproc_per_node=2 train.py --preset=gpu --device=cuda
    torchrun --standalone --nproc_per_node=2 train.py --ep=True     # experts sharded (ep.py)

Every setting below can be overridden with --key=value. After each optimizer step the expert
biases are updated in place from the loads of the whole step (all micro-batches, all ranks).
"""
import gc
import inspect
import json
import math
import os
import pickle
import re
import signal
import sys
import time
import traceback
import warnings
from dataclasses import asdict, replace

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from data import atomic_save, get_batch, load_data
from display import show_eval, summary_table
from ep import clip_grad_norm_ as ep_clip_grad_norm_
from ep import gather_experts, keep_experts_out_of_ddp, shard_experts, shard_optimizer_state
from model import GPT, presets
from moe import MoE, grouped_mm_path, max_vio, update_bias

# ----------------------------------------------------------------------------- settings
out_dir = "out"
preset = "cpu"               # a key of model.presets
data = "stdlib"              # "stdlib", a text file or folder, or a glob of .bin shards
vocab_size = 0               # 0: the preset's (256 bytes); set it for .bin shards
block_size = 0               # 0: the preset's
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1200
lr_decay_iters = 0           # 0: max_iters
eval_interval = 300
eval_iters = 20              # val batches per evaluation; 0: no evaluation, so no checkpoint
log_interval = 20
learning_rate = 3e-3         # the gpu preset's default is 1e-3: see preset_settings
min_lr = 3e-4
warmup_iters = 50
weight_decay = 0.1           # V3: 0.1, matrices only
grad_clip = 1.0              # V3: 1.0
balance = "v3"               # balancing arm, see `arms` below
bias_update_speed = 1e-3     # gamma; set by the arm unless given
seq_aux_alpha = 1e-4         # alpha; set by the arm unless given
aux_scope = "sequence"       # "sequence" or "batch"; set by the arm unless given
bias_freeze_frac = 0.0       # final fraction of iterations with gamma = 0 (V3: ~0.034)
freeze_router = False        # router weights stay at their random init (the bias still balances)
init_from = "scratch"        # "scratch" or "resume"
compile = True
fsdp = False                 # under torchrun: shard weights, gradients and AdamW state (FSDP2)
ep = False                   # under torchrun: shard the routed experts over the ranks, the rest DDP
device = "auto"              # "auto", "cpu", "cuda", "cuda:1", ...
dtype = "auto"               # autocast: "auto" (bf16 where the hardware has it), "bfloat16", "float32"
seed = 1337
sample = False               # only sample from out_dir/ckpt.pt, then exit
prompt = "\n"
max_new_tokens = 300
temperature = 0.8
top_k = 40
eval_sample = True           # print a sample at each eval (study.py turns it off)
heatmap_svg = True           # also save each eval's expert-load heatmap as out_dir/*.svg

arms_keys = ("bias_update_speed", "seq_aux_alpha", "aux_scope")
arms = {  # balancing arm: values of arms_keys
    "none": (0.0, 0.0, "sequence"), "aux": (0.0, 1e-3, "sequence"),
    "aux_batch": (0.0, 1e-3, "batch"), "bias": (1e-3, 0.0, "sequence"),
    "v3": (1e-3, 1e-4, "sequence")}
preset_settings = {  # defaults a preset changes, unless given (the arch study's gpu scale)
    "gpu": dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=200)}
PEAK_FLOPS = [  # dense bf16 tensor-core FLOP/s by part, from the vendors' datasheets; the first
    # whole-word match of the CUDA device name wins, so the slower PCIe and NVL parts come first
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
    ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def default_settings(namespace=None):
    """The settings of a script (this one by default): its module-level plain values, by name."""
    return {k: v for k, v in (namespace or globals()).items()
            if not k.startswith("_") and isinstance(v, (bool, int, float, str))}


def parse_overrides(argv, settings):
    """--key=value (or a bare --flag for booleans) -> dict of typed values; refuse unknown keys."""
    given = {}
    for arg in argv:
        key, eq, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or key not in settings:
            sys.exit(f"unknown setting {arg!r}; valid keys: {', '.join(settings)}")
        kind = type(settings[key])
        try:
            if kind is bool:
                if eq and value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                given[key] = not eq or value.lower() in ("true", "1")
            else:
                given[key] = kind(value)
        except ValueError:
            sys.exit(f"--{key}={value!r}: expected a {kind.__name__}")
    return given


def resolve_device(name):
    """"auto" -> "cuda" when a GPU is usable, else "cpu". A device that is not there ends the
    run with one line, not a stack trace from deep inside torch."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        sys.exit(f"--device={name!r}: not a device name (try cpu, cuda, cuda:1)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device={name}: no usable CUDA GPU here (torch {torch.__version__}, CUDA "
                 f"build {torch.version.cuda or 'none'}); use --device=cpu")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        sys.exit(f"--device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return name


def peak_flops(device_name):
    """PEAK_FLOPS of the first part whose name is a whole word of device_name; None if none."""
    return next((v for part, v in PEAK_FLOPS if re.search(rf"\b{part}\b", device_name)), None)


def cpu_flags():
    """The CPU's feature flags (Linux); empty where /proc/cpuinfo is missing."""
    try:
        with open("/proc/cpuinfo") as f:
            return set(f.read().split())
    except OSError:
        return set()


def cpu_matmul_tflops(dtype, n=512, reps=10):
    """TFLOP/s of an n x n matmul in dtype on this CPU: the best of reps, after one warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e12


def auto_dtype(dev):
    """The autocast dtype for dtype="auto" on device dev, and the reason, for the start-up line.
    On a CPU with bf16 instructions, whichever of bf16 and fp32 multiplies faster, timed now
    (~50 ms): flags alone mislead. bench.py, 2 cores each: an EPYC with AVX512-BF16, bf16 peak
    0.42 TFLOP/s against fp32's 0.18, the cpu preset's step at the same speed in both; a Xeon
    with AVX512-BF16 but no AMX, bf16 0.14 against fp32 0.26, the step 2.3x faster in fp32."""
    if dev.startswith("cuda"):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", "this GPU has bf16 tensor cores"
        return "float32", "this GPU has no bf16 support"
    if not cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"}:  # x86 AVX512-BF16 / AMX, Arm BF16
        return "float32", "this CPU has no native bf16 matmul (bf16 would be emulated, ~3x slower)"
    bf16, fp32 = cpu_matmul_tflops(torch.bfloat16), cpu_matmul_tflops(torch.float32)
    speeds = f"{bf16:.2f} vs {fp32:.2f} TFLOP/s in bf16 vs fp32, timed now"
    if bf16 > fp32:
        return "bfloat16", f"this CPU multiplies bf16 faster ({speeds})"
    return "float32", f"this CPU multiplies fp32 faster, bf16 instructions and all ({speeds})"


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def sample_text(model, text, n_tokens, dev, ctx):
    """Continue `text` (bytes vocab) or token 0 (other vocabs: shown as token ids), under the
    training's autocast ctx, so that it samples the model that was trained and evaluated;
    eagerly, since every new length would be a new shape for blocks compiled in place."""
    vocab = model.cfg.vocab_size
    idx = torch.tensor([list(text.encode()) if vocab == 256 else [0]], device=dev)
    with ctx, torch.compiler.set_stance("force_eager"):
        ids = model.generate(idx, n_tokens, temperature, top_k)[0].tolist()
    return bytes(ids).decode("utf-8", errors="replace") if vocab == 256 else str(ids)


def eval_load_counter(model, dev):
    """(n_moe_layers, E) int64 counts of the experts each MoE layer picks in eval-mode forwards:
    a forward hook on every gate adds its picks. Static shapes, so it compiles into the same
    graph; it counts nothing in training, where MoE itself counts (for the bias)."""
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    loads = torch.zeros(len(gates), gates[0].cfg.n_routed_experts if gates else 0,
                        dtype=torch.long, device=dev)
    def count(i, gate, out):  # out = (weights, indices, scores) of gate i
        if not gate.training:
            picked = out[1].flatten()
            loads[i].index_add_(0, picked, torch.ones_like(picked))
    for i, g in enumerate(gates):
        g.register_forward_hook(lambda gate, inp, out, i=i: count(i, gate, out))
    return loads


@torch.no_grad()
def evaluate(model, loads, shards, B, L, dev, ctx, iters, seed):
    """Val loss and per-layer expert loads over the same val batches each time. In eval mode
    the model's own counts (so the bias) never see val data; eval_load_counter's hooks count."""
    model.eval()
    loads.zero_()
    gen, total = torch.Generator().manual_seed(seed), torch.zeros((), device=dev)
    for _ in range(iters):
        x, y = get_batch(shards, gen, B, L, dev)
        with ctx:
            total += model(x, y)[1]  # eval mode: aux_loss is 0, this is cross-entropy
    model.train()
    if dist.is_initialized():  # the ranks' mean: a non-finite loss on any rank stops them all
        dist.all_reduce(total)
        total /= dist.get_world_size()
    return total.item() / iters, loads.double().cpu()


def load_checkpoint(path):
    """A checkpoint of tensors and plain values. weights_only=True: a file from elsewhere that
    carries a pickled object is refused, never run (plain pickle would execute it)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL [\w.]+", str(e))
        sys.exit(f"{path}: refused, it holds a pickled Python object "
                 f"({what.group(0) if what else 'not only tensors'}); only load files you trust")


def wrap_ddp(module):
    """DistributedDataParallel without its buffer sync: DDP would broadcast rank 0's buffers
    before the first forward of every step, when they are equal on all ranks anyway (biases
    move by all-reduced counts, counts are zero after update_bias), so it is a wasted
    collective. torch 2.13 renamed the switch and warns on every rank for the old name."""
    if "forward_sync_buffers" in inspect.signature(DDP).parameters:
        return DDP(module, forward_sync_buffers=False)
    return DDP(module, broadcast_buffers=False)


def lr_at(it, decay_iters):
    """Linear warm-up, then cosine from learning_rate down to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


def configure():
    """Settings from the command line into this module's globals; the balancing arm fills in
    gamma, alpha and the aux scope, and the preset its own defaults, unless they were given.
    Returns all settings, for the checkpoint."""
    settings = default_settings()
    given = parse_overrides(sys.argv[1:], settings)
    globals().update(given)
    if balance not in arms:
        sys.exit(f"--balance={balance!r}: expected one of {', '.join(arms)}")
    if preset not in presets:
        sys.exit(f"--preset={preset!r}: expected one of {', '.join(presets)}")
    for key, value in {**dict(zip(arms_keys, arms[balance])), **preset_settings.get(preset, {})}.items():
        if key not in given:
            globals()[key] = value
    if init_from not in ("scratch", "resume") or dtype not in ("auto", "bfloat16", "float32"):
        sys.exit(f"init_from={init_from!r} / dtype={dtype!r}: see the docstring for valid values")
    world, experts = int(os.environ.get("WORLD_SIZE", 0)), presets[preset].moe.n_routed_experts
    if ep and (fsdp or not world or experts % world):
        sys.exit(f"--ep=True shards the {experts} routed experts evenly over torchrun's ranks "
                 "and keeps the rest DDP: start it with torchrun, a rank count that divides "
                 f"{experts}, and without --fsdp=True")
    return {k: globals()[k] for k in settings}


def init_distributed():
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK -> ddp, rank, world, device."""
    ddp = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    dev = resolve_device(device)
    if ddp:
        dist.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
        if dev.startswith("cuda"):
            dev = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(dev)
    return ddp, rank, world, dev


def build_model(ckpt, dev, mesh=None):
    """The preset with the settings' overrides (a checkpoint's shapes win; balancing as set
    now), on dev, with the checkpoint's weights if there is one. With a device mesh: built on
    the meta device, sharded with FSDP2 (each block, then the root), then filled from a full
    state dict that every rank holds on the CPU (broadcasting it would need numpy). FSDP2
    keeps fp32 weights and the run's autocast does the bf16 casts, as in one process: its own
    bf16 MixedPrecisionPolicy would round the router weight (trap 3) and, by casting every
    block's inputs, the residual stream and the rotary tables. The price: all-gathers of fp32
    weights, twice the bytes of bf16."""
    cfg = presets[preset]
    cfg = replace(cfg, block_size=block_size or cfg.block_size,
                  vocab_size=vocab_size or cfg.vocab_size,
                  moe=replace(cfg.moe, bias_update_speed=bias_update_speed,
                              seq_aux_alpha=seq_aux_alpha, aux_scope=aux_scope))
    if ckpt is not None:
        saved = ckpt["model_cfg"]
        cfg = replace(cfg, **{**saved, "moe": replace(cfg.moe, **{
            **saved["moe"], **{k: getattr(cfg.moe, k) for k in arms_keys}})})
    if mesh is None:
        model = GPT(cfg).to(dev)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
        return shard_experts(model) if ep else model  # after loading: checkpoints hold all experts
    full = ckpt["model"] if ckpt is not None else GPT(cfg).state_dict()  # same init as above
    with torch.device("meta"):
        model = GPT(cfg)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=dev)
    model.reset_parameters()  # buffers outside the state dict: rotary tables, expert counts
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))
    return model


def compiled_model(model, distributed):
    """torch.compile of the whole model in one process. Under DDP or FSDP2, one compile per
    block instead, of its forward only: DDP can then all-reduce a block's gradients as soon as
    that block's backward ends, while the blocks below run theirs (one graph for the whole
    model ends its backward with every gradient at once, and DDP wrapping it gets no
    DDPOptimizer), and FSDP2's hooks, which gather and free each block's weights, stay
    outside the graphs. Same-shaped blocks share their graphs."""
    fullgraph = model.cfg.moe.dispatch == "grouped" and not ep  # ep.py's exchange runs eagerly
    if not distributed:
        return torch.compile(model, fullgraph=fullgraph)
    for block in model.layers:
        block.forward = torch.compile(block.forward, fullgraph=fullgraph)
    return model


def make_optimizer(model, dev):
    """AdamW, V3's betas; weight decay on matrices only; the fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=learning_rate, betas=(0.9, 0.95),
                             fused=True if dev.startswith("cuda") else None)


def train_step(fwd, model, optimizer, shards, gen, ctx, dev, ddp, stop):
    """Forward and backward over the micro-batches, clip, and, unless the gradient is not
    finite, step. One host sync: the flag that says "stop" (NaN, or Ctrl-C on any rank); on
    CUDA, where torch has no fast grouped GEMM for this GPU and dtype, every grouped matmul
    syncs as well (moe.grouped_mm_path)."""
    for micro in range(gradient_accumulation_steps):
        x, y = get_batch(shards, gen, batch_size, model.cfg.block_size, dev)
        last = micro == gradient_accumulation_steps - 1  # reduce the gradients once, at the end
        if isinstance(fwd, DDP):
            fwd.require_backward_grad_sync = last
        elif isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        with ctx:
            _, loss, aux = fwd(x, y)
        (loss / gradient_accumulation_steps).backward()
    norm = (ep_clip_grad_norm_(model, grad_clip) if ep else  # all micro-batches, ranks, shards
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm      # FSDP: a sharded norm
    flag = torch.stack([torch.isfinite(norm).logical_not().float(),
                        norm.new_full((), float(bool(stop)))])  # a fill, no host copy
    if ddp:  # every rank stops at the same step, or the others would hang
        dist.all_reduce(flag)
    bad, interrupted = flag.tolist()  # the step's host sync
    if not bad:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, aux, norm, bool(bad), bool(interrupted)


def save_checkpoint(path, model, optimizer, it, config, gen, dev, world, master):
    """Atomically, from rank 0: the uncompiled model, optimizer, settings, RNG, and every
    rank's data position (gathered), so that every rank resumes where it was. FSDP shards
    are gathered into full tensors, so a single process can load the file."""
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=full)  # collectives: every rank calls
    optim_state = get_optimizer_state_dict(model, optimizer, options=full)
    if ep:  # the experts are plain tensors, sharded by ep.py: gather them too
        gather_experts(model, optimizer, model_state, optim_state)
    state = gen.get_state().to(dev)
    states = [torch.empty_like(state) for _ in range(world)]
    if world > 1:
        dist.all_gather(states, state)
    else:
        states[0].copy_(state)
    if master:
        atomic_save({"model": model_state, "optimizer": optim_state,
                     "iter": it, "config": config, "model_cfg": asdict(model.cfg),
                     "rng": torch.get_rng_state(), "data_rng": [s.cpu() for s in states]}, path)


def main():
    config = configure()
    ddp, rank, world, dev = init_distributed()
    try:
        run(config, ddp, rank, world, dev)
    except BaseException as e:  # sys.exit and Ctrl-C too: free what run() held before teardown
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if ddp:
            teardown()


def teardown():
    """Destroy the process group after everything that holds it. torch binds DDP's C++
    Reducer so that its destructor keeps the GIL; if the Reducer held the last reference to
    the group, that destructor joins the group's worker threads while a worker, freeing a
    finished collective's tensors, waits for the GIL: a hang at exit (gloo, 1 run in 8 here).
    Freed first, DDP only drops one reference; destroy_process_group then frees the group
    through the group's own binding, which lets go of the GIL while it joins."""
    gc.collect()  # DDP and FSDP objects caught in reference cycles
    dist.destroy_process_group()


def run(config, ddp, rank, world, dev):
    # ---------------------------------------------------------------- set-up
    master = rank == 0
    console = Console(quiet=not master)
    dtype_name, why = auto_dtype(dev) if dtype == "auto" else (dtype, "set by --dtype")
    if ddp and dtype == "auto":  # each rank timed its own matmuls: bf16 only if all agree
        vote = torch.tensor([float(dtype_name == "bfloat16")], device=dev)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN)
        if dtype_name == "bfloat16" and not vote.item():
            dtype_name, why = "float32", "some rank multiplies fp32 faster; all ranks use one dtype"
    config = {**config, "dtype": dtype_name}  # what ran: "auto" depends on a timing
    ctx = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=dtype_name == "bfloat16")
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(seed)
    ckpt = None
    if init_from == "resume" or sample:
        if not os.path.exists(ckpt_path):
            sys.exit(f"no checkpoint at {ckpt_path}; train first or set --out_dir")
        ckpt = load_checkpoint(ckpt_path)
    if fsdp and not ddp:
        sys.exit("--fsdp=True shards over ranks: start it with torchrun")
    mesh = init_device_mesh(dev.split(":")[0], (world,)) if fsdp else None  # explicit: gloo on CPU
    model = build_model(ckpt, dev, mesh)
    if freeze_router:  # study.py --study=experts' control: routing by a fixed random projection
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.weight.requires_grad_(False)
    if sample:
        print(sample_text(model, prompt, max_new_tokens, dev, ctx))
        return
    splits = load_data(data, os.path.join(out_dir, "cache"), model.cfg.block_size)
    optimizer = make_optimizer(model, dev)
    train_gen = torch.Generator().manual_seed(seed + rank)
    it = 0
    if ckpt is not None:
        set_optimizer_state_dict(model, optimizer, shard_optimizer_state(model, ckpt["optimizer"])
                                 if ep else ckpt["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        it = ckpt["iter"]
        train_gen.set_state(ckpt["data_rng"][rank] if rank < len(ckpt["data_rng"]) else
                            torch.Generator().manual_seed(seed + rank).get_state())
        torch.set_rng_state(ckpt["rng"])
    eval_loads = eval_load_counter(model, dev)
    compiled = compiled_model(model, ddp) if compile else model  # evaluation runs it too
    if ep:  # before DDP: the expert shards stay out of its broadcast and all-reduce
        keep_experts_out_of_ddp(compiled)
    fwd = wrap_ddp(compiled) if ddp and not fsdp else compiled
    stop = []  # Ctrl-C finishes the current step, saves, and exits; a second one aborts
    def on_sigint(*_):
        if stop:
            raise KeyboardInterrupt
        stop.append(True)
    signal.signal(signal.SIGINT, on_sigint)
    log = open(os.path.join(out_dir, "log.jsonl"), "a" if ckpt else "w") if master else None
    def record(row):
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
    L = model.cfg.block_size
    tokens_per_step = batch_size * L * gradient_accumulation_steps * world
    flops = model.flops_per_token(L)
    peak = peak_flops(torch.cuda.get_device_name(dev)) if dev.startswith("cuda") else None
    console.print(f"[bold]{preset}[/] preset on {dev} ({world} rank(s)): "
                  f"{model.num_params() / 1e6:.2f}M parameters, "
                  f"{model.num_params(active=True) / 1e6:.2f}M active per token; "
                  f"{dtype_name} ({why}); "
                  f"data={data} ({sum(map(len, splits['train'])) / 1e6:.1f}M train tokens); "
                  f"balance={balance} (gamma={bias_update_speed}, alpha={seq_aux_alpha}, "
                  f"{aux_scope}); {tokens_per_step} tokens per step" + (
                      f"; grouped GEMM: {grouped_mm_path(torch.device(dev), getattr(torch, dtype_name))}"
                      if dev.startswith("cuda") else ""))
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=not master)
    task = progress.add_task("training", total=max_iters, completed=it)
    summary, maxvio = {}, []
    t_start, start_it = time.time(), it
    timed, train_s = 0, 0.0  # steps and seconds of training since the last log row

    # ---------------------------------------------------------------- the loop
    with progress:
        while True:
            if eval_iters and ((it % eval_interval == 0 and it > start_it) or it == max_iters):
                val_loss, val_loads = evaluate(compiled, eval_loads, splits["val"], batch_size,
                                               L, dev, ctx, eval_iters, seed)
                if not math.isfinite(val_loss):
                    nonfinite(console, "val loss", val_loss, it, ckpt_path)
                text = sample_text(model, prompt, 200, dev, ctx) if eval_sample else ""
                record(row := show_eval(progress.console, it, val_loss, val_loads, text,
                                           out_dir if heatmap_svg and master else None))
                summary.update(val_loss=val_loss, maxvio_global=row["maxvio_global"])
                save_checkpoint(ckpt_path, model, optimizer, it, config, train_gen, dev, world,
                                master)
            if it >= max_iters:
                break
            lr = lr_at(it, lr_decay_iters or max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            loss, aux, norm, bad, interrupted = train_step(fwd, model, optimizer, splits["train"],
                                                           train_gen, ctx, dev, ddp, stop)
            if bad:  # before optimizer.step: the weights are still good
                nonfinite(console, "loss or gradient", f"{loss.item()} / {norm.item()}", it,
                          ckpt_path)
            frozen = it >= (1 - bias_freeze_frac) * max_iters
            loads = update_bias(model, gamma=0.0 if frozen else None)  # whole step, all ranks
            maxvio.append(max_vio(loads).mean() if len(loads) else torch.zeros((), device=dev))
            it += 1
            if it > start_it + 1:  # the first step pays for compilation: not in tokens/s
                timed, train_s = timed + 1, train_s + time.time() - t0
            if it % log_interval == 0 or it == max_iters:  # tokens/s of training time alone
                tok_s = tokens_per_step * timed / train_s if timed else 0.0
                mfu = f"{100 * flops * tok_s / world / peak:.1f}%" if peak else "n/a"
                row = {"iter": it, "loss": (loss - aux).item(), "aux_loss": aux.item(), "lr": lr,
                       "tokens_per_s": tok_s, "mfu": mfu,
                       "maxvio_batch": torch.stack(maxvio).mean().item()}
                record(row)
                summary.update(loss=row["loss"], tokens_per_s=tok_s, mfu=mfu)
                progress.update(task, description=(
                    f"loss {row['loss']:.3f} aux {row['aux_loss']:.2e} lr {lr:.1e} "
                    f"{tok_s:,.0f} tok/s MFU {mfu} MaxVio {row['maxvio_batch']:.2f}"))
                timed, train_s, maxvio = 0, 0.0, []
            progress.update(task, completed=it)
            if interrupted:
                save_checkpoint(ckpt_path, model, optimizer, it, config, train_gen, dev, world,
                                master)
                console.print(f"interrupted at iter {it}; saved {ckpt_path}. "
                              "Continue with --init_from=resume")
                break

    console.print(summary_table(summary, dev, time.time() - t_start))


def nonfinite(console, what, value, it, ckpt_path):
    console.print(f"[red]{what} is {value} at iter {it}: stopping. The last good checkpoint, "
                  f"{ckpt_path}, is untouched; try a lower learning_rate.")
    sys.exit(1)


if __name__ == "__main__":
    main()
