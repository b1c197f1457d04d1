"""What the bench can time: a moe_lab backend by its registered name, or another library's backend
by "<library>:<backend>" — transformers' own ("transformers:grouped_mm", moe_lab.hf.comparison) and
Liger-Kernel's ("liger:fused_moe", moe_lab.liger), whose specs live in the interop layer and are
imported only when such a name is asked for.

Result tables keep these names in their `backend` column; `library_of` tells the two apart."""
from __future__ import annotations

from ..backends import BackendSpec, get_spec

SEPARATOR = ":"
MOE_LAB = "moe_lab"
#: The libraries whose backends moe_lab is compared with (`--compare-hf`, `--compare-liger`).
TRANSFORMERS = "transformers"
LIGER = "liger"


def library_of(name: str) -> str:
    """"grouped_mm" -> "moe_lab"; "transformers:grouped_mm" -> "transformers"."""
    library, separator, _ = str(name).partition(SEPARATOR)
    return library if separator else MOE_LAB


def backend_of(name: str) -> str:
    """"transformers:grouped_mm" -> "grouped_mm"; a moe_lab name is returned as it is."""
    library, separator, backend = str(name).partition(SEPARATOR)
    return backend if separator else library


def implementation(name: str):
    """What an `Experts` layer is set to for `name`: the registered name itself, or the other
    library's `BackendSpec`. Unknown names raise UnknownBackendError / ValueError saying what exists."""
    library = library_of(name)
    if library == MOE_LAB:
        get_spec(name)  # unknown -> UnknownBackendError naming the registered ones
        return name
    if library == TRANSFORMERS:
        from ..hf.comparison import comparison_spec

        return comparison_spec(backend_of(name))
    if library == LIGER:
        from ..liger import comparison_spec as liger_spec

        return liger_spec(backend_of(name))
    raise ValueError(f"unknown library {library!r} in {name!r}; the bench compares with {TRANSFORMERS!r} and "
                     f"{LIGER!r} (<library>:<backend>) or times moe_lab's registered backends by name")


def spec_of(name: str) -> BackendSpec:
    chosen = implementation(name)
    return chosen if isinstance(chosen, BackendSpec) else get_spec(chosen)


def compared_names(backends) -> list[str]:
    """transformers' backends with the same names as `backends`: ["transformers:grouped_mm", ...]."""
    from ..hf.comparison import IMPLEMENTATIONS

    return [f"{TRANSFORMERS}{SEPARATOR}{name}" for name in backends if name in IMPLEMENTATIONS]


def liger_names() -> list[str]:
    """Liger's compared backends, if liger-kernel is installed (else none)."""
    from .. import liger

    return [f"{LIGER}{SEPARATOR}{name}" for name in liger.IMPLEMENTATIONS] if liger.installed() else []
