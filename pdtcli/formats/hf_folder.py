"""A Hugging Face Trainer checkpoint folder (`checkpoint-N/`): weights plus the files to resume.

The weights are `model.safetensors`, or shards listed in `model.safetensors.index.json`,
or the same two for `pytorch_model.bin`; in a PEFT run (LoRA), the adapter that trains:
`adapter_model.safetensors` or `adapter_model.bin` beside `adapter_config.json`. Each weight
file is read and written by the single-file reader of its format, so a tensor is still read on
demand. Every other file (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`, `trainer_state.json`,
`config.json`, `adapter_config.json`, `training_args.bin`, DeepSpeed sub-folders) is copied
byte for byte and never loaded, so a pickle there cannot run code. The fused folder keeps the input's sharding: the same
shard files hold the same tensors, and the index is copied unchanged (sizes do not change).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..confine import member, refuse_links_out
from ..errors import CheckpointError
from ..lazy import torch
from .base import CheckpointFormat, CheckpointReader, Fuse, TensorInfo, no_duplicate_keys
from .safetensors_file import SafetensorsReader
from .torch_pickle import open_torch

# (single weight file, its shard index or None, reader), in the order Transformers prefers them. A PEFT
# adapter comes first: it is what trains (the base model beside it, if saved at all, is frozen); PEFT
# writes it unsharded.
WEIGHT_LAYOUTS = (
    ("adapter_model.safetensors", None, SafetensorsReader),
    ("adapter_model.bin", None, open_torch),
    ("model.safetensors", "model.safetensors.index.json", SafetensorsReader),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", open_torch),
)
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG = "adapter_config.json"  # PEFT's: which adapter, its rank, the modules it adapts


def weight_files(folder: Path) -> tuple[list[str], Callable[[Path], CheckpointReader]] | None:
    """The weight files of a Trainer folder (relative names) and their reader; None if it has none."""
    for single, index, reader in WEIGHT_LAYOUTS:
        if index is not None and (folder / index).is_file():
            try:
                weight_map = json.loads((folder / index).read_text(),
                                        object_pairs_hook=no_duplicate_keys(folder / index, index))["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"corrupt shard index {index} ({exc})", folder) from exc
            for shard in shards:
                member(folder, shard, f"the shard index {index}")
            return shards, reader
        if (folder / single).is_file():
            return [single], reader
    return None


class HfFolderReader(CheckpointReader):
    def __init__(self, path: Path) -> None:
        super().__init__(path)
        refuse_links_out(self.path)
        found = weight_files(self.path)
        if found is None:
            raise CheckpointError("no model.safetensors, pytorch_model.bin (nor their index) or PEFT adapter_model.* "
                                  "in this folder", self.path)
        names, reader = found
        missing = [name for name in names if not (self.path / name).is_file()]
        if missing:
            raise CheckpointError(f"the shard index lists {missing[0]}, which is missing", self.path)
        self._all_shards = list(names)
        self._shards: dict[str, CheckpointReader] = {}
        self._where: dict[str, CheckpointReader] = {}
        try:
            for name in names:
                shard = reader(self.path / name)
                self._shards[name] = shard
                for info in shard.tensors():
                    self._where[info.name] = shard
        except BaseException:
            self.close()
            raise

    def tensors(self) -> list[TensorInfo]:
        return [info for shard in self._shards.values() for info in shard.tensors()]

    def read(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def carried(self) -> list[tuple[TensorInfo, str]]:
        return [item for shard in self._shards.values() for item in shard.carried()]

    def objects(self) -> list[dict]:
        return [dict(found, where=f"{name}{found['where']}") for name, shard in self._shards.items()
                for found in shard.objects()]

    def recorded_step(self) -> int | None:
        """`global_step` from `trainer_state.json`, the counter Trainer resumes from."""
        try:
            step = json.loads((self.path / TRAINER_STATE).read_text()).get("global_step")
        except (OSError, ValueError, AttributeError):
            return None
        return step if isinstance(step, int) and not isinstance(step, bool) else None

    def adapter(self) -> dict | None:
        """What `adapter_config.json` says of a PEFT adapter folder (None for a full model): {"type": PEFT's
        peft_type, "library": "peft", "r", "alpha", "target_modules": list, "base_model"}; a config pdt cannot
        parse is shown as an adapter of unknown type (it is carried as stored either way)."""
        if not self._all_shards[0].startswith("adapter_model."):
            return None
        try:
            config = json.loads((self.path / ADAPTER_CONFIG).read_text())
            config = config if isinstance(config, dict) else {}
        except (OSError, ValueError):
            config = {}
        modules = config.get("target_modules")
        return {"type": str(config.get("peft_type", "unknown")), "library": "peft", "r": config.get("r"),
                "alpha": config.get("lora_alpha"),
                "target_modules": [modules] if isinstance(modules, str) else sorted(map(str, modules or [])),
                "base_model": config.get("base_model_name_or_path")}

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        self.write_shared(out)
        self._write_shards(out, fuse)

    def _write_shards(self, out: Path, fuse: Fuse) -> None:
        for name, shard in self._shards.items():
            shard.write_fused(member(out, name, "the shard index"), fuse)

    def weight_files(self) -> list[str]:
        return list(self._all_shards)

    def part(self, files: list[str]) -> HfFolderReader:
        """The shards in `files`, each read and written as a whole (a tensor is never split)."""
        view = _HfFolderPart(self, files)
        for name, shard in self._shards.items():
            if name not in files:
                shard.close()
        return view

    def write_shared(self, out: Path) -> None:
        shards = set(self._all_shards)
        shutil.copytree(self.path, out, ignore=lambda folder, names: [
            n for n in names if Path(folder) == self.path and n in shards])

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


class _HfFolderPart(HfFolderReader):
    """One rank's shards: it writes them into the output folder that rank 0 made."""

    def __init__(self, whole: HfFolderReader, files: list[str]) -> None:
        # not super().__init__: that would open every shard again; these are the whole reader's, open
        CheckpointReader.__init__(self, whole.path)
        self._all_shards = whole._all_shards
        self._shards = {name: shard for name, shard in whole._shards.items() if name in files}
        self._where = {name: shard for name, shard in whole._where.items() if shard in self._shards.values()}

    def write_fused(self, out: Path, fuse: Fuse) -> None:
        self._write_shards(out, fuse)


class HfFolderFormat(CheckpointFormat):
    name = "hf-folder"

    def sniff(self, path: Path, head: bytes) -> bool:
        return path.is_dir() and any((path / f).is_file() for layout in WEIGHT_LAYOUTS for f in layout[:2] if f)

    def open(self, path: Path) -> CheckpointReader:
        return HfFolderReader(path)
