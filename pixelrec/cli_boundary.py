"""The command line's error boundary and the click classes every `pixelrec` command is made of.

Every command runs inside `PixelrecGroup.invoke`, so a user never sees a traceback: bad input
(PixelrecError) and operating-system errors print one line `error: ...` and exit with status 2, an
interruption prints `interrupted` (130), and anything else is reported as an internal error (status 1)
whose traceback PIXELREC_TRACEBACK=1 shows. click's usage errors (no such option, a missing argument, a
bad choice) print one such line too, click's "did you mean" hint included, with status 2. Every
subcommand also accepts -q/--quiet. Under torchrun, rank 0 reports; the other ranks stop quietly.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import traceback
from typing import Any, Callable

import click

from .errors import PixelrecError

TRACEBACK_ENV = "PIXELREC_TRACEBACK"  # set to 1 to see the traceback of a failed command
EXIT_ERROR = 2  # bad input, refused settings, operating-system errors, out of memory
EXIT_BUG = 1  # an exception pixelrec did not expect
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), as shells report it
_MAX_DETAIL = 300  # characters of an unexpected exception's message shown on its line


# ---------------------------------------------------------------------------------- boundary
def describe_failure(exc: BaseException) -> tuple[str, int]:
    """The one line a user sees for an exception that ended a command, and the exit status."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", EXIT_INTERRUPTED
    if isinstance(exc, PixelrecError):
        return f"error: {exc}", EXIT_ERROR
    if _is_out_of_memory(exc):
        detail = _one_line(exc)
        return (f"error: out of memory{f' ({detail})' if detail else ''}; ask for less (smaller sizes or batches) "
                f"or use a machine with more memory"), EXIT_ERROR
    full = _disk_full_error(exc)  # also torch.save's and faiss's RuntimeErrors around ENOSPC
    if full is not None:
        return f"error: {_describe_os_error(full)}", EXIT_ERROR
    if isinstance(exc, OSError):
        return f"error: {_describe_os_error(exc)}", EXIT_ERROR
    lost = _lost_peer_line(exc)
    if lost is not None:
        return f"error: {lost}", EXIT_ERROR
    return (f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); this is a pixelrec bug — "
            f"rerun with {TRACEBACK_ENV}=1 to see the traceback"), EXIT_BUG


def _is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError, or torch's CPU/CUDA allocation failures (RuntimeErrors, torch not imported here)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "CUDA out of memory" in text)


def _disk_full_error(exc: BaseException) -> OSError | None:
    """runtime.disk_full_error, when the runtime is loaded (a command that never loaded it wrote nothing
    through torch or faiss)."""
    runtime = sys.modules.get("pixelrec.runtime")
    return None if runtime is None else runtime.disk_full_error(exc)


def _lost_peer_line(exc: BaseException) -> str | None:
    """'rank N stopped; ...' for a collective that failed because a torchrun peer died (distributed.py)."""
    distributed = sys.modules.get("pixelrec.distributed")
    return None if distributed is None else distributed.lost_peer_line(exc)


def _describe_os_error(exc: OSError) -> str:
    try:
        from .runtime import describe_os_error
    except Exception:  # noqa: BLE001 - the runtime's imports failing must not hide the original error
        return _one_line(exc) or type(exc).__name__
    return describe_os_error(exc)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 3] + "..."


def _wants_traceback() -> bool:
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


class UsageLine(click.ClickException):
    """A click usage error (missing argument, no such option, bad choice) as pixelrec's one line
    `error: ...`, click's "did you mean" hint included; exit status 2."""

    exit_code = EXIT_ERROR

    def __init__(self, exc: click.UsageError):
        where = exc.ctx.command_path if exc.ctx is not None else "pixelrec"
        super().__init__(f"error: {where}: {' '.join(exc.format_message().split())} (see `{where} --help`)")

    def show(self, file: Any = None) -> None:
        if process_rank() == 0:  # under torchrun, rank 0 reports it; the other ranks stop quietly
            click.echo(self.message, err=True)


def _one_line_usage(exc: click.UsageError) -> click.ClickException:
    """`exc` as one line, except click's help shown for a bare `pixelrec` (no command given)."""
    shows_help = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2; 8.1 exits with the help
    return exc if isinstance(exc, shows_help) else UsageLine(exc)


_QUIET_META = "pixelrec.quiet"  # ctx.meta key: -q/--quiet was given after the subcommand


def _set_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    if value:
        from .runtime import set_quiet

        set_quiet(True)
        ctx.meta[_QUIET_META] = True
    return value


def quiet_given(ctx: click.Context) -> bool:
    """-q/--quiet given before or after the subcommand."""
    return bool(ctx.find_root().params.get("quiet", False) or ctx.meta.get(_QUIET_META, False))


class PixelrecCommand(click.Command):
    """A pixelrec subcommand: it also accepts -q/--quiet (as `pixelrec -q COMMAND` does)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.params.append(click.Option(["--quiet", "-q"], is_flag=True, expose_value=False, callback=_set_quiet,
                                        help="No progress bars or status lines."))


class PixelrecGroup(click.Group):
    """A click group whose commands all run inside one error boundary (see the module doc)."""

    command_class = PixelrecCommand

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:  # the group's own options (`pixelrec --no-such-option`)
            raise _one_line_usage(exc) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # no such command; a command's options and arguments
            raise _one_line_usage(exc) from None
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # --help, ctx.exit(): click handles them
        except (Exception, KeyboardInterrupt) as exc:
            if isinstance(exc, OSError) and exc.errno == errno.EPIPE:
                raise  # stdout closed by the reader (`| head`): click exits quietly
            line, status = describe_failure(exc)
            rank = process_rank()
            if rank and isinstance(exc, PixelrecError) and not _wants_traceback():
                sys.exit(status)  # under torchrun, rank 0 reports bad input; the other ranks stop quietly
            if _wants_traceback():
                click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
            click.echo(line.replace("error: ", f"error: rank {rank}: ", 1) if rank else line, err=True)
            sys.exit(status)


def process_rank() -> int:
    """This process's rank under torchrun (0 without it)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def rank_zero_only(command: Callable) -> Callable:
    """For a command that does not run distributed: under torchrun rank 0 runs it, the others exit."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        if process_rank() > 0:
            return None
        return command(*args, **kwargs)

    return wrapper
