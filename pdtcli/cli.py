"""The `pdt` command: parse options, call `pdtcli.api`, render. Nothing else lives here.

Every flag is made from its declaration in `pdtcli.options` (default, help, limits), and the
values go to `Settings.build`, which checks them: an invalid one is exit 2 before any work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, api
from .errors import PdtError, os_error
from .options import OPTIONS, Settings
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

app = typer.Typer(
    help="Predictive Differential Training on saved checkpoints: fit DMD to the last h checkpoints, "
    "predict tau checkpoints ahead, keep the predictions the mask trusts, write a fused checkpoint.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
)
out = Console()
err = Console(stderr=True)
log = logging.getLogger("pdtcli")


def flag(name: str) -> Any:
    """The Typer option for `OPTIONS[name]`: flags, help, limits and shown default in one place."""
    option = OPTIONS[name]
    kwargs: dict[str, Any] = {"help": option.help}
    if isinstance(option.default, bool):
        kwargs["metavar"] = ""  # a flag takes no value
    elif option.metavar:
        kwargs["metavar"] = option.metavar
    if option.min is not None:
        kwargs["min"] = option.min
    if option.shown_default is not None:
        kwargs["show_default"] = option.shown_default
    return typer.Option(*option.flags, **kwargs)


D = {name: option.default for name, option in OPTIONS.items()}
Target = Annotated[Path, typer.Argument(help="Checkpoint folder, or its .pdt store folder / store.h5.",
                                        show_default=False, metavar="DIR")]
Store = Annotated[Optional[Path], flag("store")]
Output = Annotated[Optional[Path], flag("output")]
DryRun = Annotated[bool, flag("dry_run")]
Force = Annotated[bool, flag("force")]
InPlace = Annotated[bool, flag("in_place")]
History = Annotated[Optional[int], flag("history")]
Start = Annotated[Optional[int], flag("start")]
Every = Annotated[Optional[int], flag("every")]
Tau = Annotated[int, flag("tau")]
Modes = Annotated[str, flag("modes")]
Rank = Annotated[Optional[int], flag("rank")]
Rtol = Annotated[float, flag("rtol")]
Criteria = Annotated[str, flag("criteria")]
Random = Annotated[bool, flag("random")]
Seed = Annotated[int, flag("seed")]
Include = Annotated[Optional[list[str]], flag("include")]
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


def _show(result: api.StepResult, json_out: bool) -> None:
    payload = result.as_dict()
    if json_out:
        if result.tensors is not None:
            payload["tensors"] = result.tensors
        print(json.dumps(payload, indent=2, default=str))
        return
    for item in result.skipped:
        typer.echo(f"skipped {item['path']}: {item['reason']}", err=True)
    if result.status in ("written", "dry-run", "masked"):
        render_summary(payload, result.tensors, out)
    else:
        typer.echo(result.message)
        for warning in result.warnings:  # what the lineage showed, whatever else the run did
            typer.echo(f"warning: {warning}")


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
        print(json.dumps({"status": "error" if code != EXIT_INTERRUPTED else "interrupted", "exit_code": code,
                          "error": message, "path": path}))
    raise typer.Exit(code)


@app.command()
def snapshot(target: Target, store: Store = None, history: History = None, start: Start = None, every: Every = None,
             include: Include = None,
             exclude: Exclude = None, store_dtype: StoreDtype = None, order: Order = None, files: Files = None,
             rebuild: Rebuild = False, threads: Threads = None, wait: Wait = D["wait"], backend: Backend = D["backend"],
             dist_timeout: DistTimeout = D["dist_timeout"], json_out: Json = False, strict: Strict = False,
             verbose: Verbose = False) -> None:
    """Ingest the checkpoints the store has not seen (only the newest h are kept).

    Examples:

    - `pdt snapshot runs/exp1/ckpts`
    - `pdt snapshot runs/exp1/ckpts --order step` (names carry no step; use the one saved inside)
    - `pdt snapshot runs/exp1/ckpts --files 'ckpt-*.pt'` (other .pt files in the folder are not checkpoints)
    - `pdt snapshot runs/exp1/ckpts --rebuild` (after `pdt` reported a damaged store)
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, threads=threads, wait=wait, history=history, include=include, exclude=exclude,
                     store_dtype=store_dtype, order=order, files=files, start=start, every=every, backend=backend,
                     dist_timeout=dist_timeout)
        result = api.snapshot(target, store=store, rebuild=rebuild, settings=s)
        if strict and result.needed and result.status != "up-to-date":
            result.status = "waiting"
        finish(result, json_out=json_out, strict=strict)


