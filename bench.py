"""
Benchmark the MoE layer and a training step: eager vs torch.compile, "loop" vs "grouped"
dispatch, real / balanced / skewed routing, each against a dense ceiling from the same run.

    python bench.py                          # CPU: ~3 minutes on 2 idle cores; GPU: preset "gpu"
    python bench.py --preset=tiny            # seconds, eager only: the CI smoke test
    python bench.py --cases=qwen3:32768 --passes=fwd+bwd --modes=compiled,autotune
    .ci/gpu                                  # the GPU check: CUDA tests, this, train.py

Settings below, as --key=value. Each number is the median of `repeats` timed calls after `warmup`
untimed ones, where compiling happens ("compile s", cold unless inductor's /tmp cache has it).
- dtype: the layer's weights and inputs, the train step's autocast; "auto" = train.py's choice.
- pass: "fwd" = eval mode under no_grad; "fwd+bwd" = train mode, random output gradient;
  "train" = one step of model.py (forward, backward, AdamW, update_bias).
- mode: "compiled" = torch.compile; "autotune" = its max-autotune-no-cudagraphs mode, where
  inductor's Triton GEMM templates (grouped GEMM too, on Hopper) compete with ATen's.
- TFLOP/s counts only the work done (K active experts, shared experts, router; backward = 2x
  forward); "train" uses model.flops_per_token(). % peak: over a big square matmul in `dtype`.
- ceiling: the same matmuls, every routed row through one dense weight; the column is ceiling ms
  / our ms (1.0 = all matmul). For "train" the ceiling is the model with every block dense at its
  active width, (K + shared) * moe_inter_dim, and the column is the MoE tax (tokens/s ratio).
- routing: "real" = the router at init on random inputs; "balanced" / "skewed" = gate.bias
  fitted so the same router yields equal / Zipf(zipf) loads, MaxVio [LF eq. 4] beside the name.
- profile: torch.profiler over `repeats` more calls of each row whose label (the progress bar's
  text, e.g. "qwen3:32768 grouped compiled fwd+bwd real") contains it: the kernels (GPU) or ops
  (CPU, inductor's kernels by name) with the most self time, per call, and a share by kind.
On a CPU, time an otherwise idle machine: OpenMP threads stall when the cores are shared.
"""
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import replace
from datetime import datetime
from json import dumps

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch's optional numpy
import torch
import torch._inductor.config
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from display import bench_table
from model import GPT, presets as model_presets
from moe import MoE, MoEConfig, max_vio, update_bias
from startup import auto_dtype, default_settings, parse_overrides, resolve_device, stamp

# ----------------------------------------------------------------------------- settings
preset = ""                  # "" = "gpu" on a GPU, else "cpu"; a key of `presets`
device = "auto"              # "auto", "cpu", "cuda", "cuda:1", ...
dtype = "auto"               # "auto" (as train.py decides, on the train pass's model), "bfloat16", "float32"
cases = "small:4096"         # comma-separated layer:tokens, layers from `layers`
routings = "real,balanced,skewed"
dispatches = "grouped,loop"  # grouped first, always: a time limit cuts the baseline
modes = "eager,compiled"     # also "autotune"
compile_loop = True          # False: the loop eager only (a graph break per expert)
passes = "fwd,fwd+bwd,train"
zipf = 1.0                   # skewed loads: the expert of rank r gets a share ~ r^-zipf
warmup = 2                   # untimed calls first; compiling happens here
repeats = 5                  # timed calls; the median is reported
model = "cpu"                # model.py preset of the train pass
batch_size = 8               # sequences of block_size tokens per train step
peak_size = 2048             # n of the (n, n) @ (n, n) matmul that sets "% peak"
seed = 0
json = ""                    # also write the rows to this path
profile = ""                 # profile the rows whose progress label contains this, e.g. "compiled"

_GPU = dict(peak_size=8192, warmup=3, repeats=20, model="gpu", batch_size=16, compile_loop=False)
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
                  n_activated_experts=8, n_shared_experts=0,
                  score_func="softmax", norm_topk_prob=True),  # and Qwen3's router
    "v3": dict(dim=7168, moe_inter_dim=2048, n_routed_experts=256,  # one DeepSeek-V3 671B layer
               n_activated_experts=8, n_shared_experts=1, n_expert_groups=8, n_limited_groups=4,
               route_scale=2.5),
}
_settings = default_settings(globals())
_progress = None  # main()'s progress bar
_dtype, _dtype_reason, _runs = torch.bfloat16, "", []  # configure() sets them
_profiles = {}  # row label -> measure()'s profile


