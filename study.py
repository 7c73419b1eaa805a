"""
The project's studies. In the training ones each arm is a train.py run with the same data, seed,
steps and settings except what the arm is about, and one table, under its stamp, compares them.

    python study.py                       # does aux-loss-free balancing work? (balance)
    python study.py --seeds=4             # ... every arm with 4 seeds: means, spreads, paired gaps
    python study.py --study=arch          # does the MoE pay? DeepSeekMoE vs dense, 3 seeds
    python study.py --scale=gpu           # either study at GPU size
    python study.py --study=switch        # is the Switch balance loss minimised by uniform routing?
    python study.py --study=groups        # why node-limited routing exists, on out/ckpt.pt
    python study.py --study=experts       # what the experts of out/ckpt.pt learned (atlas.py)
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=4 study.py --study=traffic
    python study.py --arms=none,aux@0.01,bias --max_iters=100   # any train.py setting passes through

balance: train.py's --balance arms; val loss, MaxVio_global and _batch against the noise floor
of random routing, dead experts, tokens/s; expert loads in study_heatmaps.svg. An arm
"aux@0.01" is the aux arm with seq_aux_alpha=0.01. switch: the balance loss of a routing that
follows the router, below uniform routing's; then the arms none, aux at three alphas, and bias.
arch: DeepSeekMoE's arms at equal expert parameters and a dense model at equal active ones
(arch_configs): val loss at equal tokens, tokens/s, training seconds to the dense run's final
val loss, MaxVio_global, the MoE tax, which gaps exceed the seed spread; loss_vs_tokens.svg and
loss_vs_seconds.svg. experts: docs/experts.md. traffic: ep.py's all-to-all bytes per token,
measured and from the formula, and DeepSeek-V3's copies per token on paper (docs/ep.md).

Runs go to out_dir/<arm>/ (with --seeds: out_dir/<arm>/seed<N>/), tables to study.json and
study.md. Arch runs are `python study.py --train --preset=cpu:fine ...`: train.py with the arch
shapes added to model.presets as "<base>:<arm>", so every train.py setting works.
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from statistics import fmean, median, stdev

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

import train
from atlas import experts_study
from data import get_batch, load_checkpoint, load_data
from display import heatmap, plot_svg, save_svg, save_table, switch_table
from model import GPT, GPTConfig, presets
from ep import combine, dispatch
from moe import Gate, MoE, MoEConfig, max_vio
from startup import HERE, default_settings, parse_overrides, resolve_device, run_to_its_end, stamp
from train import arms


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
    H = 2 * base.n_embd
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


@torch.no_grad()
def groups_study(ckpt_path, batches=20, batch_size=8):
    """Why node-limited routing exists [V3 2.1.2]: over val batches, how many expert groups
    (in V3, nodes) one token's K experts fall into, with the router's limit and for the same
    router (weights and bias) without it. Every group a token reaches is one more copy of the
    token in the all-to-all dispatch, so this count is the dispatch traffic per token."""
    ckpt = load_checkpoint(ckpt_path)
    model = GPT.from_checkpoint(ckpt).eval()
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
    Console().print(stamp("cpu", "float32"), highlight=False, markup=False, soft_wrap=True)
    Console().print(table, f"The limit sends a token to {limited:.2f} groups on average instead "
                    f"of {free:.2f}: {100 * (1 - limited / free):.0f}% less dispatch traffic.")
    return free, limited


@torch.no_grad()
def traffic(nodes, limited, T=4096, D=256, E=16, K=4):
    """Bytes per token that ep.py's dispatch and combine hand to all_to_all_single for other
    ranks (counted by wrapping it), and the formula: copies times the bytes of a row, plus the
    counts exchange; copies counted from the picks (the other ranks, nodes, holding one). The R
    ranks emulate `nodes` nodes; the router has a group per node and keeps half, or all."""
    R, r = dist.get_world_size(), dist.get_rank()
    cfg = MoEConfig(dim=D, n_routed_experts=E, n_activated_experts=K, n_expert_groups=nodes,
                    n_limited_groups=nodes // 2 if limited else nodes)
    torch.manual_seed(0)                                       # the same router on every rank
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1 + r)).bfloat16()
    weights, indices, _ = Gate(cfg)(x)
    sent, phase, real = torch.zeros(2, R), [0], dist.all_to_all_single
    def counting(out, inp, out_splits=None, in_splits=None, **kw):
        row = inp.element_size() * math.prod(inp.shape[1:])
        sent[phase[0]] += torch.tensor(in_splits or [len(inp) // R] * R) * row
        return real(out, inp, out_splits, in_splits, **kw)
    dist.all_to_all_single = counting
    try:
        rows, local, w, P, route = dispatch(x, weights, indices, E // R)
        phase[0] = 1
        combine(rows, route, T)                                # as if experts were the identity
    finally:
        dist.all_to_all_single = real
    node = torch.arange(R) // (R // nodes)                     # (R,) emulated node of each rank
    away, abroad = torch.arange(R) != r, node != node[r]       # (R,) other ranks, other nodes
    ranks = F.one_hot(indices // (E // R), R).amax(1).bool()  # (T, R) ranks a token visits
    homes = F.one_hot(indices // (E // nodes), nodes).amax(1).bool()  # (T, nodes) its nodes
    copies = lambda hit: hit.float().sum(1).mean()
    row_in, row_out = 2 * D + 8 * K, 2 * D                     # bf16 x, K int32 ids + fp32 weights
    counts = lambda to: 16 * to.sum() / T                      # the (rows, pairs) int64 exchange
    stats = torch.stack([copies(ranks[:, away]), copies(ranks[:, abroad]),
                         copies(homes) - homes[:, node[r]].float().mean(),
                         sent[0, away].sum() / T, copies(ranks[:, away]) * row_in + counts(away),
                         sent[0, abroad].sum() / T,
                         copies(ranks[:, abroad]) * row_in + counts(abroad),
                         sent[1, away].sum() / T, copies(ranks[:, away]) * row_out])
    dist.all_reduce(stats)
    return (stats / R).tolist()


def v3_copies(limited, T=20000):
    """DeepSeek-V3's routing (256 experts, 8 groups, top-8, 4 groups kept) on 8 nodes of 8 GPUs
    (4 experts each): mean copies of a token sent per pick, per GPU and per node, and of those
    the copies that leave its own node (drawn uniformly). A random router on random inputs."""
    cfg = MoEConfig(dim=64, n_routed_experts=256, n_activated_experts=8, n_expert_groups=8,
                    n_limited_groups=4 if limited else 8, route_scale=2.5)
    torch.manual_seed(0)
    indices = Gate(cfg)(torch.randn(T, 64))[1]                 # (T, 8)
    home = torch.randint(0, 8, (T, 1))                         # (T, 1) the token's own node
    out = []
    for per in (1, 4, 32):                                     # experts per copy: pick, GPU, node
        hit = F.one_hot(indices // per, 256 // per).amax(1)   # (T, places) places it visits
        abroad = torch.arange(256 // per) // (32 // per) != home  # (T, places) on other nodes
        out += [hit.sum(1).float().mean().item(), (hit * abroad).sum(1).float().mean().item()]
    return out


def traffic_study():
    """The tables of docs/ep.md, printed as markdown by rank 0."""
    if "RANK" not in os.environ:
        sys.exit("--study=traffic measures traffic between ranks: start it with OMP_NUM_THREADS=1 "
                 "torchrun --standalone --nproc_per_node=4 study.py --study=traffic")
    dist.init_process_group("gloo")
    R = dist.get_world_size()
    rows = [(n, lim, traffic(n, lim)) for n in (R, R // 2) for lim in (True, False)]
    if dist.get_rank() == 0:
        print(stamp("cpu", "bfloat16") + "\n")
        print(f"{R} gloo ranks; 16 experts, top-4; bf16 rows of 256: bytes per token to other "
              "ranks, measured and from the formula\n\n| nodes x ranks | router | copies to "
              "other ranks | to other nodes | other nodes reached | dispatch B/token | formula "
              "| to other nodes | formula | combine B/token | formula |\n" + "|---" * 11 + "|")
        for n, lim, s in rows:
            router = f"{n} groups, {f'keep {n // 2}' if lim else 'no limit'}"
            print(f"| {n} x {R // n} | {router} | " + " | ".join(
                f"{v:.2f}" if i < 3 else f"{v:.1f}" for i, v in enumerate(s)) + " |")
        print("\nDeepSeek-V3 on paper (8 nodes x 8 GPUs, 4 experts per GPU), copies per token: "
              "sent | leaving the token's node\n\n| router | per pick | leaving | per GPU | "
              "leaving | per node | leaving |\n" + "|---" * 7 + "|")
        for lim in (True, False):
            print(f"| {'keep 4 of 8 groups' if lim else 'no limit'} | "
                  + " | ".join(f"{v:.2f}" for v in v3_copies(lim)) + " |")
        exact = [n * (1 - math.comb(256 - 256 // n, 8) / math.comb(256, 8)) for n in (64, 8)]
        print(f"\nUniform picks without the limit, exact: {exact[0]:.2f} GPUs, "
              f"{exact[1]:.2f} nodes")
    dist.destroy_process_group()


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


def main():
    args = dict(study="balance", scale="cpu", arms="", out_dir="", seed=1337, seeds=0,
                ckpt="out/ckpt.pt", control="", max_bytes=0)
    given = [a for a in sys.argv[1:] if a.split("=")[0].removeprefix("--") in args]
    args.update(parse_overrides(given, args))
    passthrough = [a for a in sys.argv[1:] if a not in given]
    if args["study"] in ("groups", "experts") and passthrough:
        sys.exit(f"unknown setting(s) {passthrough} for --study={args['study']}")
    if args["study"] == "groups":
        return groups_study(args["ckpt"])
    if args["study"] == "traffic":
        return traffic_study()
    if args["study"] == "experts":
        return experts_study(args["ckpt"], args["control"], args["out_dir"] or "out/experts",
                             args["max_bytes"], args["seeds"] or 1)
    study = "balance" if args["study"] == "switch" else args["study"]
    if study not in scales:
        sys.exit(f"--study={study!r}: expected one of "
                 f"{', '.join([*scales, 'switch', 'groups', 'traffic', 'experts'])}")
    known = arms if study == "balance" else arch_configs(presets["tiny"])
    if args["scale"] not in scales[study]:
        sys.exit(f"--scale={args['scale']!r}: expected one of {', '.join(scales[study])}")
    default = SWITCH_ARMS if args["study"] == "switch" else [a for a in known if a != "dense_wide"]
    chosen = args["arms"].split(",") if args["arms"] else default
    if unknown := [a for a in chosen if a.partition("@")[0] not in known]:
        sys.exit(f"unknown arm(s) {unknown}; expected some of {', '.join(known)}")
    settings = {**scales[study][args["scale"]], "seed": args["seed"]}
    settings.update(parse_overrides(passthrough, {**default_settings(vars(train)), **settings}))
    out_dir = args["out_dir"] or os.path.join("out", {"balance": "study"}.get(args["study"], args["study"]))
    if args["study"] == "switch":
        Console().print(stamp("cpu", "float32"), highlight=False, markup=False, soft_wrap=True)
        Console().print(switch_table(switch_counterexample()))
    if study == "balance":  # --seeds: 1 for balance, 3 for arch unless given
        balance_study(chosen, settings, out_dir, args["seeds"] or 1)
    else:
        arch_study(chosen, settings, out_dir, args["seeds"] or 3)


def balance_study(chosen, settings, out_dir, n_seeds=1):
    """Every arm with each of n_seeds seeds (seeds outside, so every arm has a first result
    early); one table of the means and spreads, and each arm's val loss against aux's on
    the same seeds, the difference's mean and standard error."""
    console = Console()
    flags = [f"--{k}={v}" for k, v in settings.items() if k != "seed"]
    seeds = [settings["seed"] + i for i in range(n_seeds)]
    runs, start, n_runs = {arm: [] for arm in chosen}, time.time(), n_seeds * len(chosen)
    for seed in seeds:
        for arm in chosen:  # "aux@0.01": the aux arm with seq_aux_alpha=0.01
            (base, _, alpha), out = arm.partition("@"), os.path.join(out_dir, arm)
            out = os.path.join(out, f"seed{seed}") if n_seeds > 1 else out
            rows = run(console, out, [os.path.join(HERE, "train.py"), f"--balance={base}",
                                      f"--out_dir={out}", f"--seed={seed}", *flags,
                                      *([f"--seq_aux_alpha={alpha}"] if alpha else [])])
            alpha = float(alpha or settings.get("seq_aux_alpha", arms[base][1]))
            runs[arm].append({**summarise_balance(arm, rows, settings, alpha), "seed": seed})
            done, spent = sum(map(len, runs.values())), time.time() - start
            console.print(f"[bold]{done}/{n_runs} runs in {spent / 60:.1f} min; "
                          f"ETA {spent / done * (n_runs - done) / 60:.1f} min[/]")

    cfg = presets[settings["preset"]].moe
    tokens = tokens_per_step(settings)
    floor = noise_floor(cfg.n_routed_experts, cfg.n_activated_experts, tokens)
    dtype = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["dtype"]
    table = Table(title=f"balance study: {settings['preset']} preset, {settings['max_iters']} steps, "
                        f"{tokens} tokens/step, seed{'s' * (n_seeds > 1)} "
                        f"{', '.join(map(str, seeds))}" + (" (mean ± half the range)" if n_seeds > 1 else ""))
    cols = ["arm", "val loss", "MaxVio global", "MaxVio batch", "noise floor", "dead experts",
            "balance loss / uniform's", "tokens/s"]
    def col(rs, key, fmt):
        xs = [r[key] for r in rs]
        return "-" if None in xs else spread(xs, fmt)
    rows = [[arm, col(rs, "val_loss", "{:.4f}"), col(rs, "maxvio_global", "{:.3f}"),
             col(rs, "maxvio_batch", "{:.3f}"), f"{floor:.3f}",
             col(rs, "dead_experts", "{:.1f}" if n_seeds > 1 else "{:.0f}"),
             col(rs, "balance_loss_ratio", "{:.3f}"), col(rs, "tokens_per_s", "{:,.0f}")]
            for arm, rs in runs.items()]
    notes = paired_differences(runs, "aux") if n_seeds > 1 else []
    maps = [heatmap(torch.tensor(rs[0]["loads"]), f"{arm}: val-set expert load / mean"
                    + (f" (seed {rs[0]['seed']})" if n_seeds > 1 else "")) for arm, rs in runs.items()]
    for r in (r for rs in runs.values() for r in rs):  # the loads are in the heatmaps
        del r["loads"]
        r["noise_floor"] = floor
    record = {"settings": settings, "seeds": seeds, "dtype": dtype, "arms": runs, "notes": notes}
    save_table(console, table, cols, rows, notes, out_dir, record,
               stamp(resolve_device(settings.get("device", "auto")), dtype))
    for hm in maps:
        console.print(hm)
    save_svg(maps, os.path.join(out_dir, "study_heatmaps.svg"), "balance study")
    console.print(f"saved {out_dir}/study.json, study.md, study_heatmaps.svg")


def paired_differences(runs, ref):
    """Each arm's final val loss minus ref's on the same seed: the mean and its standard error
    (the sample standard deviation of the differences over sqrt(seeds))."""
    notes = []
    for arm, rs in runs.items():
        if arm == ref or ref not in runs:
            continue
        d = [a["val_loss"] - b["val_loss"] for a, b in zip(rs, runs[ref])]
        se = stdev(d) / math.sqrt(len(d))
        notes.append(f"{arm} - {ref}, val loss on the same seeds: {fmean(d):+.4f} ± {se:.4f} "
                     f"(standard error, {len(d)} seeds; differences "
                     f"{', '.join(f'{x:+.4f}' for x in d)})")
    return notes


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
    dtype = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["config"]["dtype"]
    save_table(console, table, cols, rows, notes, out_dir, {**record, "dtype": dtype},
               stamp(resolve_device(settings.get("device", "auto")), dtype))
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
