"""Tests for study.py. --study=arch: the arms' parameter accounting, from the config arithmetic
and from the built models, and one end-to-end run on the tiny preset. --study=experts (atlas.py): mutual
information, the tokenize classes, the counts, the routing of a byte stream, each against its
definition, and one end-to-end run on a tiny checkpoint. (The Switch-loss counter-example is
tested in test_moe.py.)"""
import codecs
import contextlib
import json
import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch
import torch.nn.functional as F

from model import GPT, presets
from atlas import CLASSES, byte_classes, class_expert_counts, lift, mutual_information, route_bytes
from study import arch_configs, compare, param_counts, seconds_to, summarise_balance

HERE = os.path.dirname(os.path.abspath(__file__))
MOE_ARMS = ("gshard", "fine", "fine+shared")


def mlp_params_by_formula(cfg):
    """(total, active) SwiGLU parameters of every block, by hand: 3 matrices of D x width a
    dense MLP; E routed + S shared experts of width H an MoE layer, of which K + S are active."""
    D, m = cfg.n_embd, cfg.moe
    dense = cfg.n_dense_layers * 3 * D * cfg.inter_dim
    n_moe = cfg.n_layer - cfg.n_dense_layers
    total = n_moe * 3 * D * m.moe_inter_dim * (m.n_routed_experts + m.n_shared_experts)
    active = n_moe * 3 * D * m.moe_inter_dim * (m.n_activated_experts + m.n_shared_experts)
    return dense + total, dense + active


@pytest.mark.parametrize("base", ["tiny", "cpu", "gpu"])
def test_moe_arms_hold_the_same_total_and_active_expert_parameters(base):
    counts = {a: mlp_params_by_formula(c) for a, c in arch_configs(presets[base]).items()}
    assert len({counts[a] for a in MOE_ARMS}) == 1, counts


@pytest.mark.parametrize("base", ["tiny", "cpu", "gpu"])
def test_dense_matches_the_moe_active_and_dense_wide_the_moe_total(base):
    counts = {a: mlp_params_by_formula(c) for a, c in arch_configs(presets[base]).items()}
    total, active = counts["fine+shared"]
    assert counts["dense"] == (active, active)
    assert counts["dense_wide"] == (total, total)


def test_arms_are_deepseekmoe_segmentation_of_gshard():
    cfgs = arch_configs(presets["cpu"])
    g, f, fs = (cfgs[a].moe for a in MOE_ARMS)
    assert (g.n_activated_experts, g.n_shared_experts) == (2, 0)  # GShard: top-2, no shared
    assert f.moe_inter_dim * 4 == g.moe_inter_dim and f.n_routed_experts == 4 * g.n_routed_experts
    assert f.n_activated_experts == 4 * g.n_activated_experts and f.n_shared_experts == 0
    assert (fs.n_routed_experts, fs.n_activated_experts, fs.n_shared_experts) == \
           (f.n_routed_experts - 1, f.n_activated_experts - 1, 1)
    assert cfgs["dense"].n_dense_layers == cfgs["dense"].n_layer
    for c in cfgs.values():  # what the arms share: attention, depth, width, context
        assert (c.n_layer, c.n_head, c.n_embd, c.block_size) == (4, 4, 128, 256)


def test_param_counts_agree_with_the_built_model_and_the_formula():
    for arm, cfg in arch_configs(presets["tiny"]).items():
        model = GPT(cfg)
        ffn = sum(p.numel() for name, p in model.named_parameters()
                  if ".ffn." in name and "gate" not in name)
        c = param_counts(cfg)
        assert (c["mlp_total"], c["mlp_active"]) == mlp_params_by_formula(cfg)
        assert c["mlp_total"] == ffn and c["total"] == model.num_params(), arm


def test_seconds_to_interpolates_between_evals_and_says_never():
    curve = [{"seconds": 10, "val_loss": 3.0}, {"seconds": 20, "val_loss": 2.0}]
    assert seconds_to(curve, 2.5) == pytest.approx(15)
    assert seconds_to(curve, 3.5) == 10
    assert seconds_to(curve, 1.0) is None


