"""Tests for model.py and train.py: the model's parts, the data formats, and whole runs of
train.py in subprocesses (tiny preset, no compile) as a user would start them."""
import dataclasses
import json
import os
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn.functional as F

import data
import parallel
import startup
import train
from conftest import DEVICES
from model import GPT, GPTConfig, presets
from moe import MLP, MoE, MoEConfig, max_vio, update_bias

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_DEFAULTS = startup.default_settings(vars(train))  # before any in-process run changes them


def tiny_model(**moe):
    torch.manual_seed(0)
    cfg = presets["tiny"]
    return GPT(GPTConfig(**{**cfg.__dict__, "moe": MoEConfig(**{**cfg.moe.__dict__, **moe})}))


def run_script(out_dir, *args, torchrun=False, check=True, script=os.path.join(HERE, "train.py"),
               timeout=300):
    """train.py in a subprocess, as a user starts it, with the tiny preset and no compile; a run
    still going after `timeout` seconds fails the test as hung."""
    cmd = [sys.executable, script, "--preset=tiny", "--compile=False", "--batch_size=4",
           "--eval_iters=2", "--heatmap_svg=False", "--dtype=float32", f"--out_dir={out_dir}",
           *args]  # dtype pinned: "auto" times bf16 against fp32, so two runs could differ
    if torchrun:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    # torchrun starts its ranks in sessions of their own: on a timeout, SIGTERM it (it stops its
    # ranks), then kill its group. Output goes to files, which a stray rank cannot hold open.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, start_new_session=True,
                                env={**os.environ, "COLUMNS": "120"})
        hung = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.seek(0), err.seek(0)
        res = subprocess.CompletedProcess(cmd, proc.returncode, out.read(), err.read())
    if hung:
        pytest.fail(f"hung for {timeout} s: {' '.join(cmd)}\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    if check:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def run_train(out_dir, *args, torchrun=False):
    run_script(out_dir, *args, torchrun=torchrun)
    return [json.loads(l) for l in open(os.path.join(out_dir, "log.jsonl"))]


def run_main(monkeypatch, out_dir, *args):
    """train.main() in this process, its settings restored afterwards; returns the loads of
    every update_bias call (one a step)."""
    for key, value in TRAIN_DEFAULTS.items():  # as a new process would start
        monkeypatch.setattr(train, key, value)
    loads, real = [], train.update_bias
    monkeypatch.setattr(train, "update_bias", lambda model, gamma=None: loads.append(
        real(model, gamma)) or loads[-1])
    monkeypatch.setattr(sys, "argv", ["train.py", "--preset=tiny", "--compile=False",
                                      "--eval_iters=2", "--heatmap_svg=False", "--dtype=float32",
                                      "--eval_sample=False",
                                      f"--out_dir={out_dir}", *args])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        train.main()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.use_deterministic_algorithms(deterministic)
    return loads


def gate_biases(state_dict):
    return [v for k, v in state_dict.items() if k.endswith("gate.bias")]


def corpus_text():  # learnable: a short phrase repeated with a counter
    return "".join(f"def f{i % 10}(x):\n    return x + {i % 10}\n" for i in range(3000))


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(corpus_text())
    return str(path)


@pytest.fixture(scope="module")
def compiled_bias_run(tmp_path_factory):
    """The checkpoint of one short compiled run that balances with the bias alone."""
    out = tmp_path_factory.mktemp("compiled")
    (out / "corpus.txt").write_text(corpus_text())
    run_train(out, f"--data={out / 'corpus.txt'}", "--compile=True", "--balance=bias",
              "--max_iters=3", "--eval_interval=3")
    return torch.load(out / "ckpt.pt", weights_only=True)


# ------------------------------------------------------------------------------ model
def test_model_dense_layers_first_then_moe():
    model = tiny_model()
    kinds = [type(layer.ffn) for layer in model.layers]
    n = presets["tiny"].n_dense_layers
    assert kinds == [MLP] * n + [MoE] * (len(kinds) - n)


def test_model_loss_is_cross_entropy_plus_balance_loss():
    alpha = 0.1
    model = tiny_model(seq_aux_alpha=alpha)
    E, K = model.cfg.moe.n_routed_experts, model.cfg.moe.n_activated_experts
    routed = []  # (scores, indices) of every MoE layer, read from its gate
    hooks = [m.gate.register_forward_hook(lambda g, i, out: routed.append(out[1:]))
             for m in model.modules() if isinstance(m, MoE)]
    idx = torch.randint(0, 256, (2, 16))
    logits, loss, aux = model(idx, idx)
    for h in hooks:
        h.remove()
    ce = F.cross_entropy(logits.flatten(0, 1), idx.flatten())
    want_aux = 0.0  # [V3 eq. 17-20], per sequence, averaged; summed over MoE layers
    for indices, scores in routed:
        for b in range(2):
            s = scores.view(2, 16, E)[b]
            picked = indices.view(2, 16, K)[b]
            P = (s / s.sum(-1, keepdim=True)).mean(0)                                # (E,)
            f = torch.tensor([(picked == i).sum().item() for i in range(E)]) * E / (K * 16)
            want_aux += alpha * (f * P).sum() / 2
    assert len(routed) == 1 and aux > 0
    torch.testing.assert_close(aux, want_aux)
    torch.testing.assert_close(loss, ce + want_aux)
    loss.backward()
    assert model.layers[-1].ffn.gate.weight.grad.abs().sum() > 0
    assert model.layers[0].ffn.w1.weight.grad.abs().sum() > 0


def test_model_eval_has_no_balance_loss_and_counts_nothing():
    model = tiny_model(seq_aux_alpha=0.1).eval()
    _, _, aux = model(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))
    assert aux == 0
    assert all(m.tokens_per_expert.sum() == 0 for m in model.modules() if isinstance(m, MoE))


