"""Human units for printing. Bytes stay integers everywhere else; GiB = 2^30, GB = 10^9."""

from __future__ import annotations

GiB = 1 << 30
MiB = 1 << 20


def format_bytes(nbytes: int | float | None) -> str:
    """Binary units: '12.34 GiB', '512.0 MiB', '812 B'."""
    if nbytes is None:
        return "-"
    value = float(nbytes)
    sign = "-" if value < 0 else ""
    value = abs(value)
    for unit, size in (("TiB", 1 << 40), ("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if value >= size:
            return f"{sign}{value / size:.2f} {unit}"
    return f"{sign}{int(value)} B"


def format_gib(nbytes: int | float | None) -> str:
    """Fixed GiB with two decimals, for aligned table columns."""
    if nbytes is None:
        return "-"
    return f"{nbytes / GiB:.2f}"


def format_count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
