"""
What every script does first: settings from the command line, the device, the dtype that
dtype="auto" picks, the GPU's peak FLOP/s, and the stamp above every results table.

    from startup import default_settings, parse_overrides, resolve_device, auto_dtype, stamp

Nothing here imports torch.distributed's FSDP, DTensor or checkpoint modules: bench.py and the
studies load this file, not train.py.
"""
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
PEAK_FLOPS = [  # dense bf16 tensor-core FLOP/s by part, from the vendors' datasheets; the first
    # whole-word match of the CUDA device name wins, so the slower PCIe and NVL parts come first
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200 NVL", 835e12),
    ("H200", 989e12), ("GH200", 989e12), ("B200", 2250e12), ("A100", 312e12),
    ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def default_settings(namespace):
    """The settings of a script: its module-level plain values, by name."""
    return {k: v for k, v in namespace.items()
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


def model_step_ms(model, batch_size, seq_len, reps=3):
    """Milliseconds of one eager training step (forward, backward, AdamW: the weights move, as
    in training) of model on random tokens, under bf16 autocast and in fp32: the median of reps
    each, alternating on the same model, after a warm-up of each. model is changed: give it a
    throwaway one."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randint(0, model.cfg.vocab_size, (batch_size, seq_len + 1),
                      generator=torch.Generator().manual_seed(0))
    def once(bf16):
        start = time.perf_counter()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = model(x[:, :-1], x[:, 1:])[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    once(True), once(False)
    times = {True: [], False: []}
    for _ in range(reps):
        for bf16 in times:
            times[bf16].append(once(bf16))
    return {"bfloat16": 1e3 * statistics.median(times[True]),
            "float32": 1e3 * statistics.median(times[False])}


def auto_dtype(dev, make_model=None, batch_size=4):
    """The autocast dtype for dtype="auto" on device dev, and the reason, for the start-up line.
    On a CPU with bf16 instructions, the faster of the two on what the model runs: training
    steps of a fresh one from make_model() (at most 4 sequences), timed now in about a second.
    Neither the flags nor a square matmul predict it: on 2 Xeon cores with AVX512-BF16 but no
    AMX, bf16 matmuls run at half fp32's speed; on 2 EPYC cores with AVX512-BF16 at twice, yet
    the cpu preset trains faster in fp32 there too, eager and compiled (docs/training.md)."""
    if dev.startswith("cuda"):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", "this GPU has bf16 tensor cores"
        return "float32", "this GPU has no bf16 support"
    if not cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"}:  # x86 AVX512-BF16 / AMX, Arm BF16
        return "float32", "this CPU has no native bf16 matmul (bf16 would be emulated, ~3x slower)"
    with torch.random.fork_rng(devices=[]):  # the run's own random numbers stay as they were
        model = make_model()
        ms = model_step_ms(model, min(batch_size, 4), model.cfg.block_size)
    del model
    name = "bfloat16" if ms["bfloat16"] < ms["float32"] else "float32"
    return name, (f"a training step of this model took {ms['bfloat16']:.0f} ms in bf16 and "
                  f"{ms['float32']:.0f} ms in fp32, timed now")


def agree_on_dtype(name, why, dev):
    """Under torchrun each rank timed its own matmuls: bf16 only if every rank chose it."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return name, why
    vote = torch.tensor([float(name == "bfloat16")], device=dev)
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    if name == "bfloat16" and not vote.item():
        return "float32", "some rank multiplies fp32 faster; all ranks use one dtype"
    return name, why


def matmul_precision(dev, dtype):
    """On CUDA in fp32, TF32 tensor cores for matmuls (10-bit mantissa: the router's logits too);
    returns the note for the start-up line. Elsewhere nothing changes."""
    if not dev.startswith("cuda") or dtype != "float32":
        return ""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return ", TF32 matmuls"


def check_compiler(dev):
    """torch.compile builds C++ on a CPU: without a compiler, one line, not inductor's traceback."""
    if dev.startswith("cuda"):
        return
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        sys.exit("--compile=True on a CPU needs a C++ compiler (g++, or $CXX), and none was "
                 "found: install one, or run with --compile=False")


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


# ----------------------------------------------------------------------------- the stamp
def machine(dev="cpu"):
    """The GPU's name, or the CPU's model, core count and bf16 instructions."""
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(dev)
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M).group(1).strip()
    except (OSError, AttributeError):
        import platform
        model = platform.processor() or platform.machine()
    flags = cpu_flags()
    bf16 = ("AMX" if "amx_bf16" in flags else "AVX512-BF16, no AMX" if "avx512_bf16" in flags
            else "bf16" if "bf16" in flags else "no bf16 instructions")
    return f"{model}, {os.cpu_count()} cores ({bf16})"


def git_commit():
    """The short commit of this checkout, "-dirty" if tracked files differ from it."""
    def git(*args):
        return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        return (head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
                if head else "unknown")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def command_line():
    """The command as typed, as far as a process can see it: torchrun and OMP_NUM_THREADS too."""
    launcher = (f"torchrun --nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}"
                if "WORLD_SIZE" in os.environ else "python")
    cmd = [launcher, os.path.basename(sys.argv[0]), *sys.argv[1:]]
    if "OMP_NUM_THREADS" in os.environ:
        cmd.insert(0, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    return " ".join(cmd)


def stamp(dev, dtype, command=None):
    """The line above every results table: when, where, which torch and code, in what dtype,
    by what command. test_docs.py checks that every table in docs/ stands under one."""
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    return (f"> **{when} UTC** · {machine(dev)} · torch {torch.__version__} · "
            f"commit {git_commit()} · {dtype} · `{command or command_line()}`")