def fail(msg):
    sys.exit(f"bench.py: {msg}")


def configure(argv):
    """--key=value overrides typed like the defaults, over the preset's; lists get split."""
    global _dtype, _dtype_reason, _runs
    given = parse_overrides(argv, _settings)
    dev = resolve_device(given.get("device", device))
    name = given.get("preset") or ("gpu" if dev.startswith("cuda") else "cpu")
    if name not in presets:
        fail(f"--preset={name!r}: expected one of {', '.join(presets)}")
    globals().update({**presets[name], **given, "preset": name, "device": dev})
    if model not in model_presets:
        fail(f"--model={model!r}: expected one of {', '.join(model_presets)}")
    if dtype not in ("auto", "bfloat16", "float32"):
        fail(f"--dtype={dtype!r}: expected auto, bfloat16 or float32")
    name, _dtype_reason = (auto_dtype(dev, lambda: GPT(model_presets[model]), batch_size)
                           if dtype == "auto" else (dtype, "--dtype"))
    _dtype = getattr(torch, name)
    for key, valid in (("cases", [f"{n}:TOKENS" for n in layers]),
                       ("passes", ["fwd", "fwd+bwd", "train"]),
                       ("routings", ["real", "balanced", "skewed"]),
                       ("dispatches", ["loop", "grouped"]),
                       ("modes", ["eager", "compiled", "autotune"])):
        items = [item for item in globals()[key].split(",") if item]
        for item in items:
            layer, _, tokens = item.partition(":")
            if item not in valid and not (key == "cases" and layer in layers and tokens.isdigit()):
                fail(f"--{key}: {item!r} is not one of {', '.join(valid)}")
        globals()[key] = items
    _runs = [(d, m) for d in sorted(dispatches, key=lambda d: d != "grouped") for m in modes
             if compile_loop or d == "grouped" or m == "eager"]  # the (dispatch, mode) pairs


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
    if profile and profile in what:
        _profiles[what] = profiled(fn, sync)
    _progress.advance(_progress.task_ids[0])
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    return s, max(sum(times[:w]) - w * s, 0.0), mem


KINDS = {  # name patterns -> kind, first match wins; for the profile's share by kind
    "matmul": r"gemm|grouped_mm|aten::(mm|bmm|addmm)$|cutlass|xmma|nvjet|^triton_tem",
    "fused (inductor)": r"^triton_|cpp_fused|CompiledFxGraph",  # the graph call: CPU kernels
    "attention": r"attention|flash|fmha|sdpa",
    "sort / topk": r"sort|topk|radix|bitonic",
    "copy / index": r"copy|memcpy|memset|index|gather|scatter|cat$",
    "eager pointwise": r"elementwise_kernel|reduce_kernel",  # ATen's CUDA kernels
    "optimizer": r"adam|foreach|multi_tensor",
    "dispatch overhead": r"Torch-Compiled|CompiledFunction|Dynamo|AOTDispatcher|autograd::",
}


def profiled(fn, sync, top=12):
    """torch.profiler over `repeats` calls of fn: total self ms per call, the top ops by self
    time, and the share of each of KINDS. On a GPU, kernels only: the CPU side overlaps them."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    cuda = device.startswith("cuda")
    with torch_profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as p:
        for _ in range(repeats):
            fn()
        sync()
    attr = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in p.key_averages() if getattr(e, attr) > 0
              and not getattr(e, "is_user_annotation", False)
              and (not cuda or e.device_type != torch.autograd.DeviceType.CPU)]
    events.sort(key=lambda e: -getattr(e, attr))
    total = sum(getattr(e, attr) for e in events) or 1
    kinds = dict.fromkeys([*KINDS, "other"], 0.0)
    for e in events:
        kinds[next((k for k, pat in KINDS.items() if re.search(pat, e.key, re.I)), "other")] \
            += getattr(e, attr) / total
    return dict(ms=total / repeats / 1e3, kinds=kinds, top=[
        dict(name=e.key, calls=e.count / repeats, ms=getattr(e, attr) / repeats / 1e3,
             share=getattr(e, attr) / total) for e in events[:top]])


def row(s, flops, tokens, **columns):
    return dict(columns, tokens=tokens, flops=flops, ms=s * 1e3, tokens_per_s=tokens / s,
                tflops=flops / s / 1e12)


def rand(*shape, dtype=None):
    return torch.randn(*shape, device=device, dtype=dtype or _dtype)


def compiled(module, mode, fullgraph):
    """The module itself ("eager"), or torch.compile of it in `mode`."""
    return module if mode == "eager" else torch.compile(
        module, fullgraph=fullgraph, mode={"autotune": "max-autotune-no-cudagraphs"}.get(mode))


def gemms(c: MoEConfig, T: int):
    """(M, K, N, dtype) of every matmul of the layer's forward: routed rows, router, shared
    experts. The router runs in float32 whatever the layer's dtype, as moe.Gate does."""
    R, D, H = T * c.n_activated_experts, c.dim, c.moe_inter_dim
    S = c.n_shared_experts * H
    shapes = [(R, D, H, _dtype), (R, D, H, _dtype), (R, H, D, _dtype),
              (T, D, c.n_routed_experts, torch.float32)]
    return shapes + ([(T, D, S, _dtype), (T, D, S, _dtype), (T, S, D, _dtype)] if S else [])