def test_generate_appends_tokens_in_vocab():
    model = tiny_model().eval()
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 20, temperature=1.0, top_k=5)
    assert out.shape == (2, 23) and out.min() >= 0 and out.max() < 256
    greedy = model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    assert torch.equal(greedy, model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0))


def test_active_params_count_what_a_token_touches():
    """Counted from the architecture, not from the model: tiny = 2 blocks of width C, the first
    dense (SwiGLU of width (K + S) * H), the second MoE (router, S shared and K of E routed
    SwiGLU experts of width H), then a final norm and the head; the embedding is a lookup."""
    C, V, H, E, K, S = 32, 256, 16, 8, 2, 1
    attn = 4 * C * C + 2 * C                    # wqkv, wo, the two RMSNorms of the block
    dense_block = attn + 3 * C * (K + S) * H
    moe_block = lambda experts: attn + E * C + 3 * C * S * H + experts * 3 * C * H
    head = C + C * V                            # final RMSNorm, output matrix
    model = tiny_model()
    assert model.num_params(active=True) == dense_block + moe_block(K) + head
    assert model.num_params() == dense_block + moe_block(E) + head


def test_model_rejects_bad_config_and_long_input():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=96, n_head=5)
    with pytest.raises(ValueError, match="n_dense_layers"):
        GPTConfig(n_layer=2, n_dense_layers=3)
    with pytest.raises(ValueError, match="block_size"):
        tiny_model()(torch.zeros(1, 65, dtype=torch.long))


def test_attention_scores_depend_on_relative_position_only(monkeypatch):
    """One input vector at every position: after RoPE, the score of query m and key n may
    depend on m - n only (equal along each diagonal), and must depend on it."""
    model, L = tiny_model(), 12
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(q @ k.mT) or sdpa(q, k, v, **kw))
    x = torch.randn(model.cfg.n_embd).expand(1, L, -1)
    model.layers[0].attn(x, model.rope_cos[:L], model.rope_sin[:L])
    scores = seen[0][0]                                                      # (h, L, L)
    for shift in range(1, 4):
        torch.testing.assert_close(scores[:, shift:, shift:], scores[:, :-shift, :-shift])
    assert not torch.allclose(scores[:, 5, 5], scores[:, 5, 0])


def test_changing_later_tokens_leaves_earlier_logits_unchanged():
    model = tiny_model().eval()
    idx = torch.randint(0, 256, (2, 32))
    later = idx.clone()
    later[:, 20:] = torch.randint(0, 256, (2, 12))
    a, b = model(idx, idx)[0], model(later, later)[0]
    torch.testing.assert_close(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_training_flops_count_causal_attention_from_first_principles():
    """Per token, 6 FLOPs per active parameter; per layer, query t takes dot products with its
    t + 1 keys and sums as many values, 2 * n_embd FLOPs each, forward; backward twice that."""
    model, L = tiny_model(), 16
    c = model.cfg
    attention = c.n_layer * sum(3 * 2 * (2 * c.n_embd) * (t + 1) for t in range(L)) / L
    assert model.flops_per_token(L) == 6 * model.num_params(active=True) + attention


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GeForce RTX 5090", None)])
def test_peak_flops_are_looked_up_by_the_exact_part(name, peak):
    # dense bf16 tensor-core peaks from NVIDIA's datasheets (half the sparsity figures)
    assert startup.peak_flops(name) == peak


def test_auto_dtype_on_cuda_does_not_count_emulated_bf16(monkeypatch):
    # a GPU whose bf16 exists only as emulation (torch's default answer counts it)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True:
                        including_emulation)
    assert startup.auto_dtype("cuda")[0] == "float32"


@pytest.mark.full
def test_tokens_per_second_count_training_time_only(monkeypatch, tmp_path, text_file):
    """Evaluations (made 1 s slower here), samples and checkpoints are not training time."""
    steps, real_step, real_eval = [], train.train_step, train.evaluate
    def timed_step(*args):
        t0 = time.perf_counter()
        out = real_step(*args)
        steps.append(time.perf_counter() - t0)
        return out
    monkeypatch.setattr(train, "train_step", timed_step)
    monkeypatch.setattr(train, "evaluate", lambda *a: time.sleep(1) or real_eval(*a))
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=9", "--eval_interval=3",
             "--log_interval=9", "--batch_size=4", "--eval_sample=False")
    row = [r for r in map(json.loads, open(tmp_path / "log.jsonl")) if "tokens_per_s" in r][-1]
    timed = 4 * presets["tiny"].block_size * 8 / sum(steps[1:])  # the first step compiles
    assert 0.7 * timed < row["tokens_per_s"] <= 1.01 * timed, (row["tokens_per_s"], timed)


@pytest.mark.full
def test_sampling_and_evaluation_run_under_the_training_autocast(monkeypatch, tmp_path, text_file):
    seen, build = [], train.GPT  # (training?, autocast on?, autocast dtype) of every forward
    def gpt(cfg):
        model = build(cfg)
        model.register_forward_pre_hook(lambda m, args: seen.append(
            (m.training, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))))
        return model
    monkeypatch.setattr(train, "GPT", gpt)
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=2", "--eval_interval=2",
             "--dtype=bfloat16", "--batch_size=4", "--eval_sample=True")
    assert sum(not training for training, *_ in seen) == 2 + 200  # val batches, sampled tokens
    assert set(seen) == {(True, True, torch.bfloat16), (False, True, torch.bfloat16)}


def test_no_evaluation_means_no_checkpoint_and_the_gpu_preset_trains_at_1e3(monkeypatch, tmp_path,
                                                                          text_file):
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=2", "--eval_iters=0",
             "--batch_size=4")
    assert not (tmp_path / "ckpt.pt").exists() and train.learning_rate == 3e-3
    assert [r["iter"] for r in map(json.loads, open(tmp_path / "log.jsonl"))] == [2]
    monkeypatch.setattr(sys, "argv", ["train.py", "--preset=gpu"])
    assert train.configure()[0]["learning_rate"] == 1e-3
    monkeypatch.setattr(sys, "argv", ["train.py", "--preset=gpu", "--learning_rate=2e-3"])
    assert train.configure()[0]["learning_rate"] == 2e-3


