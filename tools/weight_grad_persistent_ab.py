"""A lever tried and not kept: a persistent expert weight-gradient kernel against the package's one.

The weight gradients of a training step (dW_gate_up, dW_down) are per-expert GEMMs whose reduction runs over
the expert's few hundred sorted rows, so every program's loop is short and its prologue and epilogue weigh.
A persistent grid (a program per SM or two, walking the tiles; optionally the tile loop flattened into the
row loop so loads of the next tile overlap the last tile's store) was the candidate. Both kernels read
sorted rows through TMA tiles; each variant is checked against the current kernel's output, then timed as a
CUDA-graph replay (median of 30) in three interleaved rounds at T=8192 on three presets. On an H200 it was
0-5 % faster (data/h200_weight_grad_persistent_ab.json, docs/performance_notes.md): not worth a second
kernel. GPU only:

    python tools/weight_grad_persistent_ab.py $OUT/weight_grad_persistent_ab.json
"""
import json
import statistics
import sys

import torch
import triton
import triton.language as tl

import moe_lab  # noqa: F401  (first: the triton setup)
from moe_lab.backends.triton_kernels import _grouped_program_order, tile_descriptor
from moe_lab.backends.triton_backward import launch_weight_grad
from moe_lab.backends.triton_launch import sort_pairs
from moe_lab.backends.triton_plan import KernelConfig
from moe_lab.bench.timing import median_ms
from moe_lab.cuda_graph import CapturedStep


