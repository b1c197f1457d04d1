"""The triton backend's launch plan: which kernels run and with which tiles, as one value.

`launch_plan(...)` chooses it from the layer's shape and the token count; the launchers take what
they need from it, and the tuning tools (tools/tune_triton.py, tools/sort_pairs_ab.py) build their
own plans with `dataclasses.replace` instead of patching module globals. The numbers behind each
choice are in docs/performance_notes.md and the data/ files it names, not here.

    LaunchPlan
      decode, one_program_sort            which forward path and which sort
      gate_up, down                       sorted forward kernels        (KernelConfig)
      decode_gate_up, decode_down         token-major decode kernels    (DecodeConfig)
      down_backward                       dout @ down[e], the activation's backward, d top_k_weights
      gate_up_input_grad                  d pre @ gate_up[e], rows back at their pairs -> dX
      gate_up_weight_grad, down_weight_grad   per-expert sums over its sorted rows -> dW
      save_pre_activation                 keep the [S, 2I] pre-activation for the backward, or rerun
                                          the gate_up GEMM there
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KernelConfig:
    """Tiles of one grouped GEMM kernel. In the weight-gradient kernels block_m and block_n tile the
    weight's two dimensions and block_k steps through the expert's token rows."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    tma: bool = False  # weight tiles (and down's h tiles) through TMA descriptors where the GPU has TMA

    def as_ints(self) -> list[int]:
        """The config as ints, as torch custom ops take it (their schema has no Python objects)."""
        return [self.block_m, self.block_n, self.block_k, self.num_warps, self.num_stages, self.group_m, int(self.tma)]

    @staticmethod
    def from_ints(ints) -> "KernelConfig":
        return _config_from_ints(tuple(ints))


@functools.lru_cache(maxsize=256)
def _config_from_ints(ints: tuple[int, ...]) -> KernelConfig:
    return KernelConfig(*ints[:6], tma=bool(ints[6]))


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class LaunchPlan:
    decode: bool
    one_program_sort: bool
    gate_up: KernelConfig
    down: KernelConfig
    decode_gate_up: DecodeConfig
    decode_down: DecodeConfig
    down_backward: KernelConfig
    gate_up_input_grad: KernelConfig
    gate_up_weight_grad: KernelConfig
    down_weight_grad: KernelConfig
    save_pre_activation: bool = True

    def as_ints(self) -> list[int]:
        """The plan as a flat list of ints: how it crosses into the torch custom ops.
        `LaunchPlan.from_ints` reads it back."""
        ints = [int(self.decode), int(self.one_program_sort), int(self.save_pre_activation)]
        for config in self._kernel_configs():
            ints += config.as_ints()
        for config in (self.decode_gate_up, self.decode_down):
            ints += [config.block_n, config.block_k, config.num_warps, config.num_stages]
        return ints

    def _kernel_configs(self) -> tuple[KernelConfig, ...]:
        return (self.gate_up, self.down, self.down_backward, self.gate_up_input_grad, self.gate_up_weight_grad,
                self.down_weight_grad)

    @staticmethod
    def from_ints(ints) -> "LaunchPlan":
        return _plan_from_ints(tuple(ints))


@functools.lru_cache(maxsize=256)
def _plan_from_ints(ints: tuple[int, ...]) -> LaunchPlan:
    decode, one_program_sort, save = (bool(value) for value in ints[:3])
    kernels = [KernelConfig.from_ints(ints[i:i + 7]) for i in range(3, 3 + 6 * 7, 7)]
    first_decode = 3 + 6 * 7
    decodes = [DecodeConfig(*ints[i:i + 4]) for i in (first_decode, first_decode + 4)]
    return LaunchPlan(decode=decode, one_program_sort=one_program_sort, save_pre_activation=save,
                      gate_up=kernels[0], down=kernels[1], down_backward=kernels[2], gate_up_input_grad=kernels[3],
                      gate_up_weight_grad=kernels[4], down_weight_grad=kernels[5],
                      decode_gate_up=decodes[0], decode_down=decodes[1])


