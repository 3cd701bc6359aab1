"""The `expand` command line: each verb is one library call plus printing.

Exit status: 0 success (for `check`: preserved), 1 `check` found drift or a non-finite model, 2 an error (bad
input, with a message naming the problem and the fix; never a traceback). Run as several processes, every
process exits with the largest status of all.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback

from rich.console import Console
from rich.text import Text

from expand.cli import eval_verb, heal_verb, measure_verbs, model_verbs, surgery_verbs
from expand.cli.options import HelpFormatter, join_negative_values

VERB_MODULES = (model_verbs, surgery_verbs, measure_verbs, heal_verb, eval_verb)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expand", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for module in VERB_MODULES:
        module.register(verbs)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input (a message for the user, exit 2), not a bug in expand."""
    from expand.config import ConfigError
    from expand.heal import HealDiverged
    from expand.io.atomic import NoSpaceError, OutputExistsError
    from expand.io.safetensors import CheckpointError

    # OSError: what the file system refused (a folder where a file goes, a full disk, a read-only mount)
    return ValueError, OSError, CheckpointError, ConfigError, OutputExistsError, NoSpaceError, HealDiverged


def print_error(message: str) -> None:
    """`error: ...` on stderr, the message printed literally (a [a, b] in it is text, not markup)."""
    Console(stderr=True, soft_wrap=True).print(Text("error: ", style="bold red") + Text(message))


def run_verb(args) -> int:
    """The verb's exit status, errors reported: bad input is `error: ...` and 2. An unexpected error is a
    traceback; with several processes it is printed and the status is 1, so that the processes can still
    agree on one status."""
    from expand.distributed import is_runtime_failure, several, stop_now

    try:
        return args.run(args)
    except user_errors() as e:
        print_error(str(e))
        return 2
    except KeyboardInterrupt:
        if several():
            stop_now(130, "interrupted")
        print_error("interrupted (no output is left half-written)")
        return 130
    except SystemExit as e:  # SIGTERM while an output is claimed (expand.io.atomic)
        if several():
            stop_now(e.code, f"terminated (exit {e.code})")
        raise
    except Exception as e:
        if not several():
            raise
        if is_runtime_failure(e):
            first_line = (str(e).strip() or type(e).__name__).splitlines()[0]
            stop_now(1, f"a step across processes failed ({first_line}); most likely another process stopped")
        traceback.print_exc()
        return 1


def main(argv: list[str] | None = None) -> int:
    # expand needs transformers only for configs and tokenizers; its advice to install PyTorch is noise here
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = join_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    from expand.distributed import agree_on_exit_code
    from expand.io.atomic import release_all

    devices = getattr(args, "devices", None) or (lambda args: contextlib.nullcontext())
    try:
        with devices(args):  # jax.distributed and the mesh, before anything touches a device
            return agree_on_exit_code(run_verb(args))
    except user_errors() as e:
        print_error(str(e))
        return 2
    finally:
        release_all()


if __name__ == "__main__":
    sys.exit(main())
