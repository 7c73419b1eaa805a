"""Tests of train.py on several processes: the real script under torchrun on gloo ranks (DDP and
FSDP2, eager and compiled), each against one process, and runs that must end cleanly. Every
probe below is train.py with a few lines around it; none ends its process early."""
import json
import os
import socket

import pytest
import torch

import parallel
from model import GPT, presets
from moe import MoE, update_bias
from test_train import HERE, gate_biases, run_script, text_file, tiny_model  # noqa: F401 (fixture)

pytestmark = pytest.mark.full  # torchrun launches: the full tier (conftest.py)

PROBE = """import os, sys, torch
sys.path.insert(0, {here!r})
import parallel, startup, train
rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
GPT, seen = train.GPT, []
train.GPT = parallel.GPT = lambda cfg: seen.append(GPT(cfg)) or seen[-1]
{before}
train.main()
biases = [m.gate.bias.clone() for m in seen[-1].modules() if hasattr(m, "gate")]
torch.save(biases, os.path.join(train.out_dir, "bias%d.pt" % rank))
seen.clear()  # an FSDP model holds its process group
{after}
"""
SAME_GLOBAL_BATCH = """calls = [0]
def batch(shards, gen, B, L, dev, vocab_size=0):  # one global batch of 8 per call, in parts
    g = torch.Generator().manual_seed(1000 + calls[0])
    calls[0] += 1
    xy = torch.randint(0, 256, (8, L + 1), generator=g).view(world, -1, L + 1)[rank]
    return xy[:, :-1], xy[:, 1:]
train.get_batch = batch"""
NO_GRAPH_BREAKS = """from torch._dynamo.utils import counters
assert not counters["unimplemented"], list(counters["unimplemented"])  # graph breaks, skipped frames
assert counters["stats"]["unique_graphs"] > 0  # it did compile"""
# A group that outlives main() keeps gloo's worker threads, and one that is still freeing a
# collective's tensors when the interpreter shuts down aborts the process ("terminate called
# without an active exception"). torch.distributed.nn.functional binds group.WORLD as default
# arguments when imported: imported after init_process_group (DDP's constructor imports
# torch._dynamo, which imports it), it holds the group for good. (FSDP2 is not checked: DTensor's
# sharding caches keep its DeviceMesh, and with it the group, in torch 2.13.)
GROUP_DESTROYED = """import gc
gc.collect()
tasks = os.listdir("/proc/self/task")
assert not [t for t in tasks if open(f"/proc/self/task/{t}/comm").read().startswith("pt_gloo")]"""


def run_probe(out_dir, *args, before="", after="", **kwargs):
    """train.py with `before` run ahead of its main() and `after` behind it; each rank then
    saves the biases its model holds as out_dir/bias<rank>.pt."""
    os.makedirs(out_dir, exist_ok=True)
    probe = os.path.join(out_dir, "probe.py")
    with open(probe, "w") as f:
        f.write(PROBE.format(here=HERE, before=before, after=after))
    return run_script(out_dir, *args, script=probe, **kwargs)


def saved_biases(out_dir, rank=0):
    return torch.load(os.path.join(out_dir, f"bias{rank}.pt"))


def val_losses(out_dir):
    return [r["val_loss"] for r in map(json.loads, open(os.path.join(out_dir, "log.jsonl")))
            if "val_loss" in r]


# ------------------------------------------------------------------------------ ending cleanly
def test_torchrun_runs_end_promptly_every_time(tmp_path, text_file):
    """DDP freed after the process group, its Reducer holding the last reference, hung at exit
    in about 1 run in 8 (the group's destructor joined gloo's worker thread, which waited for
    the GIL the destructor kept). Eight real runs: each must end on its own, and cleanly."""
    for i in range(8):
        run_script(tmp_path / str(i), f"--data={text_file}", "--max_iters=2", "--eval_interval=2",
                   "--eval_sample=False", torchrun=True, timeout=120)


def test_non_finite_val_loss_on_one_rank_stops_every_rank(tmp_path, text_file):
    """Rank 1 alone evaluates NaN weights. Every rank must stop at that eval, rank 0 with the
    message, and no checkpoint may be written from the bad step."""
    poison = """real = train.evaluate
def evaluate(model, *args):
    if rank == 1:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    return real(model, *args)
train.evaluate = evaluate"""
    res = run_probe(tmp_path, f"--data={text_file}", "--max_iters=4", "--eval_interval=2",
                    before=poison, torchrun=True, check=False)
    assert res.returncode != 0
    assert "val loss is nan at iter 2: stopping" in " ".join(res.stdout.split())
    assert not (tmp_path / "ckpt.pt").exists()