def kernel_configs(rows_per_expert: float, interpreted: bool, wide_output: bool = False, itemsize: int = 2
                   ) -> tuple[KernelConfig, KernelConfig]:
    """Tile sizes for (gate_up_kernel, down_kernel) by the mean rows per expert hit.

    Small groups are memory bound: the smallest row block tl.dot allows (16), so enough programs
    stream the experts' weights; big groups want big tiles for reuse, loaded through TMA.
    `wide_output` means H >= 4096 (a long K for gate_up). Chosen from H100 measurements of every
    candidate in bfloat16 (tools/tune_triton.py; the numbers are in docs/performance_notes.md);
    4-byte dtypes get half the BLOCK_K, so a pipeline stage takes the same shared memory.
    """
    if itemsize > 2 and not interpreted:
        return _halve_block_k(kernel_configs(rows_per_expert, interpreted, wide_output), itemsize)
    if interpreted:  # the interpreter runs programs one by one in numpy: fewer, bigger programs
        return KernelConfig(16, 64, 64, 1, 1), KernelConfig(16, 64, 64, 1, 1)
    if rows_per_expert <= 8:
        return KernelConfig(16, 64, 128, 4, 4), KernelConfig(16, 64, 128, 4, 4)
    if rows_per_expert <= 32:  # ~16 rows: 16-row blocks would split half the experts in two, reading them twice
        return KernelConfig(32, 64, 128, 4, 3), KernelConfig(32, 128, 128, 4, 3)
    if rows_per_expert < 256:
        return KernelConfig(64, 64, 64, 4, 3), KernelConfig(64, 128, 64, 4, 4)
    # Compute bound: TMA tiles, a fourth stage except for long K (H >= 4096, where three won), and
    # 256-column tiles for down everywhere. From 256 rows on: mixtral at T=1024 and deepseek-v3 at
    # T=8192 have exactly 256.
    return (KernelConfig(128, 128, 64, 8, 3 if wide_output else 4, tma=True),
            KernelConfig(128, 256, 64, 8, 4, tma=True))


@dataclass(frozen=True)
class BackwardConfigs:
    down_backward: KernelConfig
    gate_up_input_grad: KernelConfig
    gate_up_weight_grad: KernelConfig
    down_weight_grad: KernelConfig


def backward_configs(rows_per_expert: float, interpreted: bool, itemsize: int = 2) -> BackwardConfigs:
    """Tile sizes for the four backward kernels, by the mean rows per expert hit.

    Not yet measured (tools/tune_triton.py --parts backward sweeps them): they follow the forward's
    regimes. down_backward has gate_up's shape (token rows gathered, K = H, N = I) and the input
    gradient down's (sorted rows, K = 2I, N = H, rows stored at their pairs), so each starts from
    that kernel's tiles. The weight gradients reduce over an expert's rows: their tile covers the
    weight ([block_m, block_n] of [2I, H] or [H, I]) and block_k rows are summed per step; with few
    rows per expert they are bound by writing the gradient (every expert's, hit or not).
    """
    if itemsize > 2 and not interpreted:
        configs = backward_configs(rows_per_expert, interpreted)
        return BackwardConfigs(*_halve_block_k([getattr(configs, field.name) for field in dataclasses.fields(configs)],
                                               itemsize))
    if interpreted:
        small = KernelConfig(16, 64, 64, 1, 1)
        return BackwardConfigs(small, small, KernelConfig(64, 64, 32, 1, 1), KernelConfig(64, 64, 32, 1, 1))
    gate_up, down = kernel_configs(rows_per_expert, interpreted)
    if rows_per_expert <= 32:
        weight_grad = KernelConfig(64, 64, 16 if rows_per_expert <= 8 else 32, 4, 2)
    elif rows_per_expert < 256:
        weight_grad = KernelConfig(64, 128, 32, 4, 3)
    else:
        weight_grad = KernelConfig(128, 128, 64, 8, 3)
    return BackwardConfigs(down_backward=dataclasses.replace(gate_up, num_stages=min(gate_up.num_stages, 3)),
                           gate_up_input_grad=down, gate_up_weight_grad=weight_grad, down_weight_grad=weight_grad)