def dense(shapes, backward):
    """The ceiling: C = A B for each shape; backward adds dA = dC B^T and dB = A^T dC."""
    mats = [(rand(M, K, dtype=t), rand(K, N, dtype=t), rand(M, N, dtype=t))
            for M, K, N, t in shapes]

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
    """Yield the rows of one layer:tokens case: the ceilings, then dispatch x mode x pass x
    routing."""
    name, T = case.split(":")
    c, T = MoEConfig(**layers[name]), int(T)
    L = min(T, 2048)  # tokens per sequence: only the balance loss sees sequences
    if T % L:
        fail(f"--cases={case}: {T} tokens do not split into sequences of {L}")
    flops = sum(2 * M * K * N for M, K, N, _ in gemms(c, T))
    layer_passes, ceiling = [p for p in passes if p != "train"], {}
    for p in layer_passes:
        ceiling[p], _, mem = measure(f"{case} dense ceiling {p}", dense(gemms(c, T), p != "fwd"))
        yield row(ceiling[p], flops * (3 if p == "fwd+bwd" else 1), T, case=case,
                  **{"pass": p}, routing="-", maxvio=None, dispatch="ceiling", mode="-",
                  compile_s=None, peak_mem_gib=mem, ceiling_ratio=1.0)
    torch.set_default_dtype(_dtype)  # built in `dtype`: a V3 layer is 22 GB in bf16, 45 in fp32
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

    for d, m in _runs:
        layer.cfg.dispatch = d
        torch._dynamo.reset()  # compile cold, per dispatch and mode; frees the old graphs
        f = compiled(layer, m, fullgraph=d == "grouped")
        for p in layer_passes:
            layer.train(p == "fwd+bwd")
            step = fwd if p == "fwd" else fwd_bwd
            for r in routings:
                layer.gate.bias.copy_(bias[r])
                s, comp, mem = measure(f"{case} {d} {m} {p} {r}", lambda: step(f))
                yield row(s, flops * (3 if p == "fwd+bwd" else 1), T, case=case,
                          **{"pass": p}, routing=r, maxvio=vio[r], dispatch=d, mode=m,
                          compile_s=comp if m != "eager" else None, peak_mem_gib=mem,
                          ceiling_ratio=ceiling[p] / s)
    torch._dynamo.reset()


def bench_train():
    """Yield rows of whole training steps (forward, backward, AdamW, bias update) of the `model`
    preset and of its dense twin, every block dense at the MoE's active width: the ceiling."""
    moe_cfg = model_presets[model]
    dense_cfg = replace(moe_cfg, n_dense_layers=moe_cfg.n_layer)  # inter_dim: (K + shared) * H
    ceiling = {}
    for dispatch, cfg in (("ceiling", dense_cfg), (moe_cfg.moe.dispatch, moe_cfg)):
        torch.manual_seed(seed)
        with torch.device(device):
            gpt = GPT(cfg)  # float32 master weights
            tokens = torch.randint(cfg.vocab_size, (batch_size, cfg.block_size + 1))
        idx, targets = tokens[:, :-1], tokens[:, 1:]
        opt = torch.optim.AdamW(gpt.parameters(), lr=1e-4)
        autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16,
                                  enabled=_dtype == torch.bfloat16)
        for m in modes:
            torch._dynamo.reset()
            f = compiled(gpt, m, fullgraph=cfg.moe.dispatch == "grouped")

            def step():
                with autocast:
                    loss = f(idx, targets)[1]
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                update_bias(gpt)

            what = "dense twin" if dispatch == "ceiling" else "MoE"
            s, comp, mem = measure(f"train step, model={model} ({what}), {m}", step)
            ceiling.setdefault(m, s)
            yield row(s, gpt.flops_per_token() * idx.numel(), idx.numel(),
                      case=f"model:{model}", **{"pass": "train"},
                      routing="-" if dispatch == "ceiling" else "real",
                      maxvio=None, dispatch=dispatch, mode=m, peak_mem_gib=mem,
                      compile_s=comp if m != "eager" else None, ceiling_ratio=ceiling[m] / s)
        del gpt, opt
    torch._dynamo.reset()


