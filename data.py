"""
Training data for train.py, offline, and its checkpoints: every split is a list of 1-D token
tensors ("shards"); checkpoints are written atomically and read without running pickled code.

    from data import load_data, get_batch
    splits = load_data("stdlib", "out/cache", block_size=256)  # {"train": [...], "val": [...]}
    x, y = get_batch(splits["train"], torch.Generator().manual_seed(0), 16, 256, "cpu")

Three sources, picked by the data= setting:
- "stdlib": the .py files of the Python that runs this, as bytes (vocab 256), split by file,
  cached as one tensor per split.
- a text file or a folder of them: bytes; the last 10% is val.
- a glob of llm.c / modded-nanogpt .bin shards (uint16 tokens): each file is memory-mapped
  and stays a shard of its own. Nothing is concatenated or copied, so resident memory stays
  at the pages the sampled windows touch, however large the data (fineweb10B is ~20 GB).

A batch draws one window start uniformly over all windows of all shards of the split, from
the caller's seeded generator. That is the same as choosing a shard in proportion to its
number of windows, then a window inside it, and it makes the batches a function of the
generator's state alone: a resumed run restores the state and draws the same batches.
"""
import glob
import json
import mmap
import os
import pickle
import re
import sys
import sysconfig
import zlib

import torch


def atomic_save(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written file. One
    temporary name per process, since torchrun ranks may write the same data cache at once."""
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint of tensors and plain values, or one clear line. weights_only=True: a file
    from elsewhere that carries a pickled object is refused, never run (plain pickle would
    execute it)."""
    if not os.path.exists(path):
        sys.exit(f"no checkpoint at {path}; train first (python train.py) or set --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL [\w.]+", str(e))
        sys.exit(f"{path}: refused, it holds a pickled Python object "
                 f"({what.group(0) if what else 'not only tensors'}); only load files you trust")


def truncate_log(path, last_iter):
    """Keep the rows of a log.jsonl up to iteration last_iter: a resumed run writes the later
    ones again. Atomically, like a checkpoint."""
    def kept(row):  # a row cut short by a kill is dropped too
        try:
            return json.loads(row)["iter"] <= last_iter
        except ValueError:
            return False
    if os.path.exists(path):
        rows = [r for r in open(path) if kept(r)]
        with open(f"{path}.{os.getpid()}.tmp", "w") as f:
            f.writelines(rows)
        os.replace(f"{path}.{os.getpid()}.tmp", path)


def stdlib_files():
    """Python's own standard library sources, one bytes object per file, split into train/val
    by file. atlas.py reads the val files one by one."""
    root = sysconfig.get_paths()["stdlib"]
    parts = {"train": [], "val": []}
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        rel = os.path.relpath(path, root)
        if "site-packages" in rel:
            continue
        with open(path, "rb") as f:  # 1 file in 20 goes to val, fixed by its path
            parts["val" if zlib.crc32(rel.encode()) % 20 == 0 else "train"].append(f.read())
    if not parts["train"]:
        sys.exit(f"no .py files found under {root}; use --data=PATH")
    return parts


def stdlib_tokens(cache_dir):
    """Python's own standard library sources as bytes, split into train/val by file."""
    cache = os.path.join(cache_dir, f"stdlib-{sys.version_info[0]}.{sys.version_info[1]}.pt")
    if os.path.exists(cache):
        return {k: [v] for k, v in torch.load(cache, weights_only=True).items()}
    parts = stdlib_files()
    splits = {k: torch.frombuffer(bytearray(b"\n".join(v)), dtype=torch.uint8)
              for k, v in parts.items()}
    os.makedirs(cache_dir, exist_ok=True)
    atomic_save(splits, cache)
    return {k: [v] for k, v in splits.items()}


def text_tokens(path):
    """A text file or a folder of files as bytes; the last 10% is val."""
    files = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                   if os.path.isfile(p)) if os.path.isdir(path) else [path]
    raw = b"\n".join(open(p, "rb").read() for p in files)
    if len(raw) < 1000:
        sys.exit(f"data={path!r} holds {len(raw)} bytes; need at least 1000")
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    n = int(0.9 * len(tokens))
    return {"train": [tokens[:n]], "val": [tokens[n:]]}


