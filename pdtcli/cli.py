"""The `pdt` command: parse options, call `pdtcli.api`, render. Nothing else lives here."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__, api
from .dmd import MODES, FitOptions
from .errors import PdtError
from .fuse import DEFAULT_BLOCK
from .mask import CRITERIA, MaskOptions
from .options import DEFAULT_STORE_DTYPE, DEFAULT_WAIT
from .report import build_report, render_report, render_summary, tensor_rows
from .selection import Selection

FIT = FitOptions()  # the defaults the options show
EXIT_WAITING = 10
EXIT_UP_TO_DATE = 11

EPILOG = """Exit codes: 0 done (also 'nothing new' and 'waiting for checkpoints', unless --strict);
1 unexpected error; 2 bad usage (a path that does not exist, a folder with no checkpoints);
3 bad checkpoint; 4 store problem (other folder, newer pdt, damaged, locked);
5 output exists or cannot be written; 6 a stage is missing (apply before predict);
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

Target = Annotated[Path, typer.Argument(help="Checkpoint folder, or a store folder / store.h5.", show_default=False,
                                        metavar="DIR")]
StoreOpt = Annotated[Optional[Path], typer.Option("--store", help="Store folder [default: DIR/.pdt].", metavar="PATH")]
JsonOpt = Annotated[bool, typer.Option("--json", metavar="", help="Print the result as JSON on stdout (errors too).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda.")]
BlockOpt = Annotated[int, typer.Option("--block", help="Elements per row block (bounds memory).", min=8)]
WaitOpt = Annotated[float, typer.Option("--wait", help="Seconds to wait for another pdt's lock.", min=0)]
StrictOpt = Annotated[bool, typer.Option(
    "--strict", metavar="", help="Exit 10 when waiting for checkpoints, 11 when nothing is new.")]
FilesOpt = Annotated[Optional[list[str]], typer.Option(
    "--files", metavar="GLOB", help="Only names matching this glob are checkpoints (repeatable; kept in the store "
    "for later runs).")]
HistoryOpt = Annotated[Optional[int], typer.Option(
    "--history", help="Snapshots in the window, h [default: 5; fixed when the store is made].", min=2)]
IncludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--include", help="Also predict tensors matching this glob (repeatable).")]
ExcludeOpt = Annotated[Optional[list[str]], typer.Option(
    "--exclude", help="Never predict tensors matching this glob (repeatable).")]
OrderOpt = Annotated[Optional[str], typer.Option(
    "--order", help="Training order: auto | name (step number in the name) | step (recorded inside) | mtime "
    "[default: auto; fixed when the store is made].")]
StoreDtypeOpt = Annotated[str, typer.Option("--store-dtype", help="float32 | float64, when the store is made.")]
TauOpt = Annotated[int, typer.Option("--tau", help="Checkpoints to predict ahead.", min=1)]
ModesOpt = Annotated[str, typer.Option("--modes", help="exact | projected (the paper's eq. 11).")]
RankOpt = Annotated[Optional[int], typer.Option("--rank", help="Fixed DMD rank instead of --rtol.", min=1)]
RtolOpt = Annotated[float, typer.Option("--rtol", help="Keep singular values above rtol x the largest.")]
CriteriaOpt = Annotated[str, typer.Option("--criteria", help="all | none | comma list of lower,upper,sign.")]
RandomOpt = Annotated[bool, typer.Option("--random", metavar="",
                                          help="Audit: random mask at the criteria's per-tensor ratio.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of --random.")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="PATH", help="Write an audit copy here instead; training is taken to resume from the "
    "default output, NAME.pdt.EXT beside the newest checkpoint, which alone enters the window.")]
ForceOpt = Annotated[bool, typer.Option("--force", metavar="", help="Replace an existing output.")]
InPlaceOpt = Annotated[bool, typer.Option(
    "--in-place", metavar="", help="Write over the newest checkpoint (for scripts that resume from one path); "
    "a backup is kept, and `pdt restore` puts it back. Refused when that checkpoint is a symbolic link.")]


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


def parse_criteria(text: str) -> tuple[str, ...]:
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words == ["all"]:
        return CRITERIA
    if words == ["none"]:
        return ()
    unknown = [w for w in words if w not in CRITERIA]
    if unknown or not words:
        raise typer.BadParameter(f"{text!r}: use all, none, or a comma list of {', '.join(CRITERIA)}")
    return tuple(words)


