"""Every option of a run, declared once: its default, its help, and what values it accepts.

The library takes a `Settings`; the CLI's flags are made from `OPTIONS` (so a default or a
help text is written once), and `Settings.build` turns the flat values a user gives, on the
command line or from Python, into checked settings: every invalid value is a `UsageError`
(exit 2) before any file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .dmd import MODES, FitOptions
from .errors import UsageError
from .fuse import DEFAULT_BLOCK
from .mask import CRITERIA, DEFAULT_CRITERIA, OFFICIAL_RULE, MaskOptions
from .order import ORDERS
from .progress import NoProgress, Progress
from .selection import Selection
from .store import STORE_DTYPES
from .world import BACKENDS, DEFAULT_TIMEOUT

DEFAULT_HISTORY = 5
DEFAULT_MASK = ",".join(DEFAULT_CRITERIA)
DEFAULT_WAIT = 60.0  # seconds a second pdt waits for the store's lock
DEVICES = ("auto", "cpu", "cuda")
FIT = FitOptions()


@dataclass(frozen=True)
class Option:
    """One flag: its name(s), default, help and the values it takes (for the CLI and for checks)."""

    flags: tuple[str, ...]
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    metavar: str | None = None
    shown_default: str | None = None  # what help shows when the default is None ("the store's")

    @property
    def value_name(self) -> str | None:
        """What help shows for the value (None for a flag): the metavar, the choices, else N or X."""
        if isinstance(self.default, bool):
            return None
        if self.metavar:
            return self.metavar
        if self.choices:
            return "|".join(self.choices)
        return "X" if isinstance(self.default, float) else "N"


OPTIONS: dict[str, Option] = {
    "store": Option(("--store",), None, "Store folder; never the checkpoint folder, above it, or at or inside a "
                    "checkpoint.", metavar="PATH", shown_default="DIR/.pdt (DIR.pdt/.pdt for accelerate)"),
    "output": Option(("--output", "-o"), None, "Write an audit copy here instead; training is taken to resume from "
                     "the default output, NAME.pdt.EXT beside the newest checkpoint (in DIR.pdt/ for Trainer and "
                     "accelerate folders), which alone enters the window. Its suffix is the checkpoint's own, or "
                     ".safetensors / .pt (the fused tensors only).",
                     metavar="PATH"),
    "dry_run": Option(("--dry-run",), False, "Fit and mask; write no checkpoint."),
    "force": Option(("--force",), False, "Replace an existing output: a regular file, or a folder pdt wrote; never "
                    "an input checkpoint, the checkpoint folder or the store."),
    "in_place": Option(("--in-place",), False, "Write over the newest checkpoint (for scripts that resume from one "
                       "path), keeping a backup for `pdt restore`; never through a symbolic link."),
    "history": Option(("--history",), None, "Snapshots in the window, h; fixed when the store is made.", min=2,
                      shown_default=str(DEFAULT_HISTORY)),
    "start": Option(("--start",), None, "Write a fused checkpoint only from this step on (Algorithm 1's T_0); fixed "
                    "once one is written.", min=0, shown_default="as soon as the window holds h"),
    "every": Option(("--every",), None, "Write one only after this many plain checkpoints since the last fused one "
                    "(Algorithm 1's T_i: 1 writes at every other checkpoint); fixed once one is written.", min=0,
                    shown_default="0: at every new checkpoint"),
    "tau": Option(("--tau",), FIT.tau, "Checkpoints to predict ahead.", min=1),
    "modes": Option(("--modes",), FIT.modes, "DMD modes; projected is the paper's eq. 11.", choices=MODES),
    "rank": Option(("--rank",), None, "Fixed DMD rank instead of --rtol.", min=1),
    "rtol": Option(("--rtol",), FIT.rtol, "Keep singular values above rtol x the largest."),
    "criteria": Option(("--criteria",), DEFAULT_MASK, "all (the paper's eqs. 6 and 7), official (the "
                       "official code's reading of them), none, or a comma list of lower,upper,sign; the default drops "
                       "eq. 6's lower bound (see the README).", metavar="LIST"),
    "random": Option(("--random",), False, "Audit: random mask at the criteria's per-tensor ratio."),
    "seed": Option(("--seed",), 0, "Seed of --random.", min=0),
    "include": Option(("--include",), None, "Also predict tensors matching this glob (repeatable).", metavar="GLOB"),
    "exclude": Option(("--exclude",), None, "Never predict tensors matching this glob (repeatable).",
                      metavar="GLOB"),
    "files": Option(("--files",), None, "Only names matching this glob are checkpoints (repeatable; kept in the "
                    "store for later runs).", metavar="GLOB"),
    "order": Option(("--order",), None, "Training order: auto takes the step recorded inside when every checkpoint "
                    "has one, else the number in the names (an error when they do not settle it); name: the last "
                    "number in the name; fixed when the store is made.", choices=ORDERS, shown_default="auto"),
    "store_dtype": Option(("--store-dtype",), None, f"How the store keeps values: {', '.join(STORE_DTYPES)}; "
                          "fixed when the store is made.", choices=tuple(STORE_DTYPES), metavar="DTYPE",
                          shown_default="the model's bf16 or fp16, else float32"),
    "device": Option(("--device",), "auto", "Where the arithmetic runs (auto: cuda if there is one).", choices=DEVICES),
    "block": Option(("--block",), None, "Elements per row block (bounds memory).", min=8,
                    shown_default=f"{DEFAULT_BLOCK['cpu']:,} on a CPU, {DEFAULT_BLOCK['cuda']:,} on CUDA"),
    "threads": Option(("--threads",), None, "CPU threads for the arithmetic (more gain little, and slow a busy "
                      "machine).",
                      min=1, shown_default="1, or OMP_NUM_THREADS when set"),
    "wait": Option(("--wait",), DEFAULT_WAIT, "Seconds to wait for another pdt's lock.", min=0, metavar="SECONDS"),
    "backend": Option(("--backend",), "auto", "Under torchrun: the process group's backend (auto: nccl when each "
                      "rank has a GPU, else gloo).", choices=BACKENDS),
    "dist_timeout": Option(("--dist-timeout",), DEFAULT_TIMEOUT, "Under torchrun: seconds a rank waits for the "
                           "others at each step before it gives up (exit 7).", min=1, metavar="SECONDS"),
    "rebuild": Option(("--rebuild",), False, "Set the store aside unread (it may be damaged) and ingest the folder's "
                      "newest checkpoints into a new one; backups are kept."),
    "json_out": Option(("--json",), False, "Print the result as one JSON line on stdout (JSON Lines; errors too)."),
    "strict": Option(("--strict",), False, "Exit 10 when waiting for checkpoints, 11 when nothing is new."),
    "verbose": Option(("--verbose", "-v"), False, "Say why checkpoints were skipped and fits reused (on stderr)."),
}


def mask_options(criteria: str, random: bool, seed: int) -> MaskOptions:
    """The mask of `--criteria`, `--random` and `--seed`; `official` is all three criteria under the official
    code's rule. Raises ValueError (a bad seed) and UsageError (bad criteria)."""
    if criteria.strip().lower() == OFFICIAL_RULE:
        return MaskOptions(CRITERIA, random, seed, OFFICIAL_RULE)
    return MaskOptions(parse_criteria(criteria), random, seed)