def test_a_gap_is_resolved_only_when_the_seed_ranges_do_not_overlap():
    runs = lambda *losses: [{"val_loss": x} for x in losses]
    apart = compare({"gshard": runs(2.0, 2.1), "fine": runs(1.8, 1.9)}, ["gshard", "fine"])
    overlap = compare({"gshard": runs(2.0, 2.1), "fine": runs(1.95, 2.05)}, ["gshard", "fine"])
    assert "resolved" in apart[0] and "not resolved" in overlap[0]


@pytest.mark.full
def test_arch_study_runs_every_arm_and_writes_table_and_plots(tmp_path):
    data = tmp_path / "data.txt"
    data.write_bytes(open(os.path.join(HERE, "moe.py"), "rb").read())
    arms = ["dense", "gshard", "fine", "fine+shared"]
    subprocess.run([sys.executable, os.path.join(HERE, "study.py"), "--study=arch",
                    "--scale=tiny", "--seeds=1", f"--arms={','.join(arms)}",
                    f"--out_dir={tmp_path}", f"--data={data}"], check=True, cwd=tmp_path,
                   stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    record = json.load(open(tmp_path / "study.json"))
    assert list(record["arms"]) == arms
    for arm in arms:
        r = record["arms"][arm]
        assert (r["mlp_total"], r["mlp_active"]) == \
               mlp_params_by_formula(arch_configs(presets["tiny"])[arm])
        assert len(r["runs"]) == 1 and r["runs"][0]["tokens_per_s"] > 0
        assert torch.isfinite(torch.tensor(r["runs"][0]["val_loss"]))
    assert "MoE tax" in (tmp_path / "study.md").read_text()
    for name in ("loss_vs_tokens.svg", "loss_vs_seconds.svg"):
        lines = ET.parse(tmp_path / name).getroot().findall("{http://www.w3.org/2000/svg}polyline")
        assert len(lines) == len(arms)


def test_group_limit_bounds_the_groups_a_token_reaches(tmp_path):
    """--study=groups on a tiny checkpoint (8 experts in 2 groups, top-2, limit 1): with the
    limit every token stays in exactly one group; without it, the same router spreads."""
    from dataclasses import asdict

    from study import groups_study
    torch.manual_seed(0)
    model = GPT(presets["tiny"])
    with torch.no_grad():  # a bias that alone would send every token to experts 0 and 4
        model.layers[1].ffn.gate.bias.copy_(torch.tensor([1.0, 0, 0, 0, 1.0, 0, 0, 0]))
    text = tmp_path / "data.txt"
    text.write_bytes(bytes(range(32, 127)) * 40)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "model_cfg": asdict(model.cfg),
                "config": {"data": str(text), "out_dir": str(tmp_path)}}, path)
    free, limited = groups_study(str(path), batches=2, batch_size=2)
    assert limited == 1.0
    assert free == 2.0  # experts 0 and 4 sit in different groups


# ---------------------------------------------------------------------------------------------
# The expert atlas (--study=experts): each function against its definition written out here

def entropy_bits(counts):
    n = sum(counts)
    return -sum(c / n * math.log2(c / n) for c in counts if c)


def test_mutual_information_is_zero_for_independent_variables():
    joint = torch.outer(torch.tensor([1.0, 2, 5]), torch.tensor([3.0, 1, 1, 7])) * 10
    assert mutual_information(joint) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("n", [2, 8, 16])
def test_mutual_information_of_a_bijection_of_n_equally_likely_classes_is_log2_n(n):
    joint = torch.eye(n)[torch.randperm(n, generator=torch.Generator().manual_seed(n))] * 7
    assert mutual_information(joint) == pytest.approx(math.log2(n), rel=1e-12)


def test_mutual_information_is_h_x_plus_h_y_minus_h_xy():
    joint = torch.randint(0, 9, (5, 7), generator=torch.Generator().manual_seed(0)).double()
    joint[2] = 0  # an empty row and cell add nothing
    rows, cols = joint.sum(1).tolist(), joint.sum(0).tolist()
    expected = entropy_bits(rows) + entropy_bits(cols) - entropy_bits(joint.flatten().tolist())
    assert mutual_information(joint) == pytest.approx(expected, rel=1e-12)


