"""
Benchmark the MoE layer and a training step: eager vs torch.compile, "loop" vs "grouped"
dispatch, real / balanced / skewed routing, each against the dense-matmul ceiling of the same
shapes measured in the same run.

    python bench.py                          # CPU: ~3 minutes on 2 idle cores; GPU: preset "gpu"
    python bench.py --preset=tiny            # seconds, eager only: the CI smoke test
    python bench.py --preset=v3 --json=out/bench_v3.json
    python bench.py --cases=qwen3:8192 --routings=skewed --modes=compiled --repeats=50

Every setting below can be overridden with --key=value. bf16 weights and activations; each
number is the median of `repeats` timed calls after `warmup` untimed ones.
- pass: "fwd" = eval mode under no_grad; "fwd+bwd" = train mode, forward and backward with a
  random output gradient and the input's gradient; "train" = one step of model.py (forward,
  backward, AdamW, update_bias) under bf16 autocast with fp32 weights.
- TFLOP/s counts only the work done: K active experts per token, shared experts, router;
  backward = 2x forward; elementwise work is free. "train" uses model.flops_per_token().
- ceiling: the same matmuls, every routed row through one dense weight, and nothing else;
  ceiling_ratio = ceiling ms / our ms, so 1.0 is a layer that is all matmul.
- % peak: TFLOP/s over a big square bf16 matmul's, best of first and last ("train": MFU).
- compile s: warm-up time beyond steady state, i.e. compiling (cold unless inductor's cache in
  /tmp holds the graph), never part of ms. A recompile for a new routing shows here too.
- routing: "real" = the router at init on random inputs; "balanced" / "skewed" = gate.bias
  fitted so the same router yields equal / Zipf(zipf) loads. The bias only picks who, so the
  rest is the real layer. The MaxVio reached [LF eq. 4] is printed beside the name.
- GiB: peak memory allocated during the timed calls (GPU only).
On a CPU, time an otherwise idle machine: OpenMP threads stall when the cores are shared.
"""
import os
import statistics
import sys
import time
import warnings
from datetime import datetime
from json import dumps

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch
import torch._inductor.config
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from model import GPT, presets as model_presets
from moe import MoE, MoEConfig, max_vio, update_bias
from train import default_settings, parse_overrides

# ----------------------------------------------------------------------------- settings
preset = ""                  # "" = "gpu" on a GPU, else "cpu"; a key of `presets`
device = "auto"              # "auto", "cpu", "cuda", "cuda:1", ...
cases = "small:4096"         # comma-separated layer:tokens, layers from `layers`
routings = "real,balanced,skewed"
dispatches = "loop,grouped"
modes = "eager,compiled"
passes = "fwd,fwd+bwd,train"
zipf = 1.0                   # skewed loads: the expert of rank r gets a share ~ r^-zipf
warmup = 2                   # untimed calls first; compiling happens here
repeats = 5                  # timed calls; the median is reported
model = "cpu"                # model.py preset of the train pass
batch_size = 8               # sequences of block_size tokens per train step
peak_size = 2048             # n of the (n, n) @ (n, n) bf16 matmul that sets "% peak"
seed = 0
json = ""                    # also write the rows to this path

_GPU = dict(peak_size=8192, warmup=3, repeats=20, model="gpu", batch_size=16)
presets = {  # overrides of the settings above
    "tiny": dict(cases="tiny:256", modes="eager", warmup=1, repeats=2,
                 model="tiny", batch_size=2, peak_size=256),  # compiling would take minutes
    "cpu": dict(),
    "gpu": dict(_GPU, cases="moonlight:8192,qwen3:8192,v3:4096"),
    "moonlight": dict(_GPU, cases="moonlight:8192", model="moonlight"),
    "qwen3": dict(_GPU, cases="qwen3:8192,qwen3:32768", passes="fwd,fwd+bwd"),
    "v3": dict(_GPU, cases="v3:4096", passes="fwd,fwd+bwd"),
}
layers = {  # MoEConfig fields; published shapes from shared/reference section 8
    "tiny": dict(dim=64, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2),
    "small": dict(dim=512, moe_inter_dim=352, n_routed_experts=64,  # Moonlight, widths / 4
                  n_activated_experts=6, n_shared_experts=2),
    "moonlight": dict(dim=2048, moe_inter_dim=1408, n_routed_experts=64,  # and DeepSeek-V2-Lite
                      n_activated_experts=6, n_shared_experts=2),
    "qwen3": dict(dim=2048, moe_inter_dim=768, n_routed_experts=128,  # Qwen3-30B-A3B's shape
                  n_activated_experts=8, n_shared_experts=0, score_func="softmax"),
    "v3": dict(dim=7168, moe_inter_dim=2048, n_routed_experts=256,  # one DeepSeek-V3 671B layer
               n_activated_experts=8, n_shared_experts=1, n_expert_groups=8, n_limited_groups=4,
               route_scale=2.5),
}
_settings = default_settings(globals())
_progress = None  # main()'s progress bar


