"""One PDT step split over ranks with torch.distributed, against the same step in one process.

Every test starts real processes: checkpoints saved by 2 or 4 gloo ranks with
`torch.distributed.checkpoint.save` (each tensor sharded as FSDP shards it) or by
`huggingface_hub.save_torch_state_dict` in shards, then `pdt` as 2 or 4 ranks of one process
group. The one-process run on a copy of the same folder is the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import training
from ranks import free_port, launch, save_dcp_by_ranks
from typer.testing import CliRunner

import pdtcli.formats.base as base
from pdtcli.cli import app
from pdtcli.formats import open_checkpoint
from pdtcli.formats.torch_dcp import DcpReader
from pdtcli.store import Store, parts_of
from pdtcli.world import World

pytestmark = pytest.mark.slow
EPOCHS = 7  # 6 for the first step, the 7th for a steady step that builds on the first fused state


@pytest.fixture(scope="module")
def trajectory() -> dict[int, dict[str, torch.Tensor]]:
    """Real AdamW training of the test MLP (wider, so that 4 ranks each hold a real share)."""
    x, y = training.data()
    net = training.model(hidden=48)
    optim = training.optimizer(net, "adamw")
    states = {}
    for epoch in range(1, EPOCHS + 1):
        training.train_epoch(net, optim, x, y, epoch)
        states[epoch] = {k: v.clone() for k, v in net.state_dict().items()}
    return states


def _folder(tmp_path: Path, states: dict, kind: str, writers: int) -> Path:
    """The run's checkpoint folder, the last epoch held back (returned by `_reveal`)."""
    run = tmp_path / "run"
    if kind == "dcp":
        save_dcp_by_ranks(run, states, writers)
        newest = run / f"step_{EPOCHS}"
    else:
        from huggingface_hub import save_torch_state_dict

        for epoch, state in states.items():
            (run / f"step_{epoch}").mkdir(parents=True)
            save_torch_state_dict(state, run / f"step_{epoch}", max_shard_size=200)
            (run / f"step_{epoch}" / "trainer_state.json").write_text(json.dumps({"global_step": epoch}))
        newest = run / f"step_{EPOCHS}"
    newest.rename(tmp_path / newest.name)
    return run


def _everything(run: Path) -> dict[str, str]:
    """Content hashes of every file under `run`, the store's parts included."""
    return {p.relative_to(run).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run.rglob("*")) if p.is_file()}


def _reveal(tmp_path: Path, run: Path) -> None:
    shutil.copytree(tmp_path / f"step_{EPOCHS}", run / f"step_{EPOCHS}")


def _single(run: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pdtcli", "predict", str(run), "--json", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _ranks(k: int, run: Path, *args: str) -> dict:
    results = launch(k, ["predict", str(run), "--json", *args])
    assert [r.returncode for r in results] == [0] * k, [r.stderr[-2000:] for r in results]
    assert all(not r.stdout.strip() for r in results[1:])  # rank 0 alone prints
    return json.loads(results[0].stdout)


def _report(run: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "pdtcli", "report", str(run), "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _same_but_paths(a, b, single: Path, multi: Path) -> None:
    """Equal once paths and times are set aside; floats of the fit within float64 rounding."""
    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if k not in ("at", "time", "store")}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str):
            return value.replace(str(multi), str(single))
        return value

    a, b = clean(a), clean(b)
    for x, y in zip(a.get("window", []) + a.get("fit_window", []), b.get("window", []) + b.get("fit_window", []),
                    strict=True):  # the lineage evidence: sums over the ranks' shares, in another order
        ex, ey = x.pop("lineage_evidence", None), y.pop("lineage_evidence", None)
        assert (ex is None) == (ey is None) and (ex is None or abs(ex - ey) < 1e-9), (ex, ey)
    for key in ("fit",):
        if a.get(key) and b.get(key):
            for field in ("singular_values", "eigenvalue_magnitudes"):
                np.testing.assert_allclose(a[key].pop(field), b[key].pop(field), rtol=1e-9)
            a[key].pop("eigenvalues"), b[key].pop("eigenvalues")
            np.testing.assert_allclose(a[key].pop("start_offset"), b[key].pop("start_offset"), atol=1e-9)
    assert a == b


def _fused_equal(single: Path, multi: Path, newest: Path) -> None:
    """The same mask (the same elements moved off the newest checkpoint) and the same values, up to one
    float32 rounding of predictions whose float64 coefficients came from another (exact) reduction."""
    with open_checkpoint(single) as a, open_checkpoint(multi) as b, open_checkpoint(newest) as plain:
        names = [info.name for info in a.tensors()]
        assert names == [info.name for info in b.tensors()]
        for name in names:
            x, y, w = a.read(name), b.read(name), plain.read(name)
            assert torch.equal(x != w, y != w), name
            torch.testing.assert_close(y, x, rtol=2.4e-7, atol=0, msg=name)