@triton.jit
def wgrad_persistent(left_desc, right_desc, out_ptr, counts_ptr, num_experts, M, N, stride_oe, stride_om, stride_on,
                     NUM_EXPERTS_POW2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, FLATTEN: tl.constexpr, MASK_ALWAYS: tl.constexpr,
                     STAGES: tl.constexpr):
    """left [S, M] and right [S, N] in sorted row order (TMA tiles [BK, BM], [BK, BN]) -> out[e] [M, N] = the sum
    over expert e's rows of left^T right, each program walking tiles (expert, m block, n block) with a stride of
    the grid. Rows past the expert's last (the next expert's, in the last TMA tile) are zeroed in `right`."""
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    tiles_per_expert = num_m_blocks * tl.cdiv(N, BLOCK_N)
    num_tiles = num_experts * tiles_per_expert
    expert_ids = tl.arange(0, NUM_EXPERTS_POW2)
    counts = tl.load(counts_ptr + expert_ids, mask=expert_ids < num_experts, other=0).to(tl.int32)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        expert = tile // tiles_per_expert
        pid_m, pid_n = _grouped_program_order(tile % tiles_per_expert, num_m_blocks, N, BLOCK_N, GROUP_M)
        num_rows = tl.sum(tl.where(expert_ids == expert, counts, 0), axis=0)
        first_row = tl.sum(tl.where(expert_ids < expert, counts, 0), axis=0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if MASK_ALWAYS:
            for r0 in tl.range(0, num_rows, BLOCK_K, num_stages=STAGES):
                left = left_desc.load([first_row + r0, pid_m * BLOCK_M])  # [BK, BM]
                right = right_desc.load([first_row + r0, pid_n * BLOCK_N])  # [BK, BN]
                rows = r0 + tl.arange(0, BLOCK_K)
                right = tl.where((rows < num_rows)[:, None], right, 0.0).to(right.dtype)
                acc = tl.dot(tl.trans(left), right, acc)
        else:
            whole = num_rows - num_rows % BLOCK_K
            for r0 in tl.range(0, whole, BLOCK_K, num_stages=STAGES):
                left = left_desc.load([first_row + r0, pid_m * BLOCK_M])
                right = right_desc.load([first_row + r0, pid_n * BLOCK_N])
                acc = tl.dot(tl.trans(left), right, acc)
            if whole < num_rows:
                left = left_desc.load([first_row + whole, pid_m * BLOCK_M])
                right = right_desc.load([first_row + whole, pid_n * BLOCK_N])
                rows = whole + tl.arange(0, BLOCK_K)
                right = tl.where((rows < num_rows)[:, None], right, 0.0).to(right.dtype)
                acc = tl.dot(tl.trans(left), right, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out_ptrs = (out_ptr + expert.to(tl.int64) * stride_oe + offs_m[:, None].to(tl.int64) * stride_om
                    + offs_n[None, :] * stride_on)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


def persistent(left, right, like, counts, bm, bn, bk, warps, stages, programs, flatten, mask_always):
    E, M, N = like.shape
    out = torch.empty_like(like)
    tiles = E * triton.cdiv(M, bm) * triton.cdiv(N, bn)
    wgrad_persistent[(min(tiles, programs),)](
        tile_descriptor(left, [bk, bm]), tile_descriptor(right, [bk, bn]), out, counts, E, M, N, *out.stride(),
        # one NUM_EXPERTS_POW2 for every preset: one compile serves them all
        NUM_EXPERTS_POW2=max(128, triton.next_power_of_2(E)), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, FLATTEN=flatten,
        MASK_ALWAYS=mask_always, STAGES=stages, num_warps=warps)
    return out


def bench(fn, reps=30):
    """Median ms of `fn` replayed from a CUDA graph: CUDA events around each replay, then a synchronize."""
    return median_ms(CapturedStep(fn, warmup=2).replay, reps, device=torch.device("cuda"))


def main(out_path):
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = []
    for preset, E, H, I, k in (("qwen3-30b-a3b", 128, 2048, 768, 8), ("qwen1.5-moe-a2.7b", 60, 2048, 1408, 4),
                               ("olmoe-1b-7b", 64, 2048, 1024, 8)):
        T = 8192
        S = T * k
        torch.manual_seed(0)
        index = torch.stack([torch.randperm(E, device="cuda")[:k] for _ in range(T)])
        sorted_pair, counts = sort_pairs(index, E)
        x_sorted = torch.randn(S, H, device="cuda", dtype=torch.bfloat16)
        d_pre = torch.randn(S, 2 * I, device="cuda", dtype=torch.bfloat16)
        dout_sorted = torch.randn(S, H, device="cuda", dtype=torch.bfloat16)
        weighted_h = torch.randn(S, I, device="cuda", dtype=torch.bfloat16)
        gate_up = torch.empty(E, 2 * I, H, device="cuda", dtype=torch.bfloat16)
        down = torch.empty(E, H, I, device="cuda", dtype=torch.bfloat16)
        for name, left, right, like, current in (
                ("gate_up", d_pre, x_sorted, gate_up, KernelConfig(128, 128, 32, 8, 5, 8, True)),
                ("down", dout_sorted, weighted_h, down, KernelConfig(128, 128, 64, 8, 3, 8, True))):
            flops = 2 * S * like.shape[1] * like.shape[2]
            ref = launch_weight_grad(left, right, like, None, None, sorted_pair, counts, k, left_by_token=False,
                                     right_by_token=False, config=current)[0]
            variants = {"current": lambda: launch_weight_grad(left, right, like, None, None, sorted_pair, counts, k,
                                                              left_by_token=False, right_by_token=False,
                                                              config=current)}
            for bm, bn, bk, warps, stages in ((128, 128, 64, 8, 3), (128, 128, 32, 8, 5), (128, 256, 64, 8, 3)):
                for occ in (1, 2):
                    for flatten in (False, True):
                        for mask_always in (False, True):
                            key = f"p{bm}x{bn}x{bk}w{warps}s{stages}o{occ}{'F' if flatten else ''}{'M' if mask_always else ''}"
                            fn = (lambda bm=bm, bn=bn, bk=bk, warps=warps, stages=stages, occ=occ, flatten=flatten,
                                  mask_always=mask_always: persistent(left, right, like, counts, bm, bn, bk, warps,
                                                                      stages, sms * occ, flatten, mask_always))
                            try:
                                got = fn()
                                torch.cuda.synchronize()
                                err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
                                if err > 1e-2:
                                    results.append(dict(preset=preset, kernel=name, variant=key, error=f"wrong {err}"))
                                    continue
                                variants[key] = fn
                            except Exception as e:  # noqa
                                results.append(dict(preset=preset, kernel=name, variant=key, error=str(e)[:200]))
            times = {key: [] for key in variants}
            for _ in range(3):  # interleaved rounds
                for key, fn in variants.items():
                    times[key].append(bench(fn))
            for key, ts in times.items():
                ms = statistics.median(ts)
                results.append(dict(preset=preset, kernel=name, variant=key, ms=ms, tflops=flops / ms / 1e9))
            best = sorted((r for r in results if r.get("preset") == preset and r.get("kernel") == name and "ms" in r),
                          key=lambda r: r["ms"])[:5]
            print(preset, name, [(r["variant"], round(r["ms"], 4), round(r["tflops"])) for r in best],
                  "current", round(statistics.median(times["current"]), 4), flush=True)
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                           results=results), open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