# ------------------------------------------------------------------------------ DDP
def _ddp_worker(rank, world, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    model = tiny_model()
    torch.manual_seed(100 + rank)  # each rank sees different tokens, hence different loads
    for _ in range(5):
        model(torch.randint(0, 256, (4, 32)))
        update_bias(model, gamma=0.01)
    biases = torch.stack([m.gate.bias for m in model.modules() if isinstance(m, MoE)])
    torch.save(biases, os.path.join(result_dir, f"bias{rank}.pt"))
    torch.distributed.destroy_process_group()


def test_ranks_that_time_different_faster_dtypes_all_train_in_fp32(tmp_path, text_file):
    """--dtype=auto times bf16 against fp32 matmuls on each rank, and ranks could disagree:
    rank 0 finds bf16 faster, rank 1 fp32. One dtype for all, fp32, or their models diverge."""
    res = run_probe(tmp_path, f"--data={text_file}", "--max_iters=1", "--eval_interval=1",
                    "--eval_sample=False", "--dtype=auto", torchrun=True, before="""startup.cpu_flags = lambda: {"avx512_bf16"}
startup.model_step_ms = lambda *a: {"bfloat16": 10.0 if rank == 0 else 100.0, "float32": 50.0}""")
    assert "float32 (some rank multiplies fp32 faster" in " ".join(res.stdout.split())


def test_two_gloo_ranks_keep_identical_biases(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2)
    b0, b1 = torch.load(tmp_path / "bias0.pt"), torch.load(tmp_path / "bias1.pt")
    assert b0.abs().sum() > 0 and torch.equal(b0, b1)
    # and without the all_reduce the ranks would have drifted apart: loads differ per rank
    local = tiny_model()
    torch.manual_seed(100)
    for _ in range(5):
        local(torch.randint(0, 256, (4, 32)))
        update_bias(local, gamma=0.01)
    assert not torch.equal(local.layers[-1].ffn.gate.bias, b0[-1])


def test_compiled_ddp_on_two_ranks_trains_and_keeps_identical_biases(tmp_path, text_file):
    res = run_probe(tmp_path, f"--data={text_file}", "--max_iters=4", "--eval_interval=4",
                    "--log_interval=2", "--balance=bias", "--compile=True", "--eval_sample=False",
                    after=NO_GRAPH_BREAKS + "\n" + GROUP_DESTROYED, torchrun=True)
    assert "FutureWarning" not in res.stderr  # DDP's buffer switch under its current name
    rows = [json.loads(l) for l in open(tmp_path / "log.jsonl")]
    assert [r["iter"] for r in rows if "loss" in r] == [2, 4]
    assert len(torch.load(tmp_path / "ckpt.pt", weights_only=True)["data_rng"]) == 2
    b0, b1 = saved_biases(tmp_path, 0), saved_biases(tmp_path, 1)
    assert all(b.abs().sum() > 0 for b in b0)       # they moved
    assert all(torch.equal(x, y) for x, y in zip(b0, b1))
    ckpt = gate_biases(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    assert all(torch.equal(x, y) for x, y in zip(b0, ckpt))


def test_distributed_runs_compile_each_block_so_ddp_can_overlap_its_all_reduce(monkeypatch):
    """DDP all-reduces a bucket once the backward has made all of its gradients. One compiled
    graph for the whole model is one backward node, after which every gradient is ready at
    once: nothing left to overlap. One graph per block lets the last block's gradients travel
    while the blocks below still run their backward."""
    torch._dynamo.reset()
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real(fn, backend="aot_eager", **kw))
    model = parallel.compile_model(tiny_model(), distributed=True, use_ep=False)
    idx = torch.randint(0, 256, (2, 16))
    loss = model(idx, idx)[1]
    compiled_nodes, seen, todo = 0, set(), [loss.grad_fn]
    while todo:  # the autograd graph's nodes, once each
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        compiled_nodes += "CompiledFunction" in type(node).__name__
        todo += [n for n, _ in node.next_functions]
    assert compiled_nodes == model.cfg.n_layer
    torch._dynamo.reset()


# ------------------------------------------------------------------------------ FSDP2
def test_fsdp_on_two_ranks_equals_one_process_on_the_same_global_batch(tmp_path, text_file):
    common = [f"--data={text_file}", "--max_iters=3", "--eval_interval=3", "--dtype=float32",
              "--balance=bias", "--learning_rate=1e-2", "--warmup_iters=1"]
    run_probe(tmp_path / "one", *common, "--batch_size=8", before=SAME_GLOBAL_BATCH)
    run_probe(tmp_path / "fsdp", *common, "--batch_size=4", "--fsdp=True", torchrun=True,
              before=SAME_GLOBAL_BATCH)
    one = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)
    sharded = torch.load(tmp_path / "fsdp" / "ckpt.pt", weights_only=True)
    assert sharded["iter"] == one["iter"] == 3 and one["model"].keys() == sharded["model"].keys()
    for k, v in one["model"].items():
        assert (sharded["model"][k] - v).abs().max() < 1e-5, k
    b0, b1 = saved_biases(tmp_path / "fsdp", 0), saved_biases(tmp_path / "fsdp", 1)
    assert all(b.abs().sum() > 0 and b.dtype == torch.float32 for b in b0)
    assert all(torch.equal(x, y) for x, y in zip(b0, b1))
    assert all(torch.equal(x, y) for x, y in zip(b0, saved_biases(tmp_path / "one")))
    GPT(presets["tiny"]).load_state_dict(sharded["model"])  # a single process loads it


