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
           "_x_at_gather_core_kernel", "_xw_plus_xa_gather_core_b_kernel", "_gather_core_kernel",
           "_dropped_input_kernel"}


def _compile_check(tmp_path, *flags):
    """Runs compile_check for sm_90 in a subprocess (the tests' process has the interpreter
    on); returns (completed process, records)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "records.json"
    run = subprocess.run([sys.executable, "-m", "svk.kernels.compile_check", "--arch", "90",
                          "--quick", "--json", str(out), *flags], env=env, capture_output=True,
                         text=True, timeout=900)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    return run, records


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(tmp_path):
    """Every op, forward and backward, every strategy, bf16: each autotune config the pruning
    keeps compiles to a cubin and fits an H100's shared memory (about a minute, cold cache)."""
    run, records = _compile_check(tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    assert {r["kernel"] for r in records} == KERNELS
    assert not [r for r in records if "error" in r]
    assert all(r["shared"] <= 227 * 1024 and r["registers"] <= 255 for r in records)
    # The pruning's estimate bounds what the compiler allocated, for every pruned kernel.
    estimated = [r for r in records if r["shared_estimate"] is not None]
    # Not autotuned, so no shared-memory estimate: the router backward, gather_core and the
    # dropout mask writer.
    assert {r["kernel"] for r in estimated} == KERNELS - {"_x_at_router_bwd_kernel",
                                                          "_gather_core_kernel",
                                                          "_dropped_input_kernel"}
    assert all(r["shared"] <= r["shared_estimate"] for r in estimated)


@pytest.mark.slow
def test_pointer_offsets_are_64_bit_and_adapters_convert_before_the_k_loop(tmp_path):
    """Issue 13.2: every pointer offset of every kernel is computed in 64 bits (TTIR
    `tt.addptr` offsets are i64): with int32 row indices, (M − 1)·stride ≥ 2³¹ wraps into
    other memory. Issue 13.9: the skinny kernels, whose only 16-bit operand conversion was
    the fp32 adapter tile inside the K loop, now convert nothing (`arith.truncf`): the
    launcher hands them a in x's dtype. One config per launch, bf16 with fp32 adapters."""
    run, records = _compile_check(tmp_path, "--one-config")
    assert {r["kernel"] for r in records} == KERNELS, run.stdout + run.stderr
    assert not [r for r in records if "error" in r], run.stdout
    narrow = {(r["kernel"], r["spec"], tuple(r["narrow_offsets"][:3]))
              for r in records if r["narrow_offsets"]}
    assert not narrow, f"32-bit pointer offsets: {sorted(narrow)}"
    skinny = {"_x_at_kernel", "_x_at_gather_core_kernel", "_x_at_router_kernel"}
    converting = {(r["kernel"], r["spec"]) for r in records
                  if r["kernel"] in skinny and r["truncf"]}
    assert not converting, f"fp32 → 16-bit conversions left in: {sorted(converting)}"
    assert run.returncode == 0, run.stdout + run.stderr



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


def test_untuned_mode_keeps_one_config(monkeypatch):
    """SVK_AUTOTUNE=0 (gpu.sh's test steps): one config per launch, the one needing the least
    shared memory, so no key is benchmarked; the router backward and gather_core keep their
    first config."""
    import svk.kernels.x_at_router as router
    prune = _common.prune_by_shared_memory(
        lambda a: a["BLOCK_K"] * a["BLOCK_M"] * a["X"].element_size())
    x = torch.empty(4, 4, dtype=torch.bfloat16)
    small, big = _config(16, 64, 3), _config(128, 128, 4)
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", None)
    assert prune([big, small], {"X": x}) == [big, small]
    monkeypatch.setattr(_common, "AUTOTUNE", False)
    assert prune([big, small], {"X": x}) == [small]
    monkeypatch.setattr(_common, "SHARED_MEMORY_LIMIT", 227 * 1024)
    assert prune([big, small], {"X": x}) == [small]
    configs = [triton.Config({"BLOCK_R": br}, num_warps=4, num_stages=2) for br in (32, 64)]
    assert len(router._cap_rank_tile(configs, {"R": 100})) == 1
    assert _common.first_if_untuned(configs) == configs[:1]


def test_core_epilogue_counts_when_it_outgrows_the_loop():
    """x_at at BLOCK_M = BLOCK_R = 128 with a bf16 a: 3 stages of (128 + 128)·64·2 B = 96 KiB
    for the loop, but the compiler allocated 128 KiB, the fp32 u and core tiles of the
    epilogue's u·coreᵀ (compile_check, sm_90): the estimate is the larger of the two."""
    from svk.kernels.x_at import X_AT_STAGE_BYTES
    config = triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3)
    bf16 = torch.empty(1, dtype=torch.bfloat16)
    args = {"X": bf16, "A": bf16, "BLOCK_R": 128}
    assert X_AT_STAGE_BYTES.estimate(config, args, HAS_CORE=False) == 3 * 64 * 256 * 2
    assert X_AT_STAGE_BYTES.estimate(config, args, HAS_CORE=True) == 256 * 128 * 4
