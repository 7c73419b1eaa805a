"""
What the other scripts show a person: expert-load heatmaps, summary and benchmark tables,
hand-written SVG line plots, and the files they save. No training or measuring happens here.

    from display import heatmap, save_svg
    Console().print(hm := heatmap(loads, "expert load / mean"))   # loads (n_layers, E)
    save_svg([hm], "heatmap.svg", "expert load")
"""
import colorsys
import io
import json
import math
import os

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moe import max_vio


def blue_white_red(t):
    """A colour for t in [-1, 1]: blue below 0, white at 0, red above."""
    t = min(max(t, -1.0), 1.0)
    r, g, b = (255, 255 * (1 - t), 255 * (1 - t)) if t > 0 else (255 * (1 + t), 255 * (1 + t), 255)
    return f"rgb({int(r)},{int(g)},{int(b)})"


def heatmap(loads, title):
    """Rows MoE layers, columns experts; colour = load / mean load (blue low, red high)."""
    table = Table(title=title, show_header=False, box=None, padding=(0, 0))
    for i, row in enumerate(loads / loads.mean(-1, keepdim=True).clamp_min(1e-9)):
        text = Text(f"MoE {i:>2} ")
        for r in row.tolist():
            text.append("██", style=blue_white_red(r - 1))
        table.add_row(text.append(f"  max/mean {row.max():.2f}  min/mean {row.min():.2f}"))
    return table


def class_heatmap(lift, classes, title):
    """Rows classes, columns experts: p(expert | class) / p(expert), the number on a colour
    from blue (the class avoids the expert) through white (1: no preference) to red, log
    scale, full colour at 1/4 and 4."""
    table = Table(title=title, box=None, padding=(0, 0))
    table.add_column("expert", justify="left")
    for e in range(lift.shape[1]):
        table.add_column(f"{e:>5}", justify="right")
    for name, row in zip(classes, lift.tolist()):
        table.add_row(name + " ", *(Text(f"{v:5.1f}", style="black on " + blue_white_red(
            math.log2(max(v, 1e-9)) / 2)) for v in row))
    return table


def expert_colour(e, n):
    """One colour per expert: hues around the wheel, alternately light and dark."""
    r, g, b = colorsys.hsv_to_rgb(e / n, 0.6, 1.0 if e % 2 else 0.75)
    return f"#{int(255 * r):02x}{int(255 * g):02x}{int(255 * b):02x}"


def routed_snippet(source, top, n_experts, title):
    """ASCII source with each byte on the colour of its expert in top (one per byte); a
    newline shows as a coloured '⏎'. A legend of the experts follows."""
    text = Text(title + "\n")
    for ch, e in zip(source.decode("ascii"), top.tolist()):
        text.append("⏎" if ch == "\n" else ch, style="black on " + expert_colour(e, n_experts))
        text.append("\n" if ch == "\n" else "")
    text.append("experts: ")
    for e in range(n_experts):
        text.append(f" {e} ", style="black on " + expert_colour(e, n_experts))
    return text


def save_svg(renderables, path, title):
    """What rich would print, as an SVG picture (for slides and the README)."""
    rec = Console(record=True, width=120, file=io.StringIO())
    for r in renderables:
        rec.print(r)
    rec.save_svg(path, title=title)


def show_eval(console, it, val_loss, val_loads, text, svg_dir=None):
    """train.py's eval report: val loss, MaxVio_global, the load heatmap (also as an SVG in
    svg_dir, if given) and a sample. Returns the log row."""
    mv_global = max_vio(val_loads).mean().item() if len(val_loads) else float("nan")  # dense
    if len(val_loads):
        title = f"expert load / mean at iter {it} (val set)"
        console.print(hm := heatmap(val_loads, title))
        if svg_dir:
            save_svg([hm], os.path.join(svg_dir, f"heatmap_{it:06d}.svg"), title)
    console.print(f"[bold]iter {it}[/]: val loss {val_loss:.4f}, MaxVio_global {mv_global:.3f}"
                  f"\n[dim]{escape(text)}[/]")
    return {"iter": it, "val_loss": val_loss, "maxvio_global": mv_global,
            "loads": val_loads.tolist()}


