"""Training order: which of a folder's checkpoints came first.

One of three rules, fixed when the store is made: `name`, the last number in the name
(natural order: epoch_9 before epoch_10); `step`, the step the checkpoint records inside
(Lightning's `global_step`, the Trainer's `trainer_state.json`, an optimizer's step count);
`mtime`, the modification time. `auto` takes the strongest evidence that settles the order
(`resolve_order`), and is an error otherwise, never a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from .discover import NUMBER, Candidate, stem
from .errors import CheckpointError, NotACheckpoint, UsageError
from .formats import open_checkpoint

ORDERS = ("auto", "name", "step", "mtime")


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
    named = [c for c in candidates if len(NUMBER.findall(stem(c.path))) == 1]
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
        found = NUMBER.findall(stem(cand.path))
        if len(found) != 1:
            what = "holds no number" if not found else f"holds several numbers ({', '.join(found)})"
            raise UsageError(f"cannot tell the training order: {cand.path.name} {what} and records no step inside; "
                             + _WAY_OUT, cand.path.parent)
        other = numbers.setdefault(cand.name_step, cand)
        if other is not cand:
            raise UsageError(f"cannot tell the training order: {other.path.name} and {cand.path.name} hold the same "
                             f"number and record no step inside; " + _WAY_OUT, cand.path.parent)