def test_learning_rate_schedule(monkeypatch):
    for k, v in dict(learning_rate=1.0, min_lr=0.1, warmup_iters=10).items():
        monkeypatch.setattr(train, k, v)
    lr = lambda it: train.lr_at(it, 110)
    assert lr(0) == pytest.approx(0.1)           # warm-up from learning_rate / warmup_iters
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)           # end of warm-up: the full rate
    assert lr(10) == pytest.approx(1.0)          # the cosine starts at the top
    assert lr(60) == pytest.approx(0.55)         # half way: (learning_rate + min_lr) / 2
    assert lr(110) == pytest.approx(0.1)         # decay end: min_lr
    assert lr(1000) == pytest.approx(0.1)        # beyond it: min_lr


# ------------------------------------------------------------------------------ data
def write_shard(path, tokens, magic=20240520, truncate=0, version=1):
    header = struct.pack("<256i", magic, version, len(tokens), *[0] * 253)
    body = struct.pack(f"<{len(tokens)}H", *tokens)
    with open(path, "wb") as f:
        f.write((header + body)[:len(header + body) - truncate])


def test_text_file_and_folder_load_as_bytes(text_file, tmp_path):
    splits = data.load_data(text_file, str(tmp_path / "cache"), 16)
    raw = open(text_file, "rb").read()
    assert bytes(torch.cat(splits["train"] + splits["val"]).tolist()) == raw
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("a" * 600)
    (folder / "b.txt").write_text("b" * 600)
    splits = data.load_data(str(folder), str(tmp_path / "cache"), 16)
    assert len(splits["train"][0]) + len(splits["val"][0]) == 1201  # joined with one newline


def test_stdlib_data_is_split_by_file_and_cached(tmp_path):
    (train_tokens,), (val_tokens,) = data.load_data("stdlib", str(tmp_path), 16).values()
    assert len(train_tokens) > 10 * len(val_tokens) > 0
    assert b"def " in bytes(val_tokens[:100_000].tolist())
    assert any(p.endswith(".pt") for p in os.listdir(tmp_path))
    again = data.load_data("stdlib", str(tmp_path), 16)
    assert torch.equal(again["val"][0], val_tokens)


def test_bin_shards_load_with_val_split(tmp_path):
    write_shard(tmp_path / "d_train_000.bin", list(range(1000)))
    write_shard(tmp_path / "d_val_000.bin", [7] * 500)
    splits = data.load_data(str(tmp_path / "d_*.bin"), str(tmp_path), 16)
    assert [s.tolist() for s in splits["train"]] == [list(range(1000))]
    assert [s.tolist() for s in splits["val"]] == [[7] * 500]


def test_bin_batches_are_windows_of_one_shard_never_concatenated(tmp_path, monkeypatch):
    sizes = [40, 300, 1000]  # shard k holds 1000k, 1000k + 1, ...: a window names its shard
    for k, n in enumerate(sizes):
        write_shard(tmp_path / f"d_train_{k}.bin", [1000 * k + t for t in range(n)])
    write_shard(tmp_path / "d_val.bin", list(range(100)))
    def no_cat(*args, **kwargs):
        raise AssertionError("shards must not be concatenated")
    monkeypatch.setattr(torch, "cat", no_cat)
    monkeypatch.setattr(torch, "concat", no_cat)
    splits = data.load_data(str(tmp_path / "d_*.bin"), str(tmp_path), 16)
    assert [len(s) for s in splits["train"]] == sizes
    gen, picked = torch.Generator().manual_seed(0), []
    for _ in range(40):
        x, y = data.get_batch(splits["train"], gen, 8, 16, "cpu")
        for row in [a + b[-1:] for a, b in zip(x.tolist(), y.tolist())]:
            k, start = divmod(row[0], 1000)
            assert row == list(range(row[0], row[0] + 17))  # consecutive: one shard, no seam
            assert start + 17 <= sizes[k]                   # in range of that shard
            picked.append(k)
    counts = [picked.count(k) for k in range(3)]  # windows: 24, 284, 984 -> ~2%, 22%, 76%
    assert counts[0] < counts[1] < counts[2] and counts[0] > 0, counts


