"""What a run may change, with the paper's defaults, in one place the library and the CLI share."""

from __future__ import annotations

from dataclasses import dataclass, field

from .dmd import FitOptions
from .fuse import DEFAULT_BLOCK
from .mask import MaskOptions
from .progress import NoProgress, Progress
from .selection import Selection

DEFAULT_HISTORY = 5
DEFAULT_WAIT = 60.0  # seconds a second pdt waits for the store's lock
DEFAULT_STORE_DTYPE = "float32"


@dataclass
class Settings:
    """What a run may change; everything has the paper's default."""

    history: int | None = None
    fit: FitOptions = field(default_factory=FitOptions)
    mask: MaskOptions = field(default_factory=MaskOptions)
    selection: Selection | None = None
    device: str = "auto"
    block: int = DEFAULT_BLOCK
    store_dtype: str = DEFAULT_STORE_DTYPE
    order: str | None = None  # auto | name | step | mtime; None: the store's, or auto for a new store
    files: tuple[str, ...] | None = None  # globs naming the checkpoints; None: the store's, or every checkpoint
    lock_timeout: float = DEFAULT_WAIT
    progress: Progress = field(default_factory=NoProgress)
