"""click parameter types for dpplan's domain inputs, validated once at the command line."""

from __future__ import annotations

import re

import click

from dpplan.planner.hardware import GPU_CATALOG
from dpplan.planner.strategies.registry import STRATEGIES


class StrategyList(click.ParamType):
    """``ddp,fsdp-full`` or ``all``."""

    name = "strategy-list"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("expected a comma-separated list of strategies or 'all'", param, ctx)
        if items == ["all"]:
            return STRATEGIES
        unknown = [v for v in items if v not in STRATEGIES]
        if unknown:
            self.fail(
                f"unknown strategy {unknown[0]!r}; choose from {', '.join(STRATEGIES)} or 'all'", param, ctx
            )
        return tuple(dict.fromkeys(items))


class PositiveIntList(click.ParamType):
    """``8`` or ``1,2,4,8``."""

    name = "int-list"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        try:
            numbers = tuple(int(v) for v in items)
        except ValueError:
            self.fail(f"expected positive integers separated by commas, got {value!r}", param, ctx)
        if not numbers or any(n < 1 for n in numbers):
            self.fail(f"expected positive integers separated by commas, got {value!r}", param, ctx)
        return tuple(sorted(set(numbers)))


class GpuName(click.ParamType):
    """A catalog key such as ``h100-80gb`` (see ``dpplan gpus``)."""

    name = "gpu"

    def convert(self, value, param, ctx):
        key = str(value).lower()
        if key not in GPU_CATALOG:
            self.fail(f"unknown GPU {value!r}; run `dpplan gpus` for the catalog ({', '.join(GPU_CATALOG)})", param, ctx)
        return key


STRATEGY_LIST = StrategyList()
POSITIVE_INT_LIST = PositiveIntList()
GPU_NAME = GpuName()


class Endpoint(click.ParamType):
    """``host:port`` of a rendezvous (torchrun --rdzv-endpoint)."""

    name = "host:port"

    def convert(self, value, param, ctx):
        host, sep, port = str(value).rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            self.fail(f"expected host:port (e.g. node0:29400), got {value!r}", param, ctx)
        return str(value)


ENDPOINT = Endpoint()


BYTE_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,  # decimal, as vendors print "24GB"
    "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,  # binary, as CUDA and dpplan report
}


def parse_bytes(text: str) -> int:
    """``24GiB``, ``24GB``, ``24000MiB``, ``23.5 GiB`` -> bytes. A unit is required: a bare number
    is ambiguous between bytes and GiB."""
    match = _SIZE.fullmatch(str(text).strip().lower())
    if not match or match.group(2) not in BYTE_UNITS:
        raise ValueError(f"expected a size with a unit such as 24GiB, 24GB or 24000MiB, got {text!r}")
    nbytes = int(round(float(match.group(1)) * BYTE_UNITS[match.group(2)]))
    if nbytes < 1:
        raise ValueError(f"expected a size above zero, got {text!r}")
    return nbytes


_SIZE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]+)")


class ByteSize(click.ParamType):
    """``24GiB`` (2^30), ``24GB`` (10^9), ``24000MiB``: bytes as an integer."""

    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_bytes(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


BYTE_SIZE = ByteSize()