def _halve_block_k(configs, itemsize: int):
    return tuple(dataclasses.replace(config, block_k=max(16, config.block_k * 2 // itemsize)) for config in configs)


def decode_configs(interpreted: bool) -> tuple[DecodeConfig, DecodeConfig]:
    """Tile sizes for (decode_gate_up_kernel, decode_down_kernel).

    A decode kernel is a GEMV that only streams weight rows, so what matters is many programs with
    many bytes in flight each: 8 rows per program and 8 warps, BLOCK_K 256 (gate_up) and 512 (down),
    from the sweep of tools/tune_triton.py --parts decode (docs/performance_notes.md).
    """
    if interpreted:
        return DecodeConfig(32, 64, 1, 1), DecodeConfig(32, 64, 1, 1)
    return DecodeConfig(8, 256, 8, 1), DecodeConfig(8, 512, 8, 1)


def uses_decode_path(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """The token-major decode kernels read one expert's weights once per (token, expert) pair; the
    sorted kernels once per expert hit, after a sort. One token never repeats an expert, so T=1 is
    always decode; beyond that, only while there are at most E/4 pairs (the crossover measured by
    tools/tune_triton.py --parts crossover; docs/performance_notes.md)."""
    return num_tokens == 1 or num_tokens * top_k * 4 <= num_experts


#: Up to this many pairs one program sorts them (sort_pairs_kernel); beyond, torch's sort of int32
#: keys and a histogram. Where one program's bitonic sort stops paying was measured by
#: tools/sort_pairs_ab.py (data/h100_sort_pairs.json, docs/performance_notes.md).
ONE_PROGRAM_SORT_MAX_PAIRS = 2048


def fits_one_program_sort(num_pairs: int, num_experts: int) -> bool:
    """The one-program sort's int32 keys (expert << pair bits | pair) hold every expert id and the padding's."""
    return (num_experts + 1) * one_program_sort_block(num_pairs) <= 2**31


def one_program_sort_block(num_pairs: int) -> int:
    """Pairs are padded to a power of two (at least 16) for the bitonic sort."""
    return max(16, 1 << max(num_pairs - 1, 0).bit_length())


def launch_plan(num_tokens: int, top_k: int, num_experts: int, hidden_size: int, intermediate_size: int,
                dtype: torch.dtype, *, interpreted: bool, needs_grad: bool = False,
                save_pre_activation: bool = True) -> LaunchPlan:
    """The plan the triton backend launches for this shape.

    With `needs_grad` the decode path is never taken: its kernels keep nothing a backward could
    use, and a training step has more than a handful of tokens anyway. `save_pre_activation`
    (default True) keeps the [S, 2I] pre-activation from the forward for the backward: one extra
    write of S*2I elements in the forward and a read in the backward, against rerunning the gate_up
    GEMM (2/3 of the forward's FLOPs) in the backward — the recompute only pays when activation
    memory, not time, is what runs out. Both are measured by tools/tune_triton.py --parts backward.
    """
    key = (num_tokens, top_k, num_experts, hidden_size, intermediate_size, dtype.itemsize, interpreted, needs_grad,
           save_pre_activation)
    if torch.compiler.is_compiling():  # traced once per graph; dynamo would only skip the cache
        return _plan(*key)
    return _plan_cached(*key)


def _plan(num_tokens, top_k, num_experts, hidden_size, intermediate_size, itemsize, interpreted, needs_grad,
          save_pre_activation) -> LaunchPlan:
    num_pairs = num_tokens * top_k
    rows_per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    gate_up, down = kernel_configs(rows_per_expert, interpreted, wide_output=hidden_size >= 4096, itemsize=itemsize)
    decode_gate_up, decode_down = decode_configs(interpreted)
    backward = backward_configs(rows_per_expert, interpreted, itemsize=itemsize)
    return LaunchPlan(
        decode=not needs_grad and uses_decode_path(num_tokens, top_k, num_experts),
        one_program_sort=num_pairs <= ONE_PROGRAM_SORT_MAX_PAIRS and fits_one_program_sort(num_pairs, num_experts),
        gate_up=gate_up, down=down, decode_gate_up=decode_gate_up, decode_down=decode_down,
        down_backward=backward.down_backward, gate_up_input_grad=backward.gate_up_input_grad,
        gate_up_weight_grad=backward.gate_up_weight_grad, down_weight_grad=backward.down_weight_grad,
        save_pre_activation=save_pre_activation,
    )


_plan_cached = functools.lru_cache(maxsize=1024)(_plan)