def fail(msg):
    sys.exit(f"bench.py: {msg}")


def configure(argv):
    """--key=value overrides typed like the defaults, over the preset's; lists get split."""
    given = parse_overrides(argv, _settings)
    dev = given.get("device", device)
    dev = dev if dev != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    name = given.get("preset") or ("gpu" if dev.startswith("cuda") else "cpu")
    if name not in presets:
        fail(f"--preset={name!r}: expected one of {', '.join(presets)}")
    globals().update({**presets[name], **given, "preset": name, "device": dev})
    if model not in model_presets:
        fail(f"--model={model!r}: expected one of {', '.join(model_presets)}")
    for key, valid in (("cases", [f"{n}:TOKENS" for n in layers]),
                       ("passes", ["fwd", "fwd+bwd", "train"]),
                       ("routings", ["real", "balanced", "skewed"]),
                       ("dispatches", ["loop", "grouped"]), ("modes", ["eager", "compiled"])):
        items = [item for item in globals()[key].split(",") if item]
        for item in items:
            layer, _, tokens = item.partition(":")
            if item not in valid and not (key == "cases" and layer in layers and tokens.isdigit()):
                fail(f"--{key}: {item!r} is not one of {', '.join(valid)}")
        globals()[key] = items


def measure(what, fn, stat=statistics.median):
    """stat (median) of fn()'s seconds after warm-up, warm-up seconds beyond that, peak GiB."""
    _progress.update(_progress.task_ids[0], description=what)
    cuda, w, times = device.startswith("cuda"), max(warmup, 1), []
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    for i in range(w + repeats):
        if cuda and i == w:
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    s = stat(times[w:])
    _progress.advance(_progress.task_ids[0])
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return s, max(sum(times[:w]) - w * s, 0.0), mem


def row(s, flops, tokens, **columns):
    return dict(columns, tokens=tokens, flops=flops, ms=s * 1e3, tokens_per_s=tokens / s,
                tflops=flops / s / 1e12)


def rand(*shape):
    return torch.randn(*shape, device=device, dtype=torch.bfloat16)


def gemms(c: MoEConfig, T: int):
    """(M, K, N) of every matmul of the layer's forward: routed rows, router, shared experts."""
    R, D, H = T * c.n_activated_experts, c.dim, c.moe_inter_dim
    S = c.n_shared_experts * H
    shapes = [(R, D, H), (R, D, H), (R, H, D), (T, D, c.n_routed_experts)]
    return shapes + ([(T, D, S), (T, D, S), (T, S, D)] if S else [])


def dense(shapes, backward):
    """The ceiling: C = A B for each shape; backward adds dA = dC B^T and dB = A^T dC."""
    mats = [(rand(M, K), rand(K, N), rand(M, N)) for M, K, N in shapes]

    def run():
        for a, b, dc in mats:
            a @ b
            if backward:
                dc @ b.mT
                a.mT @ dc
    return run


def zipf_shares(E, K):
    """Zipf shares of E experts, capped at 1/K: an expert takes a token at most once."""
    p = (torch.arange(E) + 1.0) ** -zipf
    for _ in range(E):  # water-filling: clip, renormalise, repeat
        p = (p / p.sum()).clamp(max=1 / K)
    return p / p.sum()


