"""The `pdt` command: parse options, call `pdtcli.api`, render. Nothing else lives here.

Every flag is made from its declaration in `pdtcli.options` (default, help, limits), and the
values go to `Settings.build`, which checks them: an invalid one is exit 2 before any work.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import typer.core
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, api
from .errors import PdtError, UsageError, os_error
from .options import KEPT, OPTIONS, Settings
from .report import build_report, render_report, render_summary
from .world import launched_rank

EXIT_WAITING = 10
EXIT_UP_TO_DATE = 11
EXIT_INTERRUPTED = 130

EPILOG = """Exit codes: 0 done (also 'nothing new' and 'waiting for checkpoints', unless --strict);
1 unexpected error; 2 bad usage (a path that does not exist, a folder with no checkpoints);
3 bad checkpoint (also unreadable); 4 store problem (other folder, newer pdt, damaged, locked, cannot be written);
5 output exists, cannot be written, or is an input, the store or not pdt's to replace;
6 a stage is missing (apply before predict);
7 under torchrun: another rank failed or died, the ranks see different folders, or the store was
made by another number of ranks (nothing committed or published);
with --strict: 10 waiting for more checkpoints, 11 nothing new; 130 interrupted."""

# The errors Typer shows as usage errors: click's ClickException, or Typer's own copy of it (Typer >= 0.22
# vendors click); found from a public class so that neither private module is named here.
_USAGE_ERRORS = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")
_command: list[str | None] = [None]  # the subcommand of this run, for its JSON line


class PdtGroup(typer.core.TyperGroup):
    """Typer's group, and one more promise: under `--json`, a usage error (`--tua 3`, `--tau 0`) is also
    the one JSON line every other exit gives, so that a cron log keeps the typo beside the results."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        _command[0] = next((arg for arg in argv if arg in self.commands), None)
        try:
            code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except _USAGE_ERRORS as error:
            # only to show an error: its Markdown and tracebacks cost ~0.1 s at start (`from`: an `import
            # typer.rich_utils` here would make `typer` a local name of this function, unbound below)
            from typer import rich_utils

            rich_utils.rich_format_error(error)  # as Typer shows it
            if "--json" in argv and type(error).__name__ != "NoArgsIsHelpError":
                _json_line({"status": "error", "exit_code": error.exit_code, "error": error.format_message(),
                            "path": None})
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


class PdtCommand(typer.core.TyperCommand):
    """Typer's command, its usage line in the usual notation: `pdt predict [OPTIONS] DIR`."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [piece.removeprefix("{").removesuffix("}") for piece in super().collect_usage_pieces(ctx)]


app = typer.Typer(
    cls=PdtGroup,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Predictive Differential Training on saved checkpoints: fit DMD to the last h checkpoints, "
    "predict tau checkpoints ahead, keep the predictions the mask trusts, write a fused checkpoint.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


class _Stdout(Console):
    """The console of stdout, for a reader that may stop reading early (`pdt report D | head`): the rest is
    dropped as `stdout_reader_may_leave` drops it, where rich's own choice would be to exit 1."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError  # to `stdout_reader_may_leave`, which sends stdout to /dev/null


out = _Stdout()
err = Console(stderr=True)
log = logging.getLogger("pdtcli")


def flag(name: str) -> Any:
    """The Typer option for `OPTIONS[name]`: flags, help, limits and shown default in one place."""
    option = OPTIONS[name]
    default = option.shown_default if option.shown_default is not None else option.default
    if isinstance(option.default, bool):  # a flag takes no value and shows no default
        return typer.Option(*option.flags, help=option.help, show_default=False)
    kept = "; kept" if name in KEPT else ""  # not given: what the last predict ran with (the commands' help)
    shown = f" [default: {default}{kept}]" if default is not None else ""
    if option.flag:
        return typer.Option(*option.flags, help=option.help + shown, show_default=False)
    return typer.Option(*option.flags, help=option.help + shown, metavar=option.value_name, show_default=False)