def parse_criteria(text: str) -> tuple[str, ...]:
    """`all`, `none`, or a comma list of criteria, as the mask takes them."""
    words = [w.strip().lower() for w in text.split(",") if w.strip()]
    if words == ["all"]:
        return CRITERIA
    if words == ["none"]:
        return ()
    unknown = [w for w in words if w not in CRITERIA]
    if unknown or not words:
        raise UsageError(f"--criteria {text!r}: use all, official, none, or a comma list of {', '.join(CRITERIA)}")
    return tuple(words)


def _check(name: str, value: Any) -> None:
    option = OPTIONS[name]
    if value is None:
        return
    if option.choices and value not in option.choices:
        raise UsageError(f"{option.flags[0]} {value!r}: use one of {', '.join(option.choices)}")
    if option.min is not None and value < option.min:
        raise UsageError(f"{option.flags[0]} {value}: the least is {option.min:g}")


@dataclass
class Settings:
    """What a run may change; everything has the paper's default. `None`: the store's value
    (or the default, for a new store)."""

    history: int | None = None
    fit: FitOptions = field(default_factory=FitOptions)
    mask: MaskOptions = field(default_factory=MaskOptions)
    selection: Selection | None = None
    device: str = "auto"
    block: int | None = None  # None: the device's default
    threads: int | None = None  # None: 1, or OMP_NUM_THREADS when set
    store_dtype: str | None = None
    order: str | None = None
    files: tuple[str, ...] | None = None  # globs naming the checkpoints
    start: int | None = None  # Algorithm 1's T_0
    every: int | None = None  # its T_i
    lock_timeout: float = DEFAULT_WAIT
    progress: Progress = field(default_factory=NoProgress)
    backend: str = "auto"  # under torchrun
    dist_timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        for name, value in (("history", self.history), ("device", self.device), ("block", self.block),
                            ("threads", self.threads),
                            ("store_dtype", self.store_dtype), ("order", self.order), ("wait", self.lock_timeout),
                            ("start", self.start), ("every", self.every), ("backend", self.backend),
                            ("dist_timeout", self.dist_timeout)):
            _check(name, value)

    @classmethod
    def build(cls, *, tau: int = FIT.tau, modes: str = FIT.modes, rank: int | None = None, rtol: float = FIT.rtol,
              criteria: str = DEFAULT_MASK, random: bool = False, seed: int = 0, include: list[str] | None = None,
              exclude: list[str] | None = None, files: list[str] | None = None, wait: float = DEFAULT_WAIT,
              progress: Progress | None = None, **rest: Any) -> Settings:
        """Settings from the flat values of the options (as the CLI takes them), each checked."""
        for name, value in (("tau", tau), ("modes", modes), ("rank", rank), ("seed", seed)):
            _check(name, value)
        try:
            fit = FitOptions(tau=tau, modes=modes, rank=rank, rtol=rtol)
            mask = mask_options(criteria, random, seed)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        selection = Selection(tuple(include or ()), tuple(exclude or ())) if (include or exclude) else None
        return cls(fit=fit, mask=mask, selection=selection,
                   files=tuple(files) if files else None, lock_timeout=wait, progress=progress or NoProgress(),
                   **rest)
