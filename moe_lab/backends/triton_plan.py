"""The triton backend's launch plan: which kernels run and with which tiles, as one value.

`launch_plan(...)` chooses it from the layer's shape and the token count; the launchers take what
they need from it, and the tuning tools (tools/tune_triton.py, tools/sort_pairs_ab.py) build their
own plans with `dataclasses.replace` instead of patching module globals. The numbers behind each
choice are in docs/performance_notes.md and the data/ files it names, not here.

    LaunchPlan
      decode, sort                        which forward path and which sort (SORT_METHODS)
      gate_up, down                       sorted forward kernels        (KernelConfig)
      decode_gate_up, decode_down         token-major decode kernels    (DecodeConfig)
      down_backward                       dout @ down[e], the activation's backward, d top_k_weights
      gate_up_input_grad                  d pre @ gate_up[e], rows back at their pairs -> dX
      gate_up_weight_grad, down_weight_grad   per-expert sums over its sorted rows -> dW
      save_pre_activation                 keep the [S, 2I] pre-activation for the backward, or rerun
                                          the gate_up GEMM there
      sorted_grad_out, sorted_hidden_states   gather dout / x into sorted row order once in the
                                          backward, so the kernels that read them per sorted row
                                          load contiguous (TMA) tiles instead of gathering rows
      split_down_backward                 down_backward as a GEMM into an [S, I] buffer (model dtype)
                                          and a streaming activation-backward kernel (needs sorted_grad_out)
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
    # Operands that are contiguous tiles (weights; rows already in sorted order) through TMA
    # descriptors where the GPU has TMA; rows gathered by token stay pointer loads.
    tma: bool = False

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
    sort: str  # SORT_METHODS: how the pairs are sorted by expert (sort_pairs)
    gate_up: KernelConfig
    down: KernelConfig
    decode_gate_up: DecodeConfig
    decode_down: DecodeConfig
    down_backward: KernelConfig
    gate_up_input_grad: KernelConfig
    gate_up_weight_grad: KernelConfig
    down_weight_grad: KernelConfig
    save_pre_activation: bool = True
    sorted_grad_out: bool = False  # dout [T, H] -> [S, H] in sorted order for down_backward and dW_down
    sorted_hidden_states: bool = False  # x [T, H] -> [S, H] in sorted order for dW_gate_up
    split_down_backward: bool = False  # down_backward's GEMM and activation backward as two kernels

    def __post_init__(self):
        if self.sort not in SORT_METHODS:
            raise ValueError(f"unknown sort method {self.sort!r}; allowed: {list(SORT_METHODS)}")
        if self.split_down_backward and not self.sorted_grad_out:
            raise ValueError("split_down_backward runs its GEMM over dout's rows in sorted order: "
                             "set sorted_grad_out=True with it")

    def as_ints(self) -> list[int]:
        """The plan as a flat list of ints: how it crosses into the torch custom ops.
        `LaunchPlan.from_ints` reads it back."""
        ints = [int(flag) for flag in self._flags()] + [SORT_METHODS.index(self.sort)]
        for config in self._kernel_configs():
            ints += config.as_ints()
        for config in (self.decode_gate_up, self.decode_down):
            ints += [config.block_n, config.block_k, config.num_warps, config.num_stages]
        return ints

    def _flags(self) -> tuple[bool, ...]:
        return (self.decode, self.save_pre_activation, self.sorted_grad_out, self.sorted_hidden_states,
                self.split_down_backward)

    def _kernel_configs(self) -> tuple[KernelConfig, ...]:
        return (self.gate_up, self.down, self.down_backward, self.gate_up_input_grad, self.gate_up_weight_grad,
                self.down_weight_grad)

    @staticmethod
    def from_ints(ints) -> "LaunchPlan":
        return _plan_from_ints(tuple(ints))


@functools.lru_cache(maxsize=256)
def _plan_from_ints(ints: tuple[int, ...]) -> LaunchPlan:
    flags = 6  # five flags and the sort method's index
    decode, save, sorted_grad_out, sorted_hidden_states, split = (bool(v) for v in ints[:flags - 1])
    kernels = [KernelConfig.from_ints(ints[i:i + 7]) for i in range(flags, flags + 6 * 7, 7)]
    first_decode = flags + 6 * 7
    decodes = [DecodeConfig(*ints[i:i + 4]) for i in (first_decode, first_decode + 4)]
    return LaunchPlan(decode=decode, sort=SORT_METHODS[ints[flags - 1]], save_pre_activation=save,
                      sorted_grad_out=sorted_grad_out, sorted_hidden_states=sorted_hidden_states,
                      split_down_backward=split,
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
    sorted_grad_out: bool = False
    sorted_hidden_states: bool = False
    split_down_backward: bool = False


def backward_configs(rows_per_expert: float, hidden_size: int, intermediate_size: int, interpreted: bool,
                     itemsize: int = 2) -> BackwardConfigs:
    """Tile sizes for the four backward kernels, by the mean rows per expert hit and the layer's width.

    down_backward has gate_up's shape (token rows gathered, K = H, N = I) and the input gradient
    down's (sorted rows, K = 2I, N = H, rows stored at their pairs). The weight gradients reduce
    over an expert's rows: their tile covers the weight ([block_m, block_n] of [2I, H] or [H, I])
    and block_k rows are summed per step; with few rows per expert they are bound by writing the
    gradient (every expert's, hit or not). Experts as wide as a dense FFN (I >= 4096, mixtral-like)
    want big tiles where fine-grained ones (I <= ~2K) want many programs. Chosen from the bfloat16
    kernel sweeps of tools/tune_triton.py --parts backward (docs/performance_notes.md, training
    section) at 64-128 and 512-2048 rows per expert; fewer rows are not measured yet.
    """
    if itemsize > 2 and not interpreted:
        configs = backward_configs(rows_per_expert, hidden_size, intermediate_size, interpreted)
        kernels = _halve_block_k([configs.down_backward, configs.gate_up_input_grad, configs.gate_up_weight_grad,
                                  configs.down_weight_grad], itemsize)
        return dataclasses.replace(configs, **dict(zip(
            ("down_backward", "gate_up_input_grad", "gate_up_weight_grad", "down_weight_grad"), kernels)))
    if interpreted:
        small = KernelConfig(16, 64, 64, 1, 1)
        return BackwardConfigs(small, small, KernelConfig(64, 64, 32, 1, 1), KernelConfig(64, 64, 32, 1, 1))
    coarse = intermediate_size >= 4096
    if rows_per_expert <= 32:  # not measured: the forward's small tiles, and the weight gradients' guess
        gate_up, down = kernel_configs(rows_per_expert, interpreted)
        weight_grad = KernelConfig(64, 64, 16 if rows_per_expert <= 8 else 32, 4, 2)
        return BackwardConfigs(down_backward=gate_up, gate_up_input_grad=down, gate_up_weight_grad=weight_grad,
                               down_weight_grad=weight_grad)
    # From 64 rows per expert on, H200 run 2 (data/h200_triton_backward_tuning_run2.json): dout and x
    # gathered into sorted order once, and down_backward split into a GEMM and a streaming activation
    # backward, won every measured point. TMA tiles for those sorted operands pay from 256 rows per expert;
    # below, an expert's rows fill one or two 128-row tiles, and whole training steps were 2-8 % faster with
    # pointer loads, mostly in the weight gradients (data/h200_training_plan_ab_backward_tma.json).
    sorted_split = dict(sorted_grad_out=True, sorted_hidden_states=True, split_down_backward=True)
    if rows_per_expert < 256:
        return BackwardConfigs(
            down_backward=KernelConfig(128, 128, 64, 8, 3),
            gate_up_input_grad=KernelConfig(128, 256, 64, 8, 4),
            gate_up_weight_grad=KernelConfig(128, 128, 64, 8, 2),
            down_weight_grad=KernelConfig(128, 128, 64, 8, 2), **sorted_split)
    if coarse:  # mixtral: 256 rows per expert at T=1024, 2048 at T=8192
        long = rows_per_expert >= 1024
        weight_grad = KernelConfig(128, 256, 64, 8, 4, tma=True) if long else KernelConfig(128, 128, 64, 8, 3, tma=True)
        return BackwardConfigs(
            down_backward=KernelConfig(128, 256, 64, 8, 4, tma=True),
            gate_up_input_grad=KernelConfig(128, 256, 64, 8, 3, tma=True) if long
            else KernelConfig(128, 128, 64, 8, 4, tma=True),
            gate_up_weight_grad=weight_grad,
            down_weight_grad=weight_grad if long else KernelConfig(128, 128, 32, 8, 5, tma=True), **sorted_split)
    return BackwardConfigs(
        down_backward=KernelConfig(128, 256, 64, 8, 4, tma=True),
        gate_up_input_grad=KernelConfig(128, 256, 64, 8, 4, tma=True),
        gate_up_weight_grad=KernelConfig(128, 128, 32, 8, 5, tma=True),
        down_weight_grad=KernelConfig(128, 128, 64, 8, 3, tma=True), **sorted_split)


def _halve_block_k(configs, itemsize: int):
    return tuple(dataclasses.replace(config, block_k=max(16, config.block_k * 2 // itemsize)) for config in configs)


def decode_configs(hidden_size: int, intermediate_size: int, interpreted: bool,
                   transposed: bool = False) -> tuple[DecodeConfig, DecodeConfig]:
    """Tile sizes for (decode_gate_up_kernel, decode_down_kernel).

    A decode kernel is a GEMV that only streams weight rows, cold from HBM in a model (each layer reads its
    own experts). Its time is a few round trips to memory per program, one per BLOCK_K step, so the tiles
    are short and wide: a whole row (or half of one) per step, and 2-8 rows per program, so that enough
    programs run at once. gate_up reduces over K = H, down over K = I, whose row should not leave most of
    a second 1024-wide step masked (I = 1408 reads in one 2048-wide step). From tools/tune_decode.py on an
    H200, six presets, the layers back to back in a CUDA graph (docs/performance_notes.md,
    data/h200_decode_layers.json).

    `transposed`: the weights are views of [E, H, 2I] / [E, I, H] storage (transformers' `is_transposed`
    modules, gpt-oss), so a row of the output dimension N is the contiguous one, and row tiles would read a
    few bytes per memory row. The tiles span N instead: 256 rows of K per step for gate_up, wider N blocks the
    longer the row (2I); down runs one program per (token, N block), so its blocks stay narrow enough for T=1
    to fill the card, and read 512 rows per step. From tools/tune_decode.py --transposed on an H200 (gpt-oss,
    and qwen3 and mixtral stored that way; docs/performance_notes.md, data/h200_decode_layers_transposed.json):
    each the fastest candidate for its preset; the cut-offs lie between those three measured widths.
    """
    if interpreted:
        return DecodeConfig(32, 64, 1, 1), DecodeConfig(32, 64, 1, 1)
    if transposed:
        double_inter = 2 * intermediate_size
        gate_up = DecodeConfig(16 if double_inter <= 2048 else 64 if double_inter <= 8192 else 128, 256, 4, 1)
        if hidden_size <= 2048:
            down = DecodeConfig(8, 512, 4, 1)
        else:
            down = DecodeConfig(16, 512, 8, 1) if hidden_size < 4096 else DecodeConfig(32, 512, 4, 1)
        return gate_up, down
    gate_up = DecodeConfig(2, 2048, 4, 1) if hidden_size % 2048 == 0 else DecodeConfig(2, 1024, 4, 1)
    down = DecodeConfig(8, 2048, 8, 1) if 1024 < intermediate_size < 2048 else DecodeConfig(4, 1024, 4, 1)
    return gate_up, down


def uses_decode_path(num_tokens: int, top_k: int, num_experts: int, hidden_size: int | None = None) -> bool:
    """The token-major decode kernels read one expert's weights once per (token, expert) pair; the
    sorted kernels once per expert hit, after a sort. One token never repeats an expert, so T=1 is
    always decode. Beyond that, decode only while there are at most E/4 pairs and the experts are
    narrow (H <= 2048; None: not known, taken as narrow): wider experts keep the sorted kernels' 16-row
    tiles busy enough from T=2 on. From tools/tune_decode.py --crossover, the weights cold as in a
    model, six presets (docs/performance_notes.md, data/h200_decode_crossover.json)."""
    if num_tokens == 1:
        return True
    return num_tokens * top_k * 4 <= num_experts and (hidden_size is None or hidden_size <= 2048)


#: How sort_pairs sorts the pairs by expert: one program's bitonic sort (a few thousand pairs), a
#: counting sort over blocks of pairs in two launches, or torch's sort and histogram (kept to measure).
SORT_METHODS = ("one_program", "blocks", "torch")
#: Up to this many pairs one program sorts them (sort_pairs_kernel); beyond, the block counting sort.
#: Where one program's bitonic sort stops paying was measured by tools/sort_pairs_ab.py
#: (data/h100_sort_pairs.json, docs/performance_notes.md).
ONE_PROGRAM_SORT_MAX_PAIRS = 2048
#: Pairs per program of the block counting sort (each program sorts its block bitonically in registers).
BLOCK_SORT_PAIRS = 1024


def sort_method(num_pairs: int, num_experts: int) -> str:
    """The sort the plan takes for this many pairs: one program while they fit, else the block sort."""
    if num_pairs <= ONE_PROGRAM_SORT_MAX_PAIRS and fits_one_program_sort(num_pairs, num_experts):
        return "one_program"
    return "blocks"


def fits_one_program_sort(num_pairs: int, num_experts: int) -> bool:
    """The one-program sort's int32 keys (expert << pair bits | pair) hold every expert id and the padding's."""
    return (num_experts + 1) * one_program_sort_block(num_pairs) <= 2**31


def one_program_sort_block(num_pairs: int) -> int:
    """Pairs are padded to a power of two (at least 16) for the bitonic sort."""
    return max(16, 1 << max(num_pairs - 1, 0).bit_length())


def launch_plan(num_tokens: int, top_k: int, num_experts: int, hidden_size: int, intermediate_size: int,
                dtype: torch.dtype, *, interpreted: bool, needs_grad: bool = False,
                save_pre_activation: bool = True, transposed: bool = False) -> LaunchPlan:
    """The plan the triton backend launches for this shape.

    With `needs_grad` the decode path is never taken: its kernels keep nothing a backward could
    use, and a training step has more than a handful of tokens anyway. `save_pre_activation`
    (default True) keeps the [S, 2I] pre-activation from the forward for the backward: one extra
    write of S*2I elements in the forward and a read in the backward, against rerunning the gate_up
    GEMM (2/3 of the forward's FLOPs) in the backward — the recompute only pays when activation
    memory, not time, is what runs out. Both are measured by tools/tune_triton.py --parts backward.
    `transposed`: the weights' K dimension is not the contiguous one (`weights_transposed`); it changes the
    decode tiles only.
    """
    key = (num_tokens, top_k, num_experts, hidden_size, intermediate_size, dtype.itemsize, interpreted, needs_grad,
           save_pre_activation, transposed)
    if torch.compiler.is_compiling():  # traced once per graph; dynamo would only skip the cache
        return _plan(*key)
    return _plan_cached(*key)


def _plan(num_tokens, top_k, num_experts, hidden_size, intermediate_size, itemsize, interpreted, needs_grad,
          save_pre_activation, transposed) -> LaunchPlan:
    num_pairs = num_tokens * top_k
    rows_per_expert = num_pairs / max(1, min(num_experts, num_pairs))
    gate_up, down = kernel_configs(rows_per_expert, interpreted, wide_output=hidden_size >= 4096, itemsize=itemsize)
    decode_gate_up, decode_down = decode_configs(hidden_size, intermediate_size, interpreted, transposed)
    backward = backward_configs(rows_per_expert, hidden_size, intermediate_size, interpreted, itemsize=itemsize)
    return LaunchPlan(
        decode=not needs_grad and uses_decode_path(num_tokens, top_k, num_experts, hidden_size),
        sort=sort_method(num_pairs, num_experts),
        gate_up=gate_up, down=down, decode_gate_up=decode_gate_up, decode_down=decode_down,
        down_backward=backward.down_backward, gate_up_input_grad=backward.gate_up_input_grad,
        gate_up_weight_grad=backward.gate_up_weight_grad, down_weight_grad=backward.down_weight_grad,
        save_pre_activation=save_pre_activation, sorted_grad_out=backward.sorted_grad_out,
        sorted_hidden_states=backward.sorted_hidden_states, split_down_backward=backward.split_down_backward,
    )


_plan_cached = functools.lru_cache(maxsize=1024)(_plan)


def weights_transposed(gate_up: torch.Tensor) -> bool:
    """gate_up [E, 2I, H] is a view of [E, H, 2I] storage: its K (H) dimension is not the contiguous one."""
    return gate_up.stride(-1) != 1
