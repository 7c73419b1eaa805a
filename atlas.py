"""
The expert atlas: what the routed experts of a trained checkpoint learned. The default data is
the standard library's Python source, so Python's own tokenize can name the kind of every val
byte (names, keywords, operators, numbers, strings, comments, whitespace, newlines). Per MoE
layer: a class x expert heatmap, p(expert | class) / p(expert), and the mutual information
I(class; expert) in bits, against two controls measured the same way: the checkpoint's settings
trained again with the router frozen at its random init (the bias still balances), and the
classes shuffled over the bytes. A snippet is shown with each byte on its top expert's colour.

    python train.py && python study.py --study=experts     # -> out/experts/, ~9 min on 2 cores
    python study.py --study=experts --ckpt=PATH --control=PATH --max_bytes=N --out_dir=DIR

Writes experts.json, experts.md and experts.svg; the readings are in docs/experts.md.
"""
import codecs
import io
import itertools
import keyword
import os
import sys
import tokenize
from statistics import fmean

import torch
from rich.console import Console
from rich.progress import Progress

import train
from data import load_checkpoint, stdlib_files
from display import class_heatmap, routed_snippet, save_atlas
from model import GPT
from moe import MoE
from startup import HERE, default_settings, resolve_device, run_to_its_end, stamp


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


def train_like(ckpt, out, what, **changes):
    """train.py with the checkpoint's own settings and steps, but for changes (a seed, the
    router frozen at its random init). A finished run of the same settings in out is reused;
    one stopped by Ctrl-C resumes."""
    config, known = ckpt["config"], default_settings(vars(train))
    settings = {**known, **{k: v for k, v in config.items() if k in known},
                "max_iters": ckpt["iter"], "lr_decay_iters": config["lr_decay_iters"] or
                config["max_iters"], "out_dir": out, "eval_sample": False,
                "heatmap_svg": False, "init_from": "scratch", **changes}
    path = os.path.join(out, "ckpt.pt")
    if os.path.exists(path):
        done = load_checkpoint(path)
        if {**done["config"], "init_from": "scratch"} == settings:
            if done["iter"] >= settings["max_iters"]:
                Console().print(f"{what}: {path} has these settings and steps; reusing it")
                return path
            settings["init_from"] = "resume"
    Console().rule(f"{what}: {settings['max_iters']} steps of train.py into {out}")
    run_to_its_end([sys.executable, os.path.join(HERE, "train.py"),
                    *(f"--{k}={v}" for k, v in settings.items())], out,
                   "; the same command resumes it")
    return path