def write_cold_shards(folder, n_train, tokens_each):
    """n_train shards and a small val shard of tokens below 256, written, then dropped from the
    page cache: a disk that nobody has read yet."""
    pattern = bytes(b for t in range(256) for b in (t, 0))  # uint16 0..255
    for name, n in [(f"d_train_{i}.bin", tokens_each) for i in range(n_train)] + [("d_val.bin", 1 << 16)]:
        with open(folder / name, "wb") as f:
            f.write(struct.pack("<256i", 20240520, 1, n, *[0] * 253) + pattern * (n // 256))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def test_shard_windows_read_their_own_pages_not_the_kernels_read_around(tmp_path):
    """Drawing 480 windows of 130 bytes from 64 MB of shards nobody has read yet. Without
    MADV_RANDOM each first touch of a page also read the pages around it (read_ahead_kb: 8 MB
    on the machine this was written on; 128 KB is the kernel's default): 359 MB read from disk
    and 32 MB more resident for 480 windows of 400 MB of shards, against 2 MB and 5 MB."""
    write_cold_shards(tmp_path, 2, 16 << 20)
    splits = data.load_data(str(tmp_path / "d_*.bin"), str(tmp_path), 64)
    def read_bytes():  # what this process made the kernel fetch from storage
        return int(dict(line.split(": ") for line in open("/proc/self/io"))["read_bytes"])
    def resident_file_kib():
        return int(next(l for l in open("/proc/self/status") if l.startswith("RssFile")).split()[1])
    gen, read, resident = torch.Generator().manual_seed(0), read_bytes(), resident_file_kib()
    for _ in range(60):
        data.get_batch(splits["train"], gen, 8, 64, "cpu")
    read, resident = read_bytes() - read, resident_file_kib() - resident
    assert read < 480 * 16 * 1024, f"{read / 2**20:.1f} MB read for 480 windows of 130 bytes"
    assert resident < 480 * 16, f"{resident / 1024:.1f} MB more resident"


@pytest.mark.parametrize("kind,message", [("magic", "magic"), ("truncated", "truncated"),
                                          ("version", "header version 2; only version 1"),
                                          ("only val", "matches only val shards"),
                                          ("no files", "matches no files"),
                                          ("empty file", "too short for the 1024-byte header"),
                                          ("missing", "no such file"),
                                          ("short split", "too few for block_size=16"),
                                          ("one file", "one .bin file, which would serve as both")])
def test_bad_data_gets_a_clear_error(tmp_path, kind, message):
    spec = str(tmp_path / "x_*.bin")
    if kind == "magic":
        write_shard(tmp_path / "x_0.bin", [1, 2, 3], magic=1234)
    elif kind == "truncated":
        write_shard(tmp_path / "x_0.bin", [1, 2, 3], truncate=2)
    elif kind == "version":
        write_shard(tmp_path / "x_0.bin", [1, 2, 3], version=2)
    elif kind == "only val":
        write_shard(tmp_path / "x_val_0.bin", list(range(100)))
        write_shard(tmp_path / "x_val_1.bin", list(range(100)))
    elif kind == "empty file":
        (tmp_path / "x_0.bin").write_bytes(b"")
    elif kind == "short split":
        write_shard(tmp_path / "x_train.bin", list(range(100)))
        write_shard(tmp_path / "x_val.bin", [1] * 10)
    elif kind == "missing":
        spec = str(tmp_path / "nothing.txt")
    elif kind == "one file":
        write_shard(tmp_path / "x_0.bin", list(range(100)))
    with pytest.raises(SystemExit, match=message):
        data.load_data(spec, str(tmp_path), 16)


def test_overrides_are_typed_and_unknown_keys_refused():
    settings = {"max_iters": 10, "learning_rate": 1e-3, "compile": True, "data": "stdlib"}
    got = startup.parse_overrides(["--max_iters=5", "--learning_rate=0.5", "--compile=False",
                                 "--data=x.txt"], settings)
    assert got == {"max_iters": 5, "learning_rate": 0.5, "compile": False, "data": "x.txt"}
    assert startup.parse_overrides(["--compile"], settings) == {"compile": True}
    with pytest.raises(SystemExit, match="unknown setting.*max_iters"):
        startup.parse_overrides(["--max_iter=5"], settings)
    with pytest.raises(SystemExit, match="max_iters.*int"):
        startup.parse_overrides(["--max_iters=five"], settings)


@pytest.mark.full
def test_compiled_evaluation_counts_val_loads_and_not_training_counts():
    model, K = tiny_model(), presets["tiny"].moe.n_activated_experts
    loads = model.count_eval_loads()
    corpus = torch.tensor(list(b"def f(x):\n    return x * 2 + 1\n" * 50))
    model(corpus[None, :64], corpus[None, 1:65])  # training mode: the hooks count nothing
    assert loads.sum() == 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.tokens_per_expert.zero_()
    compiled, ctx = torch.compile(model), torch.autocast("cpu", enabled=False)
    val_loss, got = train.evaluate(compiled, loads, [corpus], 4, 32, "cpu", ctx, 2, 0)
    assert torch.equal(train.evaluate(compiled, loads, [corpus], 4, 32, "cpu", ctx, 2, 0)[1], got)
    # the reference: the same batches through the eager model, picks read from each gate
    picks = [m.gate for m in model.modules() if isinstance(m, MoE)]
    want, ce, gen = torch.zeros_like(got), 0.0, torch.Generator().manual_seed(0)
    def count(j, out):
        want[j] += torch.bincount(out[1].flatten(), minlength=want.shape[1])
    hooks = [g.register_forward_hook(lambda g, i, out, j=j: count(j, out))
             for j, g in enumerate(picks)]
    model.eval()
    for _ in range(2):
        x, y = data.get_batch([corpus], gen, 4, 32, "cpu")
        ce += F.cross_entropy(model(x, y)[0].flatten(0, 1), y.flatten()).item() / 2
    for h in hooks:
        h.remove()
    assert got.sum(1).tolist() == [2 * 4 * 32 * K] * len(picks)
    assert torch.equal(got, want)
    assert val_loss == pytest.approx(ce, abs=1e-4)
    assert all(m.tokens_per_expert.sum() == 0 for m in model.modules() if isinstance(m, MoE))


# ------------------------------------------------------------------------------ runs
@pytest.mark.full
@pytest.mark.parametrize("device", DEVICES)
def test_training_lowers_the_loss(tmp_path, text_file, device):
    rows = run_train(tmp_path, f"--data={text_file}", "--max_iters=60", "--eval_interval=60",
                     "--log_interval=10", "--learning_rate=1e-2", f"--device={device}")
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0
    evals = [r for r in rows if "val_loss" in r]
    assert evals[-1]["iter"] == 60 and 0 <= evals[-1]["maxvio_global"]
    assert os.path.exists(tmp_path / "ckpt.pt")


@pytest.mark.full
def test_resume_reproduces_uninterrupted_run(tmp_path, text_file):
    common = [f"--data={text_file}", "--lr_decay_iters=12", "--log_interval=1", "--eval_interval=6"]
    full = run_train(tmp_path / "a", *common, "--max_iters=12")
    run_train(tmp_path / "b", *common, "--max_iters=6")
    resumed = run_train(tmp_path / "b", *common, "--max_iters=12", "--init_from=resume")
    losses = lambda rows: [(r["iter"], r["loss"], r["maxvio_batch"]) for r in rows if "loss" in r]
    assert losses(full)[6:] == losses(resumed)[6:]
    assert len(losses(full)) == 12


@pytest.mark.full
def test_bias_moves_in_steps_of_gamma(compiled_bias_run):
    gamma, steps = train.arms["bias"][0], 3
    for bias in gate_biases(compiled_bias_run["model"]):
        n = bias / gamma
        torch.testing.assert_close(n, n.round(), atol=1e-3, rtol=0)  # whole steps of gamma
        assert n.abs().max() <= steps and n.abs().sum() > 0


def test_each_optimizer_step_moves_every_bias_by_gamma(monkeypatch, tmp_path, text_file):
    """Two steps of train.py in this process, uncompiled: each expert's bias moved by +-gamma
    per step (sign(mean load - load) is +-1 or 0, so |bias| / gamma is 0, 1 or 2 after two)."""
    loads = run_main(monkeypatch, tmp_path, f"--data={text_file}", "--balance=bias",
                     "--max_iters=2", "--batch_size=4")
    gamma = train.arms["bias"][0]
    assert len(loads) == 2  # (n_moe_layers, E) loads of each step, as train.py passed them on
    want = sum(gamma * torch.sign(l.mean(-1, keepdim=True) - l).float() for l in loads)
    biases = torch.stack(gate_biases(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"]))
    assert want.abs().sum() > 0
    torch.testing.assert_close(biases, want, rtol=0, atol=1e-7)


def test_frozen_bias_stays_zero(monkeypatch, tmp_path, text_file):
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--balance=bias", "--max_iters=3",
             "--bias_freeze_frac=1.0", "--batch_size=4")
    biases = gate_biases(torch.load(tmp_path / "ckpt.pt", weights_only=True)["model"])
    assert biases and all(b.abs().sum() == 0 for b in biases)


@pytest.mark.full
def test_checkpoint_of_a_compiled_run_loads_into_a_plain_model(compiled_bias_run):
    assert not [k for k in compiled_bias_run["model"] if "_orig_mod." in k]
    GPT(presets["tiny"]).load_state_dict(compiled_bias_run["model"])  # strict: every key


def test_accumulated_micro_batches_update_the_bias_once_from_all_of_them(monkeypatch, tmp_path,
                                                                         text_file):
    loads = run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=1",
                     "--gradient_accumulation_steps=2", "--batch_size=4")
    cfg = presets["tiny"]
    per_layer = 4 * cfg.block_size * 2 * cfg.moe.n_activated_experts  # B * L * accum * K
    assert len(loads) == 1
    assert loads[0].sum(1).tolist() == [per_layer] * (cfg.n_layer - cfg.n_dense_layers)


@pytest.mark.full
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, text_file):
    run_train(tmp_path, f"--data={text_file}", "--max_iters=2", "--eval_interval=2")
    with pytest.raises(AssertionError, match="nan at iter"):  # lr 1e30 blows the weights up
        run_train(tmp_path, f"--data={text_file}", "--max_iters=10", "--eval_interval=2",
                  "--init_from=resume", "--learning_rate=1e30", "--warmup_iters=1")
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"] == 2


@pytest.mark.full
def test_sample_from_checkpoint(tmp_path, text_file):
    run_train(tmp_path, f"--data={text_file}", "--max_iters=4", "--eval_interval=4")
    res = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), f"--out_dir={tmp_path}",
                          "--prompt=def ", "--max_new_tokens=20"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("def ")


