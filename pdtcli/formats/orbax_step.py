"""Orbax checkpoints (Flax's guide: `ocp.CheckpointManager(...).save(step, args=StandardSave(state))`):
a step folder `<step>/` holding `_CHECKPOINT_METADATA` and one folder per item (`default/`, or the
names of a `Composite`), each PyTree item an OCDBT store (`_METADATA`, `manifest.ocdbt`, `d/...`).
A folder a `StandardCheckpointer` saved directly (`_METADATA` at its top) is one item of its own.

Read and written through orbax itself, an optional extra (`pip install 'pdtcli[orbax]'`), imported
only here: without it such a folder is named and refused. Each PyTree item is restored whole as
NumPy arrays (one checkpoint in memory, as for Flax msgpack); a tensor's name is the item's name and
its key path joined by `/` (`default/params/params/Dense_0/kernel`). The model's tensors are the
arrays under an item's top-level `params` when it has one (a TrainState also holds `step` and
`opt_state`), else all of its arrays. The fused step is a new Orbax checkpoint: every file of the
step that is not a PyTree item copied as stored, and each item saved again by orbax with the fused
values in place and every other leaf as restored. The step number is the folder's name, as the
manager parses it.

Confinement: a folder whose links lead outside is refused before orbax opens it, and orbax reads
OCDBT data through tensorstore's file store, which refuses keys with `..` (a manifest cannot name
a file outside the item).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..confine import refuse_links_out
from ..errors import CheckpointError
from ..lazy import torch
from .base import DTYPES, CheckpointFormat, CheckpointReader, Fuse, TensorInfo, unique_names

STEP_METADATA = "_CHECKPOINT_METADATA"  # a CheckpointManager step
ITEM_METADATA = "_METADATA"  # a PyTree item
PARAMS_KEY = "params"
TMP_MARK = ".orbax-checkpoint-tmp"  # a save in progress, renamed when complete
# orbax's standard step name: `<step>` or `<prefix>_<step>` (step.py, _StandardNameFormat)
STEP_NAME = re.compile(r"(?:.+_)?(0|[1-9]\d*)")


def _orbax(path: Path):
    """`orbax.checkpoint` and `jax.tree_util`, or the refusal of `path` that names the extra to install."""
    try:
        import jax
        import orbax.checkpoint as ocp
    except ImportError as exc:
        raise CheckpointError(f"an Orbax checkpoint; reading it needs orbax-checkpoint ({exc}): "
                              "pip install 'pdtcli[orbax]'", path) from exc
    return ocp, jax.tree_util


def _key_name(key: Any) -> str:
    """One step of a key path as a name: a dict key, a sequence index, an attribute."""
    for field in ("key", "idx", "name"):
        if hasattr(key, field):
            return str(getattr(key, field))
    return str(key)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    if array.dtype.name == "bfloat16":  # ml_dtypes' bfloat16, which torch.from_numpy does not know
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array))


def _to_numpy(tensor: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """`tensor`'s values as an array of `like`'s dtype and shape."""
    if like.dtype.name == "bfloat16":
        return tensor.contiguous().view(torch.int16).numpy().view(like.dtype).reshape(like.shape)
    return tensor.numpy().astype(like.dtype, copy=False).reshape(like.shape)


class OrbaxReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        ocp, self._tree_util = _orbax(self.path)
        refuse_links_out(self.path)
        self._managed = (self.path / STEP_METADATA).is_file()
        self._items = {"": self.path} if (self.path / ITEM_METADATA).is_file() else {
            sub.name: sub for sub in sorted(self.path.iterdir()) if (sub / ITEM_METADATA).is_file()}
        if not self._items:
            raise CheckpointError(f"an Orbax step with no PyTree item (no {ITEM_METADATA} in it or its folders)",
                                  self.path)
        self._flat: dict[str, list] = {}  # item: its leaves, in the order of its tree structure
        self._structures: dict[str, Any] = {}
        entries = []
        for item, folder in self._items.items():
            with_paths, self._structures[item] = self._tree_util.tree_flatten_with_path(self._restore(ocp, folder))
            self._flat[item] = [leaf for _, leaf in with_paths]
            model = [(i, keys) for i, (keys, leaf) in enumerate(with_paths) if isinstance(leaf, np.ndarray)]
            if any(keys and _key_name(keys[0]) == PARAMS_KEY for _, keys in model):
                model = [(i, keys) for i, keys in model if _key_name(keys[0]) == PARAMS_KEY]
            entries += [("/".join([item] * bool(item) + [_key_name(k) for k in keys]),
                         f"{item or '.'}{self._tree_util.keystr(keys)}", (item, i)) for i, keys in model]
        self._leaves = unique_names(iter(entries), "key paths are joined with '/'", self.path)
        self._infos = [self._describe(name, self._flat[item][i]) for name, (item, i) in self._leaves.items()]

    def _restore(self, ocp, folder: Path) -> Any:
        """An item's tree: arrays as NumPy arrays, scalars as orbax restores them by default (Python
        numbers, saved back as scalars as they were). CheckpointError when orbax cannot restore it."""
        checkpointer = ocp.PyTreeCheckpointer()
        try:
            meta = checkpointer.metadata(folder).item_metadata.tree
            args = self._tree_util.tree_map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray) if isinstance(
                m, ocp.metadata.ArrayMetadata) and not isinstance(m, ocp.metadata.ScalarMetadata) else
                ocp.RestoreArgs(), meta)
            return checkpointer.restore(folder, args=ocp.args.PyTreeRestore(restore_args=args))
        except (ValueError, TypeError, KeyError, OSError, RuntimeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(f"orbax cannot restore {folder.name} ({type(exc).__name__}: {reason})"[:300],
                                  self.path) from exc

    def _describe(self, name: str, array: np.ndarray) -> TensorInfo:
        dtype = DTYPES.get(array.dtype.name)
        if dtype is None:
            raise CheckpointError(f"array {name!r} has unsupported dtype {array.dtype}", self.path)
        return TensorInfo(name, tuple(array.shape), dtype)

    def tensors(self) -> list[TensorInfo]:
        return list(self._infos)

    def read(self, name: str) -> torch.Tensor:
        item, index = self._leaves[name]
        return _to_torch(self._flat[item][index])

    def recorded_step(self) -> int | None:
        """The manager's step: the step folder's name, as `CheckpointManager` parses it."""
        match = STEP_NAME.fullmatch(self.path.name)
        return int(match.group(1)) if self._managed and match else None

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        ocp, _ = _orbax(self.path)
        if "" not in self._items:  # a manager's step: its own files and non-PyTree items as stored
            shutil.copytree(self.path, out, ignore=lambda folder, names: [
                n for n in names if Path(folder) == self.path and n in self._items])
        fused = {item: list(leaves) for item, leaves in self._flat.items()}
        for name, (item, index) in self._leaves.items():
            if fuse.wants(name):
                fused[item][index] = _to_numpy(fuse(name, self.read(name)), self._flat[item][index])
        for item, leaves in fused.items():
            tree = self._tree_util.tree_unflatten(self._structures[item], leaves)
            ocp.PyTreeCheckpointer().save(out / item if item else out, args=ocp.args.PyTreeSave(tree))


class OrbaxFormat(CheckpointFormat):
    name = "orbax"

    def sniff(self, path: Path, head: bytes) -> bool:
        return (path.is_dir() and TMP_MARK not in path.name
                and any((path / f).is_file() for f in (STEP_METADATA, ITEM_METADATA)))

    def open(self, path: Path) -> CheckpointReader:
        return OrbaxReader(path)
