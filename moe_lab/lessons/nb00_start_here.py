"""Notebook 00 (start here): its parameters."""
from __future__ import annotations

from ..parameters import Device, Dtype, Int, Parameters, Str
from ..presets import PRESETS

PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(),
    preset=Str(choices=lambda: list(PRESETS)),
    hidden_size=Int(min=16, max=1024, multiple_of=16,
                    help="the scaled-down layer's H; a multiple of 16 keeps every row 16-byte aligned"),
    num_tokens=Int(min=1, max=4096),
    seed=Int(min=0),
)