D = {name: option.default for name, option in OPTIONS.items()}
Target = Annotated[Path, typer.Argument(help="Checkpoint folder, or its .pdt store folder / store.h5.",
                                        show_default=False, metavar="DIR")]
Store = Annotated[Optional[Path], flag("store")]
Output = Annotated[Optional[Path], flag("output")]
DryRun = Annotated[bool, flag("dry_run")]
Force = Annotated[bool, flag("force")]
InPlace = Annotated[Optional[bool], flag("in_place")]
History = Annotated[Optional[int], flag("history")]
Start = Annotated[Optional[int], flag("start")]
Every = Annotated[Optional[int], flag("every")]
Tau = Annotated[Optional[int], flag("tau")]
Modes = Annotated[Optional[str], flag("modes")]
Rank = Annotated[Optional[int], flag("rank")]
Rtol = Annotated[Optional[float], flag("rtol")]
DmdScope = Annotated[Optional[str], flag("dmd_scope")]
Criteria = Annotated[Optional[str], flag("criteria")]
Random = Annotated[Optional[bool], flag("random")]
Seed = Annotated[Optional[int], flag("seed")]
Include = Annotated[Optional[list[str]], flag("include")]
Verify = Annotated[Optional[str], flag("verify")]
VerifyTimeout = Annotated[float, flag("verify_timeout")]
Exclude = Annotated[Optional[list[str]], flag("exclude")]
Files = Annotated[Optional[list[str]], flag("files")]
Order = Annotated[Optional[str], flag("order")]
StoreDtype = Annotated[Optional[str], flag("store_dtype")]
Device = Annotated[str, flag("device")]
Block = Annotated[Optional[int], flag("block")]
Threads = Annotated[Optional[int], flag("threads")]
Wait = Annotated[float, flag("wait")]
Backend = Annotated[str, flag("backend")]
DistTimeout = Annotated[float, flag("dist_timeout")]
Rebuild = Annotated[bool, flag("rebuild")]
Json = Annotated[bool, flag("json_out")]
Strict = Annotated[bool, flag("strict")]
Verbose = Annotated[bool, flag("verbose")]


class RichProgress:
    """Progress bars on stderr, shown only on a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and err.is_terminal

    @contextmanager
    def task(self, description: str, total: int) -> Iterator:
        if not self.enabled:
            yield lambda n: None
            return
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=err, transient=True) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)


class _Stderr(logging.Handler):
    """The library's log lines, `pdt: ...` on whatever stderr is now."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(f"pdt: {record.getMessage()}", err=True)


def settings(json_out: bool, verbose: bool, **values: Any) -> Settings:
    """Checked settings from the command's flags; with --verbose, the library's reasons on stderr."""
    log.handlers = [_Stderr()] if verbose else []
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    return Settings.build(progress=RichProgress(enabled=not json_out and launched_rank() == 0), **values)


def finish(result: api.StepResult, *, json_out: bool, strict: bool) -> None:
    """Print the result (under torchrun, rank 0 alone prints: every rank has the whole model's result)
    and exit with what --strict asks."""
    if launched_rank() == 0:
        _show(result, json_out)
    if strict and result.status == "waiting":
        raise typer.Exit(EXIT_WAITING)
    if strict and result.status == "up-to-date":
        raise typer.Exit(EXIT_UP_TO_DATE)


def _json_line(payload: dict[str, Any]) -> None:
    """One JSON object on one line of stdout (JSON Lines: a log of many runs reads line by line), stamped
    with the time (UTC, ISO 8601) and pdt's version."""
    stamped = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "pdt": __version__,
               "command": _command[0], **payload}
    with stdout_reader_may_leave():
        print(json.dumps(stamped, default=str), flush=True)


