"""The Triton kernels compile for Hopper (sm_90) with the real compiler, not only run under the
interpreter; and the autotune pruning that keeps impossible configs out of the search."""
import json
import os
import subprocess
import sys

import pytest
import torch
import triton

from svk.kernels import _common

KERNELS = {"_x_at_kernel", "_xw_plus_ub_kernel", "_x_at_router_kernel", "_x_at_router_bwd_kernel",
           "_x_at_gather_core_kernel", "_xw_plus_xa_gather_core_b_kernel"}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path):
    """Every op, forward and backward, every strategy, bf16: each autotune config the pruning
    keeps compiles to a cubin and fits an H100's shared memory (about a minute, cold cache)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "records.json"
    run = subprocess.run([sys.executable, "-m", "svk.kernels.compile_check", "--arch", "90",
                          "--quick", "--json", str(out)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    records = json.loads(out.read_text())["records"]
    assert {r["kernel"] for r in records} == KERNELS
    assert not [r for r in records if "error" in r]
    assert all(r["shared"] <= 227 * 1024 and r["registers"] <= 255 for r in records)
    # The pruning's estimate bounds what the compiler allocated, for every pruned kernel.
    estimated = [r for r in records if r["shared_estimate"] is not None]
    assert {r["kernel"] for r in estimated} == KERNELS - {"_x_at_router_bwd_kernel"}
    assert all(r["shared"] <= r["shared_estimate"] for r in estimated)


def _config(bm, bk, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=4, num_stages=stages)


def test_prune_by_shared_memory(monkeypatch):
    """num_stages × bytes per K step + the once-only bytes against the limit; the smallest
    config survives when none fit; no limit known, nothing pruned."""
    prune = _common.prune_by_shared_memory(
        lambda a: a["BLOCK_K"] * a["BLOCK_M"] * a["X"].element_size(), lambda a: 1000)
    x = torch.empty(4, 4, dtype=torch.bfloat16)
    small, big, huge = _config(16, 64, 3), _config(128, 128, 4), _config(256, 256, 5)
    # small: 3·16·64·2 + 1000; big: 4·128·128·2 + 1000 = 132072; huge: 5·256·256·2 + 1000.
    assert prune.estimate(big, {"X": x}) == 4 * 128 * 128 * 2 + 1000
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", 4 * 128 * 128 * 2 + 999)
    assert prune([small, big, huge], {"X": x}) == [small]
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", 4 * 128 * 128 * 2 + 1000)
    assert prune([small, big, huge], {"X": x}) == [small, big]
    assert prune([big, huge], {"X": x.float()}) == [big]      # 4-byte x: none fits
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", 1024)
    assert prune([big, small, huge], {"X": x}) == [small]
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", None)   # CPU tensor, no limit known
    assert prune([small, big, huge], {"X": x}) == [small, big, huge]


def test_adapter_copy_counts_only_a_converted_tile():
    a = {"X": torch.empty(1, dtype=torch.bfloat16), "BLOCK_R": 64, "BLOCK_K": 128}
    assert _common.adapter_copy_bytes({**a, "A": torch.empty(1)}) == 64 * 128 * 2
    assert _common.adapter_copy_bytes({**a, "A": torch.empty(1, dtype=torch.bfloat16)}) == 0


def test_router_prune_caps_the_rank_tile(monkeypatch):
    import svk.kernels.x_at_router as router
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", 227 * 1024)
    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 64, "BLOCK_R": br}, num_warps=4,
                             num_stages=2) for br in (32, 64, 128)]
    args = {"X": torch.empty(1, 1, dtype=torch.bfloat16), "A": torch.empty(1, 1), "R": 20}
    kept = router._prune(configs, args, T_GIVEN=False, BLOCK_H=16)
    assert [c.kwargs["BLOCK_R"] for c in kept] == [32]          # 64 and 128 cap to 32, deduped
    args["R"] = 1000
    kept = router._prune(configs, args, T_GIVEN=False, BLOCK_H=16)
    assert [c.kwargs["BLOCK_R"] for c in kept] == [32, 64, 128]


def test_one_pass_keeps_tiles_of_at_most_64_rows(monkeypatch):
    import sys
    xw = sys.modules["svk.kernels.xw_plus_ub"]
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", 227 * 1024)
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": 128, "BLOCK_K": 64, "BLOCK_R": 16},
                             num_warps=4, num_stages=3) for bm in (16, 64, 128, 256)]
    tensor = torch.empty(1, 1, dtype=torch.bfloat16)
    args = {"X": tensor, "W": tensor, "A": torch.empty(1, 1), "U": torch.empty(1, 1),
            "V": torch.empty(1, 1)}
    rows = lambda kept: [c.kwargs["BLOCK_M"] for c in kept]  # noqa: E731
    assert rows(xw._prune(configs, args, ONE_PASS=True, HAS_LOWRANK=True)) == [16, 64]
    assert rows(xw._prune(configs, args, ONE_PASS=False, HAS_LOWRANK=True)) == [16, 64, 128, 256]
