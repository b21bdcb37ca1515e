"""Tensors read, fused and written a piece at a time give what whole tensors give.

Formats that can read part of a tensor (safetensors, and the sharded Trainer folders built on
it) hand pass 2 and ingest pieces of at most `CHUNK_ELEMENTS`, so that memory does not grow
with the largest tensor. Here the pieces are made tiny (20 elements, so a piece ends inside a
byte of the packed mask, and a 1-d tensor is split too) on a real training run whose widths
(37) are no multiple of 8, and every output must be byte-identical to the one-piece run.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import training
from typer.testing import CliRunner

import pdtcli.formats.base as base
from pdtcli.cli import app


def _pdt(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pieces_of_tensors_give_the_bytes_whole_tensors_give(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    training.train(whole, 6, fmt="safetensors", opt="adamw", hidden=37)
    pieces = tmp_path / "pieces"
    shutil.copytree(whole, pieces)
    runs = {}
    for folder, chunk in ((whole, base.CHUNK_ELEMENTS), (pieces, 20)):
        monkeypatch.setattr(base, "CHUNK_ELEMENTS", chunk)
        first = _pdt("predict", str(folder))
        random = _pdt("mask", str(folder), "--random", "--seed", "3")  # the random mask is drawn per element
        audit = _pdt("apply", str(folder), "-o", str(tmp_path / f"{folder.name}-audit.safetensors"))
        runs[folder.name] = (first, random, audit)
    for a, b in zip(runs["whole"], runs["pieces"], strict=True):
        assert a["mask"]["totals"] == b["mask"]["totals"]
        assert a.get("tensors") == b.get("tensors")
    assert _sha(whole / "epoch_6.pdt.safetensors") == _sha(pieces / "epoch_6.pdt.safetensors")
    assert _sha(tmp_path / "whole-audit.safetensors") == _sha(tmp_path / "pieces-audit.safetensors")
    # the stores too: snapshots ingested in pieces, the fused state kept for the next window, the masks' bits
    assert _sha(whole / ".pdt" / "snapshots.bin") == _sha(pieces / ".pdt" / "snapshots.bin")
    report = [_pdt("report", str(folder)) for folder in (whole, pieces)]
    assert report[0]["tensors"] == report[1]["tensors"]
