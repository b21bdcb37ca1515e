from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest

os.environ.setdefault("KERAS_BACKEND", "torch")  # Keras 3 on the torch that is already installed
sys.path.insert(0, str(Path(__file__).parent))


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# SIGTERM (from `timeout`, a CI runner, a scheduler) stops the run as Ctrl-C does. Without a
# handler of our own, Lightning's Trainer takes SIGTERM over during `fit` and the run goes on as
# a test failure; with one, Lightning calls it after its own.
signal.signal(signal.SIGTERM, _stop)

import training  # noqa: E402


@pytest.fixture(scope="session")
def _sgd_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sgd")
    training.train(folder, 8)
    return folder


@pytest.fixture(scope="session")
def _adamw_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("adamw")
    training.train(folder, 8, opt="adamw")
    return folder


@pytest.fixture(scope="session")
def _safetensors_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("st")
    training.train(folder, 6, fmt="safetensors")
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def sgd_run(_sgd_run, tmp_path) -> Path:
    """A private copy of 8 epochs of real SGD training, one torch checkpoint per epoch."""
    return _copy(_sgd_run, tmp_path / "ckpts")


@pytest.fixture
def adamw_run(_adamw_run, tmp_path) -> Path:
    return _copy(_adamw_run, tmp_path / "ckpts")


@pytest.fixture
def safetensors_run(_safetensors_run, tmp_path) -> Path:
    return _copy(_safetensors_run, tmp_path / "ckpts")


def digest_tree(folder: Path) -> dict[str, str]:
    """Content hashes of the files in `folder` and its sub-folders (checkpoint folders), not pdt's store."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).parts[0] != ".pdt"}
