"""How the `pluginpool` command talks to people and to scripts: exit codes, errors, help.

Errors are a readable message on a terminal and one JSON object on stderr otherwise (or
with `--json`), so scripts that capture stderr keep parsing it. Help shows every option's
default.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Final

from pluginpool.policy.errors import (
    BreakerUnavailableError,
    BrokerUnavailableError,
    JobWaitTimeoutError,
    PluginExecutionError,
    PluginPoolError,
)

EXIT_OK: Final = 0
EXIT_JOB_FAILED: Final = 1
"""A job ran and failed (or was refused by its breaker at the worker)."""
EXIT_BAD_INPUT: Final = 2
"""Bad input or configuration: nothing was done (argparse uses 2 for usage errors too)."""
EXIT_WAIT_TIMEOUT: Final = 3
"""A wait for a job's outcome timed out; the job goes on."""
EXIT_UNAVAILABLE: Final = 4
"""Redis (broker, registry or breaker state) could not be reached."""

EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 a job failed; 2 bad input or configuration; "
    "3 a wait for a job timed out (the job goes on); 4 Redis unreachable")


def exit_code_for(exc: PluginPoolError) -> int:
    if isinstance(exc, JobWaitTimeoutError):
        return EXIT_WAIT_TIMEOUT
    if isinstance(exc, BrokerUnavailableError | BreakerUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, PluginExecutionError):
        return EXIT_JOB_FAILED
    return EXIT_BAD_INPUT


def wants_json(as_json: bool) -> bool:
    """JSON when asked for, or when nobody is reading stderr on a terminal."""
    return as_json or not sys.stderr.isatty()


def report_error(name: str, message: str, *, as_json: bool, **fields: Any) -> None:
    """Print one error on stderr: `{"error": name, "message": ...}` or a readable block."""
    if wants_json(as_json):
        print(json.dumps({"error": name, "message": message, **fields}), file=sys.stderr)
        return
    print(f"error: {message}", file=sys.stderr)
    print(f"  ({name})", file=sys.stderr)
    for key, value in fields.items():
        print(f"  {key}: {value}", file=sys.stderr)


def report_exception(exc: PluginPoolError, *, as_json: bool) -> int:
    report_error(type(exc).__name__, str(exc), as_json=as_json)
    return exit_code_for(exc)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Adds "(default: X)" to every option that has a meaningful default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default in (None, False, argparse.SUPPRESS)
                or isinstance(action, argparse._HelpAction | argparse._VersionAction)
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)"


def apply_formatter(parser: argparse.ArgumentParser) -> None:
    """Use DefaultsHelpFormatter on the parser and every subcommand's parser."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_formatter(sub)


def options_without_help(parser: argparse.ArgumentParser, path: str = "pluginpool"
                         ) -> list[str]:
    """Every option or argument, in every subcommand, that has no help text (for tests)."""
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                missing += options_without_help(sub, f"{path} {name}")
        elif not action.help and not isinstance(action, argparse._HelpAction):
            missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    return missing