# one letter per byte: n name, k keyword, o operator, d number, s string, c comment,
# w whitespace, l newline, - none
LETTERS = dict(zip("nkodscwl", range(8)), **{"-": -1})
KNOWN = [  # (source, its classes byte by byte)
    ("if x1 >= 0x1F:  # hi\n", "kkwnnwoowddddowwccccl"),
    ("    s = 'é' + \"\"\"a\n", "wwwwnwowsssswowsssss"),  # 'é': 2 bytes of UTF-8
    ("b\"\"\"; match = 2\n", "ssssownnnnnwowdl"),      # a soft keyword is a name
    ("\n", "l"),                                          # a blank line (NL)
    ("    t = s\\\n", "wwwwnwownwl"),                    # a backslash continues the line
    ("        or 2\n", "wwwwwwwwkkwdl"),
]


def test_byte_classes_of_a_known_snippet_byte_by_byte():
    source = "".join(s for s, _ in KNOWN).encode()
    expected = [LETTERS[c] for _, cs in KNOWN for c in cs]
    assert len(expected) == len(source)
    assert byte_classes(source) == expected


def test_byte_classes_count_bytes_in_the_files_own_encoding_and_skip_a_bom():
    latin1 = "# -*- coding: latin-1 -*-\ns = 'é'; t = 1\n".encode("latin-1")  # 'é': one byte
    assert byte_classes(latin1) == [LETTERS[c] for c in "c" * 25 + "l" + "nwowsssownwowdl"]
    assert byte_classes(codecs.BOM_UTF8 + b"x = 1\n") == [-1] * 3 + [LETTERS[c] for c in "nwowdl"]


def test_byte_classes_give_minus_one_to_every_byte_of_a_file_tokenize_refuses():
    assert byte_classes(b"x = (1,\n") == [-1] * 8  # EOF in a multi-line statement


def test_class_expert_counts_and_lift_from_their_definitions():
    labels = torch.tensor([0, 0, 1, -1, 1], dtype=torch.int8)
    picks = torch.tensor([[0, 1], [0, 2], [1, 2], [0, 0], [2, 0]])
    joint = class_expert_counts(labels, picks, 3)
    expected = torch.zeros(len(CLASSES), 3, dtype=torch.long)
    for c, row in zip(labels.tolist(), picks.tolist()):  # one count per (byte, pick) pair
        for e in row:
            if c >= 0:
                expected[c, e] += 1
    assert torch.equal(joint, expected)
    n = expected.sum().item()
    for c in (0, 1):  # p(e | c) / p(e)
        for e in range(3):
            want = (expected[c, e] / expected[c].sum()) / (expected[:, e].sum() / n)
            assert lift(joint)[c, e].item() == pytest.approx(want.item())


