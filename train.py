"""
Train a small DeepSeek-V3-style MoE GPT, offline, with aux-loss-free balancing.

    python train.py                                  # CPU default: Python's own stdlib as bytes
    python train.py --data=notes.txt                 # a text file or a folder of text files
    python train.py --data='fineweb10B/*.bin' --vocab_size=50304   # llm.c / modded-nanogpt shards
    python train.py --init_from=resume               # continue out_dir/ckpt.pt
    python sample.py --prompt='def '                 # sample from out_dir/ckpt.pt
    python train.py --balance=aux                    # none | aux | aux_batch | bias | v3
    torchrun --standalone --nproc_per_node=2 train.py --preset=gpu --device=cuda   # parallel.py

Every setting below can be overridden with --key=value. After each optimizer step the expert
biases are updated in place from the loads of the whole step (all micro-batches, all ranks).
This file reads as one process's run; what several processes add sits behind parallel.*.
"""
import json
import math
import os
import signal
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, replace

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

import parallel
from data import atomic_save, get_batch, load_checkpoint, load_data, truncate_log
from display import show_eval, summary_table
from model import GPT, presets
from moe import MoE, grouped_mm_path, max_vio, update_bias
from sample import sample_text
from startup import (agree_on_dtype, auto_dtype, check_compiler, default_settings,
                     matmul_precision, parse_overrides, peak_flops, stamp)

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
dtype = "auto"               # autocast: "auto" (the faster here), "bfloat16", "float32"
seed = 1337
eval_sample = True           # print a sample at each eval, as sample.py would (study.py: off)
heatmap_svg = True           # also save each eval's expert-load heatmap as out_dir/*.svg

arms_keys = ("bias_update_speed", "seq_aux_alpha", "aux_scope")
arms = {  # balancing arm: values of arms_keys
    "none": (0.0, 0.0, "sequence"), "aux": (0.0, 1e-3, "sequence"),
    "aux_batch": (0.0, 1e-3, "batch"), "bias": (1e-3, 0.0, "sequence"),
    "v3": (1e-3, 1e-4, "sequence")}
preset_settings = {  # defaults a preset changes, unless given (the arch study's gpu scale)
    "gpu": dict(learning_rate=1e-3, min_lr=1e-4, warmup_iters=200)}
LAUNCH = ("out_dir", "init_from", "device", "compile", "fsdp", "ep")  # not resumed: how to run


def configure():
    """Settings into this module's globals, each from the first of: the command line; when
    resuming, the checkpoint's own settings (but for how to launch: LAUNCH); the defaults
    above. A balancing arm or a preset named here (on resume: changed here) sets gamma, alpha
    and the aux scope, or the preset's own defaults, unless those are given too. Returns the
    settings, the checkpoint or None, and what the command line changed: {key: (was, now)}."""
    settings = default_settings(globals())
    given = parse_overrides(sys.argv[1:], settings)
    ckpt, saved = None, {}
    if given.get("init_from") == "resume":  # the same run goes on, as it was set up
        ckpt = load_checkpoint(os.path.join(given.get("out_dir", out_dir), "ckpt.pt"))
        saved = {k: v for k, v in ckpt["config"].items() if k in settings and k not in LAUNCH
                 and (k != "preset" or v in presets)}  # study.py's arch presets: shapes below
    globals().update({**saved, **given})
    if balance not in arms:
        sys.exit(f"--balance={balance!r}: expected one of {', '.join(arms)}")
    if preset not in presets:
        sys.exit(f"--preset={preset!r}: expected one of {', '.join(presets)}")
    for key, values in (("balance", dict(zip(arms_keys, arms[balance]))),
                        ("preset", preset_settings.get(preset, {}))):
        if ckpt is None or (key in given and given[key] != saved.get(key)):
            globals().update({k: v for k, v in values.items() if k not in given})
    if init_from not in ("scratch", "resume") or dtype not in ("auto", "bfloat16", "float32"):
        sys.exit(f"init_from={init_from!r} / dtype={dtype!r}: see the docstring for valid values")
    experts = ckpt["model_cfg"]["moe"] if ckpt else vars(presets[preset].moe)
    parallel.check(fsdp, ep, experts["n_routed_experts"])
    changed = {k: (saved[k], globals()[k]) for k in saved if saved[k] != globals()[k]}
    return {k: globals()[k] for k in settings}, ckpt, changed