def experts_study(ckpt_path, control, out_dir, max_bytes, n_seeds=1, shuffles=3):
    """The expert atlas of a checkpoint, against its random-router control (trained unless
    given) and a floor of shuffled classes; max_bytes > 0 takes only the first val bytes.
    With n_seeds > 1, the checkpoint's settings are trained again with the next seeds, each
    with its own random-router control, and the mutual information is given over the seeds."""
    console = Console()
    ckpt = load_checkpoint(ckpt_path)
    model = GPT.from_checkpoint(ckpt)
    if model.cfg.vocab_size != 256 or not any(isinstance(m, MoE) for m in model.modules()):
        sys.exit(f"{ckpt_path}: the atlas needs a byte-level model (vocab_size=256) with MoE layers")
    os.makedirs(out_dir, exist_ok=True)
    console.print(f"expert atlas of {ckpt_path}: the random-router control{'s' * (n_seeds > 1)} "
                  f"{'and the other seeds are' if n_seeds > 1 else 'is'} trained first unless "
                  "given (train.py shows its ETA), then the val bytes are classified and routed "
                  "through the models (ETA shown)")
    seeds = [ckpt["config"]["seed"] + i for i in range(n_seeds)]
    pairs = [(ckpt_path, control or train_like(ckpt, os.path.join(out_dir, "random_router"),
                                               "random-router control", freeze_router=True))]
    for seed in seeds[1:]:
        sub = os.path.join(out_dir, f"seed{seed}")
        pairs.append((train_like(ckpt, os.path.join(sub, "learned"), f"seed {seed}", seed=seed),
                      train_like(ckpt, os.path.join(sub, "random_router"),
                                 f"seed {seed}, random-router control", seed=seed,
                                 freeze_router=True)))
    dev = resolve_device(ckpt["config"]["device"])
    dtype = {"auto": "float32"}.get(ckpt["config"]["dtype"], ckpt["config"]["dtype"])  # old files
    ctx = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16")
    files = stdlib_files()["val"]  # the val split of data="stdlib", file by file
    E = model.cfg.moe.n_routed_experts
    with Progress(*Progress.get_default_columns(), console=console) as progress:
        stream, labels = torch.frombuffer(bytearray(b"\n".join(files)), dtype=torch.uint8), []
        n = min(max_bytes or len(stream), len(stream))
        for f in progress.track(files, description="classifying val bytes (tokenize)"):
            if len(labels) < n:
                labels += byte_classes(f) + [-1]  # -1: the b"\n" data.py joins files with
        stream, labels = stream[:n], torch.tensor(labels[:n], dtype=torch.int8)
        records, models = [], {}
        for seed, (learned, random_router) in zip(seeds, pairs):
            models = {name: GPT.from_checkpoint(load_checkpoint(path)).eval().to(dev)
                      for name, path in (("learned", learned), ("random router", random_router))}
            routed = {name: route_bytes(m, stream, ctx, ckpt["config"]["compile"], progress,
                                        f"seed {seed}, {name}")
                      for name, m in models.items()}            # name: (picks, top, val loss)
            records.append(atlas_record(routed, labels, E, shuffles))
            if len(records) == 1:
                first = models  # the pictures show the first seed's models
    record = {"checkpoint": ckpt_path, "control": pairs[0][1], "val_bytes": len(stream),
              **records[0], "seeds": seeds, "runs": [dict(zip(("learned", "random_router"), p))
                                                     for p in pairs]}
    if n_seeds > 1:
        record["per_seed"] = [{"seed": s, "val_loss": r["val_loss"],
                               "mi": [{k: l[k] for k in ("mi_learned", "mi_random_router",
                                                         "mi_shuffled")} for l in r["layers"]]}
                              for s, r in zip(seeds, records)]
    layer = record["snippet_layer"]
    snippet = torch.frombuffer(bytearray(SNIPPET), dtype=torch.uint8)
    pictures = [routed_snippet(SNIPPET, route_bytes(m, snippet, ctx, False)[1][layer], E,
                               f"{name}, MoE {layer}: each byte on the colour of its top expert")
                for name, m in first.items()]
    maps = [class_heatmap(torch.tensor(l["heatmap"]), CLASSES, f"MoE {l['moe_layer']}, learned "
                          "router: p(expert | class) / p(expert)") for l in record["layers"]]
    save_atlas(console, record, maps + pictures, out_dir, stamp(dev, dtype))


def atlas_record(routed, labels, E, shuffles):
    """Per MoE layer, I(class; expert) of the learned and the random router (on all the bytes
    and on each half), of shuffled classes, and the lift heatmaps; the class counts."""
    known = labels >= 0
    counts = torch.bincount(labels[known].long(), minlength=len(CLASSES))
    gen, layers, n = torch.Generator().manual_seed(0), [], len(labels)
    halves = (slice(0, n // 2), slice(n // 2, None))  # how much the text moves it
    for i in range(len(routed["learned"][0])):  # MoE layer i
        joint = {k: class_expert_counts(labels, r[0][i], E) for k, r in routed.items()}
        half = {k: [mutual_information(class_expert_counts(labels[h], r[0][i][h], E))
                    for h in halves] for k, r in routed.items()}
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
    return {"classified_bytes": int(counts.sum()), "classes": CLASSES,
            "class_bytes": counts.tolist(), "class_entropy_bits": -(p * p.log2()).nansum().item(),
            "val_loss": {k: r[2] for k, r in routed.items()}, "layers": layers,
            "snippet_layer": max(layers, key=lambda l: l["mi_learned"])["moe_layer"]}
