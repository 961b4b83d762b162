"""The command line: subcommands, progress, exit codes. The only package that prints.

Exit codes: 0 success, 1 an ocibuild error (``error:`` and ``hint:`` lines on stderr; any other exception is told
the same way, by :func:`.common.unexpected`, its traceback shown only with --debug), 2 usage, 130 Ctrl-C.
With ``--json`` stdout holds exactly one JSON document; progress goes to stderr.

:mod:`.dispatch` holds the parser and the table of commands; each group of commands has a module of its own:
:mod:`.build` (plan, build, lock, verify, gc), :mod:`.transfer` (push, push-cache, pull-cache, login),
:mod:`.airgap` (export, import, inventory), :mod:`.run` (run, shell, doctor); :mod:`.common` what they share;
:mod:`.progress` the progress on stderr (a live display on a terminal, timestamped lines otherwise, none with -q).
Start-up time is part of every command's time (a no-op build, a push that finds everything present), so the
modules only some commands need (planner, bundle, engine, doctor: zstandard, isal, python-on-whales) are imported
in the functions that use them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from ..errors import OcibuildError, UsageError
from .common import report, unexpected
from .dispatch import dispatch, parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return dispatch(args)
    except UsageError as err:
        report(err, args.debug)
        return 2
    except OcibuildError as err:
        report(err, args.debug)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # (MemoryError and RecursionError included): one line, the traceback only with --debug
        report(unexpected(err), args.debug)
        return 1

