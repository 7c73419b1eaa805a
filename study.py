"""
The project's studies. In the training ones each arm is a train.py run with the same data, seed,
steps and settings except what the arm is about, and one table compares them.

    python study.py                       # does aux-loss-free balancing work? ~15 min, 2 cores
    python study.py --study=arch          # does the MoE pay? DeepSeekMoE vs dense, ~20 min
    python study.py --scale=gpu           # either study at GPU size
    python study.py --study=groups        # why node-limited routing exists, on out/ckpt.pt
    python study.py --study=switch        # is the Switch balance loss minimised by uniform routing?
    python study.py --study=experts       # what the experts of out/ckpt.pt learned, ~15 min
    python study.py --study=experts --ckpt=out/ckpt.pt --control=CKPT --max_bytes=100000
    python study.py --arms=none,aux@0.01,bias --max_iters=100   # any train.py setting passes through

balance (default): train.py's --balance arms; val loss, MaxVio_global and _batch against the
noise floor of random routing, dead experts, tokens/s; expert loads in study_heatmaps.svg.
An arm "aux@0.01" is the aux arm with seq_aux_alpha=0.01.
switch: the balance loss of a routing that follows the router, below uniform routing's; then
the balance study's arms none, aux at three alphas, and bias, with the balance loss over uniform's.
experts: every byte of the stdlib val split classified by Python's tokenize (names, keywords, ...);
per MoE layer a class x expert heatmap and I(class; expert) in bits, against two controls: the
checkpoint's settings trained with the router frozen at its random init (trained here unless
--control gives one) and shuffled classes; a snippet coloured by each byte's top expert.
arch: DeepSeekMoE's arms at equal expert parameters and a dense model at equal active ones
(arch_configs), --seeds seeds each: val loss at equal tokens, tokens/s (median step, compiled,
train.py's dtype), training seconds to reach the dense run's final val loss, MaxVio_global, the
MoE tax (tokens/s of fine+shared / dense) and which loss gaps exceed the seed spread. Val loss
against tokens and against training seconds (tokens / median tokens/s: compile and evals left
out) in loss_vs_tokens.svg and loss_vs_seconds.svg.

Runs go to out_dir/<arm>/ (arch: out_dir/<arm>/seed<N>/), the table to study.json and study.md
(experts: out_dir/random_router/, experts.json, experts.md, experts.svg).
Arch runs are `python study.py --train --preset=cpu:fine ...`: train.py with the arch shapes
added to model.presets as "<base>:<arm>"; every train.py setting works (--sample, resume, ...).
"""
import codecs
import io
import itertools
import json
import keyword
import math
import os
import signal
import subprocess
import sys
import time
import tokenize
import warnings
from dataclasses import replace
from statistics import fmean, median

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import train
from data import get_batch, load_data, stdlib_files
from display import (class_heatmap, heatmap, plot_svg, routed_snippet, save_atlas, save_svg,
                     save_table, switch_table)
from model import GPT, GPTConfig, presets
from moe import MoE, MoEConfig, max_vio
from train import arms, auto_dtype, default_settings, parse_overrides

HERE = os.path.dirname(os.path.abspath(__file__))

# per study and scale: the train.py settings every arm shares
scales = {
    "balance": {
        "cpu": dict(preset="cpu", max_iters=600, eval_interval=600, eval_iters=40,
                    log_interval=10, batch_size=8, warmup_iters=30),
        "gpu": dict(preset="gpu", device="cuda", max_iters=3000, eval_interval=1000,
                    eval_iters=100, log_interval=50, batch_size=32, learning_rate=1e-3,
                    min_lr=1e-4, warmup_iters=200)},
    "arch": {
        "tiny": dict(preset="tiny", max_iters=4, eval_interval=2, eval_iters=1, log_interval=1,
                     batch_size=2, warmup_iters=1, compile=False, eval_sample=False),
        "cpu": dict(preset="cpu", max_iters=300, eval_interval=50, eval_iters=20,
                    log_interval=10, batch_size=8, warmup_iters=30, eval_sample=False),
        "gpu": dict(preset="gpu", device="cuda", max_iters=3000, eval_interval=250,
                    eval_iters=50, log_interval=50, batch_size=32, learning_rate=1e-3,
                    min_lr=1e-4, warmup_iters=200, eval_sample=False)},
}
COLOURS = {"dense": "#444444", "gshard": "#d62728", "fine": "#1f77b4", "fine+shared": "#2ca02c",
           "dense_wide": "#9467bd"}