def read_shard(path):
    """One llm.c shard, memory-mapped: 256 int32 header (magic 20240520, version 1 = uint16
    tokens, token count), then the tokens. Copy-on-write mapping, because torch.frombuffer
    wants a writable buffer; nothing is ever written, so the pages stay the file's. The kernel
    is told the access is random: by default each page fault also reads the pages around it
    (read_ahead_kb, often megabytes), so a 514-byte window would cost a megabyte of reads and
    of resident memory."""
    if os.path.getsize(path) < 1024:
        sys.exit(f"{path}: {os.path.getsize(path)} bytes, too short for the 1024-byte header")
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    m.madvise(mmap.MADV_RANDOM)
    header = torch.frombuffer(m, dtype=torch.int32, count=256)
    if header[0] != 20240520:
        sys.exit(f"{path}: magic {int(header[0])} is not 20240520; not an llm.c .bin shard")
    if header[1] != 1:
        sys.exit(f"{path}: header version {int(header[1])}; only version 1 (uint16 tokens) "
                 "is known")
    n = int(header[2])
    if len(m) != 1024 + 2 * n:
        sys.exit(f"{path}: header says {n} tokens, file holds {(len(m) - 1024) // 2}: truncated?")
    return torch.frombuffer(m, dtype=torch.uint16, offset=1024, count=n)


def bin_tokens(pattern):
    """Shards matching pattern, each mapped on its own; "val" in a file name: val."""
    files = sorted(glob.glob(pattern))
    if not files:
        sys.exit(f"data={pattern!r} matches no files")
    shards = {f: read_shard(f) for f in files}  # each checked: header, length
    val = [f for f in files if "val" in os.path.basename(f)]
    if val == files:  # training on them would make the val loss meaningless
        sys.exit(f"data={pattern!r} matches only val shards ({len(val)}); match the train "
                 "shards too")
    if len(files) == 1:  # it would be both splits: the val loss would measure memorising
        sys.exit(f"data={pattern!r} is one .bin file, which would serve as both train and val; "
                 "add a val shard (a file with 'val' in its name) or more train shards")
    val = val or files[-1:]
    train = [f for f in files if f not in val]
    return {"train": [shards[f] for f in train], "val": [shards[f] for f in val]}


def load_data(spec, cache_dir, block):
    """data= setting -> {"train": [shards], "val": [shards]}; a clear exit for bad data."""
    if spec == "stdlib":
        splits = stdlib_tokens(cache_dir)
    elif spec.endswith(".bin"):
        splits = bin_tokens(spec)
    elif os.path.exists(spec):
        splits = text_tokens(spec)
    else:
        sys.exit(f"data={spec!r}: no such file or folder")
    for name, shards in splits.items():  # fail now, not at the first eval
        if not n_windows(shards, block).sum():
            sys.exit(f"data={spec!r}: the {name} split holds {sum(map(len, shards))} tokens, "
                     f"too few for block_size={block}")
    return splits


def n_windows(shards, L):
    """How many windows of L+1 tokens each shard holds, (n_shards,) int64."""
    return torch.tensor([max(0, len(s) - L) for s in shards])


def get_batch(shards, gen, B, L, dev, vocab_size=0):
    """B random windows of L+1 tokens, each inside one shard -> inputs, targets (B, L) int64.
    A token id outside vocab_size (if given) ends the run with one line, checked here on the
    CPU: on a GPU it would be a device-side assert. On CUDA the batch goes through pinned
    memory, so the copy does not block the host."""
    counts = n_windows(shards, L)
    ends = counts.cumsum(0)                                             # (n_shards,)
    i = torch.randint(int(ends[-1]), (B,), generator=gen)               # a window of all shards
    shard = torch.searchsorted(ends, i, right=True)                     # (B,) whose window
    start = i - (ends[shard] - counts[shard])                           # (B,) inside that shard
    xy = torch.stack([shards[s][j:j + L + 1] for s, j in zip(shard.tolist(), start.tolist())])
    xy = xy.long()
    if vocab_size and int(xy.max()) >= vocab_size:
        sys.exit(f"token id {int(xy.max())} in the data, but the model's vocabulary holds "
                 f"{vocab_size} ids: set --vocab_size above the largest id (GPT-2 tokens: 50304)")
    if torch.device(dev).type == "cuda":
        xy = xy.pin_memory().to(dev, non_blocking=True)
    else:
        xy = xy.to(dev)
    return xy[:, :-1], xy[:, 1:]