@contextmanager
def stdout_reader_may_leave() -> Iterator[None]:
    """Output for a reader that may stop reading early (`pdt ... --json | head -1`): once it has, the
    rest is dropped silently (stdout then goes to /dev/null, so the final flush cannot fail either),
    and the exit code stays the run's own: the step itself was done."""
    try:
        yield
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _show(result: api.StepResult, json_out: bool) -> None:
    payload = result.as_dict()
    if json_out:
        if result.tensors is not None:
            payload["tensors"] = result.tensors
        _json_line(payload)
        return
    for reason, paths in _grouped(result.skipped):
        many = f"{len(paths)} checkpoints ({Path(paths[0]).name} … {Path(paths[-1]).name})"
        typer.echo(f"skipped {paths[0] if len(paths) == 1 else many}: {reason}", err=True)
    with stdout_reader_may_leave():
        if result.status in ("written", "dry-run", "masked"):
            render_summary(payload, result.tensors, out)
        else:
            typer.echo(result.message)
            for warning in result.warnings:
                typer.echo(f"warning: {warning}")


def _grouped(skipped: list[dict]) -> list[tuple[str, list[str]]]:
    """Skipped entries, those skipped for one reason together (in order): a first run over a long run
    passes over hundreds of old checkpoints, which is one line, not hundreds."""
    groups: dict[str, list[str]] = {}
    for item in skipped:
        groups.setdefault(item["reason"], []).append(item["path"])
    return list(groups.items())


INTERRUPTED = "interrupted; the store and earlier outputs are unchanged"


@contextmanager
def errors_as_exit(json_out: bool = False) -> Iterator[None]:
    """One line on stderr naming the file and the problem, and the documented exit code.

    With --json the same error is also one JSON object on stdout, so that `--json >> log`
    from cron keeps the failures beside the successes.
    """
    try:
        yield
    except PdtError as exc:
        _fail(str(exc), exc.exit_code, json_out, None if exc.path is None else str(exc.path))
    except KeyboardInterrupt:
        _fail(INTERRUPTED, EXIT_INTERRUPTED, json_out, None)
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except OSError as exc:  # the system refused where no boundary named the stake: one line, not a traceback
        error = os_error(exc, PdtError, "the operating system refused")
        _fail(str(error), error.exit_code, json_out, None if error.path is None else str(error.path))
    except Exception as exc:  # a bug: keep the traceback for the report, and still end with one line
        traceback.print_exc()
        _fail(f"unexpected {type(exc).__name__}: {exc} (a bug in pdt; the traceback above helps to fix it)", 1,
              json_out, None)


def _fail(message: str, code: int, json_out: bool, path: str | None) -> None:
    who = f"[rank {launched_rank()}] " if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else ""
    typer.echo(f"pdt: {who}error: {message}" if code != EXIT_INTERRUPTED else f"pdt: {who}{message}", err=True)
    if json_out and launched_rank() == 0:
        _json_line({"status": "error" if code != EXIT_INTERRUPTED else "interrupted", "exit_code": code,
                    "error": message, "path": path})
    raise typer.Exit(code)


