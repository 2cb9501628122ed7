"""One way for every command-line tool to report a bad argument or config: a single line `error: ...` on stderr
and exit code 2, never a traceback.

What counts as the user's mistake (reported as that line) and what counts as a bug (left to raise with its
traceback):
  - argument parsing: argparse errors (through `ArgumentParser`) and absl flag errors, including an unreadable
    or unknown `--config` / `--config.key=value` (through `absl_run`);
  - while the tool runs: `ValueError` and its subclasses (every named error of the project derives from it:
    CheckpointFormatError, UnsafeCheckpointError, UnsupportedConfigError, ...; also malformed JSON), and
    the missing / unreadable file errors of `OSError` (FileNotFoundError, NotADirectoryError,
    IsADirectoryError, PermissionError).
Anything else (TypeError, RuntimeError, ...) is a bug and keeps its traceback. Set LLAVA_JAX_TRACEBACK=1 to
see the traceback of a reported error too.

  from llava_jax import cli
  parser = cli.ArgumentParser(prog="python -m llava_jax.foo")      # argparse tools
  if __name__ == "__main__":
      sys.exit(cli.run(main))                                        # argparse tools: main(argv) -> int | None
      cli.absl_run(main)                                             # absl tools, instead of app.run(main)
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

EXIT_USAGE = 2
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


class UsageError(ValueError):
    """A command-line argument or config value that parsed but cannot be used."""


def one_line(message: object) -> str:
    """The message with its whitespace (newlines included) collapsed, so it prints as one line."""
    return " ".join(str(message).split())


def report(message: object) -> int:
    """Prints `error: <message>` (one line) on stderr; returns the usage exit code 2."""
    sys.stdout.flush()
    print(f"error: {one_line(message) or 'invalid argument'}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def describe(exc: BaseException) -> str:
    """A one-line description of an exception: its message (for an OSError with a file name: the file and the
    reason), or its class name when the message is empty."""
    if isinstance(exc, OSError) and exc.filename is not None:
        reason = exc.strerror or type(exc).__name__
        return f"{exc.filename}: {reason}"
    return one_line(exc) or type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error contract: a parse error prints only `error: <message>` and exits 2
    (subparsers made with `add_subparsers` inherit it)."""

    def error(self, message: str) -> NoReturn:
        """Reports `message` as the one error line and exits with code 2."""
        report(f"{self.prog}: {message}" if self.prog else message)
        raise SystemExit(EXIT_USAGE)


def guard(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `main` so that a user error it raises is reported as one `error:` line and returns exit code 2."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as e:
            if os.environ.get("LLAVA_JAX_TRACEBACK"):
                raise
            return report(describe(e))

    return wrapped


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Runs an argparse tool's `main(argv)`; returns its exit code (0 for None), or 2 after one `error:` line
    for a user error. Use as `sys.exit(cli.run(main))`."""
    code = guard(main)(argv)
    return 0 if code is None else int(code)


def flag_error_message(exc: BaseException, argv: Sequence[str] = ()) -> str:
    """One line for an error raised while absl parses `argv`. ml_collections puts the whole traceback of a
    failing `get_config` into its message; only its head (which flag) and its last line (the error) are kept.
    A `--config.a.b=v` override of a field that does not exist is named."""
    text = str(exc)
    if isinstance(exc, (AttributeError, KeyError)):
        key = text.strip("\"' ")
        names = [a.split("=", 1)[0] for a in argv if a.startswith("--") and "." in a.split("=", 1)[0]]
        hits = [n for n in names if key in n.lstrip("-").split(".")[1:]]
        if hits:
            return f"{hits[0]}: the config has no field {key!r}"
    if "Traceback (most recent call last)" in text:
        head = text.split("Traceback (most recent call last)")[0].strip().rstrip(":")
        lines = [x.strip() for x in text.splitlines() if x.strip()]
        return one_line(f"{head}: {lines[-1]}" if head else lines[-1])
    if isinstance(exc, (AttributeError, KeyError)):  # ConfigDict: an override names a field that does not exist
        return f"a --config.* override names a config field that does not exist: {one_line(text)}"
    if isinstance(exc, OSError):
        return describe(exc) if exc.filename is not None else one_line(text)
    return describe(exc)


def parse_absl_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with the error contract: a bad, unknown or missing required flag, a `--config` file
    that cannot be loaded, or a `--config.key=value` override of a missing field or of the wrong type, is one
    `error:` line and exit code 2. Returns the remaining arguments."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, *USER_ERRORS) as e:
        if os.environ.get("LLAVA_JAX_TRACEBACK"):
            raise
        report(flag_error_message(e, argv))
        raise SystemExit(EXIT_USAGE) from None
    for name in flags.FLAGS:
        value = flags.FLAGS[name].value
        # ml_collections defers a config file that cannot be read to its first use; report it now instead
        if type(value).__name__ == "_ErrorConfig":
            report(f"flag --{name}: {object.__getattribute__(value, '_error')}")
            raise SystemExit(EXIT_USAGE)
    return rest


def absl_run(main: Callable[[list[str]], Any]) -> NoReturn:
    """`absl.app.run(main)` with the error contract for flag parsing and for user errors raised by `main`."""
    from absl import app

    app.run(guard(main), flags_parser=parse_absl_flags)
    raise SystemExit(0)  # app.run exits itself; this only satisfies the type checker