def summary_table(summary, dev, seconds):
    """train.py's last word: final losses, balance, speed, peak GPU memory, time."""
    table = Table("", "", title="summary", show_header=False)
    for k in ("loss", "val_loss", "maxvio_global", "tokens_per_s", "mfu"):
        if k in summary:
            v = summary[k]
            table.add_row(k + " (median)" * (k in ("tokens_per_s", "mfu")),
                          f"{v:,.0f}" if k == "tokens_per_s" else
                          f"{v:,.4f}" if isinstance(v, float) else str(v))
    if dev.startswith("cuda"):
        table.add_row("peak GPU memory", f"{torch.cuda.max_memory_allocated(dev) / 2**30:.2f} GiB")
    table.add_row("time", f"{seconds:.0f} s")
    return table


def bench_table(rows, profiles, console, stamp=""):
    """bench.py's rows as one table under the run's stamp, the MoE tax lines, then each
    profile's top ops. Returns the stamp, table and tax lines as markdown, for docs/."""
    cols = {"case": "", "routing": "", "dispatch": "", "mode": "", "pass": "", "ms": ".2f",
            "compile s": ".1f", "tok/s": ",.0f", "TFLOP/s": ".3f", "ceiling": ".2f",
            "% peak": ".0f", "x eager": ".2f", "x loop": ".2f", "GiB": ".2f"}
    if all(r["peak_mem_gib"] is None for r in rows):
        del cols["GiB"]  # no allocator statistics on a CPU
    table, cells = Table(), []
    for col, spec in cols.items():
        table.add_column(col, justify="right" if spec else "left")
    for r in rows:
        vio = f" {r['maxvio']:.2f}" if r["maxvio"] is not None else ""
        values = [r["case"], r["routing"] + vio, r["dispatch"], r["mode"], r["pass"], r["ms"],
                  r["compile_s"], r["tokens_per_s"], r["tflops"], r["ceiling_ratio"],
                  100 * r["peak_frac"], r["speedup_compiled"], r["speedup_grouped"],
                  r["peak_mem_gib"]][:len(cols)]
        cells.append(["" if v is None else format(v, f) for v, f in zip(values, cols.values())])
        table.add_row(*cells[-1])
    if stamp:
        console.print(stamp, highlight=False, markup=False, soft_wrap=True)
    console.print(table)
    tax = [f"MoE tax, {r['case']} {r['mode']}: MoE tokens/s / dense tokens/s = "
           f"{r['ceiling_ratio']:.2f}" for r in rows if r["pass"] == "train" and r["dispatch"] != "ceiling"]
    for line in tax:
        console.print(line, highlight=False)
    md = ([stamp, ""] if stamp else []) + ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(c) + " |" for c in cells] + ([""] + tax if tax else [])
    for what, p in profiles.items():
        kinds = ", ".join(f"{k} {100 * v:.0f}%" for k, v in p["kinds"].items())
        console.print(f"profile of {what}: {p['ms']:.2f} ms of self time per call; {kinds}",
                      highlight=False)
        table = Table()
        for col in ("op / kernel", "calls", "ms", "%"):
            table.add_column(col, justify="right" if col != "op / kernel" else "left")
        for e in p["top"]:
            table.add_row(e["name"][:90], f"{e['calls']:g}", f"{e['ms']:.2f}",
                          f"{100 * e['share']:.1f}")
        console.print(table)
    return "\n".join(md) + "\n"


