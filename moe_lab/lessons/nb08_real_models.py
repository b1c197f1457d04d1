"""Notebook 08 (real models): its parameters."""
from __future__ import annotations

from ..parameters import Device, Dtype, Int, Parameters, Str

#: The families `moe_lab.hf.tiny_transformers_model` builds (moe_lab.hf.FAMILIES + EXTRA_FAMILIES); asked
#: when the check runs, so the notebook's own "transformers is optional" path still gets a clear message.


def _families() -> list[str]:
    try:
        from ..hf import EXTRA_FAMILIES, FAMILIES
    except ImportError:  # transformers missing: any family name is moot, the sections are skipped
        return ["qwen2_moe", "mixtral", "qwen3_moe", "olmoe", "gpt_oss"]
    return list(FAMILIES + EXTRA_FAMILIES)


PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(), family=Str(choices=_families),
    num_tokens=Int(min=1, max=120, help="the tiny models have 128 positions; the two-backbone model adds 6 patches"),
    seed=Int(min=0),
)