def add_speedups(rows):
    """compiled (or autotune) over eager, grouped over loop: the other row's ms over this one's."""
    key = ("case", "pass", "routing", "dispatch", "mode")
    ms = {tuple(r[k] for k in key): r["ms"] for r in rows}
    for r in rows:
        for col, k, other in (("speedup_compiled", "mode", "eager"),
                              ("speedup_grouped", "dispatch", "loop")):
            o = ms.get(tuple(other if kk == k else r[kk] for kk in key))
            r[col] = o / r["ms"] if o and r[k] not in (other, "-", "ceiling") else None


def save(rows, peak, header, complete):
    """Fill in % peak and speed-ups; write the rows to `json` if set."""
    for r in rows:
        r["peak_frac"] = r["tflops"] * 1e12 / peak
    add_speedups(rows)
    if not json:
        return
    os.makedirs(os.path.dirname(json) or ".", exist_ok=True)
    with open(json + ".tmp", "w") as fh:  # then rename: a kill never leaves half a file
        fh.write(dumps(dict(header, peak_tflops=peak / 1e12, complete=complete, rows=rows,
                            profiles=_profiles, date=datetime.now().isoformat(timespec="seconds")),
                       indent=1))
    os.replace(json + ".tmp", json)


def main():
    global _progress
    configure(sys.argv[1:])
    torch.manual_seed(seed)
    if device == "cpu":  # inductor's pool of compile workers keeps the cores busy afterwards
        torch._inductor.config.compile_threads = 1
        torch._inductor.config.cpp.enable_kernel_profile = bool(profile)  # its kernels, by name
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 160)  # logs and CI: one line per row
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else \
        f"cpu ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"
    header = dict(command=" ".join(["python bench.py", *sys.argv[1:]]), device=name,
                  torch=torch.__version__, dtype=str(_dtype).removeprefix("torch."),
                  dtype_reason=_dtype_reason, settings={k: globals()[k] for k in _settings})
    header["stamp"] = stamp(device, header["dtype"])
    console.print(f"{header['command']} (preset {preset}) on {name}, torch {torch.__version__}, "
                  f"{header['dtype']} ({_dtype_reason})", highlight=False, soft_wrap=True)
    n_layer_passes = sum(p != "train" for p in passes)
    total = (2 + len(cases) * n_layer_passes * (1 + len(_runs) * len(routings))
             + 2 * len(modes) * ("train" in passes))
    started, rows = time.perf_counter(), []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as _progress:
        _progress.add_task("", total=total)
        a, b = rand(peak_size, peak_size), rand(peak_size, peak_size)
        peak = 2 * peak_size**3 / measure("dense peak", lambda: a @ b, stat=min)[0]  # best case
        jobs = [bench_layer(c) for c in cases] + ([bench_train()] if "train" in passes else [])
        for job in jobs:
            for r in job:  # generators: measured one row at a time
                rows.append(r)
                save(rows, peak, header, complete=False)  # a run cut short keeps every row
        peak = max(peak, 2 * peak_size**3 / measure("dense peak", lambda: a @ b, stat=min)[0])
    save(rows, peak, header, complete=True)
    console.print(f"dense {header['dtype']} peak {peak / 1e12:.2f} TFLOP/s; "
                  f"{time.perf_counter() - started:.0f} s", highlight=False)
    md = bench_table(rows, _profiles, console, header["stamp"])
    if json:
        with open(json.removesuffix(".json") + ".md", "w") as fh:
            fh.write(md)
        console.print(f"wrote {len(rows)} rows to {json}, the table to "
                      f"{json.removesuffix('.json')}.md")


if __name__ == "__main__":
    main()