def switch_table(routings):
    """study.py --study=switch: the balance loss of each routing with its f_i and P_i."""
    table = Table(title="balance loss (alpha = 1) of two routings that both follow the router: "
                        "E = 4, K = 2, one sequence of 4 tokens")
    for col in ("routing", "picks per token", "f_i", "P_i", "sum_i f_i P_i (moe.py)"):
        table.add_column(col)
    for name, r in routings.items():
        table.add_row(name, " ".join(f"{a}{b}" for a, b in r["picks"]),
                      " ".join(f"{v:.3f}" for v in r["f"]), " ".join(f"{v:.3f}" for v in r["P"]),
                      f"{r['loss']:.4f}")
    return table


def save_table(console, table, cols, rows, notes, out_dir, record, stamp=""):
    """Print a study's table and notes under its stamp; write them to study.md (stamped) and
    record to study.json."""
    for c in cols:
        table.add_column(c, justify="left" if c == "arm" else "right")
    for row in rows:
        table.add_row(*row)
    if stamp:
        console.print(stamp, highlight=False, markup=False, soft_wrap=True)
    console.print(table)
    for note in notes:
        console.print(note)
    with open(os.path.join(out_dir, "study.json"), "w") as f:
        json.dump({**record, "stamp": stamp}, f, indent=1)
    with open(os.path.join(out_dir, "study.md"), "w") as f:
        f.write(stamp + "\n\n" if stamp else "")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        f.writelines("| " + " | ".join(row) + " |\n" for row in rows)
        f.writelines(f"\n{note}\n" for note in notes)


def plot_svg(lines, path, title, xlabel, W=640, H=400):
    """A line chart in hand-written SVG: lines = [(label, colour, [(x, y), ...]), ...], the x
    axis from 0, one legend entry per label."""
    left, right, top, bottom = 60, 130, 30, 45  # margins
    xs, ys = zip(*(p for *_, pts in lines for p in pts))
    x1, y0, y1 = max(xs), min(ys), max(ys) + 1e-9
    def sx(x): return left + x / x1 * (W - left - right)
    def sy(y): return top + (y1 - y) / (y1 - y0) * (H - top - bottom)
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           'font-family="sans-serif" font-size="12">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle" font-size="14">{title}</text>',
           f'<text x="{(W + left - right) / 2}" y="{H - 8}" text-anchor="middle">{xlabel}</text>',
           f'<path d="M{left},{top} V{H - bottom} H{W - right}" stroke="black" fill="none"/>']
    for i in range(5):  # ticks, and grid lines across
        x, y = x1 * i / 4, y0 + (y1 - y0) * i / 4
        xt = f"{x:,.0f}" if x1 >= 10 else f"{x:.2f}"
        svg += [f'<text x="{sx(x):.1f}" y="{H - bottom + 16}" text-anchor="middle">{xt}</text>',
                f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3f}</text>',
                f'<path d="M{left},{sy(y):.1f} H{W - right}" stroke="#dddddd"/>']
    for label, colour, pts in lines:
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        svg.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="1.5">'
                   f'<title>{label}</title></polyline>')
    for i, (label, colour) in enumerate(dict((l, c) for l, c, _ in lines).items()):
        y = top + 10 + 18 * i
        svg += [f'<path d="M{W - right + 10},{y} h20" stroke="{colour}" stroke-width="3"/>',
                f'<text x="{W - right + 36}" y="{y + 4}">{label}</text>']
    with open(path, "w") as f:
        f.write("\n".join(svg + ["</svg>\n"]))


