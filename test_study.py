"""Tests for study.py --study=arch: the arms' parameter accounting, from the config arithmetic
and from the built models, and one end-to-end run of the study on the tiny preset."""
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest
import torch

from model import GPT, presets
from study import arch_configs, compare, param_counts, seconds_to

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
