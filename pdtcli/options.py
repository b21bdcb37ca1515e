"""Every option of a run, declared once: its default, its help, and what values it accepts.

The library takes a `Settings`; the CLI's flags are made from `OPTIONS` (so a default or a
help text is written once), and `Settings.build` turns the flat values a user gives, on the
command line or from Python, into checked settings: every invalid value is a `UsageError`
(exit 2) before any file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .dmd import MODES, SCOPES, FitOptions
from .errors import UsageError
from .fuse import DEFAULT_BLOCK
from .mask import CRITERIA, DEFAULT_CRITERIA, OFFICIAL_RULE, MaskOptions
from .order import ORDERS
from .progress import NoProgress, Progress
from .selection import Selection
from .store import STORE_DTYPES
from .verify import DEFAULT_TIMEOUT as VERIFY_TIMEOUT
from .verify import Verifier, command_words
from .world import BACKENDS, DEFAULT_TIMEOUT

DEFAULT_HISTORY = 5
DEFAULT_MASK = ",".join(DEFAULT_CRITERIA)
DEFAULT_WAIT = 60.0  # seconds a second pdt waits for the store's lock
DEVICES = ("auto", "cpu", "cuda")
FIT = FitOptions()
# The settings that shape a run's step, kept in the store by `pdt predict` as `--files` and the schedule are:
# a later run without the flag takes the kept value (a store that keeps none: the default). The others
# (--device, --block, --threads, --wait, --json, ...) are for one invocation.
KEPT = ("tau", "modes", "rank", "rtol", "dmd_scope", "criteria", "random", "seed", "in_place")


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
    flag: bool = False  # takes no value (also when its default is None: not given, the store's)
    kept: Any = None  # for the KEPT settings (default None: "not given"), the value a store that keeps none uses

    @property
    def value_name(self) -> str | None:
        """What help shows for the value (None for a flag): the metavar, the choices, else N or X."""
        if self.flag or isinstance(self.default, bool):
            return None
        if self.metavar:
            return self.metavar
        if self.choices:
            return "|".join(self.choices)
        return "X" if isinstance(self.default, float) else "N"


OPTIONS: dict[str, Option] = {
    "store": Option(("--store",), None, "Store folder, outside the checkpoints.", metavar="PATH",
                    shown_default="DIR/.pdt; DIR.pdt/.pdt for accelerate"),
    "output": Option(("--output", "-o"), None, "Write an audit copy here instead (the window is unchanged); its suffix "
                     "is the checkpoint's own, or .safetensors / .pt (the fused tensors only).",
                     metavar="PATH"),
    "dry_run": Option(("--dry-run",), False, "Fit and mask; write no checkpoint."),
    "force": Option(("--force",), False, "Replace an existing output pdt wrote, or a plain file; never an input or "
                    "the store."),
    "in_place": Option(("--in-place/--no-in-place",), None, "Write over the newest checkpoint (for scripts that "
                       "resume from one path), keeping a backup for `pdt restore`; never through a symbolic link.",
                       shown_default="off", flag=True, kept=False),
    "history": Option(("--history",), None, "Snapshots in the window, h; fixed when the store is made.", min=2,
                      shown_default=str(DEFAULT_HISTORY)),
    "start": Option(("--start",), None, "First step a fused checkpoint may be written at (Algorithm 1's T_0); "
                    "fixed once one is written.", min=0, shown_default="when the window holds h"),
    "every": Option(("--every",), None, "Plain checkpoints between two fused ones (Algorithm 1's T_i); like --start, "
                    "fixed once one is written.", min=0, shown_default="0"),
    "tau": Option(("--tau",), None, "Checkpoints to predict ahead.", min=1, shown_default=str(FIT.tau),
                  kept=FIT.tau),
    "modes": Option(("--modes",), None, "DMD modes; projected is the paper's eq. 11.", choices=MODES,
                    shown_default=FIT.modes, kept=FIT.modes),
    "rank": Option(("--rank",), None, "Fixed DMD rank instead of --rtol.", min=1, shown_default="none: --rtol"),
    "rtol": Option(("--rtol",), None, "Keep singular values above rtol x the largest (and no fixed --rank).",
                   shown_default=f"{FIT.rtol:g}", kept=FIT.rtol, metavar="X"),
    "dmd_scope": Option(("--dmd-scope",), None, "One DMD over the whole model, or one per tensor (each tensor's own "
                        "modes, its rows alone).", choices=SCOPES, shown_default=FIT.scope, kept=FIT.scope),
    "criteria": Option(("--criteria",), None, "all (the paper's eqs. 6 and 7), official (the official code's reading "
                       "of them), none, or a comma list of lower,upper,sign; the default drops eq. 6's lower bound.",
                       metavar="LIST",
                       shown_default=DEFAULT_MASK, kept=DEFAULT_MASK),
    "random": Option(("--random/--no-random",), None, "Audit: random mask at the criteria's per-tensor ratio.",
                     shown_default="off", flag=True, kept=False),
    "seed": Option(("--seed",), None, "Seed of --random.", min=0, shown_default="0", kept=0),
    "verify": Option(("--verify",), None, "Publish the fused checkpoint only if CMD, run on it ({} in CMD: its path, "
                     "else appended), exits 0 and, if it prints a loss last, one not above the newest checkpoint's.",
                     metavar="CMD"),
    "verify_timeout": Option(("--verify-timeout",), VERIFY_TIMEOUT, "Seconds CMD may run (then: rejected).", min=1,
                             metavar="SECONDS"),
    "include": Option(("--include",), None, "Also predict tensors matching this glob (repeatable).", metavar="GLOB"),
    "exclude": Option(("--exclude",), None, "Never predict tensors matching this glob (repeatable).",
                      metavar="GLOB"),
    "files": Option(("--files",), None, "Only names matching this glob are checkpoints (repeatable; kept in the "
                    "store for later runs).", metavar="GLOB"),
    "order": Option(("--order",), None, "Training order: auto takes the step saved inside, else the number in the "
                    "names; fixed when the store is made.", choices=ORDERS, metavar="RULE", shown_default="auto"),
    "store_dtype": Option(("--store-dtype",), None, f"How the store keeps values: {', '.join(STORE_DTYPES)}; "
                          "fixed when the store is made.", choices=tuple(STORE_DTYPES), metavar="DTYPE",
                          shown_default="the model's bf16 or fp16, else float32"),
    "device": Option(("--device",), "auto", "Where the arithmetic runs (auto: cuda if there is one).", choices=DEVICES),
    "block": Option(("--block",), None, "Elements per row block (bounds memory).", min=8,
                    shown_default=f"{DEFAULT_BLOCK['cpu']:,}; CUDA {DEFAULT_BLOCK['cuda']:,}"),
    "threads": Option(("--threads",), None, "CPU threads for the arithmetic.", min=1,
                      shown_default="1, or OMP_NUM_THREADS"),
    "wait": Option(("--wait",), DEFAULT_WAIT, "Seconds to wait for another pdt's lock.", min=0, metavar="SECONDS"),
    "backend": Option(("--backend",), "auto", "Under torchrun: the process group's backend (auto: nccl on GPUs).",
                      choices=BACKENDS),
    "dist_timeout": Option(("--dist-timeout",), DEFAULT_TIMEOUT, "Under torchrun: seconds a rank waits for the "
                           "others (then exit 7).", min=1, metavar="SECONDS"),
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


def criteria_text(text: str) -> str:
    """The one spelling of `--criteria` that the store keeps and messages show: official, all, none, or a list
    (UsageError for criteria no mask takes)."""
    if text.strip().lower() == OFFICIAL_RULE:
        return OFFICIAL_RULE
    criteria = parse_criteria(text)
    return "all" if set(criteria) == set(CRITERIA) else ",".join(criteria) or "none"


def _shown(name: str, value: Any) -> str:
    """A KEPT setting as a user writes it: `--tau 3`, `--in-place`, `--no-random`, `--rank none`."""
    flag = OPTIONS[name].flags[0]
    if OPTIONS[name].flag:
        on, off = flag.split("/")
        return on if value else off
    return f"{flag} {'none' if value is None else value}"


def as_flags(values: dict[str, Any]) -> str:
    """KEPT settings as the flags that give them (`--tau 5 --modes exact ... --no-in-place`), for reports."""
    return " ".join(_shown(name, values[name]) for name in KEPT if name in values)


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
    in_place: bool = False  # write over the newest checkpoint
    verify: str | None = None  # the command that judges a fused checkpoint before it is published (not KEPT)
    verify_timeout: float = VERIFY_TIMEOUT  # seconds per run of it
    given: dict[str, Any] = field(default_factory=dict)  # the KEPT settings this run was given: {name: value}
    # this step's tau, chosen by a horizon policy (`PDTStep(horizon=)`): the fit predicts that far, but it is the
    # loop's choice of the moment, not a new --tau: no change is reported and the store keeps the configured one
    step_tau: int | None = None

    def __post_init__(self) -> None:
        for name, value in (("history", self.history), ("device", self.device), ("block", self.block),
                            ("threads", self.threads),
                            ("store_dtype", self.store_dtype), ("order", self.order), ("wait", self.lock_timeout),
                            ("start", self.start), ("every", self.every), ("backend", self.backend),
                            ("dist_timeout", self.dist_timeout), ("verify_timeout", self.verify_timeout)):
            _check(name, value)
        if self.verify is not None:
            command_words(self.verify)  # a command that cannot run is exit 2 before any work

    @property
    def verifier(self) -> Verifier | None:
        """The `--verify` gate of this run, or None."""
        return Verifier(self.verify, self.verify_timeout) if self.verify is not None else None

    @classmethod
    def build(cls, *, tau: int | None = None, modes: str | None = None, rank: int | None = None,
              rtol: float | None = None, dmd_scope: str | None = None, criteria: str | None = None,
              random: bool | None = None, seed: int | None = None, in_place: bool | None = None,
              include: list[str] | None = None,
              exclude: list[str] | None = None, files: list[str] | None = None, wait: float = DEFAULT_WAIT,
              progress: Progress | None = None, **rest: Any) -> Settings:
        """Settings from the flat values of the options (as the CLI takes them), each checked. A KEPT one left
        None is not given: the run takes the store's (`with_kept`), else its default."""
        given = {name: value for name, value in (("tau", tau), ("modes", modes), ("rank", rank), ("rtol", rtol),
                                                 ("dmd_scope", dmd_scope), ("criteria", criteria),
                                                 ("random", random), ("seed", seed), ("in_place", in_place))
                 if value is not None}
        selection = Selection(tuple(include or ()), tuple(exclude or ())) if (include or exclude) else None
        settings = cls(selection=selection, files=tuple(files) if files else None, lock_timeout=wait,
                       progress=progress or NoProgress(), **rest)
        return settings.giving(**given)

    def giving(self, **given: Any) -> Settings:
        """These settings, also given these KEPT ones (None: not given), checked; UsageError for a bad one."""
        given = {name: value for name, value in given.items() if value is not None}
        for name, value in given.items():
            _check(name, value)
        if "criteria" in given:
            given["criteria"] = criteria_text(given["criteria"])
        return replace(self, given={**self.given, **given}).with_kept({})

    def run_values(self, kept: dict[str, Any]) -> dict[str, Any]:
        """Every KEPT setting of this run: as given, else as `kept` (a store's), else the default."""
        values = {name: OPTIONS[name].kept for name in KEPT}
        values.update({name: value for name, value in kept.items() if name in KEPT})
        values.update(self.given)
        if "rtol" in self.given and "rank" not in self.given:  # --rtol chooses the rank: a kept --rank goes
            values["rank"] = None
        return values

    def with_kept(self, kept: dict[str, Any]) -> Settings:
        """These settings with the store's `kept` values for the KEPT ones not given (a UsageError, exit 2,
        for a combination no fit or mask takes)."""
        values = self.run_values(kept)
        try:
            fit = FitOptions(tau=values["tau"], modes=values["modes"], rank=values["rank"], rtol=values["rtol"],
                             scope=values["dmd_scope"])
            mask = mask_options(values["criteria"], bool(values["random"]), values["seed"])
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        if self.step_tau is not None:
            fit = replace(fit, tau=self.step_tau)
        return replace(self, fit=fit, mask=mask, in_place=bool(values["in_place"]))

    def changes(self, kept: dict[str, Any]) -> str | None:
        """The KEPT settings in which this run differs from what the store `kept`, as flags with the old values
        (`--criteria upper,sign (was all), --tau 3 (was 5)`); None when none differs or the store keeps none."""
        if not kept:
            return None
        before, after = Settings().run_values(kept), self.run_values(kept)
        changed = [f"{_shown(name, after[name])} (was {_shown(name, before[name]).split(' ', 1)[-1]})"
                   for name in KEPT if after[name] != before[name]]
        return ", ".join(changed) or None