def build_model(ckpt, dev):
    """The preset with the settings' overrides (a checkpoint's shapes win; balancing as set
    now), on dev, with the checkpoint's weights if there is one."""
    cfg = presets[preset]
    cfg = replace(cfg, block_size=block_size or cfg.block_size,
                  vocab_size=vocab_size or cfg.vocab_size,
                  moe=replace(cfg.moe, bias_update_speed=bias_update_speed,
                              seq_aux_alpha=seq_aux_alpha, aux_scope=aux_scope))
    if ckpt is not None:
        saved = ckpt["model_cfg"]
        cfg = replace(cfg, **{**saved, "moe": replace(cfg.moe, **{
            **saved["moe"], **{k: getattr(cfg.moe, k) for k in arms_keys}})})
    if fsdp:
        return parallel.fsdp_model(cfg, ckpt["model"] if ckpt else None, dev)
    model = GPT(cfg).to(dev)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
    return parallel.shard_experts(model) if ep else model  # after loading: ckpts hold all experts


def make_optimizer(model, dev):
    """AdamW, V3's betas; weight decay on matrices only; the fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=learning_rate, betas=(0.9, 0.95),
                             fused=True if dev.startswith("cuda") else None)


def lr_at(it, decay_iters):
    """Linear warm-up, then cosine from learning_rate down to min_lr."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / warmup_iters
    ratio = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    return min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, loads, shards, B, L, dev, ctx, iters, seed, world=1):
    """Val loss (the ranks' mean: a non-finite one on any rank stops them all) and per-layer
    expert loads over the same val batches each time. In eval mode the model's own counts (so
    the bias) never see val data; the hooks of GPT.count_eval_loads count."""
    model.eval()
    loads.zero_()
    gen, total = torch.Generator().manual_seed(seed), torch.zeros((), device=dev)
    for _ in range(iters):
        x, y = get_batch(shards, gen, B, L, dev, model.cfg.vocab_size)
        with ctx:
            total += model(x, y)[1]  # eval mode: aux_loss is 0, this is cross-entropy
    model.train()
    return parallel.sum_over_ranks(total).item() / world / iters, loads.double().cpu()


# ----------------------------------------------------------------------------- one step
def train_step(fwd, model, optimizer, shards, gen, ctx, dev, stop):
    """Forward and backward over the micro-batches, clip, and, unless the gradient is not
    finite, step. One host sync: the flag that says "stop" (NaN, or a stop on any rank); on
    CUDA, where torch has no fast grouped GEMM for this GPU and dtype, every grouped matmul
    syncs as well (moe.grouped_mm_path)."""
    for micro in range(gradient_accumulation_steps):
        x, y = get_batch(shards, gen, batch_size, model.cfg.block_size, dev, model.cfg.vocab_size)
        parallel.sync_gradients(fwd, model, now=micro == gradient_accumulation_steps - 1)
        with ctx:
            _, loss, aux = fwd(x, y)
        (loss / gradient_accumulation_steps).backward()
    norm = parallel.clip_grad_norm_(model, grad_clip, ep)  # all micro-batches (and ranks)
    flag = torch.stack([torch.isfinite(norm).logical_not().float(),
                        norm.new_full((), float(bool(stop)))])  # a fill, no host copy
    bad, interrupted = parallel.sum_over_ranks(flag).tolist()  # the step's host sync
    if not bad:  # every rank skips or steps alike, or they would drift apart (or hang)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, aux, norm, bool(bad), bool(interrupted)


