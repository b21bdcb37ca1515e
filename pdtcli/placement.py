"""Where pdt keeps its store and writes its default fused output: nowhere a framework enumerates.

Frameworks list their checkpoint folder to rotate, resume and number their saves, and an entry
they did not make there is counted, loaded or fails their parsing. What each one enumerates,
read from its code (tests/test_rotation.py runs each):

- accelerate (`ProjectConfiguration(automatic_checkpoint_naming=True)`, `checkpoints/checkpoint_<N>/`):
  `save_state` with `total_limit` and `load_state()` read a number out of EVERY entry of the
  folder; an entry without digits (`.pdt`) raises IndexError, one with digits is rotated or loaded.
- Hugging Face Trainer (`checkpoint-<N>/`): rotation (`save_total_limit`, by modification time)
  counts every folder matching `checkpoint-*`; `resume_from_checkpoint=True` takes `checkpoint-<digits>`.
- Lightning (`*.ckpt`): `ckpt_path="last"` loads the newest `.ckpt` whose stem starts with `last`.
- Orbax `CheckpointManager` (`ckpts/<N>/`): `all_steps()`, `latest_step()` and `max_to_keep` rotation take only
  folders named `<N>` or `<prefix>_<N>` (orbax-checkpoint 0.12.8, `_StandardNameFormat`), so `N.pdt` and `.pdt`
  are never steps: the default rule (store and outputs inside the folder) holds, and needs no case of its own.

The rule decides from the folder's path and its entries' names only, never from a file's content:
an entry a framework would enumerate goes to the side folder `<folder>.pdt/` beside the checkpoint
folder instead (the store as `<folder>.pdt/.pdt/`, outputs by their usual names). A store already
in `<folder>/.pdt` is used where it is.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from .discover import OUTPUT_TAG, output_name
from .errors import OutputError
from .store import STORE_DIRNAME, Store

log = logging.getLogger(__name__)

_ACCELERATE = re.compile(r"checkpoint_\d+")  # accelerate's automatic checkpoint naming
_TRAINER = re.compile(r"checkpoint-\d+")  # transformers' PREFIX_CHECKPOINT_DIR-<step>
_LIGHTNING_LAST = re.compile(r"last")  # ModelCheckpoint._find_last_checkpoints matches the stem's start


def side_folder(folder: Path) -> Path:
    """`<folder>.pdt/`, beside the checkpoint folder: where pdt keeps what the framework would enumerate."""
    folder = Path(folder).absolute()
    return folder.with_name(folder.name + OUTPUT_TAG)


def _layout(folder: Path) -> str | None:
    """"accelerate" or "trainer" when the folder holds that framework's numbered checkpoint folders, else None."""
    try:
        entries = [p for p in Path(folder).iterdir() if p.is_dir()]
    except OSError:  # a folder pdt cannot list: the command says so where it lists it
        return None
    if any(_ACCELERATE.fullmatch(p.name) for p in entries):
        return "accelerate"
    if any(_TRAINER.fullmatch(p.name) for p in entries):
        return "trainer"
    return None


def enumerated(folder: Path, name: str) -> bool:
    """Whether the framework that saves into `folder` would take an entry called `name` there for one of
    its checkpoints (or fail on it)."""
    layout = _layout(folder)
    if layout == "accelerate":
        return True
    if layout == "trainer":
        return name.startswith("checkpoint-")
    return name.endswith(".ckpt") and _LIGHTNING_LAST.match(name) is not None


def store_root(folder: Path) -> Path:
    """The default store folder of a checkpoint folder: `<folder>/.pdt`, unless the framework enumerates
    it and no store is there yet; then `<folder>.pdt/.pdt`."""
    inside = Path(folder) / STORE_DIRNAME
    if not enumerated(folder, STORE_DIRNAME):
        return inside
    if Store.exists(inside):
        log.warning("%s: this framework enumerates every entry of the folder and fails on this store; move it "
                    "out of the way (pdt makes a new one in %s)", inside, side_folder(folder))
        return inside
    return side_folder(folder) / STORE_DIRNAME


def is_default_store(root: Path, folder: Path) -> bool:
    """Whether `root` is one of the two store folders derived from `folder`'s path alone."""
    root = Path(root).resolve()
    return root.name == STORE_DIRNAME and root.parent in (Path(folder).resolve(), side_folder(folder).resolve())


def default_output(newest: Path) -> Path:
    """The fused checkpoint's default path: `output_name(newest)` beside it, or in the side folder when
    the framework would enumerate it there. OutputError when the side folder is a symbolic link."""
    out = output_name(newest)
    if not enumerated(newest.parent, out.name):
        return out
    side = side_folder(newest.parent)
    if side.is_symlink():  # derived from the folder's path, so a link there was planted: never written through
        raise OutputError(f"is a symbolic link to {side.readlink()}; pdt writes the default output into this "
                          "folder and never through a link (remove it, or pass -o)", side)
    return side / out.name