def test_unknown_setting_is_refused_in_one_line(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="unknown setting '--lr=1'.*learning_rate"):
        run_main(monkeypatch, tmp_path, "--lr=1")


@pytest.mark.parametrize("env, args", [({}, []), ({"WORLD_SIZE": "2"}, ["--fsdp=True"]),
                                       ({"WORLD_SIZE": "3"}, [])])
def test_unsupported_ep_settings_end_with_one_line(monkeypatch, tmp_path, env, args):
    """Without torchrun, with --fsdp=True, or on ranks that do not divide the experts: one line,
    before any process group exists."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, tmp_path, "--ep=True", *args)
    lines = str(stop.value.code).splitlines()
    assert len(lines) == 1 and lines[0].startswith("--ep=True shards"), lines
    assert not torch.distributed.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_missing_gpu_ends_with_one_line(monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, tmp_path, "--device=cuda")
    assert len(str(stop.value.code).splitlines()) == 1
    assert "--device=cuda: no usable CUDA GPU here" in str(stop.value.code)


@pytest.mark.parametrize("flags, ms_bf16, expected", [
    ({"avx2", "avx512f"}, 10, "float32"), (set(), 10, "float32"),  # bf16 would be emulated
    ({"avx512f", "avx512_bf16"}, 50, "bfloat16"), ({"amx_bf16"}, 50, "bfloat16"),
    ({"avx512f", "avx512_bf16"}, 120, "float32")])  # bf16 instructions, yet fp32 trains faster
def test_auto_dtype_on_a_cpu_takes_bf16_where_the_model_trains_faster_in_it(
        monkeypatch, flags, ms_bf16, expected):
    monkeypatch.setattr(startup, "cpu_flags", lambda: flags)
    monkeypatch.setattr(startup, "model_step_ms",
                        lambda *a: {"bfloat16": ms_bf16, "float32": 100.0})
    name, why = startup.auto_dtype("cpu", tiny_model, 2)
    assert name == expected
    if flags & {"avx512_bf16", "amx_bf16"}:  # both figures on the start-up line
        assert f"{ms_bf16} ms in bf16 and 100 ms in fp32" in why


def test_model_step_ms_times_training_steps_in_both_dtypes():
    model, seen = tiny_model(), []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_autocast_enabled("cpu"))))
    before = [p.detach().clone() for p in model.parameters()]
    ms = startup.model_step_ms(model.eval(), 2, 16, reps=2)
    assert set(ms) == {"bfloat16", "float32"} and min(ms.values()) > 0
    assert sorted(set(seen)) == [(True, False), (True, True)] and len(seen) == 2 * 3
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))  # steps taken


def test_dtype_auto_leaves_the_runs_random_numbers_and_trains_as_the_dtype_it_picks(
        monkeypatch, capsys, tmp_path, text_file):
    """dtype=auto on a CPU with bf16 instructions times a throwaway model: picking fp32, the
    run is the one --dtype=float32 makes, step for step; the start-up line has both times."""
    monkeypatch.setattr(startup, "cpu_flags", lambda: {"avx512_bf16"})
    steps = [r for r in run_logged(monkeypatch, tmp_path / "auto", text_file, "--dtype=auto")]
    out = " ".join(capsys.readouterr().out.split())
    assert "ms in bf16 and" in out and "ms in fp32, timed now" in out
    config = torch.load(tmp_path / "auto" / "ckpt.pt", weights_only=True)["config"]
    if config["dtype"] == "float32":  # what this machine timed; the other way, compare to bf16
        assert steps == run_logged(monkeypatch, tmp_path / "fp32", text_file, "--dtype=float32")
    else:
        assert steps == run_logged(monkeypatch, tmp_path / "bf16", text_file, "--dtype=bfloat16")


def run_logged(monkeypatch, out_dir, text_file, *args):
    run_main(monkeypatch, out_dir, f"--data={text_file}", "--max_iters=3", "--eval_interval=3",
             "--log_interval=1", "--batch_size=4", *args)
    return [(r["iter"], r.get("loss"), r.get("val_loss")) for r in map(json.loads, open(out_dir / "log.jsonl"))]


def test_fp32_on_cuda_turns_on_tf32_through_the_start_up(monkeypatch, tmp_path, text_file):
    calls = []
    monkeypatch.setattr(train, "matmul_precision", lambda dev, dtype: calls.append((dev, dtype)) or "")
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=1", "--eval_iters=0")
    assert calls == [("cpu", "float32")]  # startup.matmul_precision decides for the device


def test_startup_line_names_the_dtype_and_why(monkeypatch, capsys, tmp_path, text_file):
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=0", "--dtype=float32")
    assert "float32 (set by --dtype)" in " ".join(capsys.readouterr().out.split())


class WritesAFile:
    """Unpickling this opens, so creates, a file: what a hostile checkpoint could do."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_checkpoint_carrying_a_pickled_object_is_refused_not_run(tmp_path):
    victim = tmp_path / "written_by_the_checkpoint"
    torch.save({"model": {}, "iter": 0, "payload": WritesAFile(str(victim))}, tmp_path / "ckpt.pt")
    with pytest.raises(SystemExit) as stop:
        data.load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert stop.value.code == f"{tmp_path / 'ckpt.pt'}: refused, it holds a pickled Python " \
                              "object (GLOBAL io.open); only load files you trust"
    assert not victim.exists()
    torch.load(tmp_path / "ckpt.pt", weights_only=False)  # the control: plain pickle runs it
    assert victim.exists()