@torch.no_grad()
def fit_bias(layer, x, target, steps):
    """Set gate.bias so that the router's loads on x (T, D) approach the target shares (E,)."""
    gate, E = layer.gate, layer.cfg.n_routed_experts
    gate.bias.zero_()
    scores = gate(x)[2]
    lr = (scores.amax(-1) - scores.amin(-1)).mean()  # first step: the range of the scores
    for i in range(steps + 1):
        load = torch.bincount(gate(x)[1].flatten(), minlength=E).float()
        if i < steps:  # the sign update of [LF Alg. 1], towards the target, shrinking
            gate.bias += lr * 0.95**i * torch.sign(target.to(load) * load.sum() - load)
    return gate.bias.clone(), max_vio(load).item()


def bench_layer(case):
    """Rows of one layer:tokens case: the ceilings, then dispatch x mode x pass x routing."""
    name, T = case.split(":")
    c, T = MoEConfig(**layers[name]), int(T)
    L = min(T, 2048)  # tokens per sequence: only the balance loss sees sequences
    if T % L:
        fail(f"--cases={case}: {T} tokens do not split into sequences of {L}")
    flops = sum(2 * M * K * N for M, K, N in gemms(c, T))
    layer_passes, ceiling, rows = [p for p in passes if p != "train"], {}, []
    for p in layer_passes:
        ceiling[p], _, mem = measure(f"{case} dense ceiling {p}", dense(gemms(c, T), p != "fwd"))
        rows.append(row(ceiling[p], flops * (3 if p == "fwd+bwd" else 1), T, case=case,
                        **{"pass": p}, routing="-", maxvio=None, dispatch="ceiling", mode="-",
                        compile_s=None, peak_mem_gib=mem, ceiling_ratio=1.0))
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: a V3 layer is 45 GB in fp32
    with torch.device(device):
        layer = MoE(c)  # gate.bias is float32 all the same
    torch.set_default_dtype(torch.float32)
    x, dy = rand(T // L, L, c.dim).requires_grad_(), rand(T // L, L, c.dim)
    E, K = c.n_routed_experts, c.n_activated_experts
    targets = {"real": None, "balanced": torch.ones(E) / E,
               "skewed": zipf_shares(E, K)[torch.randperm(E)]}
    bias, vio = {}, {}
    for r in routings:
        _progress.update(_progress.task_ids[0], description=f"{case} fitting gate.bias: {r}")
        bias[r], vio[r] = fit_bias(layer, x.detach().view(T, -1), targets[r],
                                   steps=0 if r == "real" else 100)

    def fwd(f):
        with torch.no_grad():
            f(x)

    def fwd_bwd(f):
        y, aux = f(x)
        torch.autograd.backward((y, aux), (dy, torch.ones_like(aux)))
        x.grad = None
        layer.zero_grad(set_to_none=True)

    for d in dispatches:
        layer.cfg.dispatch = d
        for m in modes:
            torch._dynamo.reset()  # compile cold, per dispatch; frees the previous graphs
            f = torch.compile(layer, fullgraph=d == "grouped") if m == "compiled" else layer
            for p in layer_passes:
                layer.train(p == "fwd+bwd")
                step = fwd if p == "fwd" else fwd_bwd
                for r in routings:
                    layer.gate.bias.copy_(bias[r])
                    s, comp, mem = measure(f"{case} {d} {m} {p} {r}", lambda: step(f))
                    rows.append(row(s, flops * (3 if p == "fwd+bwd" else 1), T, case=case,
                                    **{"pass": p}, routing=r, maxvio=vio[r], dispatch=d, mode=m,
                                    compile_s=comp if m == "compiled" else None, peak_mem_gib=mem,
                                    ceiling_ratio=ceiling[p] / s))
    torch._dynamo.reset()
    return rows


def bench_train():
    """Rows of whole training steps of model.py: forward, backward, AdamW, bias update."""
    cfg = model_presets[model]
    torch.manual_seed(seed)
    with torch.device(device):
        gpt = GPT(cfg)  # float32 master weights
        tokens = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size + 1))
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)
    rows = []
    for m in modes:
        torch._dynamo.reset()
        f = torch.compile(gpt, fullgraph=cfg.moe.dispatch == "grouped") if m == "compiled" else gpt

        def step():
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss = f(idx, targets)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            update_bias(gpt)

        s, comp, mem = measure(f"train step, model={model}, {m}", step)
        rows.append(row(s, gpt.flops_per_token() * idx.numel(), idx.numel(),
                        case=f"model:{model}", **{"pass": "train"}, routing="real", maxvio=None,
                        dispatch=cfg.moe.dispatch, mode=m, peak_mem_gib=mem,
                        compile_s=comp if m == "compiled" else None, ceiling_ratio=None))
    torch._dynamo.reset()
    return rows