@app.command(cls=PdtCommand, short_help="Ingest new checkpoints into the store (the newest h).")
def snapshot(target: Target, store: Store = None, history: History = None, start: Start = None, every: Every = None,
             include: Include = None,
             exclude: Exclude = None, store_dtype: StoreDtype = None, order: Order = None, files: Files = None,
             rebuild: Rebuild = False, threads: Threads = None, wait: Wait = D["wait"], backend: Backend = D["backend"],
             dist_timeout: DistTimeout = D["dist_timeout"], json_out: Json = False, strict: Strict = False,
             verbose: Verbose = False) -> None:
    """Ingest the checkpoints the store has not seen (only the newest h are kept).

    \b
    Examples:
      pdt snapshot runs/exp1/ckpts
      pdt snapshot runs/exp1/ckpts --order step        # by the step saved inside
      pdt snapshot runs/exp1/ckpts --files 'ckpt-*.pt' # only these names
      pdt snapshot runs/exp1/ckpts --rebuild           # after a damaged store
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, threads=threads, wait=wait, history=history, include=include, exclude=exclude,
                     store_dtype=store_dtype, order=order, files=files, start=start, every=every, backend=backend,
                     dist_timeout=dist_timeout)
        result = api.snapshot(target, store=store, rebuild=rebuild, settings=s)
        if strict and result.needed and result.status != "up-to-date":
            result.status = "waiting"
        finish(result, json_out=json_out, strict=strict)


@app.command(cls=PdtCommand, short_help="Ingest, fit DMD, mask, write the fused checkpoint.")
def predict(target: Target, store: Store = None, output: Output = None, dry_run: DryRun = False, force: Force = False,
            in_place: InPlace = None, history: History = None, start: Start = None, every: Every = None,
            tau: Tau = None, modes: Modes = None,
            rank: Rank = None, rtol: Rtol = None, dmd_scope: DmdScope = None, criteria: Criteria = None,
            random: Random = None, seed: Seed = None, include: Include = None, exclude: Exclude = None,
            store_dtype: StoreDtype = None, order: Order = None, files: Files = None, device: Device = D["device"],
            block: Block = D["block"],
            threads: Threads = None, wait: Wait = D["wait"], backend: Backend = D["backend"],
            dist_timeout: DistTimeout = D["dist_timeout"], verify: Verify = None,
            verify_timeout: VerifyTimeout = D["verify_timeout"], json_out: Json = False, strict: Strict = False,
            verbose: Verbose = False) -> None:
    """Ingest new checkpoints, fit DMD, mask, and write the fused checkpoint next to the newest.

    Options marked "kept" take, when not given, the value the last predict ran with (kept in the store).

    \b
    Examples:
      pdt predict runs/exp1/ckpts            # exits 0 when there is nothing to do
      pdt predict runs/exp1/ckpts --dry-run --json
      pdt predict runs/exp1/ckpts -o a.pt    # an audit copy; the window unchanged
      pdt predict runs/exp1/ckpts --in-place # over the newest; undo: pdt restore
      pdt predict runs/exp1/ckpts --start 10 --every 2   # Algorithm 1's T_0, T_i
      pdt predict runs/exp1/ckpts --verify 'python eval.py {}'  # see --verify
    From cron (one JSON line per run; name pdt by its path, `command -v pdt`):
      */30 * * * * /opt/venv/bin/pdt predict /data/r1 --json >> /data/r1/pdt.log
    On many nodes (each rank reads its share; see the README):
      torchrun --nnodes 8 --nproc-per-node 1 ... -m pdtcli predict /shared/r1
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, device=device, block=block, threads=threads, wait=wait, history=history,
                     include=include, exclude=exclude, store_dtype=store_dtype, order=order, files=files, tau=tau,
                     modes=modes, rank=rank, rtol=rtol, dmd_scope=dmd_scope, criteria=criteria, random=random,
                     seed=seed, start=start, every=every, backend=backend, dist_timeout=dist_timeout,
                     in_place=in_place, verify=verify, verify_timeout=verify_timeout)
        result = api.predict(target, store=store, output=output, dry_run=dry_run, force=force, settings=s)
        finish(result, json_out=json_out, strict=strict)


@app.command("mask", cls=PdtCommand, short_help="Mask again from the stored fit (the paper's ablations).")
def mask_cmd(target: Target, store: Store = None, criteria: Criteria = None, random: Random = None,
             seed: Seed = None, device: Device = D["device"], block: Block = D["block"], threads: Threads = None,
             wait: Wait = D["wait"],
             backend: Backend = D["backend"], dist_timeout: DistTimeout = D["dist_timeout"], json_out: Json = False,
             verbose: Verbose = False) -> None:
    """Mask again from the stored fit with other settings (the paper's ablations); no new fit.

    \b
    Examples:
      pdt mask runs/exp1/ckpts --criteria lower,upper  # eq. 6 alone
      pdt mask runs/exp1/ckpts --criteria none  # non-selective Koopman training
      pdt mask runs/exp1/ckpts --random --seed 1  # random, at the mask's ratio
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, device=device, block=block, threads=threads, wait=wait, criteria=criteria,
                     random=random, seed=seed, backend=backend, dist_timeout=dist_timeout)
        finish(api.remask(target, store=store, settings=s), json_out=json_out, strict=False)


@app.command("apply", cls=PdtCommand, short_help="Write the fused checkpoint from the stored fit and mask.")
def apply_cmd(target: Target, store: Store = None, output: Output = None, force: Force = False,
              in_place: InPlace = None, device: Device = D["device"], block: Block = D["block"],
              threads: Threads = None, wait: Wait = D["wait"], backend: Backend = D["backend"],
              dist_timeout: DistTimeout = D["dist_timeout"], verify: Verify = None,
              verify_timeout: VerifyTimeout = D["verify_timeout"], json_out: Json = False,
              verbose: Verbose = False) -> None:
    """Write the fused checkpoint from the stored fit and mask: the default output, or an audit copy.

    \b
    Examples:
      pdt apply runs/exp1/ckpts --force             # after pdt mask
      pdt apply runs/exp1/ckpts -o /tmp/audit.pt
      pdt apply runs/exp1/ckpts --verify './eval.sh {}'  # exit 0 keeps it
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, device=device, block=block, threads=threads, wait=wait, backend=backend,
                     dist_timeout=dist_timeout, in_place=in_place, verify=verify, verify_timeout=verify_timeout)
        result = api.apply(target, store=store, output=output, force=force, settings=s)
        finish(result, json_out=json_out, strict=False)