def _train_arm(arm, steps=100, seed=0, skew=0.5):
    """Tiny GPT, router skewed at start toward the first K experts; returns MaxVio over the
    loads of the last 50 steps (mean over MoE layers). gamma is 10x the arm's: in 100 steps
    of 1e-3 the bias moves 0.1 at most, less than the skew it has to undo."""
    gamma, alpha, scope = train.arms[arm]
    gamma *= 10
    model = tiny_model(bias_update_speed=gamma, seq_aux_alpha=alpha, aux_scope=scope)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    gen = torch.Generator().manual_seed(seed)
    corpus = torch.tensor(list(b"def f(x):\n    return x * 2 + 1\n" * 200))
    inputs = []
    hooks = [m.gate.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for m in moes]
    model(data.get_batch([corpus], gen, 8, 32, "cpu")[0])
    for h in hooks:
        h.remove()
    with torch.no_grad():  # skew: the first K experts' router rows point along the mean input
        for m, x in zip(moes, inputs):
            u = x.mean(0) / x.mean(0).norm()
            m.gate.weight[: m.cfg.n_activated_experts] += skew * u
            m.tokens_per_expert.zero_()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    recent = []
    for step in range(steps):
        x, y = data.get_batch([corpus], gen, 8, 32, "cpu")
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad()
        loads = update_bias(model)
        if step == 0:
            start = max_vio(loads).mean().item()
        if step >= steps - 50:
            recent.append(loads)
    return max_vio(torch.stack(recent).sum(0)).mean().item(), start


@pytest.mark.full
def test_bias_arm_balances_a_skewed_router():
    vio_none, start_none = _train_arm("none")
    vio_bias, _ = _train_arm("bias")
    assert start_none > 1.0  # the skew took: most tokens go to the same experts
    assert vio_bias < 0.5 * vio_none, (vio_bias, vio_none)


def test_bench_ceiling_runs_the_router_in_float32_like_the_layer():
    import bench
    bench._dtype = torch.bfloat16
    cfg = MoEConfig(dim=64, moe_inter_dim=32, n_routed_experts=8, n_activated_experts=2)
    dtypes = {(M, K, N): t for M, K, N, t in bench.gemms(cfg, 100)}
    assert dtypes.pop((100, 64, 8)) == torch.float32                          # the router
    assert set(dtypes.values()) == {torch.bfloat16}