def add_speedups(rows):
    """compiled over eager, grouped over loop: the other row's ms over this row's ms."""
    key = ("case", "pass", "routing", "dispatch", "mode")
    ms = {tuple(r[k] for k in key): r["ms"] for r in rows}
    for r in rows:
        for col, k, this, other in (("speedup_compiled", "mode", "compiled", "eager"),
                                    ("speedup_grouped", "dispatch", "grouped", "loop")):
            o = ms.get(tuple(other if kk == k else r[kk] for kk in key))
            r[col] = o / r["ms"] if r[k] == this and o else None


def show(rows, console):
    cols = {"case": "", "routing": "", "dispatch": "", "mode": "", "pass": "", "ms": ".2f",
            "compile s": ".1f", "tok/s": ",.0f", "TFLOP/s": ".3f", "ceiling": ".2f",
            "% peak": ".0f", "compiled/eager": ".2f", "grouped/loop": ".2f", "GiB": ".2f"}
    if all(r["peak_mem_gib"] is None for r in rows):
        del cols["GiB"]  # no allocator statistics on a CPU
    table = Table()
    for col, spec in cols.items():
        table.add_column(col, justify="right" if spec else "left")
    for r in rows:
        vio = f" {r['maxvio']:.2f}" if r["maxvio"] is not None else ""
        values = [r["case"], r["routing"] + vio, r["dispatch"], r["mode"], r["pass"], r["ms"],
                  r["compile_s"], r["tokens_per_s"], r["tflops"], r["ceiling_ratio"],
                  100 * r["peak_frac"], r["speedup_compiled"], r["speedup_grouped"],
                  r["peak_mem_gib"]]
        table.add_row(*["" if v is None else format(v, f) for v, f in zip(values, cols.values())])
    console.print(table)


def main():
    global _progress
    configure(sys.argv[1:])
    torch.manual_seed(seed)
    if device == "cpu":  # inductor's pool of compile workers keeps the cores busy afterwards
        torch._inductor.config.compile_threads = 1
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and CI: one line per row
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"cpu ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"
    n_layer_passes = sum(p != "train" for p in passes)
    total = (2 + len(cases) * n_layer_passes * (1 + len(dispatches) * len(modes) * len(routings))
             + len(modes) * ("train" in passes))
    started, rows = time.perf_counter(), []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as _progress:
        _progress.add_task("", total=total)
        a, b = rand(peak_size, peak_size), rand(peak_size, peak_size)
        peak = 2 * peak_size**3 / measure("dense peak", lambda: a @ b, stat=min)[0]  # best case
        for case in cases:
            rows += bench_layer(case)
        if "train" in passes:
            rows += bench_train()
        peak = max(peak, 2 * peak_size**3 / measure("dense peak", lambda: a @ b, stat=min)[0])
    for r in rows:
        r["peak_frac"] = r["tflops"] * 1e12 / peak
    add_speedups(rows)
    command = " ".join(["python bench.py", *sys.argv[1:]])
    console.print(f"{command} (preset {preset}) on {name}, torch {torch.__version__}, bf16; dense "
                  f"peak {peak / 1e12:.2f} TFLOP/s; {time.perf_counter() - started:.0f} s",
                  highlight=False, soft_wrap=True)
    show(rows, console)
    if json:
        os.makedirs(os.path.dirname(json) or ".", exist_ok=True)
        top = dict(device=name, torch=torch.__version__, peak_tflops=peak / 1e12,
                   date=datetime.now().isoformat(timespec="seconds"),
                   settings={k: globals()[k] for k in _settings})
        with open(json, "w") as fh:
            fh.write(dumps(dict(top, rows=rows), indent=1))
        console.print(f"wrote {len(rows)} rows to {json}")


if __name__ == "__main__":
    main()
