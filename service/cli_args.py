"""argparse types shared by every `spo` command (serving and training), so a bad flag reads the same everywhere.

Each type raises `argparse.ArgumentTypeError`, which argparse turns into a usage error naming the flag.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.contracts.config import Settings


def image_size(value: str) -> tuple[int, int]:
    """'WxH' in multiples of 8 -> (width, height)."""
    from service.contracts.sizes import parse_size

    try:
        return parse_size(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _whole_number(low: int, high: int | None, what: str = "an integer") -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            n = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if n < low or (high is not None and n > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {n}")
        return n

    return parse


positive_int = _whole_number(1, None)
port = _whole_number(1, 65535, "a port number")


def positive_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {value!r}") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return number


def number_list(cast: Callable[[str], float], what: str,
                minimum: float | None = None) -> Callable[[str], tuple[float, ...]]:
    """An argparse type for "a,b,c" lists (`--guidance 1,5,7.5`, `--steps 4,8,20`): one parser, two number kinds."""

    def parse(value: str) -> tuple[float, ...]:
        try:
            values = tuple(cast(v) for v in value.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {value!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected at least one of the {what}, got {value!r}")
        if minimum is not None and min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected {what} >= {minimum:g}, got {value!r}")
        return values

    return parse


float_list = number_list(float, "numbers")  # ranges are checked by each command, naming its flag
int_list = number_list(int, "whole numbers", minimum=1)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default (unless it has none worth showing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, argparse.SUPPRESS) or action.required:
            return action.help
        return super()._get_help_string(action)


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse `argv`, set up logging from the settings, run the chosen subcommand: every `spo` entry point's body.
    Subcommand errors name the subcommand's own flags (its parser is passed along)."""
    from service.contracts.config import configure_logging

    args = parser.parse_args(argv)
    settings = settings_or_error(parser)
    configure_logging(settings.log_level, settings.log_format)
    return int(args.func(args, getattr(args, "_parser", parser)) or 0)


def settings_or_error(parser: argparse.ArgumentParser) -> Settings:
    """Settings from SPO_* env; a bad value is a usage error naming the variable."""
    from pydantic import ValidationError

    from service.contracts.config import Settings

    try:
        return Settings()
    except ValidationError as err:
        first = err.errors()[0]
        parser.error(f"environment variable SPO_{str(first['loc'][0]).upper()}: {first['msg']}")
