"""moe_lab's exception types. All derive from `ValueError`, so `except ValueError` catches bad input."""


class ConfigError(ValueError):
    """An `MoEConfig` or preset was asked for with values that cannot describe an MoE layer."""


class UnknownBackendError(ValueError):
    """An experts implementation name that is not in the registry."""


class BackendInputError(ValueError):
    """Tensors handed to an experts backend with the wrong shape, dtype or device."""


class GatherBudgetError(ValueError):
    """`batched_mm` would gather more weight bytes than its budget allows.

    Raised *before* any allocation, so the process (and a notebook kernel) stays alive.
    """

    def __init__(self, predicted_bytes: int, budget_bytes: int, detail: str = ""):
        self.predicted_bytes = int(predicted_bytes)
        self.budget_bytes = int(budget_bytes)
        super().__init__(
            f"batched_mm would gather {_human(predicted_bytes)} ({int(predicted_bytes):,} bytes) of expert weights, "
            f"over its budget of {_human(budget_bytes)} ({int(budget_bytes):,} bytes)"
            f"{': ' + detail if detail else ''}. "
            "Use fewer tokens, the grouped_mm backend, or raise the budget with "
            "moe_lab.set_batched_mm_budget(bytes) / the MOE_LAB_BATCHED_MM_BUDGET environment variable."
        )


def first_line(error: BaseException) -> str:
    """"TypeError: first line of the message" (just the type when there is no message): enough to
    say in a table row, a status line or an exercise's feedback what went wrong."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    raise AssertionError("unreachable")


class BackendCapabilityError(ValueError):
    """The chosen experts backend cannot do what this call needs (e.g. gradients), as its spec declares."""


class DetachedOutputError(BackendCapabilityError):
    """A backend returned an output whose autograd graph does not reach inputs that require grad."""


class CapacityOverflowError(ValueError):
    """A fixed-capacity expert-parallel dispatch had more (token, expert) pairs for one destination rank
    than its capacity and dropped them (moe_lab.parallel.padded)."""
