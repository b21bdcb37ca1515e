"""Finding the training checkpoints in a folder, in training order.

Training order is one of three rules, fixed when the store is made:
`name`, the last number in the name (natural order: epoch_9 before epoch_10);
`step`, the step the checkpoint records inside (Lightning's `global_step`, Trainer's
`trainer_state.json`, a `step` entry); `mtime`, the modification time. `auto` takes the
strongest evidence that settles the order (`resolve_order`), and is an error otherwise.
pdt's own outputs (`*.pdt.*`, and any path the store recorded as an output) and Lightning's
`last.ckpt` beside its step checkpoints are never training checkpoints. A file with a checkpoint
suffix that holds no tensors (`hparams.pt`) is passed over with a note, and `--files` globs
say which names are checkpoints when a folder holds other files with the same suffixes.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

from .errors import CheckpointError, NotACheckpoint, UsageError
from .formats import CHECKPOINT_SUFFIXES, OUTPUT_SUFFIXES, folder_format, open_checkpoint
from .identity import stat_of

OUTPUT_TAG = ".pdt"
_NUMBER = re.compile(r"(\d+)")
LIGHTNING_LAST = re.compile(r"last(-v\d+)?\.ckpt")  # ModelCheckpoint(save_last=True), versioned when taken


ORDERS = ("auto", "name", "step", "mtime")


@dataclass(frozen=True)
class Candidate:
    path: Path
    name_step: int | None
    mtime: float
    size: int
    recorded_step: int | None = None


def order_key(item: Candidate | dict, rule: str) -> tuple:
    """The sort key of a candidate or a store record under an order rule; ties go by modification time."""
    get = item.get if isinstance(item, dict) else lambda key: getattr(item, key)
    if rule == "mtime":
        return (get("mtime"),)
    step = get("recorded_step") if rule == "step" else get("name_step")
    return (step is None, step if step is not None else 0, get("mtime"))


def with_recorded_step(cand: Candidate) -> Candidate:
    """The candidate with the step its file records; a checkpoint that records none is an error."""
    with open_checkpoint(cand.path) as reader:
        step = reader.recorded_step()
    if step is None:
        raise CheckpointError("records no step inside; order by --order name or --order mtime", cand.path)
    return replace(cand, recorded_step=step)


def located(path: Path) -> str:
    """How the store names a checkpoint or output: its folder resolved, its own name kept, so a
    link stays the link (and is never mistaken for, or written as, the file it points to)."""
    path = Path(path)
    return str(path.parent.resolve() / path.name)


def resolve_order(rule: str, candidates: list[Candidate]) -> tuple[str, list[Candidate], list[Candidate]]:
    """The concrete rule for `auto`, the candidates with their recorded steps read when the rule needs
    them, and the files found to hold no state dict on the way (they must not decide the order for the
    real checkpoints).

    `auto` takes the strongest evidence: the step every checkpoint records inside (Lightning's
    `global_step`, the Trainer's `trainer_state.json`, an optimizer's step count), else the number in
    every name, else modification times when no name has a number. Evidence that does not settle
    the order is a UsageError naming `--order`, never a guess: names whose numbers disagree with the
    steps recorded inside, or (without steps) a name with several numbers (`epoch=5-val_loss=0.3099`)
    or two names with the same number.
    """
    if rule == "auto":
        stepped, dropped = _with_steps(candidates, _recorded)
        if all(c.recorded_step is not None for c in stepped):
            _names_agree(stepped)
            return "step", stepped, dropped
        if all(c.name_step is None for c in stepped):
            return "mtime", stepped, dropped
        _names_settle(stepped)
        return "name", stepped, dropped
    if rule == "step":
        return (rule, *_with_steps(candidates, with_recorded_step))
    return rule, candidates, []


def _with_steps(candidates: list[Candidate], read: Callable[[Candidate], Candidate]
                ) -> tuple[list[Candidate], list[Candidate]]:
    """(the candidates with the steps `read` found in them, those that hold no state dict)."""
    kept, dropped = [], []
    for cand in candidates:
        try:
            kept.append(read(cand))
        except NotACheckpoint:
            dropped.append(cand)
    return kept, dropped


def _recorded(cand: Candidate) -> Candidate:
    """The candidate with the step its file records, if it records one (NotACheckpoint: it holds no tensors)."""
    with open_checkpoint(cand.path) as reader:
        return replace(cand, recorded_step=reader.recorded_step())


_WAY_OUT = "pass --order step, --order name (the last number in each name) or --order mtime"


def _names_agree(candidates: list[Candidate]) -> None:
    """Names that each hold one number must order the checkpoints as the steps recorded inside do."""
    named = [c for c in candidates if len(_NUMBER.findall(_stem(c.path))) == 1]
    by_step = sorted(named, key=lambda c: (c.recorded_step, c.name_step))
    for before, after in zip(by_step, by_step[1:], strict=False):
        if before.name_step > after.name_step and before.recorded_step < after.recorded_step:
            raise UsageError(f"the names and the steps recorded inside disagree on the training order: "
                             f"{before.path.name} records step {before.recorded_step}, {after.path.name} step "
                             f"{after.recorded_step}; pass --order step or --order name", before.path.parent)


def _names_settle(candidates: list[Candidate]) -> None:
    """Without steps inside, every name must hold exactly one number, each a different one."""
    numbers: dict[int, Candidate] = {}
    for cand in candidates:
        found = _NUMBER.findall(_stem(cand.path))
        if len(found) != 1:
            what = "holds no number" if not found else f"holds several numbers ({', '.join(found)})"
            raise UsageError(f"cannot tell the training order: {cand.path.name} {what} and records no step inside; "
                             + _WAY_OUT, cand.path.parent)
        other = numbers.setdefault(cand.name_step, cand)
        if other is not cand:
            raise UsageError(f"cannot tell the training order: {other.path.name} and {cand.path.name} hold the same "
                             f"number and record no step inside; " + _WAY_OUT, cand.path.parent)


def _stem(path: Path) -> str:
    return path.name if path.is_dir() else path.stem


def name_step(path: Path) -> int | None:
    """The last number in the name (a file's stem), which is the step or epoch by convention."""
    numbers = _NUMBER.findall(_stem(path))
    return int(numbers[-1]) if numbers else None


def is_pdt_output(path: Path) -> bool:
    return OUTPUT_TAG + "." in path.name or path.stem.endswith(OUTPUT_TAG) or path.name.endswith(OUTPUT_TAG)


def output_name(newest: Path) -> Path:
    """Where the fused checkpoint goes by default: next to the newest, tagged as pdt's.

    The tag goes before a compound suffix that the format insists on (Keras loads only
    names ending in `.weights.h5`), else before the last suffix; a folder gets it at the end.
    """
    if newest.is_dir():
        return newest.with_name(newest.name + OUTPUT_TAG)
    for compound in OUTPUT_SUFFIXES:
        if newest.name.endswith(compound):
            return newest.with_name(f"{newest.name[: -len(compound)]}{OUTPUT_TAG}{compound}")
    return newest.with_name(f"{newest.stem}{OUTPUT_TAG}{newest.suffix}")


def is_checkpoint(path: Path) -> bool:
    """A file with a checkpoint suffix, or a folder in a checkpoint-folder format."""
    if path.is_dir():
        return folder_format(path) is not None
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def list_checkpoints(folder: Path, known_outputs: set[str] = frozenset(),
                     files: tuple[str, ...] | None = None) -> list[Candidate]:
    """The checkpoints (files, or Trainer/DCP folders) directly in `folder`, unsorted: the
    order rule may need what is recorded inside, which is read only for unseen ones.
    `files`: globs on the name; only matching entries are checkpoints. Lightning's `last.ckpt`
    (`save_last`) is a copy of, or a link to, a checkpoint saved beside it: never one of its own
    while the folder holds other `.ckpt` files (it would enter the window twice)."""
    found = []
    for path in folder.iterdir():
        if path.name.startswith(".") or is_pdt_output(path) or not is_checkpoint(path):
            continue
        if files and not any(fnmatchcase(path.name, pattern) for pattern in files):
            continue
        if located(path) in known_outputs:
            continue
        size, mtime = stat_of(path)
        found.append(Candidate(path, name_step(path), mtime, size))
    if any(not LIGHTNING_LAST.fullmatch(c.path.name) and c.path.suffix == ".ckpt" for c in found):
        found = [c for c in found if not LIGHTNING_LAST.fullmatch(c.path.name)]
    return found


def _readable_with_checkpoints(folder: Path, files: tuple[str, ...] | None) -> bool:
    try:
        return bool(list_checkpoints(folder, files=files))
    except OSError:  # a sub-folder we may not read is not one to suggest
        return False


def no_checkpoints_here(folder: Path, files: tuple[str, ...] | None = None) -> str | None:
    """Why `folder` cannot be a checkpoint folder (nothing in it looks like one), naming the
    sub-folders that do hold checkpoints, as a user who gave the parent folder needs; or None."""
    if list_checkpoints(folder, files=files):
        return None
    where = f" matching --files {' '.join(files)}" if files else ""
    message = f"no checkpoints here{where} (files {', '.join(CHECKPOINT_SUFFIXES)}, or Trainer/DCP folders)"
    holding = sorted(f"{sub.name}/" for sub in folder.iterdir()
                     if sub.is_dir() and not sub.name.startswith(".") and not is_checkpoint(sub)
                     and _readable_with_checkpoints(sub, files))
    if holding:
        message += "; sub-folders that hold checkpoints: " + ", ".join(holding[:5]) + (" …" if len(holding) > 5 else "")
    return message