@pytest.mark.full
def test_bench_tiny_preset_writes_its_rows(tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--preset=tiny",
                          f"--json={out}", "--profile=grouped eager fwd+bwd"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert {"device", "torch", "date"} <= report.keys()
    rows = report["rows"]
    assert {r["dispatch"] for r in rows} == {"ceiling", "loop", "grouped"}
    layer_rows = [r["dispatch"] for r in rows if r["pass"] != "train" and r["dispatch"] != "ceiling"]
    assert layer_rows == sorted(layer_rows, key=lambda d: d != "grouped")  # a time limit cuts loop rows

    assert {r["pass"] for r in rows} == {"fwd", "fwd+bwd", "train"}
    for r in rows:
        assert {"case", "dispatch", "mode", "pass", "ms", "tokens_per_s", "tflops",
                "ceiling_ratio"} <= r.keys() and r["ms"] > 0
    # --profile: exactly the rows it names, their time split by kind, matmuls found by name
    profiles = report["profiles"]
    assert sorted(profiles) == [f"tiny:256 grouped eager fwd+bwd {r}"
                                for r in ("balanced", "real", "skewed")]
    for p in profiles.values():
        assert abs(sum(p["kinds"].values()) - 1) < 1e-6
        # the matmul share holds at least the top ops named as matmuls (not a share of the
        # time: on 2 busy cores the tiny preset's matmuls took 17% to 54% of it)
        mm = sum(e["share"] for e in p["top"] if re.fullmatch(r"aten::(mm|_grouped_mm)", e["name"]))
        assert mm > 0 and p["kinds"]["matmul"] >= mm - 1e-9
        ms = [e["ms"] for e in p["top"]]
        assert ms == sorted(ms, reverse=True) and sum(ms) <= p["ms"] * (1 + 1e-6)


# ------------------------------------------------------------------------------ layout
def project_imports():
    """{module: the project modules it imports}, read from the source of every project file."""
    import ast
    mods = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("test_")
            and f != "conftest.py"}
    graph = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(HERE, m + ".py")).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                 for a in n.names} | {n.module.split(".")[0] for n in ast.walk(tree)
                                      if isinstance(n, ast.ImportFrom) and n.module}
        graph[m] = names & mods - {m}
    return graph


def test_no_two_modules_import_each_other_directly_or_in_a_loop():
    graph, cycles = project_imports(), []
    def visit(m, path):
        for n in graph[m]:
            if n in path:
                cycles.append(path[path.index(n):] + [n])
            else:
                visit(n, path + [n])
    for m in graph:
        visit(m, [m])
    assert graph["study"] and not cycles, cycles


def test_import_bench_loads_nothing_of_training_or_distributed_checkpoints():
    """bench.py times the layer: it must not drag in train.py, parallel.py or torch's
    distributed checkpoint. (torch._dynamo itself, which any compile needs, imports FSDP and
    DTensor modules in torch 2.13: bench.py may load those, and no more of them.)"""
    probe = ("import sys, warnings; warnings.filterwarnings('ignore'); sys.path.insert(0, {!r})\n"
             "import torch._dynamo\n"
             "dynamo = {{m for m in sys.modules if 'fsdp' in m or 'distributed.tensor' in m}}\n"
             "import bench\n"
             "extra = [m for m in sys.modules if m in ('train', 'parallel') or 'checkpoint.state_dict' in m"
             " or m.startswith('torch.distributed.checkpoint') or (('fsdp' in m or 'distributed.tensor' in m)"
             " and m not in dynamo)]\n"
             "print(extra)").format(HERE)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ a run's life
def test_resume_continues_the_same_run_with_its_own_settings(monkeypatch, capsys, tmp_path,
                                                             text_file):
    """A run with its own settings, whose last checkpoint (iter 2) is older than its log (4
    rows): resumed with only --init_from=resume and a new max_iters, it goes on with the
    checkpoint's settings, says what the command line changed, and logs each step once."""
    first = [f"--data={text_file}", "--batch_size=2", "--learning_rate=2e-3", "--balance=bias",
             "--max_iters=4", "--eval_interval=2", "--log_interval=1"]
    real_save = train.save_checkpoint
    monkeypatch.setattr(train, "save_checkpoint",  # as if it had died after iter 4, unsaved
                        lambda path, model, opt, it, *a: it > 2 or real_save(path, model, opt, it, *a))
    run_main(monkeypatch, tmp_path, *first)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"] == 2
    capsys.readouterr()
    run_main(monkeypatch, tmp_path, "--init_from=resume", "--max_iters=6")
    assert (train.batch_size, train.learning_rate, train.balance, train.data, train.max_iters,
            train.seq_aux_alpha) == (2, 2e-3, "bias", text_file, 6, 0.0)
    assert "max_iters=6 (was 4)" in " ".join(capsys.readouterr().out.split())
    config = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert (config["batch_size"], config["learning_rate"], config["max_iters"]) == (2, 2e-3, 6)
    steps = [r["iter"] for r in map(json.loads, open(tmp_path / "log.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_takes_what_to_run_from_the_checkpoint_and_how_to_launch_from_now(
        monkeypatch, tmp_path, text_file):
    """Launch settings (device, compile, fsdp, ep, out_dir) are today's: a run compiled on a
    GPU under torchrun can go on uncompiled in one process on a CPU. An arm named anew sets
    its own gamma and alpha, and the start-up line's list of changes says so."""
    for key, value in TRAIN_DEFAULTS.items():
        monkeypatch.setattr(train, key, value)
    config = {**TRAIN_DEFAULTS, "data": text_file, "batch_size": 2, "balance": "bias",
              "bias_update_speed": 2e-3, "seq_aux_alpha": 0.0, "device": "cuda", "compile": True,
              "fsdp": True, "out_dir": "elsewhere", "dtype": "bfloat16"}
    model = tiny_model()
    torch.save({"config": config, "model_cfg": dataclasses.asdict(model.cfg), "iter": 4},
               tmp_path / "ckpt.pt")
    monkeypatch.setattr(sys, "argv", ["train.py", "--init_from=resume", f"--out_dir={tmp_path}"])
    got, _, changed = train.configure()
    assert (got["data"], got["batch_size"], got["balance"], got["bias_update_speed"],
            got["dtype"]) == (text_file, 2, "bias", 2e-3, "bfloat16")
    assert (got["device"], got["compile"], got["fsdp"], got["out_dir"]) == (
        "auto", True, False, str(tmp_path)) and changed == {}
    monkeypatch.setattr(sys, "argv", ["train.py", "--init_from=resume", f"--out_dir={tmp_path}",
                                      "--balance=aux"])
    got, _, changed = train.configure()
    assert (got["bias_update_speed"], got["seq_aux_alpha"]) == (0.0, 1e-3)
    assert changed == {"balance": ("bias", "aux"), "bias_update_speed": (2e-3, 0.0),
                       "seq_aux_alpha": (0.0, 1e-3)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_finishes_the_step_saves_and_says_how_to_resume(monkeypatch, capsys, tmp_path,
                                                              text_file, sig):
    """SIGTERM, what schedulers and `kill` send, is handled like Ctrl-C (SIGINT): here it
    arrives during step 2, twice, as when a launcher forwards a stop the process also got."""
    real, calls = train.train_step, []
    def step(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), sig)  # a copy of the same stop: no abort
        return real(*args)
    monkeypatch.setattr(train, "train_step", step)
    def unhandled(*_):
        raise AssertionError(f"{sig.name} reached the test's handler: train.py ignored it")
    before = signal.signal(sig, unhandled)
    try:
        run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=50",
                 "--eval_interval=50")
    finally:
        signal.signal(sig, before)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter"] == 2 and len(calls) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert f"stopped by {sig.name} at iter 2" in out and "--init_from=resume" in out


def write_bin_pair(folder, train_ids, val_ids):
    write_shard(folder / "d_train.bin", train_ids)
    write_shard(folder / "d_val.bin", val_ids)
    return str(folder / "d_*.bin")


def test_token_ids_past_the_vocabulary_end_the_run_with_one_line(monkeypatch, tmp_path):
    spec = write_bin_pair(tmp_path, [300] * 2000, [300] * 2000)  # GPT-2 ids, bytes vocab
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, tmp_path, f"--data={spec}", "--max_iters=1")
    message = str(stop.value.code)
    assert len(message.splitlines()) == 1 and "--vocab_size" in message and "300" in message
    ok = data.load_data(write_bin_pair(tmp_path, [255] * 200, [1] * 200), str(tmp_path), 16)
    x, y = data.get_batch(ok["train"], torch.Generator(), 2, 16, "cpu", vocab_size=256)
    assert x.max() == 255  # the largest id that fits passes