def settings(*, json_out: bool, device: str = "auto", block: int = DEFAULT_BLOCK, wait: float = DEFAULT_WAIT,
             history: int | None = None, include=None, exclude=None, store_dtype: str = DEFAULT_STORE_DTYPE,
             order: str | None = None, files: list[str] | None = None,
             tau: int = FIT.tau, modes: str = FIT.modes, rank: int | None = None, rtol: float = FIT.rtol,
             criteria: str = "all", random: bool = False, seed: int = 0) -> api.Settings:
    if modes not in MODES:
        raise typer.BadParameter(f"--modes {modes!r}: use one of {', '.join(MODES)}")
    if device not in ("auto", "cpu", "cuda"):
        raise typer.BadParameter(f"--device {device!r}: use auto, cpu or cuda")
    selection = Selection(tuple(include or ()), tuple(exclude or ())) if (include or exclude) else None
    return api.Settings(
        history=history,
        fit=FitOptions(tau=tau, modes=modes, rank=rank, rtol=rtol),
        mask=MaskOptions(parse_criteria(criteria), random, seed),
        selection=selection,
        device=device,
        block=block,
        store_dtype=store_dtype,
        order=order,
        files=tuple(files) if files else None,
        lock_timeout=wait,
        progress=RichProgress(enabled=not json_out),
    )


def finish(result: api.StepResult, *, json_out: bool, strict: bool, tensors: list[dict] | None = None) -> None:
    payload = result.as_dict()
    if json_out:
        if tensors is not None:
            payload["tensors"] = tensors
        print(json.dumps(payload, indent=2, default=str))
    else:
        for item in result.skipped:
            typer.echo(f"skipped {item['path']}: {item['reason']}", err=True)
        if result.status in ("written", "dry-run", "masked"):
            render_summary(payload, tensors, out)
        else:
            typer.echo(result.message)
    if strict and result.status == "waiting":
        raise typer.Exit(EXIT_WAITING)
    if strict and result.status == "up-to-date":
        raise typer.Exit(EXIT_UP_TO_DATE)


def _tensors(result: api.StepResult, target: Path, store: Path | None, wait: float) -> list[dict] | None:
    if not result.mask:
        return None
    data = api.load_state(target, store=store, lock_timeout=wait)
    return tensor_rows(data["state"]["layout"]["tensors"], data["counts"]) if data["counts"] else None


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
        _fail(INTERRUPTED, 130, json_out, None)
    except (typer.Exit, typer.Abort, typer.BadParameter):
        raise
    except Exception as exc:  # a bug: keep the traceback for the report, and still end with one line
        traceback.print_exc()
        _fail(f"unexpected {type(exc).__name__}: {exc} (a bug in pdt; the traceback above helps to fix it)", 1,
              json_out, None)


def _fail(message: str, code: int, json_out: bool, path: str | None) -> None:
    typer.echo(f"pdt: error: {message}" if code != 130 else f"pdt: {message}", err=True)
    if json_out:
        print(json.dumps({"status": "error" if code != 130 else "interrupted", "exit_code": code,
                          "error": message, "path": path}))
    raise typer.Exit(code)


@app.command()
def snapshot(target: Target, store: StoreOpt = None, history: HistoryOpt = None, include: IncludeOpt = None,
             exclude: ExcludeOpt = None, store_dtype: StoreDtypeOpt = DEFAULT_STORE_DTYPE, order: OrderOpt = None,
             files: FilesOpt = None, rebuild: Annotated[bool, typer.Option(
                 "--rebuild", metavar="", help="Set the store aside unread (it may be damaged) and ingest the "
                 "folder's newest checkpoints into a new one; backups are kept.")] = False,
             wait: WaitOpt = DEFAULT_WAIT, json_out: JsonOpt = False, strict: StrictOpt = False) -> None:
    """Ingest the checkpoints the store has not seen (only the newest h are kept).

    Examples:

    - `pdt snapshot runs/exp1/ckpts`
    - `pdt snapshot runs/exp1/ckpts --order step` (names carry no step; use the one saved inside)
    - `pdt snapshot runs/exp1/ckpts --files 'ckpt-*.pt'` (other .pt files in the folder are not checkpoints)
    - `pdt snapshot runs/exp1/ckpts --rebuild` (after `pdt` reported a damaged store)
    """
    with errors_as_exit(json_out):
        s = settings(json_out=json_out, wait=wait, history=history, include=include, exclude=exclude,
                     store_dtype=store_dtype, order=order, files=files)
        result = api.snapshot(target, store=store, rebuild=rebuild, settings=s)
        if strict and result.needed and result.status != "up-to-date":
            result.status = "waiting"
        finish(result, json_out=json_out, strict=strict)