def test_route_bytes_routes_every_byte_once_in_windows_with_next_byte_targets():
    """A stream of 2.5 windows in batches of 2 (so one padded window): each window's picks
    and top experts as the model gives them for that window alone, and the mean
    cross-entropy of every byte but the last predicting the next."""
    torch.manual_seed(0)
    model = GPT(presets["tiny"]).eval()
    gate = model.layers[1].ffn.gate
    gate.bias.copy_(torch.randn(8) * 0.1)  # picks in biased order, the top one by gate value
    L, K = model.cfg.block_size, model.cfg.moe.n_activated_experts
    stream = torch.randint(0, 256, (2 * L + L // 2,), dtype=torch.uint8)
    picks, top, loss = route_bytes(model, stream, contextlib.nullcontext(), False, batch_size=2)
    assert picks.shape == (1, len(stream), K) and top.shape == (1, len(stream))
    seen = []
    hook = gate.register_forward_hook(lambda g, i, out: seen.append(out))
    logits = []
    with torch.no_grad():
        for s in range(0, len(stream), L):
            window = stream[s:s + L].long()[None]
            logits.append(model(window, window)[0][0])
            weights, indices, _ = seen[-1]
            assert torch.equal(picks[0, s:s + L].long(), indices)
            assert torch.equal(top[0, s:s + L].long(), indices[torch.arange(len(indices)),
                                                                weights.argmax(1)])
    hook.remove()
    ce = F.cross_entropy(torch.cat(logits)[:-1], stream[1:].long())
    assert loss == pytest.approx(ce.item(), rel=1e-5)


def test_balance_loss_over_uniform_routings_is_the_logged_loss_over_alpha_per_moe_layer():
    n_moe = presets["cpu"].n_layer - presets["cpu"].n_dense_layers
    rows = [{"iter": i, "loss": 2.0, "aux_loss": 0.9 * 1e-2 * n_moe, "maxvio_batch": 0.1,
             "tokens_per_s": 1.0} for i in (50, 100)]
    rows.append({"iter": 100, "val_loss": 2.0, "maxvio_global": 0.1, "loads": [[1, 1]]})
    r = summarise_balance("aux@0.01", rows, {"preset": "cpu", "max_iters": 100}, 1e-2)
    assert r["balance_loss_ratio"] == pytest.approx(0.9)
    assert summarise_balance("bias", rows, {"preset": "cpu", "max_iters": 100}, 0.0)[
        "balance_loss_ratio"] is None


@pytest.mark.full
def test_expert_atlas_runs_on_a_tiny_checkpoint_with_its_frozen_router_control(tmp_path):
    """study.py --study=experts end to end: a 4-step tiny checkpoint, the control trained by
    the study (router weights still at their seeded init, biases moved), the files written."""
    text = tmp_path / "data.txt"
    text.write_bytes(open(os.path.join(HERE, "moe.py"), "rb").read())
    common = [sys.executable, os.path.join(HERE, "train.py"), "--preset=tiny", "--max_iters=4",
              "--eval_interval=4", "--eval_iters=1", "--batch_size=2", "--compile=False",
              f"--data={text}", "--eval_sample=False", "--heatmap_svg=False"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*common, f"--out_dir={tmp_path / 'learned'}"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    atlas = [sys.executable, os.path.join(HERE, "study.py"), "--study=experts",
             f"--ckpt={tmp_path / 'learned' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'atlas'}",
             "--max_bytes=3000"]
    subprocess.run(atlas, check=True, env=env, stdout=subprocess.DEVNULL)
    record = json.load(open(tmp_path / "atlas" / "experts.json"))
    assert record["val_bytes"] == 3000 and record["classes"] == list(CLASSES)
    assert sum(record["class_bytes"]) == record["classified_bytes"] > 2900
    (layer,) = record["layers"]  # the tiny preset: one MoE layer of 8 experts
    for key in ("mi_learned", "mi_random_router", "mi_shuffled"):
        assert 0 <= layer[key] <= record["class_entropy_bits"]
    assert len(layer["mi_learned_halves"]) == len(layer["mi_random_router_halves"]) == 2
    assert torch.tensor(layer["heatmap"]).shape == (len(CLASSES), 8)
    assert "| MoE layer |" in (tmp_path / "atlas" / "experts.md").read_text()
    ET.parse(tmp_path / "atlas" / "experts.svg")

    control = torch.load(tmp_path / "atlas" / "random_router" / "ckpt.pt", weights_only=True)
    learned = torch.load(tmp_path / "learned" / "ckpt.pt", weights_only=True)
    assert control["iter"] == 4 and control["config"]["freeze_router"]
    assert control["config"]["dtype"] == learned["config"]["dtype"] != "auto"  # what ran
    torch.manual_seed(learned["config"]["seed"])  # train.py's init of the same settings
    init = GPT(presets["tiny"]).state_dict()
    gate = "layers.1.ffn.gate."
    assert torch.equal(control["model"][gate + "weight"], init[gate + "weight"])  # frozen
    assert control["model"][gate + "bias"].abs().sum() > 0                        # balanced
    assert not torch.equal(learned["model"][gate + "weight"], init[gate + "weight"])
    assert not torch.equal(control["model"]["head.weight"], init["head.weight"])  # trained

    made = os.path.getmtime(tmp_path / "atlas" / "random_router" / "ckpt.pt")
    again = subprocess.run(atlas, check=True, env=env, capture_output=True, text=True).stdout
    assert "reusing" in again  # a second atlas takes the finished control as it is
    assert os.path.getmtime(tmp_path / "atlas" / "random_router" / "ckpt.pt") == made