def test_fsdp_in_bf16_computes_what_one_process_under_autocast_computes(tmp_path, text_file):
    """bf16 as everywhere else: fp32 weights, autocast. FSDP2's own bf16 policy rounded the
    router weight and, casting each block's inputs, the residual stream and the rotary tables:
    its val loss at init was 3.4e-5 off one process's, and 1.6e-4 off after 3 steps.
    Tolerances: at init the weights, the batch and every op are the same, so the loss may
    differ only by float32 summation order (1e-6 relative); after 3 steps of AdamW, whose first
    updates are about lr * sign(gradient), the ranks' reduction order may flip the sign of the
    smallest gradients, which moved the val loss by 1.2e-5: allowed 5e-5."""
    common = [f"--data={text_file}", "--dtype=bfloat16", "--balance=bias", "--learning_rate=1e-2",
              "--warmup_iters=1", "--eval_sample=False"]
    for steps in (0, 3):
        args = [*common, f"--max_iters={steps}", f"--eval_interval={max(steps, 1)}"]
        run_probe(tmp_path / f"one{steps}", *args, "--batch_size=8", before=SAME_GLOBAL_BATCH)
        run_probe(tmp_path / f"fsdp{steps}", *args, "--batch_size=4", "--fsdp=True",
                  torchrun=True, before=SAME_GLOBAL_BATCH)
    (one0,), (fsdp0,) = val_losses(tmp_path / "one0"), val_losses(tmp_path / "fsdp0")
    assert abs(fsdp0 - one0) <= 1e-6 * one0, (fsdp0, one0)
    (one3,), (fsdp3,) = val_losses(tmp_path / "one3"), val_losses(tmp_path / "fsdp3")
    assert abs(fsdp3 - one3) <= 5e-5, (fsdp3, one3)


def test_fsdp_reduces_gradients_once_per_optimizer_step(tmp_path, text_file):
    """2 micro-batches a step, 2 steps: each of FSDP2's groups (one per block, one for the
    root) must reduce-scatter once a step, not once a micro-batch."""
    count = """import torch.distributed as dist
calls = [0]
for name in ("reduce_scatter_tensor", "reduce_scatter_single"):
    if hasattr(dist, name):
        def counted(*args, _real=getattr(dist, name), **kwargs):
            calls[0] += 1
            return _real(*args, **kwargs)
        setattr(dist, name, counted)"""
    save = 'torch.save(calls[0], os.path.join(train.out_dir, "reduce_scatters%d.pt" % rank))'
    run_probe(tmp_path, f"--data={text_file}", "--max_iters=2", "--eval_interval=2",
              "--gradient_accumulation_steps=2", "--fsdp=True", "--eval_sample=False",
              before=count, after=save, torchrun=True)
    groups = presets["tiny"].n_layer + 1
    assert torch.load(tmp_path / "reduce_scatters0.pt") == 2 * groups


def test_compiled_fsdp_keeps_its_hooks_outside_the_graphs(tmp_path, text_file):
    """One compile of the whole model traced into FSDP2's hooks, broke the graph there and
    ran the model's forward eagerly, silently. Compiled per block, nothing breaks."""
    run_probe(tmp_path, f"--data={text_file}", "--max_iters=3", "--eval_interval=3",
              "--fsdp=True", "--compile=True", "--eval_sample=False", "--balance=bias",
              after=NO_GRAPH_BREAKS, torchrun=True)
    b0, b1 = saved_biases(tmp_path, 0), saved_biases(tmp_path, 1)
    assert all(b.abs().sum() > 0 for b in b0) and all(map(torch.equal, b0, b1))
    GPT(presets["tiny"]).load_state_dict(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])


def test_a_stop_from_torchrun_saves_on_every_rank_at_one_step(tmp_path, text_file):
    """SIGTERM to torchrun and its ranks, as a scheduler sends it: each rank gets it twice
    (the launcher passes it on), finishes the step it is in, agrees on it with the others, and
    they save one loadable checkpoint, no rank failing. No evaluation comes before, so the
    checkpoint can only be that save."""
    import signal
    import subprocess
    import sys
    import time
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(HERE, "train.py"), "--preset=tiny", "--compile=False", "--batch_size=4",
           "--dtype=float32", "--heatmap_svg=False", "--eval_sample=False", f"--data={text_file}",
           "--max_iters=100000", "--eval_interval=100000", "--log_interval=1",
           f"--out_dir={tmp_path}"]
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        log, deadline = tmp_path / "log.jsonl", time.time() + 120
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGTERM)  # the launcher and, like a scheduler, its ranks
        try:
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = (tmp_path / "out.txt").read_text()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] >= 3 and f"stopped by SIGTERM at iter {ckpt['iter']}" in " ".join(text.split())
    assert 'train.py", line' not in text and "parallel.py\", line" not in text, text[-3000:]
    GPT.from_checkpoint(ckpt)  # loadable, strict: every key
    assert len(ckpt["data_rng"]) == 2  # both ranks' data positions: they all took part