def save_atlas(console, record, pictures, out_dir, stamp=""):
    """study.py --study=experts: print the mutual information table(s) and the pictures under
    the stamp; write experts.json (record), experts.md (the tables) and experts.svg."""
    cols = ["MoE layer", "learned router", "random router", "shuffled classes"]
    def mi(l, key):  # the whole val text, then (its first half, its second half)
        return f"{l[key]:.4f} ({l[key + '_halves'][0]:.4f}, {l[key + '_halves'][1]:.4f})"
    rows = [[str(l["moe_layer"]), mi(l, "mi_learned"), mi(l, "mi_random_router"),
             f"{l['mi_shuffled']:.4f}"] for l in record["layers"]]
    loss, H = record["val_loss"], record["class_entropy_bits"]
    notes = [f"{record['classified_bytes']:,} of {record['val_bytes']:,} val bytes classified; "
             f"H(class) = {H:.3f} bits. Val loss on these bytes (nats "
             f"per byte): learned {loss['learned']:.4f}, random router {loss['random router']:.4f}"]
    title = "I(class; expert) in bits: a byte's class against one of its K experts (in brackets: on each half of the val bytes)"
    tables = [(title + (f", seed {record['seeds'][0]}" if len(record["seeds"]) > 1 else ""),
               cols, rows)]
    if "per_seed" in record:  # mean ± half the range over the seeds, per layer
        def over(xs, fmt="{:.4f}"):
            half = fmt.format((max(xs) - min(xs)) / 2).lstrip("+")
            return f"{fmt.format(sum(xs) / len(xs))} ± {half}"
        seeds = record["per_seed"]
        seed_cols = ["MoE layer", "learned router", "random router", "learned - random",
                     "learned / H(class)", "shuffled classes"]
        seed_rows = []
        for i in range(len(record["layers"])):
            got = {k: [s["mi"][i][k] for s in seeds] for k in seeds[0]["mi"][i]}
            diff = [a - b for a, b in zip(got["mi_learned"], got["mi_random_router"])]
            seed_rows.append([str(i), over(got["mi_learned"]), over(got["mi_random_router"]),
                              over(diff, "{:+.4f}"), over([x / H for x in got["mi_learned"]], "{:.3f}"),
                              over(got["mi_shuffled"])])
        tables.insert(0, (f"I(class; expert) in bits over seeds {', '.join(map(str, record['seeds']))}"
                          " (mean ± half the range)", seed_cols, seed_rows))
        notes.append("learned - random router by seed: " + "; ".join(
            f"MoE {i}: " + ", ".join(f"{s['mi'][i]['mi_learned'] - s['mi'][i]['mi_random_router']:+.4f}"
                                     for s in seeds) for i in range(len(record["layers"]))))
        notes.append("val loss by seed (learned, random router): " + "; ".join(
            f"{s['seed']}: {s['val_loss']['learned']:.4f}, {s['val_loss']['random router']:.4f}"
            for s in seeds))
    rich_tables = []
    for title, tcols, trows in tables:
        table = Table(title=title)
        for c in tcols:
            table.add_column(c, justify="right")
        for row in trows:
            table.add_row(*row)
        rich_tables.append(table)
    if stamp:
        console.print(stamp, highlight=False, markup=False, soft_wrap=True)
    for p in [*rich_tables, *notes, *pictures]:
        console.print(p)
    record = {**record, "stamp": stamp}
    with open(os.path.join(out_dir, "experts.json"), "w") as f:
        json.dump(record, f, indent=1)
    E = len(record["layers"][0]["heatmap"][0])
    md = [stamp, ""] if stamp else []
    for title, tcols, trows in tables:
        md += [title, "", "| " + " | ".join(tcols) + " |", "|" + "---|" * len(tcols),
               *("| " + " | ".join(r) + " |" for r in trows), ""]
    md += [*notes, ""]
    for l in record["layers"]:
        for key, router in (("heatmap", "learned"), ("heatmap_random_router", "random")):
            md += [f"MoE {l['moe_layer']}, {router} router: p(expert | class) / p(expert)", "",
                   "| class | bytes | " + " | ".join(map(str, range(E))) + " |",
                   "|---|---|" + "---:|" * E]
            md += [f"| {c} | {n:,} | " + " | ".join(f"{v:.2f}" for v in row) + " |"
                   for c, n, row in zip(record["classes"], record["class_bytes"], l[key])]
            md.append("")
    with open(os.path.join(out_dir, "experts.md"), "w") as f:
        f.write("\n".join(md))
    save_svg([*rich_tables, *pictures], os.path.join(out_dir, "experts.svg"), "expert atlas")
    console.print(f"saved {out_dir}/experts.json, experts.md, experts.svg")