def save_checkpoint(path, model, optimizer, it, config, gen, dev, master):
    """Atomically, from rank 0: the uncompiled model, optimizer, settings, RNG, and every
    rank's data position, so that every rank resumes where it was. Full tensors: a single
    process can load the file whatever wrote it."""
    model_state, optim_state, data_rng = parallel.full_state(model, optimizer, ep, gen, dev)
    if master:
        atomic_save({"model": model_state, "optimizer": optim_state, "iter": it,
                     "config": config, "model_cfg": asdict(model.cfg),
                     "rng": torch.get_rng_state(), "data_rng": data_rng}, path)


def nonfinite(console, what, value, it, ckpt_path):
    console.print(f"[red]{what} is {value} at iter {it}: stopping. The last good checkpoint, "
                  f"{ckpt_path}, is untouched; try a lower learning_rate.")
    sys.exit(1)


def main():
    config, ckpt, changed = configure()
    distributed, rank, world, dev = parallel.init(device)
    try:
        run(config, ckpt, changed, distributed, rank, world, dev)
    except BaseException as e:  # sys.exit and Ctrl-C too: free what run() held before teardown
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        if distributed:
            parallel.teardown()


def run(config, ckpt, changed, distributed, rank, world, dev):
    # ---------------------------------------------------------------- set-up
    master = rank == 0
    console = Console(quiet=not master)
    if compile:
        check_compiler(dev)
    ckpt_path = os.path.join(out_dir, "ckpt.pt")
    os.makedirs(out_dir, exist_ok=True)
    if dev == "cpu":  # else compiled kernels add some gradients in thread order, and two runs
        torch.use_deterministic_algorithms(True)  # of one seed drift apart (docs/training.md)
    torch.manual_seed(seed)
    model = build_model(ckpt, dev)
    dtype_name, why = dtype, ("as the checkpoint ran" if ckpt and "dtype" not in changed
                              else "set by --dtype")
    if dtype == "auto":  # timed on a fresh model of the same shapes; one dtype for all ranks
        dtype_name, why = agree_on_dtype(*auto_dtype(dev, lambda: GPT(model.cfg), batch_size), dev)
    why += matmul_precision(dev, dtype_name)
    config = {**config, "dtype": dtype_name}  # what ran: "auto" depends on a timing
    ctx = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=dtype_name == "bfloat16")
    if freeze_router:  # study.py --study=experts' control: routing by a fixed random projection
        for m in model.modules():
            if isinstance(m, MoE):
                m.gate.weight.requires_grad_(False)
    splits = load_data(data, os.path.join(out_dir, "cache"), model.cfg.block_size)
    optimizer = make_optimizer(model, dev)
    train_gen = torch.Generator().manual_seed(seed + rank)
    it = ckpt["iter"] if ckpt else 0
    if ckpt is not None:
        parallel.load_optimizer_state(model, optimizer, ckpt["optimizer"], ep)
        train_gen.set_state(ckpt["data_rng"][rank] if rank < len(ckpt["data_rng"]) else
                            torch.Generator().manual_seed(seed + rank).get_state())
        torch.set_rng_state(ckpt["rng"])
    eval_loads = model.count_eval_loads()  # (n_moe_layers, E), by hooks on the gates
    compiled = parallel.compile_model(model, distributed, ep) if compile else model  # evals too
    fwd = parallel.wrap(compiled, distributed, fsdp, ep)  # the module itself in one process
    stop = []  # Ctrl-C or SIGTERM: finish the step, save, exit. Ctrl-C again a second later
    def on_stop(signum, _):  # aborts; copies of the first (a launcher forwards it) do not
        if stop and signum == signal.SIGINT and time.time() > stop[1] + 1:
            raise KeyboardInterrupt
        stop[:] = stop or [signal.Signals(signum).name, time.time()]
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, on_stop)
    log_path = os.path.join(out_dir, "log.jsonl")
    if master and ckpt is not None:  # each iteration once: rows past the checkpoint run again
        truncate_log(log_path, it)
    log = open(log_path, "a" if ckpt else "w", buffering=1) if master else None  # by line
    record = lambda row: log and log.write(json.dumps(row) + "\n")  # rank 0 writes
    L = model.cfg.block_size
    tokens_per_step = batch_size * L * gradient_accumulation_steps * world
    flops = model.flops_per_token(L)
    peak = peak_flops(torch.cuda.get_device_name(dev)) if dev.startswith("cuda") else None
    mfu_of = lambda tok_s: f"{100 * flops * tok_s / world / peak:.1f}%" if peak else "n/a"
    if ckpt is not None:
        console.print(f"resuming {ckpt_path} at iter {it} with its settings" + "".join(
            f", {k}={new} (was {old})" for k, (old, new) in changed.items()), highlight=False)
    gemm = f"; grouped GEMM: {grouped_mm_path(torch.device(dev), getattr(torch, dtype_name))}"
    console.print(f"[bold]{preset}[/] preset on {dev} ({world} rank(s)): "
                  f"{model.num_params() / 1e6:.2f}M parameters, "
                  f"{model.num_params(active=True) / 1e6:.2f}M active per token; "
                  f"{dtype_name} ({why}); data={data} ({sum(map(len, splits['train'])) / 1e6:.1f}M "
                  f"train tokens); balance={balance} (gamma={bias_update_speed}, alpha="
                  f"{seq_aux_alpha}, {aux_scope}); {tokens_per_step} tokens per step"
                  + (gemm if dev.startswith("cuda") else ""))
    progress = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console, disable=not master)
    task = progress.add_task("training", total=max_iters, completed=it)
    summary, maxvio, speeds = {}, [], []
    t_start, start_it = time.time(), it
    timed, train_s = 0, 0.0  # steps and seconds of training since the last log row

    # ---------------------------------------------------------------- the loop
    with progress:
        while True:
            due = it % eval_interval == 0 and it > 0 or it == max_iters  # not a resumed one's
            if eval_iters and due and (it > start_it or ckpt is None):  # first: it is saved
                val_loss, val_loads = evaluate(compiled, eval_loads, splits["val"], batch_size,
                                               L, dev, ctx, eval_iters, seed, world)
                if not math.isfinite(val_loss):
                    nonfinite(console, "val loss", val_loss, it, ckpt_path)
                text = sample_text(model, "\n", 200, ctx) if eval_sample else ""
                record(row := show_eval(progress.console, it, val_loss, val_loads, text,
                                           out_dir if heatmap_svg and master else None))
                summary.update(val_loss=val_loss, maxvio_global=row["maxvio_global"])
                save_checkpoint(ckpt_path, model, optimizer, it, config, train_gen, dev, master)
            if it >= max_iters:
                break
            lr = lr_at(it, lr_decay_iters or max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            t0 = time.time()
            loss, aux, norm, bad, interrupted = train_step(fwd, model, optimizer, splits["train"],
                                                           train_gen, ctx, dev, stop)
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
                row = {"iter": it, "loss": (loss - aux).item(), "aux_loss": aux.item(), "lr": lr,
                       "tokens_per_s": tok_s, "mfu": mfu_of(tok_s),
                       "maxvio_batch": torch.stack(maxvio).mean().item()}
                record(row)
                speeds.append(tok_s)  # the summary's speed: the median of the log rows
                summary.update(loss=row["loss"], tokens_per_s=statistics.median(speeds),
                               mfu=mfu_of(statistics.median(speeds)))
                progress.update(task, description=(
                    f"loss {row['loss']:.3f} aux {row['aux_loss']:.2e} lr {lr:.1e} "
                    f"{tok_s:,.0f} tok/s MFU {row['mfu']} MaxVio {row['maxvio_batch']:.2f}"))
                timed, train_s, maxvio = 0, 0.0, []
            progress.update(task, completed=it)
            if interrupted:
                save_checkpoint(ckpt_path, model, optimizer, it, config, train_gen, dev, master)
                console.print(f"stopped by {stop[0] if stop else 'a signal to another rank'} "
                              f"at iter {it}; saved {ckpt_path}. Continue with the same "
                              f"command and --init_from=resume --out_dir={out_dir}")
                break

    console.print(stamp(dev, dtype_name), highlight=False, markup=False, soft_wrap=True)
    console.print(summary_table(summary, dev, time.time() - t_start))


if __name__ == "__main__":
    main()