@app.command(cls=PdtCommand, short_help="Undo the latest --in-place write.")
def restore(target: Target, store: Store = None, path: Annotated[Optional[Path], typer.Option(
        "--path", metavar="PATH", help="Undo the latest in-place write to this file [default: the latest of all].")]
            = None, force: Annotated[bool, typer.Option(
                "--force", metavar="", help="Restore even if training has saved over pdt's output since.")] = False,
            wait: Wait = D["wait"], json_out: Json = False, verbose: Verbose = False) -> None:
    """Put back the checkpoint that `--in-place` replaced, and drop the fused state from the window.

    \b
    Example:
      pdt restore runs/exp1/ckpts
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, wait=wait)
        finish(api.restore(target, store=store, path=path, force=force, settings=s), json_out=json_out, strict=False)


@app.command(cls=PdtCommand, short_help="Audit: what the mask accepted, the fit, the history.")
def report(target: Target, store: Store = None, top: Annotated[
        Optional[int], typer.Option("--top", help="Show only the N largest tensors.", metavar="N")] = None,
           plot: Annotated[Optional[Path], typer.Option(
               "--plot", metavar="FILE", help="Also draw the accepted ratio per layer type and the rejections per "
               "criterion across the history, and the fit's eigenvalues, into FILE (.png, .svg or .pdf; needs "
               "matplotlib: pip install 'pdtcli[plot]').")] = None,
           wait: Wait = D["wait"], json_out: Json = False) -> None:
    """Per tensor, per layer type and model: accepted elements and which criterion rejected the rest;
    the DMD fit; and the mask ratio of every past step.

    \b
    Examples:
      pdt report runs/exp1/ckpts
      pdt report runs/exp1/ckpts --json | jq .model
      pdt report runs/exp1/ckpts --plot pdt.png
    """
    with errors_as_exit(json_out):
        if top is not None and top < 1:
            raise UsageError(f"--top {top}: the least is 1")
        data = build_report(api.load_state(target, store=store, lock_timeout=wait, writes=plot))
        if data["unlocked"]:
            typer.echo(f"pdt: note: {data['store']}: {data['unlocked']}", err=True)
        for note in data["notes"]:
            typer.echo(f"pdt: note: {data['store']}: {note}", err=True)
        if plot is not None:
            from .plot import plot_report  # matplotlib only when a picture is asked for

            data["plot"] = str(plot_report(data, plot))
        if json_out:
            _json_line(data)
            return
        with stdout_reader_may_leave():
            render_report(data, out, top=top)
            if plot is not None:
                out.print(f"plot: {plot}")


def version_callback(value: bool) -> None:
    if value:
        print(f"pdt {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                              help="Print the version and exit.")] = False) -> None:
    """pdt: Predictive Differential Training on saved checkpoints."""


def run() -> None:
    app(prog_name="pdt")


if __name__ == "__main__":
    sys.exit(run())
