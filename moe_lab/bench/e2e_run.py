"""`moe-lab e2e`: pick the model (a shipped config, a tiny one, or a checkpoint), fit it on the
device, run the end-to-end plan and write the table (CSV + JSON provenance) after every group.

Model names: a config shipped with moe_lab (`moe_lab.hf.real_configs.real_config_names()`),
"tiny:<family>" (a 2-layer random model of a transformers family, `moe_lab.hf.tiny_transformers_model`:
seconds on a CPU), or any checkpoint with `pretrained=True` (a Hub name or a local folder).
`layers="auto"` keeps every layer when the model fits in 85% of the device's free memory, else as
many as fit (the table's `layers` / `full_layers` columns and the progress output say so).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from .e2e import PINNED_SUFFIX, TRANSFORMERS_IMPLEMENTATIONS, E2EPlan, implementation_of, run_e2e
from .e2e_profile import NO_EXPERTS
from .memory import available_bytes
from .results import save_results

TINY_PREFIX = "tiny:"
#: Share of the free device memory the weights may take; the rest is for caches, activations, graphs.
FIT_SHARE = 0.85


def default_backends(device) -> list[str]:
    """transformers' implementations (grouped_mm with generate's decode switch and pinned), every moe_lab
    backend that runs compiled kernels here, and the no-experts baseline."""
    from ..backends import runnable_backends
    from ..hf import register_with_transformers

    register_with_transformers()
    ours = [f"moe_lab_{name}" for name in runnable_backends(torch.device(device), interpreted=False)]
    return [*TRANSFORMERS_IMPLEMENTATIONS, "grouped_mm:pinned", *ours, NO_EXPERTS]


def layer_bytes(name: str, dtype) -> tuple[int, list[int]]:
    """(bytes of everything but the decoder layers, bytes of each decoder layer) of shipped config
    `name`, from a build on the meta device (no memory, a fraction of a second). Layers differ:
    DeepSeek-V3's first three are dense."""
    from ..hf.build import build_model, parameter_bytes

    model = build_model(name, device="meta", dtype=dtype).model
    layers = [parameter_bytes(layer) for layer in _decoder_layers(model)]
    return parameter_bytes(model) - sum(layers), layers


def _decoder_layers(model):
    found = [module for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and name.endswith("layers") and "visual" not in name]
    if not found:
        raise ValueError(f"{type(model).__name__}: no decoder layers (a ModuleList named ...layers) found")
    return max(found, key=len)


def layers_that_fit(name: str, device, dtype, share: float = FIT_SHARE) -> int:
    """The most leading decoder layers of shipped config `name` whose weights fit in `share` of the free memory."""
    free = available_bytes(device)
    base, layers = layer_bytes(name, dtype)
    if free is None:
        return len(layers)
    room, fitting = share * free - base, 0
    for size in layers:
        if room < size:
            break
        room, fitting = room - size, fitting + 1
    if fitting < 1:
        raise ValueError(f"{name} does not fit on {device}: {base / 2**30:.1f} GiB besides its layers and "
                         f"{layers[0] / 2**30:.2f} GiB for the first layer, {free / 2**30:.1f} GiB free")
    return fitting


def build_for_e2e(model: str, *, device, dtype, layers="auto", pretrained: bool = False, seed: int = 0):
    """A BuiltModel for `model` (see the module docstring)."""
    from ..hf import tiny_transformers_model
    from ..hf.build import BuiltModel, build_model

    if model.startswith(TINY_PREFIX):
        family = model.removeprefix(TINY_PREFIX)
        tiny = tiny_transformers_model(family, seed=seed, dtype=dtype).to(device)
        count = tiny.config.num_hidden_layers
        return BuiltModel(tiny, model, count, count, "random")
    if pretrained:
        return build_model(model, pretrained=True, device=device, dtype=dtype)
    if layers == "auto":
        layers = layers_that_fit(model, device, dtype)
    return build_model(model, device=device, dtype=dtype, num_layers=int(layers), seed=seed)


def check_backend_names(backends) -> None:
    """Unknown experts implementation names are a usage error before anything is built."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    known = {"eager", NO_EXPERTS, *ALL_EXPERTS_FUNCTIONS.keys()}
    unknown = [name for name in backends if implementation_of(name) not in known]
    if unknown:
        raise ValueError(f"unknown experts implementation(s) {unknown}; known here: {sorted(known)} (each may "
                         f"take {PINNED_SUFFIX!r}; moe_lab's are registered as moe_lab_<backend>)")


def record_e2e(model: str, plan: E2EPlan, *, device, dtype, layers="auto", pretrained: bool = False,
               output=None, progress: bool = True):
    """Build, measure, and (with `output`) write `output`.csv/.json after every group; return the table.
    `plan.deadline_s` counts from this call (the model's build included)."""
    started = time.monotonic()
    check_backend_names([*plan.backends, *(plan.compiled_backends or []), *(plan.decode_backends or []),
                         plan.reference])
    built = build_for_e2e(model, device=device, dtype=dtype, layers=layers, pretrained=pretrained, seed=plan.seed)
    if plan.deadline_s is not None:
        plan = dataclasses.replace(plan, deadline_s=plan.deadline_s - (time.monotonic() - started))
    extra = {"e2e_plan": {key: value for key, value in vars(plan).items() if key != "extra"}, **plan.extra,
             "model": built.describe()}
    if built.weights == "random" and not model.startswith(TINY_PREFIX):
        from ..hf.real_configs import config_source

        extra["config_source"] = config_source(model)

    def write(frame):
        if output is not None:
            save_results(frame, output, extra_provenance=extra)

    frame = run_e2e(built, plan, on_rows=write, progress=progress)
    write(frame)
    return frame