def _owned_only(run: Path, k: int) -> None:
    """Each rank's part of the store holds the pieces stored in the files that rank owns, and nothing else."""
    parts = parts_of(run / ".pdt")[k]
    assert len(parts) == k
    with DcpReader(run / f"step_{EPOCHS}") as whole:
        where = {}
        for info in whole.tensors():
            chunks = whole._chunks[info.name]
            for chunk, storage in chunks:
                name = info.name if len(chunks) == 1 else f"{info.name}@" + ",".join(map(str, chunk.offsets))
                where[name] = storage.relative_path
        files = whole.weight_files()
    for rank, part in enumerate(parts):
        store = Store.open(part)
        owned = set(World(rank, k).owned(files))
        assert {where[t.name] for t in store.tensors} <= owned
        assert store.n == sum(t.numel for t in store.tensors)
        store.close()


@pytest.mark.parametrize("kind,writers,k", [("dcp", 2, 2), ("dcp", 2, 4), ("dcp", 4, 2), ("dcp", 4, 4),
                                            ("safetensors", 0, 2), ("safetensors", 0, 4)])
def test_k_ranks_give_what_one_process_gives(tmp_path, trajectory, kind, writers, k):
    run = _folder(tmp_path, trajectory, kind, writers)
    if kind == "safetensors":
        index = json.loads((run / "step_1" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 4  # a share for each of 4 ranks
    single = tmp_path / "single"
    shutil.copytree(run, single)

    for step in ("first", "steady"):  # the steady step fits a window that holds the first fused state
        if step == "steady":
            _reveal(tmp_path, run)
            _reveal(tmp_path, single)
        expected = _single(single)
        got = _ranks(k, run)
        assert got["status"] == expected["status"] == "written"
        assert got["mask"]["totals"] == expected["mask"]["totals"]
        _same_but_paths(got, expected, single, run)
        newest = f"step_{6 if step == 'first' else EPOCHS}"
        _fused_equal(single / f"{newest}.pdt", run / f"{newest}.pdt", run / newest)
    if (kind, writers, k) == ("dcp", 2, 2):  # the audit commands too: a mask of the stored fit, as one process
        masks = [launch(k, ["mask", str(run), "--criteria", "all", "--json"])[0],
                 subprocess.run([sys.executable, "-m", "pdtcli", "mask", str(single), "--criteria", "all", "--json"],
                                capture_output=True, text=True, timeout=300)]
        assert [m.returncode for m in masks] == [0, 0], [m.stderr for m in masks]
        got, expected = (json.loads(m.stdout) for m in masks)
        assert got["status"] == "masked" and got["mask"]["totals"] == expected["mask"]["totals"]
        assert got["tensors"] == expected["tensors"]
    if kind == "dcp":
        _owned_only(run, k)
        assert (run / f"step_{EPOCHS}.pdt" / ".metadata").read_bytes() == \
            (run / f"step_{EPOCHS}" / ".metadata").read_bytes()
    _same_but_paths(_report(run), _report(single), single, run)


def test_per_tensor_fits_over_ranks_give_what_one_process_gives(tmp_path, trajectory):
    """--dmd-scope tensor over DCP files that hold a piece of every tensor each: the ranks' factors of a tensor's
    pieces combine into the factor of all its rows, so the ranks fit, mask and write what one process does."""
    run = _folder(tmp_path, trajectory, "dcp", 2)
    single = tmp_path / "single"
    shutil.copytree(run, single)
    expected = _single(single, "--dmd-scope", "tensor")
    got = _ranks(2, run, "--dmd-scope", "tensor")
    assert got["status"] == expected["status"] == "written"
    assert got["mask"]["totals"] == expected["mask"]["totals"]
    ours, theirs = got["fit"]["per_tensor"], expected["fit"]["per_tensor"]
    np.testing.assert_allclose(ours.pop("spectral_radius"), theirs.pop("spectral_radius"), rtol=1e-9)
    assert ours == theirs and ours["tensors"] == 6  # the predicted tensors, whole
    assert any("@" in t.name for part in parts_of(run / ".pdt")[2] for t in Store.open(part).tensors)  # pieces
    _fused_equal(single / "step_6.pdt", run / "step_6.pdt", run / "step_6")


def test_a_store_made_by_other_ranks_is_refused_until_run_as_made(tmp_path, trajectory):
    run = _folder(tmp_path, trajectory, "dcp", 2)
    _ranks(2, run)
    _reveal(tmp_path, run)
    before = _everything(run)
    for k in (4, 1):
        results = launch(k, ["predict", str(run)]) if k > 1 else [subprocess.run(
            [sys.executable, "-m", "pdtcli", "predict", str(run)], capture_output=True, text=True, timeout=300)]
        for result in results:
            assert result.returncode == 7, result.stderr
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "made by 2 ranks" in lines[0] and str(run / ".pdt") in lines[0]
        assert _everything(run) == before  # no output, no store touched
    assert _ranks(2, run)["status"] == "written"
    assert (run / f"step_{EPOCHS}.pdt").is_dir()


def test_a_missing_shard_on_one_rank_stops_every_rank(tmp_path, trajectory):
    run = _folder(tmp_path, trajectory, "dcp", 2)
    _ranks(2, run)
    _reveal(tmp_path, run)
    (run / f"step_{EPOCHS}" / "__1_0.distcp").unlink()  # rank 1's file of the new checkpoint
    before = _everything(run)
    results = launch(2, ["predict", str(run)], timeout=120)
    # every rank reads the step the new checkpoint records (its training order), which lies in that very
    # file: each stops on it and says what, before any agreement
    for result in results:
        assert result.returncode == 3 and "__1_0.distcp" in result.stderr, result.stderr
    for result in results:
        assert len(result.stderr.strip().splitlines()) == 1
    assert _everything(run) == before  # the store parts as they were; no output, no temporary


def _steady_step_with_rank_1_killed(tmp_path: Path, trajectory: dict, target: str, nth: int, when: str
                                    ) -> tuple[Path, Path, list[subprocess.CompletedProcess]]:
    """(the 2-rank run, its one-process copy, the ranks' results) of a steady step in which rank 1 is
    SIGKILLed at the `nth` call of `target` (`tests/kill_at.py`); both folders have had their first step."""
    run = _folder(tmp_path, trajectory, "dcp", 2)
    single = tmp_path / "single"
    shutil.copytree(run, single)
    _ranks(2, run)
    _single(single)
    _reveal(tmp_path, run)
    _reveal(tmp_path, single)
    kill = [str(Path(__file__).parent / "kill_at.py"), target, str(nth), when, "--"]
    return run, single, launch(2, ["predict", str(run)], before_rank={1: kill}, timeout=120)


def test_a_rank_killed_mid_pass_leaves_no_output_and_the_next_run_goes_on(tmp_path, trajectory):
    run, single, results = _steady_step_with_rank_1_killed(tmp_path, trajectory, "pdtcli.fuse:Predictor.stream", 2,
                                                           "before")
    assert results[1].returncode == -9  # SIGKILL, in the second pass
    assert results[0].returncode == 7 and "another rank stopped" in results[0].stderr
    assert len(results[0].stderr.strip().splitlines()) == 1
    assert not (run / f"step_{EPOCHS}.pdt").exists()
    assert not [p for p in run.iterdir() if ".pdt-tmp-" in p.name]
    parts = [Store.open(p) for p in parts_of(run / ".pdt")[2]]
    assert parts[0].fingerprint() == parts[1].fingerprint()  # both ranks committed the same, or nothing
    assert all(p.fit.window != p.window for p in parts)  # the new checkpoint is in; no fit of it was kept
    for part in parts:
        part.close()
    assert _ranks(2, run)["status"] == "written"  # the same world goes on from there
    _single(single)
    _fused_equal(single / f"step_{EPOCHS}.pdt", run / f"step_{EPOCHS}.pdt", run / f"step_{EPOCHS}")


def test_the_readme_torchrun_line(tmp_path, trajectory):
    """`torchrun ... -m pdtcli predict DIR`, as a user runs it: torchrun's own rendezvous and supervision."""
    run = _folder(tmp_path, trajectory, "dcp", 2)
    single = tmp_path / "single"
    shutil.copytree(run, single)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "pdtcli", "predict", str(run), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = _single(single)
    assert json.loads(proc.stdout)["mask"]["totals"] == expected["mask"]["totals"]
    _fused_equal(single / "step_6.pdt", run / "step_6.pdt", run / "step_6")


def test_a_rank_killed_inside_a_commit_is_brought_forward_on_the_next_run(tmp_path, trajectory):
    """Killed after every rank has written its next records and agreed, before its own are in place:
    the other rank has committed. The next run finishes the commit for it, and goes on as one process would."""
    run, single, results = _steady_step_with_rank_1_killed(tmp_path, trajectory, "pdtcli.world:World.agree", 1,
                                                           "after")
    assert results[1].returncode == -9
    assert results[0].returncode == 7, results[0].stderr
    part0, part1 = parts_of(run / ".pdt")[2]
    stores = [Store.open(part0), Store.open(part1)]
    assert stores[0].generation == stores[1].generation + 1  # rank 0 committed; rank 1 has only its next records
    assert (part1 / "store.h5.next").is_file()
    for store in stores:
        store.close()
    assert _ranks(2, run)["status"] == "written"
    assert not (part0 / "store.h5.next").exists() and not (part1 / "store.h5.next").exists()
    _single(single)
    _fused_equal(single / f"step_{EPOCHS}.pdt", run / f"step_{EPOCHS}.pdt", run / f"step_{EPOCHS}")


def test_a_pdt_started_by_a_training_worker_runs_as_one_process(tmp_path):
    """A pdt started from inside a torchrun worker inherits its RANK, WORLD_SIZE and MASTER_PORT; it must
    not join (or wait for) the training's process group."""
    run = tmp_path / "run"
    training.train(run, 5)
    env = dict(os.environ, RANK="1", WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    env.pop("PDT_DISTRIBUTED", None)
    proc = subprocess.run([sys.executable, "-m", "pdtcli", "predict", str(run), "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "not started by torchrun: it runs as one process" in proc.stderr
    assert (run / ".pdt" / "store.h5").is_file()
    report = subprocess.run([sys.executable, "-m", "pdtcli", "report", str(run), "--json"],
                            env=dict(env, PDT_DISTRIBUTED="1"), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr  # a report never joins a process group


def test_a_store_held_by_another_run_stops_every_rank_before_any_part_is_taken(tmp_path, trajectory):
    """Rank 0 takes the store folder's own lock before any rank locks its part, so two runs queue as wholes."""
    import filelock

    run = _folder(tmp_path, trajectory, "dcp", 2)
    _ranks(2, run)
    before = _everything(run)
    with filelock.FileLock(str(run / ".pdt" / "lock")):  # another run holds the store
        results = launch(2, ["predict", str(run), "--wait", "0"], timeout=120)
    for result in results:
        assert result.returncode == 4, result.stderr
        assert "locked by another pdt process" in result.stderr
    assert _everything(run) == before


def test_one_process_reads_and_fuses_a_dcp_sharded_by_rows_a_chunk_at_a_time(tmp_path, trajectory, monkeypatch):
    """Tensors that 2 ranks saved by rows are read and fused per chunk and per piece (20 elements, ending
    inside a byte of the mask): outputs, store and masks byte-identical to assembling each tensor whole."""
    run = _folder(tmp_path, trajectory, "dcp", 2)
    with DcpReader(run / "step_1") as reader:
        assert all(reader._rows(info.name) is not None and len(reader._rows(info.name)) == 2
                   for info in reader.tensors() if info.shape and info.shape[0] >= 2)
    whole = tmp_path / "whole"
    shutil.copytree(run, whole)
    results = {}
    for folder, by_chunks in ((run, True), (whole, False)):
        with monkeypatch.context() as patch:
            if by_chunks:
                patch.setattr(base, "CHUNK_ELEMENTS", 20)
            else:
                patch.setattr(DcpReader, "_rows", lambda self, name: None)
            steps = []
            for step in ("first", "steady"):
                if step == "steady":
                    _reveal(tmp_path, folder)
                result = CliRunner().invoke(app, ["predict", str(folder), "--json"])
                assert result.exit_code == 0, result.output
                steps.append(json.loads(result.output))
        results[by_chunks] = steps
    for chunked, assembled in zip(results[True], results[False], strict=True):
        assert chunked["mask"]["totals"] == assembled["mask"]["totals"]
        assert chunked.get("tensors") == assembled.get("tensors")
    for name in ("step_6.pdt", f"step_{EPOCHS}.pdt"):
        assert _everything(run / name) == _everything(whole / name)
    assert (run / ".pdt" / "snapshots.bin").read_bytes() == (whole / ".pdt" / "snapshots.bin").read_bytes()


@pytest.mark.parametrize("lost", ["folder", "records"])
def test_a_distributed_store_missing_a_part_is_refused_by_the_report(tmp_path, trajectory, lost):
    """A part of a 2-rank store that is gone (its folder, or only its store.h5) would make the report show the
    other rank's half of the model as the whole: it is a store error naming the missing part."""
    run = _folder(tmp_path, trajectory, "dcp", 2)
    _ranks(2, run)
    part1 = parts_of(run / ".pdt")[2][1]
    if lost == "folder":
        shutil.rmtree(part1)
    else:
        (part1 / "store.h5").unlink()
    before = _everything(run)
    proc = subprocess.run([sys.executable, "-m", "pdtcli", "report", str(run), "--json"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "rank-00001-of-00002" in lines[0] and "is missing" in lines[0], lines
    assert json.loads(proc.stdout)["exit_code"] == 4
    assert _everything(run) == before