@app.command()
def predict(target: Target, store: StoreOpt = None, output: OutputOpt = None, dry_run: Annotated[
        bool, typer.Option("--dry-run", metavar="", help="Fit and mask; write no checkpoint.")] = False,
            force: ForceOpt = False, in_place: InPlaceOpt = False, history: HistoryOpt = None, tau: TauOpt = FIT.tau,
            modes: ModesOpt = FIT.modes,
            rank: RankOpt = None, rtol: RtolOpt = FIT.rtol, criteria: CriteriaOpt = "all", random: RandomOpt = False,
            seed: SeedOpt = 0, include: IncludeOpt = None, exclude: ExcludeOpt = None,
            store_dtype: StoreDtypeOpt = DEFAULT_STORE_DTYPE, order: OrderOpt = None, files: FilesOpt = None,
            device: DeviceOpt = "auto", block: BlockOpt = DEFAULT_BLOCK, wait: WaitOpt = DEFAULT_WAIT,
            json_out: JsonOpt = False, strict: StrictOpt = False) -> None:
    """Ingest new checkpoints, fit DMD, mask, and write the fused checkpoint next to the newest.

    Examples:

    - `pdt predict runs/exp1/ckpts` (cron-friendly: exits 0 when there is nothing to do)
    - `pdt predict runs/exp1/ckpts --dry-run --json`
    - `pdt predict runs/exp1/ckpts --tau 3 -o /tmp/audit.pt --force` (an audit copy; the window is unchanged)
    - `pdt predict runs/exp1/ckpts --in-place` (training always resumes from last.pt; undo: `pdt restore`)
    - `*/30 * * * * pdt predict /data/run1/ckpts --json >> /data/run1/pdt.log` (cron; errors are logged as JSON too)
    """
    with errors_as_exit(json_out):
        s = settings(json_out=json_out, device=device, block=block, wait=wait, history=history, include=include,
                     exclude=exclude, store_dtype=store_dtype, order=order, files=files, tau=tau, modes=modes,
                     rank=rank, rtol=rtol, criteria=criteria, random=random, seed=seed)
        result = api.predict(target, store=store, output=output, dry_run=dry_run, force=force, in_place=in_place,
                             settings=s)
        finish(result, json_out=json_out, strict=strict, tensors=_tensors(result, target, store, wait))


@app.command("mask")
def mask_cmd(target: Target, store: StoreOpt = None, criteria: CriteriaOpt = "all", random: RandomOpt = False,
             seed: SeedOpt = 0, device: DeviceOpt = "auto", block: BlockOpt = DEFAULT_BLOCK,
             wait: WaitOpt = DEFAULT_WAIT, json_out: JsonOpt = False) -> None:
    """Mask again from the stored fit with other settings (the paper's ablations); no new fit.

    Examples:

    - `pdt mask runs/exp1/ckpts --criteria lower,upper` (eq. 6 alone)
    - `pdt mask runs/exp1/ckpts --criteria none` (non-selective Koopman training)
    - `pdt mask runs/exp1/ckpts --random --seed 1` (random mask at the paper mask's ratio)
    """
    with errors_as_exit(json_out):
        s = settings(json_out=json_out, device=device, block=block, wait=wait, criteria=criteria, random=random,
                     seed=seed)
        result = api.remask(target, store=store, settings=s)
        finish(result, json_out=json_out, strict=False, tensors=_tensors(result, target, store, wait))


@app.command("apply")
def apply_cmd(target: Target, store: StoreOpt = None, output: OutputOpt = None, force: ForceOpt = False,
              in_place: InPlaceOpt = False, device: DeviceOpt = "auto", block: BlockOpt = DEFAULT_BLOCK,
              wait: WaitOpt = DEFAULT_WAIT, json_out: JsonOpt = False) -> None:
    """Write the fused checkpoint from the stored fit and mask, to any path.

    Example: `pdt apply runs/exp1/ckpts -o runs/exp1/resume.pt --force`
    """
    with errors_as_exit(json_out):
        s = settings(json_out=json_out, device=device, block=block, wait=wait)
        result = api.apply(target, store=store, output=output, force=force, in_place=in_place, settings=s)
        finish(result, json_out=json_out, strict=False)


@app.command()
def restore(target: Target, store: StoreOpt = None, path: Annotated[Optional[Path], typer.Option(
        "--path", help="Undo the latest in-place write to this file [default: the latest of all].")] = None,
            force: Annotated[bool, typer.Option(
                "--force", metavar="", help="Restore even if training has saved over pdt's output since.")] = False,
            wait: WaitOpt = DEFAULT_WAIT, json_out: JsonOpt = False) -> None:
    """Put back the checkpoint that `--in-place` replaced, and drop the fused state from the window.

    Example: `pdt restore runs/exp1/ckpts`
    """
    with errors_as_exit(json_out):
        result = api.restore(target, store=store, path=path, force=force, settings=settings(json_out=json_out,
                                                                                           wait=wait))
        finish(result, json_out=json_out, strict=False)


@app.command()
def report(target: Target, store: StoreOpt = None, top: Annotated[
        Optional[int], typer.Option("--top", help="Show only the N largest tensors.", min=1)] = None,
           wait: WaitOpt = DEFAULT_WAIT, json_out: JsonOpt = False) -> None:
    """Per tensor, per layer type and model: accepted elements and which criterion rejected the rest;
    the DMD fit; and the mask ratio of every past step.

    Examples: `pdt report runs/exp1/ckpts`, `pdt report runs/exp1/ckpts --json | jq .model`
    """
    with errors_as_exit(json_out):
        data = build_report(api.load_state(target, store=store, lock_timeout=wait))
        if json_out:
            print(json.dumps(data, indent=2, default=str))
        else:
            render_report(data, out, top=top)


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