def test_tf32_matmuls_in_fp32_on_cuda_only():
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    before = [f.allow_tf32 for f in flags]  # global switches: restored for the other tests
    try:
        for f in flags:
            f.allow_tf32 = False
        assert startup.matmul_precision("cpu", "float32") == ""
        assert startup.matmul_precision("cuda", "bfloat16") == ""
        assert not any(f.allow_tf32 for f in flags)
        assert startup.matmul_precision("cuda:1", "float32") == ", TF32 matmuls"
        assert all(f.allow_tf32 for f in flags)
    finally:
        for f, was in zip(flags, before):
            f.allow_tf32 = was


def test_compile_without_a_cpp_compiler_ends_with_one_line(monkeypatch, tmp_path, text_file):
    from torch._inductor import config
    monkeypatch.setattr(config.cpp, "cxx", ("/nonexistent/g++",))
    with pytest.raises(SystemExit) as stop:
        run_main(monkeypatch, tmp_path, f"--data={text_file}", "--compile=True", "--max_iters=1")
    assert len(str(stop.value.code).splitlines()) == 1 and "--compile=False" in str(stop.value.code)


@pytest.mark.parametrize("env, argv, want", [
    ({}, ["study.py", "--seeds=4"], "python study.py --seeds=4"),
    ({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"},
     ["/x/study.py", "--study=traffic"],
     "OMP_NUM_THREADS=1 torchrun --nproc_per_node=4 study.py --study=traffic")])
def test_the_stamp_names_the_command_as_typed(monkeypatch, env, argv, want):
    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", argv)
    line = startup.stamp("cpu", "float32")
    assert line.endswith(f"· float32 · `{want}`"), line
    assert re.match(r"> \*\*\d{4}-\d\d-\d\d \d\d:\d\d UTC\*\* · .+ · torch \S+ · commit \S+ · ", line)


def test_a_cpu_run_trains_with_deterministic_algorithms(monkeypatch, tmp_path, text_file):
    """Without it, two compiled CPU runs of one seed drifted apart (at iter 20 of 30), since
    some gradients are summed in the order the threads finish."""
    seen, real = [], train.train_step
    monkeypatch.setattr(train, "train_step", lambda *a: seen.append(
        torch.are_deterministic_algorithms_enabled()) or real(*a))
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=2", "--eval_iters=0")
    assert seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled()  # run_main restored it


def test_summary_speed_is_the_median_of_the_logged_speeds(monkeypatch, tmp_path, text_file, capsys):
    run_main(monkeypatch, tmp_path, f"--data={text_file}", "--max_iters=8", "--log_interval=1",
             "--eval_interval=8", "--batch_size=2")
    speeds = sorted(r["tokens_per_s"] for r in map(json.loads, open(tmp_path / "log.jsonl"))
                    if "tokens_per_s" in r)
    median = (speeds[3] + speeds[4]) / 2  # 8 rows
    shown = re.search(r"tokens_per_s \(median\)\s*│\s*([\d,]+)", capsys.readouterr().out)[1]
    assert int(shown.replace(",", "")) == round(median), (shown, speeds)


def test_summary_rounds_tokens_per_second():
    from rich.console import Console
    from display import summary_table
    console = Console(record=True, width=80)
    console.print(summary_table({"loss": 1.23456, "tokens_per_s": 10452.8047}, "cpu", 3.0))
    text = console.export_text()
    assert "10,453" in text and "10,452.8" not in text and "1.2346" in text