@app.command()
def predict(target: Target, store: Store = None, output: Output = None, dry_run: DryRun = False, force: Force = False,
            in_place: InPlace = False, history: History = None, start: Start = None, every: Every = None,
            tau: Tau = D["tau"], modes: Modes = D["modes"],
            rank: Rank = None, rtol: Rtol = D["rtol"], criteria: Criteria = D["criteria"], random: Random = False,
            seed: Seed = D["seed"], include: Include = None, exclude: Exclude = None, store_dtype: StoreDtype = None,
            order: Order = None, files: Files = None, device: Device = D["device"], block: Block = D["block"],
            threads: Threads = None, wait: Wait = D["wait"], backend: Backend = D["backend"],
            dist_timeout: DistTimeout = D["dist_timeout"], json_out: Json = False, strict: Strict = False,
            verbose: Verbose = False) -> None:
    """Ingest new checkpoints, fit DMD, mask, and write the fused checkpoint next to the newest.

    Examples:

    - `pdt predict runs/exp1/ckpts` (cron-friendly: exits 0 when there is nothing to do)
    - `pdt predict runs/exp1/ckpts --dry-run --json`
    - `pdt predict runs/exp1/ckpts --tau 3 -o /tmp/audit.pt --force` (an audit copy; the window is unchanged)
    - `pdt predict runs/exp1/ckpts --in-place` (training always resumes from last.pt; undo: `pdt restore`)
    - `pdt predict runs/exp1/ckpts --start 10 --every 2` (Algorithm 1's T_0 and T_i; other runs only ingest)
    - `*/30 * * * * pdt predict /data/run1/ckpts --json >> /data/run1/pdt.log` (cron; errors are logged as JSON too)
    - `torchrun --nnodes 8 --nproc-per-node 1 ... -m pdtcli predict /shared/run1/ckpts` (each rank its share of
      a sharded checkpoint; see the README)
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, device=device, block=block, threads=threads, wait=wait, history=history,
                     include=include, exclude=exclude, store_dtype=store_dtype, order=order, files=files, tau=tau,
                     modes=modes, rank=rank, rtol=rtol, criteria=criteria, random=random, seed=seed, start=start,
                     every=every, backend=backend, dist_timeout=dist_timeout)
        result = api.predict(target, store=store, output=output, dry_run=dry_run, force=force, in_place=in_place,
                             settings=s)
        finish(result, json_out=json_out, strict=strict)


@app.command("mask")
def mask_cmd(target: Target, store: Store = None, criteria: Criteria = D["criteria"], random: Random = False,
             seed: Seed = D["seed"], device: Device = D["device"], block: Block = D["block"], threads: Threads = None,
             wait: Wait = D["wait"],
             backend: Backend = D["backend"], dist_timeout: DistTimeout = D["dist_timeout"], json_out: Json = False,
             verbose: Verbose = False) -> None:
    """Mask again from the stored fit with other settings (the paper's ablations); no new fit.

    Examples:

    - `pdt mask runs/exp1/ckpts --criteria lower,upper` (eq. 6 alone)
    - `pdt mask runs/exp1/ckpts --criteria none` (non-selective Koopman training)
    - `pdt mask runs/exp1/ckpts --random --seed 1` (random mask at the paper mask's ratio)
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, device=device, block=block, threads=threads, wait=wait, criteria=criteria,
                     random=random, seed=seed, backend=backend, dist_timeout=dist_timeout)
        finish(api.remask(target, store=store, settings=s), json_out=json_out, strict=False)


@app.command("apply")
def apply_cmd(target: Target, store: Store = None, output: Output = None, force: Force = False,
              in_place: InPlace = False, device: Device = D["device"], block: Block = D["block"],
              threads: Threads = None, wait: Wait = D["wait"], backend: Backend = D["backend"],
              dist_timeout: DistTimeout = D["dist_timeout"], json_out: Json = False, verbose: Verbose = False) -> None:
    """Write the fused checkpoint from the stored fit and mask: the default output, or an audit copy.

    Examples: `pdt apply runs/exp1/ckpts --force` (after `pdt mask`), `pdt apply runs/exp1/ckpts -o /tmp/audit.pt`
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, device=device, block=block, threads=threads, wait=wait, backend=backend,
                     dist_timeout=dist_timeout)
        result = api.apply(target, store=store, output=output, force=force, in_place=in_place, settings=s)
        finish(result, json_out=json_out, strict=False)


@app.command()
def restore(target: Target, store: Store = None, path: Annotated[Optional[Path], typer.Option(
        "--path", metavar="PATH", help="Undo the latest in-place write to this file [default: the latest of all].")]
            = None, force: Annotated[bool, typer.Option(
                "--force", metavar="", help="Restore even if training has saved over pdt's output since.")] = False,
            wait: Wait = D["wait"], json_out: Json = False, verbose: Verbose = False) -> None:
    """Put back the checkpoint that `--in-place` replaced, and drop the fused state from the window.

    Example: `pdt restore runs/exp1/ckpts`
    """
    with errors_as_exit(json_out):
        s = settings(json_out, verbose, wait=wait)
        finish(api.restore(target, store=store, path=path, force=force, settings=s), json_out=json_out, strict=False)


@app.command()
def report(target: Target, store: Store = None, top: Annotated[
        Optional[int], typer.Option("--top", help="Show only the N largest tensors.", min=1)] = None,
           plot: Annotated[Optional[Path], typer.Option(
               "--plot", metavar="FILE", help="Also draw the masked ratio per layer type and the rejections per "
               "criterion across the history, and the fit's eigenvalues, into FILE (.png, .svg or .pdf; needs "
               "matplotlib: pip install 'pdtcli[plot]').")] = None,
           wait: Wait = D["wait"], json_out: Json = False) -> None:
    """Per tensor, per layer type and model: accepted elements and which criterion rejected the rest;
    the DMD fit; and the mask ratio of every past step.

    Examples: `pdt report runs/exp1/ckpts`, `pdt report runs/exp1/ckpts --json | jq .model`,
    `pdt report runs/exp1/ckpts --plot pdt.png`
    """
    with errors_as_exit(json_out):
        data = build_report(api.load_state(target, store=store, lock_timeout=wait, writes=plot))
        if data["unlocked"]:
            typer.echo(f"pdt: note: {data['store']}: {data['unlocked']}", err=True)
        if plot is not None:
            from .plot import plot_report  # matplotlib only when a picture is asked for

            data["plot"] = str(plot_report(data, plot))
        if json_out:
            print(json.dumps(data, indent=2, default=str))
        else:
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
