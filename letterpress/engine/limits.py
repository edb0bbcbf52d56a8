"""What the engine can honour, and the checks of one value against it, without torch: `SamplingParams.validate`
uses them for every request, and the CLI for its flags before torch and the model load (a mistyped
`--max-new-tokens 0` is refused in a fraction of a second, not after seconds of loading)."""

from __future__ import annotations

import math

from ..errors import RequestError

# Steps: the schedule divides step counts in float32, exact up to 2**24. Temperatures: the schedule's lowest
# temperature is above t_max / max_denoising_steps (>= 6e-14), so dividing softcapped logits by it stays finite;
# above 100 every proposal is uniform noise anyway. Seeds: what torch.Generator.manual_seed accepts.
MAX_DENOISING_STEPS = 2**24
MAX_TOKENS = 2**31 - 1
MIN_TEMPERATURE = 1e-6
MAX_TEMPERATURE = 100.0
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1


def check_integer(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        kind = "a positive integer" if low == 1 else f"an integer >= {low}"
        raise RequestError(f"{name} must be {kind} (at most {high}), got {value!r}")


def check_number(name: str, value: object, low: float, high: float, low_open: bool = False) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise RequestError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        raise RequestError(f"{name} must lie in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return float(value)


def check_temperatures(t_min: float, t_max: float) -> None:
    if t_min > t_max:
        raise RequestError(f"need t_min <= t_max, got t_min={t_min:g}, t_max={t_max:g}")


# field -> the check of a value set for it (SamplingParams' scalar fields; seed only when set)
SAMPLING_LIMITS = {
    "max_new_tokens": lambda v: check_integer("max_new_tokens", v, 1, MAX_TOKENS),
    "max_denoising_steps": lambda v: check_integer("max_denoising_steps", v, 1, MAX_DENOISING_STEPS),
    "stability_threshold": lambda v: check_integer("stability_threshold", v, 0, MAX_DENOISING_STEPS),
    "entropy_bound": lambda v: check_number("entropy_bound", v, 0.0, math.inf, low_open=True),
    "confidence_threshold": lambda v: check_number("confidence_threshold", v, 0.0, math.inf, low_open=True),
    "t_min": lambda v: check_number("t_min", v, 0.0, MAX_TEMPERATURE),
    "t_max": lambda v: check_number("t_max", v, MIN_TEMPERATURE, MAX_TEMPERATURE),
    "seed": lambda v: check_integer("seed", v, MIN_SEED, MAX_SEED),
    "top_k": lambda v: check_integer("top_k", v, 0, MAX_TOKENS),
}


def check_sampling_values(values: dict[str, object]) -> None:
    """Check the fields of `values` that are set (not None), and t_min <= t_max when both are."""
    for name, value in values.items():
        if value is not None:
            SAMPLING_LIMITS[name](value)
    if values.get("t_min") is not None and values.get("t_max") is not None:
        check_temperatures(values["t_min"], values["t_max"])