def arch_configs(base: GPTConfig, m: int = 4, n_large: int = 8) -> dict[str, GPTConfig]:
    """DeepSeekMoE's arms [DSM Table 1] on base's attention, depth and width D. A large expert
    is 2D wide, so two active ones hold the 4D of a standard GPT MLP; every arm's first
    n_dense_layers blocks are that 4D MLP. MLP and expert parameters (routers aside) match:
      dense        every block a 4D MLP: the MoE arms' active parameters, no routing
      gshard       n_large=8 experts of 2D, top-2, no shared expert (GShard)
      fine         the same experts cut m=4 times finer: 32 of D/2, top-8
      fine+shared  fine with one active expert made shared: 1 shared + 31 routed, top-7
      dense_wide   every block dense, as wide as the MoE's total parameters (the upper bound)
    Routing is plain top-k over all experts (one group): 31 routed experts fit no group
    structure of 32, and node-limited routing is a cluster constraint that came after DSM."""
    D, H = base.n_embd, 2 * base.n_embd
    moe = replace(base.moe, n_expert_groups=1, n_limited_groups=1)
    def arm(inter_dim=2 * H, n_dense_layers=base.n_dense_layers, **routing):
        return replace(base, inter_dim=inter_dim, n_dense_layers=n_dense_layers,
                       moe=replace(moe, **routing))
    moe_total = base.n_dense_layers * 2 * H + (base.n_layer - base.n_dense_layers) * n_large * H
    return {
        "dense": arm(n_dense_layers=base.n_layer),
        "gshard": arm(moe_inter_dim=H, n_routed_experts=n_large, n_activated_experts=2,
                      n_shared_experts=0),
        "fine": arm(moe_inter_dim=H // m, n_routed_experts=m * n_large,
                    n_activated_experts=2 * m, n_shared_experts=0),
        "fine+shared": arm(moe_inter_dim=H // m, n_routed_experts=m * n_large - 1,
                           n_activated_experts=2 * m - 1, n_shared_experts=1),
        "dense_wide": arm(inter_dim=moe_total // base.n_layer, n_dense_layers=base.n_layer),
    }


def param_counts(cfg: GPTConfig) -> dict:
    """Parameters (embedding aside, as GPT.num_params): all, active per token, and of the MLPs
    and experts alone (routers aside), the part the arch arms hold equal."""
    with torch.device("meta"):  # shapes only: no memory, no init time, even at GPU size
        model = GPT(cfg)
    mlp = sum(p.numel() for n, p in model.named_parameters() if ".ffn." in n and ".gate." not in n)
    total, active = model.num_params(), model.num_params(active=True)
    return {"total": total, "active": active, "mlp_total": mlp, "mlp_active": mlp - total + active}


def noise_floor(n_experts, k, tokens, draws=20, seed=0):
    """Expected MaxVio of uniformly random top-k routing over `tokens` tokens: the value a
    perfectly balanced router still shows from sampling noise alone."""
    gen = torch.Generator().manual_seed(seed)
    picks = [torch.rand(tokens, n_experts, generator=gen).topk(k, dim=-1).indices
             for _ in range(draws)]
    return fmean(max_vio(torch.bincount(p.flatten(), minlength=n_experts)).item() for p in picks)


def run(console, out, cmd):
    """One train.py run in out/; its log.jsonl rows."""
    console.rule(f"[bold]{out}[/]: {' '.join(cmd[1:])}")
    if os.path.exists(os.path.join(out, "log.jsonl")):
        os.remove(os.path.join(out, "log.jsonl"))  # a fresh run, a fresh log
    run_to_its_end([sys.executable, *cmd], out)
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def run_to_its_end(cmd, out, after_ctrl_c=""):
    """Run a train.py command. Ctrl-C reaches it too (same terminal) and train.py answers by
    finishing its step and saving a checkpoint, so wait for that instead of killing it."""
    stopped = []
    previous = signal.signal(signal.SIGINT, lambda *_: stopped.append(True))
    try:
        failed = subprocess.run(cmd).returncode
    finally:
        signal.signal(signal.SIGINT, previous)
    if stopped:
        sys.exit(f"stopped by Ctrl-C; {out}/ckpt.pt holds the run so far{after_ctrl_c}")
    if failed:
        sys.exit(f"run {out} failed; its output is above")


def load_model(path):
    """The model of a train.py checkpoint, in eval mode, and the checkpoint."""
    if not os.path.exists(path):
        sys.exit(f"no checkpoint at {path}: run `python train.py` first, or pass --ckpt")
    ckpt = train.load_checkpoint(path)  # tensors and plain values only, or one clear line
    cfg = GPTConfig(**{**ckpt["model_cfg"], "moe": MoEConfig(**ckpt["model_cfg"]["moe"])})
    model = GPT(cfg)
    model.load_state_dict(ckpt["model"])
    return model.eval(), ckpt


@torch.no_grad()
def groups_study(ckpt_path, batches=20, batch_size=8):
    """Why node-limited routing exists [V3 2.1.2]: over val batches, how many expert groups
    (in V3, nodes) one token's K experts fall into, with the router's limit and for the same
    router (weights and bias) without it. Every group a token reaches is one more copy of the
    token in the all-to-all dispatch, so this count is the dispatch traffic per token."""
    model, ckpt = load_model(ckpt_path)
    cfg = model.cfg
    E, G, M = cfg.moe.n_routed_experts, cfg.moe.n_expert_groups, cfg.moe.n_limited_groups
    if M == G:
        sys.exit(f"{ckpt_path}: n_limited_groups={M} of n_expert_groups={G}: no group limit")
    gates = [m.gate for m in model.modules() if isinstance(m, MoE)]
    inputs = {g: [] for g in gates}  # every gate's input tokens
    hooks = [g.register_forward_pre_hook(lambda g, args: inputs[g].append(args[0])) for g in gates]
    settings = ckpt["config"]
    val = load_data(settings["data"], os.path.join(settings["out_dir"], "cache"),
                    cfg.block_size)["val"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(batches):
        model(get_batch(val, gen, batch_size, cfg.block_size, "cpu")[0])
    for h in hooks:
        h.remove()
    stats = []  # per layer: mean, max without the limit, then with it
    for g in gates:
        x, row = torch.cat(inputs[g]), []
        for routing in (replace(cfg.moe, n_limited_groups=G), cfg.moe):  # without, then with
            g.cfg = routing
            groups = g(x)[1] // (E // G)                                    # (T, K) group ids
            span = torch.zeros(len(x), G).scatter_(1, groups, 1.0).sum(1)    # (T,)
            row += [span.mean().item(), span.max().item()]
        stats.append(row)
    free, limited = (fmean(s[c] for s in stats) for c in (0, 2))
    table = Table(f"{ckpt_path}: {E} experts in {G} groups, top-{cfg.moe.n_activated_experts}",
                  "groups per token, no limit: mean", "max", f"limit {M}: mean", "max")
    for i, s in enumerate(stats):
        table.add_row(f"MoE {i}", *(f"{v:.2f}" for v in s))
    Console().print(table, f"The limit sends a token to {limited:.2f} groups on average instead "
                    f"of {free:.2f}: {100 * (1 - limited / free):.0f}% less dispatch traffic.")
    return free, limited


# ---------------------------------------------------------------------------------------------
# The Switch-loss question: is sum_i f_i P_i smallest when routing is uniform?

def switch_counterexample(d=0.1, c=4.0):
    """A routing that follows the router (each token goes to its own top-K) whose balance loss
    [V3 eq. 17-20], computed by moe.py's own layer, is below perfectly uniform routing's.
    E = 4 experts, K = 2, alpha = 1, sequences of 4 tokens of two kinds:
      a near tie: logits (d, d, 0, 0), picks experts 0 and 1, but spreads its P over all four
      a sure one: logits (-c, -c, c, c), picks experts 2 and 3 and puts its P there
    "skewed" (3 near ties, 1 sure token) loads experts 0 and 1 three times as much as 2 and 3,
    "uniform" (2 and 2) loads every expert alike and so scores exactly 1. Skewed scores less:
    its busy experts hold little P. As d -> 0 and c -> inf it tends to 7/8.
    Returns {routing: {"picks", "f", "P", "loss"}}; f and P recomputed here, for the table."""
    layer = MoE(MoEConfig(dim=8, moe_inter_dim=8, n_routed_experts=4, n_activated_experts=2,
                          n_shared_experts=0, seq_aux_alpha=1.0)).train()
    with torch.no_grad():
        layer.gate.weight.zero_()
        layer.gate.weight[:, 0] = torch.tensor([d, d, 0.0, 0.0])   # input e_0: a near tie
        layer.gate.weight[:, 1] = torch.tensor([-c, -c, c, c])     # input e_1: a sure token
    tie, sure = torch.eye(8)[0], torch.eye(8)[1]
    out = {}
    for name, tokens in (("skewed", [tie, tie, tie, sure]), ("uniform", [tie, tie, sure, sure])):
        x = torch.stack(tokens)                                              # (T=4, D)
        _, picks, scores = layer.gate(x)                                     # (T, K) (T, E)
        counts = torch.bincount(picks.flatten(), minlength=4)
        out[name] = {"picks": picks.sort(-1).values.tolist(),
                     "f": (counts * 4 / (2 * len(x))).tolist(),              # E / (K T) * count
                     "P": (scores / scores.sum(-1, keepdim=True)).mean(0).tolist(),
                     "loss": layer(x[None])[1].item()}                       # moe.py's loss
    return out


SWITCH_ARMS = ["none", "aux", "aux@0.01", "aux@0.1", "bias"]  # the balance loss at 3 alphas


# ---------------------------------------------------------------------------------------------
# The expert atlas: which kinds of Python bytes each expert takes

CLASSES = ("names", "keywords", "operators", "numbers", "strings", "comments", "whitespace",
           "newlines")
NAME, KEYWORD, OPERATOR, NUMBER, STRING, COMMENT, WHITESPACE, NEWLINE = range(len(CLASSES))
TOKEN_CLASS = {tokenize.NAME: NAME, tokenize.OP: OPERATOR, tokenize.NUMBER: NUMBER,
               tokenize.STRING: STRING, tokenize.COMMENT: COMMENT, tokenize.INDENT: WHITESPACE,
               tokenize.NEWLINE: NEWLINE, tokenize.NL: NEWLINE}
TOKEN_CLASS.update({getattr(tokenize, t): STRING for t in  # Python 3.12 splits f-strings up
                    ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, t)})
SNIPPET = b'''def mean(xs, start=0.0):
    """The average of xs; 0 if empty."""
    total = start  # running sum
    for x in xs:
        if x is not None:
            total += x * 1.5
    return total / max(len(xs), 1)
'''


def byte_classes(source: bytes) -> list[int]:
    """The class of every byte of one Python file by Python's own tokenize: an index into
    CLASSES, or -1 where none fits (an error token, a byte-order mark, every byte of a file
    tokenize refuses). Bytes between tokens are whitespace (indentation, spaces, a backslash
    that continues a line), or newlines if they are \\r or \\n."""
    labels = [NEWLINE if b in b"\r\n" else WHITESPACE for b in source]
    lines = io.BytesIO(source).readlines()  # the rows tokenize counts: split after each b"\n"
    starts = [0, *itertools.accumulate(map(len, lines))]
    try:
        encoding = tokenize.detect_encoding(io.BytesIO(source).readline)[0]
        tokens = list(tokenize.tokenize(io.BytesIO(source).readline))
    except (SyntaxError, tokenize.TokenError, UnicodeDecodeError):
        return [-1] * len(source)
    encoding = encoding.removesuffix("-sig")
    bom = len(codecs.BOM_UTF8) if source.startswith(codecs.BOM_UTF8) else 0  # not in row 1
    labels[:bom] = [-1] * bom

    def offset(row, col):  # tokenize's (row from 1, column in characters) -> byte offset
        skip = bom if row == 1 else 0
        line = lines[row - 1][skip:]
        if not line.isascii():  # a column counts characters, and some take several bytes
            col = len(line.decode(encoding)[:col].encode(encoding))
        return starts[row - 1] + skip + col

    for tok in tokens:
        if not tok.string or tok.type == tokenize.ENCODING:  # DEDENT, ENDMARKER: no bytes
            continue
        cls = TOKEN_CLASS.get(tok.type, -1)                  # ERRORTOKEN: -1
        if cls == NAME and keyword.iskeyword(tok.string):    # soft keywords (match) stay names
            cls = KEYWORD
        a, b = offset(*tok.start), offset(*tok.end)
        labels[a:b] = [cls] * (b - a)
    return labels


def mutual_information(joint: torch.Tensor) -> float:
    """I(X; Y) in bits from a table of counts, X along the rows and Y along the columns:
    the sum over cells of p(x, y) log2(p(x, y) / (p(x) p(y))); empty cells add nothing."""
    p = joint.double() / joint.sum()
    independent = p.sum(1, keepdim=True) * p.sum(0, keepdim=True)
    seen = p > 0
    return (p[seen] * (p[seen] / independent[seen]).log2()).sum().item()


def class_expert_counts(labels, picks, n_experts):
    """(classes, experts) table: how many (byte, one of its K experts) pairs fall in each cell;
    bytes of class -1 are left out. labels (N,), picks (N, K)."""
    keep = labels >= 0
    cell = labels[keep, None].long() * n_experts + picks[keep].long()                # (n, K)
    return torch.bincount(cell.flatten(), minlength=len(CLASSES) * n_experts).view(-1, n_experts)


def lift(joint):
    """A class's share of each expert's pairs over that expert's share of all pairs:
    p(e | c) / p(e); 1 means the class goes to the expert as often as bytes do in general."""
    joint = joint.double()
    return (joint / joint.sum(1, keepdim=True).clamp_min(1)) / (joint.sum(0) / joint.sum())


@torch.no_grad()
def route_bytes(model, stream, ctx, compiled, progress=None, what="", batch_size=16):
    """Every byte of stream (1-D uint8) through the model once as an input, in windows of
    block_size with the next bytes as targets. Returns, per MoE layer, the K experts each byte
    goes to (n_moe, N, K) and the one with the largest gate value (n_moe, N), and the mean
    cross-entropy in nats per byte."""
    L, N, K = model.cfg.block_size, len(stream), model.cfg.moe.n_activated_experts
    gates, dev = [m.gate for m in model.modules() if isinstance(m, MoE)], model.head.weight.device
    B = min(batch_size, -(-N // L))
    n_win = -(-N // (L * B)) * B  # whole batches, so the compiled model sees one shape
    padded = torch.full((n_win * L + 1,), -1)
    padded[:N] = stream
    x, y = padded[:-1].view(n_win, L).clamp_min(0), padded[1:].view(n_win, L)     # (W, L)
    picks = torch.zeros(len(gates), B * L, K, dtype=torch.long, device=dev)  # hooks write here
    top = torch.zeros(len(gates), B * L, dtype=torch.long, device=dev)       # (static shapes)
    def keep(i, weights, indices):
        picks[i].copy_(indices)
        top[i].copy_(indices.gather(1, weights.argmax(1, keepdim=True)).squeeze(1))
    hooks = [g.register_forward_hook(lambda g, inp, out, i=i: keep(i, *out[:2]))
             for i, g in enumerate(gates)]
    fwd = torch.compile(model) if compiled else model
    all_picks, all_top, loss, n = [], [], 0.0, 0
    task = progress.add_task(f"routing {N:,} bytes: {what}", total=n_win // B) if progress else None
    for s in range(0, n_win, B):
        with ctx:
            ce = fwd(x[s:s + B].to(dev), y[s:s + B].to(dev))[1]  # eval: no balance loss
        counted = int((y[s:s + B] >= 0).sum())
        loss, n = loss + ce.item() * counted, n + counted
        all_picks.append(picks.to("cpu", torch.int16))
        all_top.append(top.to("cpu", torch.int16))
        if progress:
            progress.advance(task)
    for h in hooks:
        h.remove()
    return torch.cat(all_picks, 1)[:, :N], torch.cat(all_top, 1)[:, :N], loss / n


def train_control(ckpt, out):
    """The random-router control: train.py with the checkpoint's own settings and steps, the
    router's weights frozen at their random init (the bias still balances). A finished control
    of the same settings in out is reused; one stopped by Ctrl-C resumes."""
    config = ckpt["config"]
    settings = {**default_settings(), **{k: v for k, v in config.items() if k in default_settings()},
                "max_iters": ckpt["iter"], "lr_decay_iters": config["lr_decay_iters"] or
                config["max_iters"], "out_dir": out, "freeze_router": True, "sample": False,
                "eval_sample": False, "heatmap_svg": False, "init_from": "scratch"}
    path = os.path.join(out, "ckpt.pt")
    if os.path.exists(path):
        done = train.load_checkpoint(path)
        if {**done["config"], "init_from": "scratch"} == settings:
            if done["iter"] >= settings["max_iters"]:
                Console().print(f"random-router control: {path} has these settings and steps; "
                                "reusing it")
                return path
            settings["init_from"] = "resume"
    Console().rule(f"random-router control: {settings['max_iters']} steps of train.py into {out}")
    run_to_its_end([sys.executable, os.path.join(HERE, "train.py"),
                    *(f"--{k}={v}" for k, v in settings.items())], out,
                   "; the same command resumes it")
    return path


def experts_study(ckpt_path, control, out_dir, max_bytes, shuffles=3):
    """The expert atlas of a checkpoint, against its random-router control (trained unless
    given) and a floor of shuffled classes; max_bytes > 0 takes only the first val bytes."""
    console = Console()
    model, ckpt = load_model(ckpt_path)
    if model.cfg.vocab_size != 256 or not any(isinstance(m, MoE) for m in model.modules()):
        sys.exit(f"{ckpt_path}: the atlas needs a byte-level model (vocab_size=256) with MoE layers")
    os.makedirs(out_dir, exist_ok=True)
    console.print(f"expert atlas of {ckpt_path}: the random-router control is trained first "
                  "unless given (train.py shows its ETA), then the val bytes are classified and "
                  "routed through both models (ETA shown)")
    control = control or train_control(ckpt, os.path.join(out_dir, "random_router"))
    dev, dtype = train.resolve_device(ckpt["config"]["device"]), ckpt["config"]["dtype"]
    models = {"learned": model.to(dev), "random router": load_model(control)[0].to(dev)}
    ctx = torch.autocast(dev.split(":")[0], torch.bfloat16,
                         enabled=(auto_dtype(dev)[0] if dtype == "auto" else dtype) == "bfloat16")
    files = stdlib_files()["val"]  # the val split of data="stdlib", file by file
    with Progress(*Progress.get_default_columns(), console=console) as progress:
        stream, labels = torch.frombuffer(bytearray(b"\n".join(files)), dtype=torch.uint8), []
        n = min(max_bytes or len(stream), len(stream))
        for f in progress.track(files, description="classifying val bytes (tokenize)"):
            if len(labels) < n:
                labels += byte_classes(f) + [-1]  # -1: the b"\n" data.py joins files with
        stream, labels = stream[:n], torch.tensor(labels[:n], dtype=torch.int8)
        routed = {name: route_bytes(m, stream, ctx, ckpt["config"]["compile"], progress, name)
                  for name, m in models.items()}                # name: (picks, top, val loss)
    E, known = model.cfg.moe.n_routed_experts, labels >= 0
    counts = torch.bincount(labels[known].long(), minlength=len(CLASSES))
    gen, layers = torch.Generator().manual_seed(0), []
    halves = (slice(0, len(stream) // 2), slice(len(stream) // 2, None))  # how much text moves it
    for i in range(len(routed["learned"][0])):  # MoE layer i
        joint = {n: class_expert_counts(labels, r[0][i], E) for n, r in routed.items()}
        half = {n: [mutual_information(class_expert_counts(labels[h], r[0][i][h], E))
                    for h in halves] for n, r in routed.items()}
        shuffled = [class_expert_counts(labels[known][torch.randperm(int(known.sum()), generator=gen)],
                                        routed["learned"][0][i][known], E) for _ in range(shuffles)]
        layers.append({"moe_layer": i, "mi_learned": mutual_information(joint["learned"]),
                       "mi_random_router": mutual_information(joint["random router"]),
                       "mi_shuffled": fmean(map(mutual_information, shuffled)),
                       "mi_learned_halves": half["learned"],
                       "mi_random_router_halves": half["random router"],
                       "heatmap": lift(joint["learned"]).tolist(),
                       "heatmap_random_router": lift(joint["random router"]).tolist()})
    p = counts.double() / counts.sum()
    record = {"checkpoint": ckpt_path, "control": control, "val_bytes": len(stream),
              "classified_bytes": int(counts.sum()), "classes": CLASSES,
              "class_bytes": counts.tolist(), "class_entropy_bits": -(p * p.log2()).nansum().item(),
              "val_loss": {n: r[2] for n, r in routed.items()}, "layers": layers,
              "snippet_layer": max(layers, key=lambda l: l["mi_learned"])["moe_layer"]}
    layer, E = record["snippet_layer"], model.cfg.moe.n_routed_experts
    snippet = torch.frombuffer(bytearray(SNIPPET), dtype=torch.uint8)
    pictures = [routed_snippet(SNIPPET, route_bytes(m, snippet, ctx, False)[1][layer], E,
                               f"{name}, MoE {layer}: each byte on the colour of its top expert")
                for name, m in models.items()]
    maps = [class_heatmap(torch.tensor(l["heatmap"]), CLASSES, f"MoE {l['moe_layer']}, learned "
                          "router: p(expert | class) / p(expert)") for l in layers]
    save_atlas(console, record, maps + pictures, out_dir)


def main():
    args = dict(study="balance", scale="cpu", arms="", out_dir="", seed=1337, seeds=3,
                ckpt="out/ckpt.pt", control="", max_bytes=0)
    given = [a for a in sys.argv[1:] if a.split("=")[0].removeprefix("--") in args]
    args.update(parse_overrides(given, args))
    passthrough = [a for a in sys.argv[1:] if a not in given]
    if args["study"] in ("groups", "experts") and passthrough:
        sys.exit(f"unknown setting(s) {passthrough} for --study={args['study']}")
    if args["study"] == "groups":
        return groups_study(args["ckpt"])
    if args["study"] == "experts":
        return experts_study(args["ckpt"], args["control"], args["out_dir"] or "out/experts",
                             args["max_bytes"])
    study = "balance" if args["study"] == "switch" else args["study"]
    if study not in scales:
        sys.exit(f"--study={study!r}: expected one of {', '.join([*scales, 'switch', 'groups', 'experts'])}")
    known = arms if study == "balance" else arch_configs(presets["tiny"])
    if args["scale"] not in scales[study]:
        sys.exit(f"--scale={args['scale']!r}: expected one of {', '.join(scales[study])}")
    default = SWITCH_ARMS if args["study"] == "switch" else [a for a in known if a != "dense_wide"]
    chosen = args["arms"].split(",") if args["arms"] else default
    if unknown := [a for a in chosen if a.partition("@")[0] not in known]:
        sys.exit(f"unknown arm(s) {unknown}; expected some of {', '.join(known)}")
    settings = {**scales[study][args["scale"]], "seed": args["seed"]}
    settings.update(parse_overrides(passthrough, {**default_settings(), **settings}))
    out_dir = args["out_dir"] or os.path.join("out", {"balance": "study"}.get(args["study"], args["study"]))
    if args["study"] == "switch":
        Console().print(switch_table(switch_counterexample()))
    if study == "balance":
        balance_study(chosen, settings, out_dir)
    else:
        arch_study(chosen, settings, out_dir, args["seeds"])


def balance_study(chosen, settings, out_dir):
    console = Console()
    flags = [f"--{k}={v}" for k, v in settings.items()]
    results = []
    for arm in chosen:  # "aux@0.01": the aux arm with seq_aux_alpha=0.01
        (base, _, alpha), out = arm.partition("@"), os.path.join(out_dir, arm)
        rows = run(console, out, [os.path.join(HERE, "train.py"), f"--balance={base}",
                                  f"--out_dir={out}", *flags,
                                  *([f"--seq_aux_alpha={alpha}"] if alpha else [])])
        alpha = float(alpha or settings.get("seq_aux_alpha", arms[base][1]))
        results.append(summarise_balance(arm, rows, settings, alpha))

    cfg = presets[settings["preset"]].moe
    tokens = tokens_per_step(settings)
    floor = noise_floor(cfg.n_routed_experts, cfg.n_activated_experts, tokens)
    table = Table(title=f"balance study: {settings['preset']} preset, {settings['max_iters']} steps, "
                        f"{tokens} tokens/step, seed {settings['seed']}")
    cols = ["arm", "val loss", "MaxVio global", "MaxVio batch", "noise floor", "dead experts",
            "balance loss / uniform's", "tokens/s"]
    rows = [[r["arm"], f"{r['val_loss']:.4f}", f"{r['maxvio_global']:.3f}",
             f"{r['maxvio_batch']:.3f}", f"{floor:.3f}", str(r["dead_experts"]),
             "-" if r["balance_loss_ratio"] is None else f"{r['balance_loss_ratio']:.3f}",
             f"{r['tokens_per_s']:,.0f}"] for r in results]
    for r in results:
        r["noise_floor"] = floor
    maps = [heatmap(torch.tensor(r.pop("loads")), f"{r['arm']}: val-set expert load / mean")
            for r in results]
    save_table(console, table, cols, rows, [], out_dir, {"settings": settings, "rows": results})
    for hm in maps:
        console.print(hm)
    save_svg(maps, os.path.join(out_dir, "study_heatmaps.svg"), "balance study")
    console.print(f"saved {out_dir}/study.json, study.md, study_heatmaps.svg")


def tokens_per_step(settings):
    return (settings["batch_size"] * settings.get("gradient_accumulation_steps", 1) *
            (settings.get("block_size") or presets[settings["preset"]].block_size))


def summarise_balance(arm, rows, settings, alpha):
    """Final val loss and MaxVio_global; MaxVio_batch over the last fifth of training, and the
    balance loss there over uniform routing's (alpha per MoE layer; None without the loss)."""
    train_rows = [r for r in rows if "loss" in r]
    final = [r for r in rows if "val_loss" in r][-1]
    last = [r for r in train_rows if r["iter"] > 0.8 * settings["max_iters"]] or train_rows[-1:]
    cfg = presets[settings["preset"]]
    uniform = alpha * (cfg.n_layer - cfg.n_dense_layers)
    return {"arm": arm, "val_loss": final["val_loss"], "maxvio_global": final["maxvio_global"],
            "maxvio_batch": sum(r["maxvio_batch"] for r in last) / len(last),
            "balance_loss_ratio": fmean(r["aux_loss"] for r in last) / uniform if alpha else None,
            "dead_experts": sum(v == 0 for layer in final["loads"] for v in layer),
            "tokens_per_s": median(r["tokens_per_s"] for r in train_rows), "loads": final["loads"]}


def arch_study(chosen, settings, out_dir, n_seeds):
    console = Console()
    base, step_tokens = settings["preset"], tokens_per_step(settings)
    flags = [f"--{k}={v}" for k, v in settings.items() if k not in ("preset", "seed")]
    seeds = [settings["seed"] + i for i in range(n_seeds)]
    runs, start, n_runs = {a: [] for a in chosen}, time.time(), n_seeds * len(chosen)
    for seed in seeds:  # seeds outside: one result of every arm comes early, and a fair ETA
        for arm in chosen:
            out = os.path.join(out_dir, arm, f"seed{seed}")
            rows = run(console, out, [os.path.join(HERE, "study.py"), "--train",
                                      f"--preset={base}:{arm}", f"--seed={seed}",
                                      f"--out_dir={out}", *flags])
            runs[arm].append(summarise_arch(rows, step_tokens))
            done, spent = sum(map(len, runs.values())), time.time() - start
            console.print(f"[bold]{done}/{n_runs} runs in {spent / 60:.1f} min; "
                          f"ETA {spent / done * (n_runs - done) / 60:.1f} min[/]")

    ref = "dense" if "dense" in chosen else chosen[0]
    loss = {a: [r["val_loss"] for r in runs[a]] for a in chosen}
    record = {"settings": settings, "seeds": seeds, "reference": ref, "arms": {}}
    cols = ["arm", "params M (active)", "MLP params M (active)", "val loss", f"- {ref}",
            "tokens/s", f"s to {ref}'s loss", "MaxVio global"]
    rows, configs = [], arch_configs(presets[base])
    for arm in chosen:  # each seed against the reference arm's run with the same seed
        c, rs = param_counts(configs[arm]), runs[arm]
        reach = [seconds_to(r["curve"], t) for r, t in zip(rs, loss[ref])]
        got = [s for s in reach if s is not None]
        rows.append([arm, f"{c['total'] / 1e6:.3f} ({c['active'] / 1e6:.3f})",
                     f"{c['mlp_total'] / 1e6:.3f} ({c['mlp_active'] / 1e6:.3f})",
                     spread(loss[arm], "{:.4f}"),
                     "-" if arm == ref else spread([a - b for a, b in zip(loss[arm], loss[ref])],
                                                   "{:+.4f}"),
                     spread([r["tokens_per_s"] for r in rs], "{:,.0f}"),
                     "not reached" if not got else spread(got, "{:.0f}") +
                     ("" if len(got) == len(reach) else f" ({len(got)}/{len(reach)} seeds)"),
                     "-" if rs[0]["maxvio_global"] is None else
                     spread([r["maxvio_global"] for r in rs], "{:.3f}")])
        record["arms"][arm] = {**c, "runs": rs, "seconds_to_reference": reach}
    notes = compare(runs, chosen)
    if "dense" in chosen and "fine+shared" in chosen:
        speed = {a: fmean(r["tokens_per_s"] for r in runs[a]) for a in ("dense", "fine+shared")}
        record["moe_tax"] = speed["fine+shared"] / speed["dense"]
        notes.insert(0, f"MoE tax: fine+shared trains at {record['moe_tax']:.2f}x the tokens/s "
                        "of dense")
    table = Table(title=f"architecture study: {base} preset, {settings['max_iters']} steps of "
                        f"{step_tokens} tokens, seeds {seeds} (mean ± half the range)")
    save_table(console, table, cols, rows, notes, out_dir, record)
    for x, label in (("tokens", "training tokens (M)"), ("seconds", "training seconds")):
        plot_svg([(arm, COLOURS.get(arm, "#888888"), [(p[x], p["val_loss"]) for p in r["curve"]])
                  for arm in chosen for r in runs[arm]],
                 os.path.join(out_dir, f"loss_vs_{x}.svg"), f"val loss vs {label}", label)
    console.print(f"saved {out_dir}/study.json, study.md, loss_vs_tokens.svg, loss_vs_seconds.svg")


def spread(xs, fmt):
    """One arm's seeds as 'mean ± half the range'."""
    half = fmt.format((max(xs) - min(xs)) / 2).lstrip("+")
    return fmt.format(fmean(xs)) + (f" ± {half}" if len(xs) > 1 else "")


def compare(runs, chosen):
    """DeepSeekMoE's claims, one line each: is the loss gap larger than the seed spread?"""
    notes = []
    for a, b in (("gshard", "fine"), ("fine", "fine+shared"), ("dense", "fine+shared"),
                 ("dense", "gshard"), ("fine+shared", "dense_wide")):
        if a in chosen and b in chosen:
            la, lb = ([r["val_loss"] for r in runs[x]] for x in (a, b))
            apart = max(lb) < min(la) or min(lb) > max(la)  # the seed ranges do not overlap
            notes.append(f"{b} - {a}: val loss {fmean(lb) - fmean(la):+.4f}, " + (
                "one seed: no spread to judge it by" if len(la) < 2 else
                "resolved (the seed ranges do not overlap)" if apart else
                "within the seed spread (not resolved)"))
    return notes


def summarise_arch(rows, step_tokens):
    """Median tokens/s of the training rows; the val curve against tokens (M) and training
    seconds (tokens / median tokens/s: compile and evals left out); final MaxVio_global."""
    speed = median(r["tokens_per_s"] for r in rows if "loss" in r)
    evals = [r for r in rows if "val_loss" in r]
    curve = [{"tokens": r["iter"] * step_tokens / 1e6, "seconds": r["iter"] * step_tokens / speed,
              "val_loss": r["val_loss"]} for r in evals]
    vio = evals[-1].get("maxvio_global")
    return {"val_loss": evals[-1]["val_loss"], "tokens_per_s": speed, "curve": curve,
            "maxvio_global": vio if vio is not None and math.isfinite(vio) else None}


def seconds_to(curve, target):
    """Training seconds at which a val curve first reaches target, linear between evals;
    None if it never does."""
    for prev, p in zip([None] + curve, curve):
        if p["val_loss"] <= target:
            if prev is None:
                return p["seconds"]
            f = (prev["val_loss"] - target) / (prev["val_loss"] - p["val_loss"])
            return prev["seconds"] + f * (p["seconds"] - prev["seconds"])
    return None


def train_arm():
    """python study.py --train ARGS is python train.py ARGS, with the arch arms of the base
    preset in ARGS added to model.presets as "<base>:<arm>" (train.py takes shapes by name)."""
    sys.argv.remove("--train")
    name = next((a.partition("=")[2] for a in sys.argv if a.startswith("--preset=")), "")
    if (base := name.partition(":")[0]) in presets:
        presets.update({f"{base}:{arm}": c for arm, c in arch_configs(presets[base]).items()})
    train.main()


if __name__ == "__main__":
    train_arm() if "--train" in sys.argv[1:] else main()
