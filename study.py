"""
Does auxiliary-loss-free balancing work? Train every balancing arm with the same seed, data and
steps, then compare balance and loss in one table.

    python study.py                       # CPU: five arms, about 15 minutes on 2 cores
    python study.py --scale=gpu           # the same study at GPU size
    python study.py --arms=none,bias --max_iters=100   # any train.py setting passes through

Each arm is a normal train.py run in out_dir/<arm>/ (logs, checkpoint, heatmaps). The table
goes to the terminal and to out_dir/study.json and out_dir/study.md, the final val-set expert
loads of every arm to out_dir/study_heatmaps.svg.
"""
import json
import os
import subprocess
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch
from rich.console import Console
from rich.table import Table

from model import presets
from moe import max_vio
from train import arms, default_settings, heatmap, parse_overrides, save_svg

HERE = os.path.dirname(os.path.abspath(__file__))

# per scale: the train.py settings every arm shares
scales = {
    "cpu": dict(preset="cpu", max_iters=600, eval_interval=600, eval_iters=40, log_interval=10,
                batch_size=8, warmup_iters=30),
    "gpu": dict(preset="gpu", device="cuda", max_iters=3000, eval_interval=1000, eval_iters=100,
                log_interval=50, batch_size=32, learning_rate=1e-3, min_lr=1e-4, warmup_iters=200),
}


def noise_floor(n_experts, k, tokens, draws=20, seed=0):
    """Expected MaxVio of uniformly random top-k routing over `tokens` tokens: the value a
    perfectly balanced router still shows from sampling noise alone."""
    gen = torch.Generator().manual_seed(seed)
    vios = []
    for _ in range(draws):
        picks = torch.rand(tokens, n_experts, generator=gen).topk(k, dim=-1).indices
        vios.append(max_vio(torch.bincount(picks.flatten(), minlength=n_experts).double()))
    return torch.stack(vios).mean().item()


def main():
    args = dict(scale="cpu", arms=",".join(arms), out_dir="out/study", seed=1337)
    given = [a for a in sys.argv[1:] if a.split("=")[0].removeprefix("--") in args]
    args.update(parse_overrides(given, args))
    passthrough = [a for a in sys.argv[1:] if a not in given]
    if args["scale"] not in scales:
        sys.exit(f"--scale={args['scale']!r}: expected one of {', '.join(scales)}")
    chosen = args["arms"].split(",")
    if unknown := [a for a in chosen if a not in arms]:
        sys.exit(f"unknown arm(s) {unknown}; expected some of {', '.join(arms)}")
    settings = {**scales[args["scale"]], "seed": args["seed"]}
    settings.update(parse_overrides(passthrough, {**default_settings(), **settings}))
    console = Console()
    results = []
    for arm in chosen:
        out = os.path.join(args["out_dir"], arm)
        cmd = [sys.executable, os.path.join(HERE, "train.py"), f"--balance={arm}",
               f"--out_dir={out}",
               *[f"--{k}={v}" for k, v in settings.items()]]
        console.rule(f"[bold]{arm}[/]: {' '.join(cmd[2:])}")
        if os.path.exists(os.path.join(out, "log.jsonl")):
            os.remove(os.path.join(out, "log.jsonl"))  # a fresh run, a fresh log
        if subprocess.run(cmd).returncode:
            sys.exit(f"arm {arm} failed; its output is above")
        rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        results.append(summarise(arm, rows, settings))

    cfg = presets[settings["preset"]].moe
    tokens = (settings["batch_size"] * settings.get("gradient_accumulation_steps", 1) *
              (settings.get("block_size") or presets[settings["preset"]].block_size))
    floor = noise_floor(cfg.n_routed_experts, cfg.n_activated_experts, tokens)
    table = Table(title=f"balance study: {settings['preset']} preset, {settings['max_iters']} steps, "
                        f"{tokens} tokens/step, seed {settings['seed']}")
    cols = ["arm", "val loss", "MaxVio global", "MaxVio batch", "noise floor", "dead experts",
            "tokens/s"]
    for c in cols:
        table.add_column(c, justify="left" if c == "arm" else "right")
    for r in results:
        r["noise_floor"] = floor
        table.add_row(r["arm"], f"{r['val_loss']:.4f}", f"{r['maxvio_global']:.3f}",
                      f"{r['maxvio_batch']:.3f}", f"{floor:.3f}", str(r["dead_experts"]),
                      f"{r['tokens_per_s']:,.0f}")
    console.print(table)
    maps = [heatmap(torch.tensor(r.pop("loads")), f"{r['arm']}: val-set expert load / mean")
            for r in results]
    for hm in maps:
        console.print(hm)
    save_svg(maps, os.path.join(args["out_dir"], "study_heatmaps.svg"), "balance study")
    with open(os.path.join(args["out_dir"], "study.json"), "w") as f:
        json.dump({"settings": settings, "rows": results}, f, indent=1)
    with open(os.path.join(args["out_dir"], "study.md"), "w") as f:
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in results:
            f.write(f"| {r['arm']} | {r['val_loss']:.4f} | {r['maxvio_global']:.3f} | "
                    f"{r['maxvio_batch']:.3f} | {floor:.3f} | {r['dead_experts']} | "
                    f"{r['tokens_per_s']:,.0f} |\n")
    console.print(f"saved {args['out_dir']}/study.json, study.md, study_heatmaps.svg")


def summarise(arm, rows, settings):
    """Final val loss and MaxVio_global; MaxVio_batch over the last fifth of training."""
    train_rows = [r for r in rows if "loss" in r]
    final = [r for r in rows if "val_loss" in r][-1]
    last = [r for r in train_rows if r["iter"] > 0.8 * settings["max_iters"]] or train_rows[-1:]
    speeds = sorted(r["tokens_per_s"] for r in train_rows)
    return {"arm": arm, "val_loss": final["val_loss"], "maxvio_global": final["maxvio_global"],
            "maxvio_batch": sum(r["maxvio_batch"] for r in last) / len(last),
            "dead_experts": sum(v == 0 for layer in final["loads"] for v in layer),
            "tokens_per_s": speeds[len(speeds) // 2], "loads": final["loads"]}


if __name__ == "__main__":
    main()
