"""Optional interop with Hugging Face transformers (>= 5): run moe_lab backends inside transformers models.

transformers 5 keeps MoE expert weights as two 3-D tensors per layer (`gate_up_proj` [E, 2I, H],
`down_proj` [E, H, I]) — the layout moe_lab's backends read — and dispatches each experts module's
forward through a registry, `ALL_EXPERTS_FUNCTIONS`, keyed by `config._experts_implementation`
("eager" runs the module's own loop; "grouped_mm", "batched_mm", ... are registered functions).
This module plugs moe_lab's backends into that registry:

    import moe_lab.hf
    moe_lab.hf.register_with_transformers()          # -> ["moe_lab_eager", "moe_lab_batched_mm", ...]
    model = moe_lab.hf.tiny_transformers_model("qwen3_moe")
    model.set_experts_implementation("moe_lab_grouped_mm")
    moe_lab.hf.compare_implementations(model, input_ids)   # max differences of the logits vs "eager"

and offers small random-weight models (no download) and access to their experts modules, so that a
moe_lab backend can be called on a transformers experts module directly:

    experts = next(moe_lab.hf.experts_modules(model))
    moe_lab.experts_forward("grouped_mm", experts, hidden, top_k_index, top_k_weights)

transformers' own backends can also be timed beside moe_lab's on the same weights
(`moe_lab.hf.comparison`, what `moe-lab bench --compare-hf` runs).

`import moe_lab` never imports transformers; only `import moe_lab.hf` does. The package:
    registry.py         moe_lab backends registered in transformers' experts registry
    models.py           tiny random-weight models, their experts modules, comparing implementations
    comparison.py       transformers' own backends as moe_lab specs, on a moe_lab layer's weights
    real_configs.py     the published config.json of real models, shipped in configs/ with source and licence
    build.py            whole models from those configs (random weights, on the device) or from a checkpoint
    families.py         every transformers family on the experts registry, and whether moe_lab runs it
    expert_parallel.py  moe_lab.parallel's dispatch/combine as a transformers EPImplementation (import it explicitly)
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: F401
except ImportError as _error:  # transformers missing, or a 4.x without the experts registry
    _installed = ""
    try:
        import importlib.metadata as _metadata

        _installed = f" (found transformers {_metadata.version('transformers')})"
    except Exception:  # noqa: BLE001 - any failure here just means "not installed"
        pass
    raise ImportError(
        "moe_lab.hf needs Hugging Face transformers >= 5.0 with its experts registry "
        f"(transformers.integrations.moe){_installed}. Install it with: pip install 'moe-lab[hf]'"
    ) from _error

from .build import BuiltModel, build_model
from .models import (
    EXTRA_FAMILIES, FAMILIES, compare_implementations, experts_modules, named_experts_modules,
    tiny_transformers_config, tiny_transformers_model, transformers_experts_forward,
)
from .real_configs import config_source, real_config, real_config_names
from .registry import register_with_transformers, registered_with_transformers, unregister_from_transformers

__all__ = [
    "BuiltModel", "EXTRA_FAMILIES", "FAMILIES", "build_model", "compare_implementations", "config_source",
    "experts_modules", "named_experts_modules", "real_config", "real_config_names",
    "register_with_transformers", "registered_with_transformers", "tiny_transformers_config",
    "tiny_transformers_model", "transformers_experts_forward", "unregister_from_transformers",
]
