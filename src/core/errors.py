"""User-facing errors: one line naming the file, slide, field and value; no traceback."""
from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class InputError(Exception):
    """Bad input from the user (data file, params, CLI value). The message is the whole report."""


def exit_on_input_error(main: F) -> F:
    """Wrap a CLI ``main`` so an :class:`InputError` prints one line to stderr and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except InputError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]
