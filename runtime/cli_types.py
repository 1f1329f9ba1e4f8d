"""Option types shared by every ``edgediff`` command, so one value is parsed one way everywhere.

Each type turns a bad value into click's usage error (one line, exit 2) naming the option and what is allowed.
"""
from __future__ import annotations

import click


class SizeType(click.ParamType):
    """``WIDTHxHEIGHT`` (e.g. ``768x512``) -> ``(height, width)``, the order the pipeline takes them in."""

    name = "WIDTHxHEIGHT"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        parts = str(value).lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts) or not all(int(p) > 0 for p in parts):
            self.fail(f"{value!r}; expected WIDTHxHEIGHT with positive integers, e.g. 512x512", param, ctx)
        return int(parts[1]), int(parts[0])


class ListType(click.ParamType):
    """A comma-separated list of ``item`` values (``4,20``; ``512x512,768x768``; ``cpu,cuda``)."""

    def __init__(self, item: click.ParamType):
        self.item = item
        self.name = f"{item.name}[,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)) and not isinstance(value, str) and not isinstance(self.item, SizeType):
            return list(value)
        items = [v.strip() for v in str(value).split(",")]
        if not all(items):
            self.fail(f"{value!r}; expected a comma-separated list without empty entries", param, ctx)
        return [self.item.convert(v, param, ctx) for v in items]


SIZE = SizeType()
POSITIVE_INT = click.IntRange(min=1)
STEPS = click.IntRange(min=1, max=1000)  # the schedulers' num_train_timesteps bound of every family we run
NAMES = ListType(click.STRING)
