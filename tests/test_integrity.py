"""The snapshot matrix is checked, not trusted: damage to `snapshots.bin` stops a step with exit 4.

Each test builds a store from real checkpoints of a small training run (2,948 float32 values a
snapshot), damages `.pdt/snapshots.bin` the way a bad disk or a lost write would (flipped bits, a
stale page, a stale slot, NaN or Inf bytes, a truncated or missing file), and checks that the step
stops with one line naming the slot, the checkpoint it holds and `pdt snapshot --rebuild`, writes
no output and leaves the checkpoints as they were; then that `--rebuild` recovers, to the bytes of
an undamaged run. Most run with checksum chunks of 256 values (12 a slot), so that reads cross
chunk boundaries and skip about; one case runs with the default chunk too.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import training
from conftest import digest_tree
from test_hostile import _checksum, one_error_line, pdt

from pdtcli.errors import StoreError
from pdtcli.store import Store, checksums

OUT = "epoch_7.pdt.safetensors"  # the default output of a step whose newest checkpoint is epoch 7


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Digests of 256 values: a slot of 2,948 values has 12 chunks, the last one short."""
    monkeypatch.setattr(checksums, "CHUNK_ELEMENTS", 256)


@pytest.fixture(scope="module")
def _run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wide")
    training.train(folder, 8, fmt="safetensors", hidden=128)
    return folder


def _grown(run: Path, folder: Path) -> bytes:
    """`folder` made as cron makes it: `pdt snapshot` after epochs 1-5, after 6 and after 7 (which
    reuses the slot of epoch 1). Returns snapshots.bin as it was before the last ingest."""
    folder.mkdir()
    before = b""
    for last in (5, 6, 7):
        for epoch in range(1, last + 1):
            name = f"epoch_{epoch}.safetensors"
            if not (folder / name).exists():
                shutil.copy2(run / name, folder / name)
        if last == 7:
            before = (folder / ".pdt" / "snapshots.bin").read_bytes()
        assert pdt("snapshot", folder)[0] == 0
    return before


@pytest.fixture(scope="module")
def undamaged(_run, tmp_path_factory) -> bytes:
    """The fused checkpoint of `pdt predict` on the grown folder, nothing damaged."""
    folder = tmp_path_factory.mktemp("clean") / "ckpts"
    _grown(_run, folder)
    assert pdt("predict", folder)[0] == 0
    return (folder / OUT).read_bytes()


def _newest_slot(folder: Path, place: int = -1) -> tuple[int, int, str]:
    """(slot of the window's newest snapshot, or the one at `place`; values a slot; the path it holds)."""
    store = Store.open(folder / ".pdt")
    try:
        chosen = store.window[place]
        return store.slot_of(chosen), store.n, store.snapshot(chosen).path
    finally:
        store.close()


def _edit(path: Path, position: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        f.write(data)


def _flip_bits(matrix: Path, slot: int, n: int) -> None:
    """One mantissa bit flipped in 1,000 of the slot's float32 values."""
    values = np.fromfile(matrix, np.float32, count=n, offset=slot * n * 4)
    where = np.random.default_rng(0).choice(n, 1000, replace=False)
    values.view(np.uint32)[where] ^= np.uint32(1 << 5)
    _edit(matrix, slot * n * 4, values.tobytes())


def _stale_page(matrix: Path, slot: int, n: int, before: bytes) -> None:
    """The 4 KiB page holding the slot's first values, as it was before the last ingest (a lost write)."""
    page = slot * n * 4 // 4096 * 4096
    _edit(matrix, page, before[page:page + 4096])


def _stale_slot(matrix: Path, slot: int, n: int, before: bytes) -> None:
    _edit(matrix, slot * n * 4, before[slot * n * 4:(slot + 1) * n * 4])


def _special(value: float):
    def damage(matrix: Path, slot: int, n: int, before: bytes) -> None:
        _edit(matrix, (slot * n + 1234) * 4, np.full(3, value, np.float32).tobytes())
    return damage


DAMAGE = {
    "flipped-bits": lambda matrix, slot, n, before: _flip_bits(matrix, slot, n),
    "stale-page": _stale_page,
    "stale-slot": _stale_slot,
    "nan": _special(float("nan")),
    "inf": _special(float("-inf")),
}


def _refused(folder: Path, *command: str) -> str:
    """Run a command that must stop on the damaged matrix: exit 4, one line, no output, inputs kept."""
    inputs = digest_tree(folder)
    code, output = pdt(*command, folder)
    assert code == 4, output
    line = one_error_line(output)
    assert f"{folder / '.pdt' / 'snapshots.bin'}: " in line and "`pdt snapshot --rebuild`" in line
    assert not (folder / OUT).exists() and digest_tree(folder) == inputs
    return line


def _rebuilt_and_predicted(folder: Path, undamaged: bytes) -> None:
    assert pdt("snapshot", folder, "--rebuild")[0] == 0
    assert pdt("predict", folder)[0] == 0
    assert (folder / OUT).read_bytes() == undamaged


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damage_to_a_window_slot_stops_the_step_and_rebuild_recovers(_run, undamaged, tmp_path, how):
    folder = tmp_path / "ckpts"
    before = _grown(_run, folder)
    slot, n, checkpoint = _newest_slot(folder)
    DAMAGE[how](folder / ".pdt" / "snapshots.bin", slot, n, before)
    line = _refused(folder, "predict")
    assert f"slot {slot} (checkpoint {checkpoint})" in line
    assert ("NaN or Inf" if how in ("nan", "inf") else "fail their checksum") in line
    _rebuilt_and_predicted(folder, undamaged)


def test_damage_is_found_with_the_default_chunk_too(_run, undamaged, tmp_path, monkeypatch):
    monkeypatch.setattr(checksums, "CHUNK_ELEMENTS", 1 << 20)  # one chunk a slot here
    folder = tmp_path / "ckpts"
    before = _grown(_run, folder)
    slot, n, checkpoint = _newest_slot(folder)
    _stale_page(folder / ".pdt" / "snapshots.bin", slot, n, before)
    assert f"slot {slot} (checkpoint {checkpoint}): values 0 to {n:,} fail" in _refused(folder, "predict")
    _rebuilt_and_predicted(folder, undamaged)


@pytest.mark.parametrize("command", [["apply"], ["mask", "--criteria", "sign"], ["mask", "--random"]])
def test_steps_from_the_stored_fit_check_what_they_read(_run, undamaged, tmp_path, command):
    """`pdt apply` and `pdt mask` run pass 2 only (the fit is stored); `--random` reads each tensor
    twice, the second time not where the last read ended."""
    folder = tmp_path / "ckpts"
    _grown(_run, folder)
    assert pdt("predict", folder, "--dry-run")[0] == 0
    slot, n, checkpoint = _newest_slot(folder)
    _flip_bits(folder / ".pdt" / "snapshots.bin", slot, n)
    store = (folder / ".pdt" / "store.h5").read_bytes()
    assert f"slot {slot} (checkpoint {checkpoint})" in _refused(folder, *command)
    assert (folder / ".pdt" / "store.h5").read_bytes() == store  # no mask stored from damaged values
    _rebuilt_and_predicted(folder, undamaged)


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_truncated_or_missing_matrix_says_rebuild(_run, undamaged, tmp_path, how):
    folder = tmp_path / "ckpts"
    _grown(_run, folder)
    matrix = folder / ".pdt" / "snapshots.bin"
    if how == "missing":
        matrix.unlink()
        assert "missing" in _refused(folder, "predict")
    else:
        store = Store.open(folder / ".pdt")
        cut, n = store.window[2], store.n
        slot, held = store.slot_of(cut), store.snapshot(cut).path
        store.close()
        with open(matrix, "r+b") as f:
            f.truncate(slot * n * 4 + 100)
        assert f"slot {slot} (checkpoint {held}) and any after it are cut short" in _refused(folder, "predict")
    _rebuilt_and_predicted(folder, undamaged)


def test_a_damaged_fused_state_is_named_as_such(_run, tmp_path):
    """After a first `pdt predict`, the window's newest snapshot is the fused state training resumed from."""
    folder = tmp_path / "ckpts"
    _grown(_run, folder)
    assert pdt("predict", folder)[0] == 0
    slot, n, fused = _newest_slot(folder)
    assert fused == str(folder / OUT)
    _flip_bits(folder / ".pdt" / "snapshots.bin", slot, n)
    shutil.copy2(_run / "epoch_8.safetensors", folder)
    code, output = pdt("predict", folder)
    line = one_error_line(output)
    assert code == 4 and f"slot {slot} (fused checkpoint {fused})" in line and "--rebuild" in line
    assert not (folder / "epoch_8.pdt.safetensors").exists()
    clean = tmp_path / "clean"  # what a store made afresh from the same checkpoints writes
    clean.mkdir()
    for epoch in range(1, 9):
        shutil.copy2(_run / f"epoch_{epoch}.safetensors", clean)
    assert pdt("predict", clean)[0] == 0
    assert pdt("snapshot", folder, "--rebuild")[0] == 0
    assert pdt("predict", folder)[0] == 0
    assert (folder / "epoch_8.pdt.safetensors").read_bytes() == (clean / "epoch_8.pdt.safetensors").read_bytes()


def test_a_chunk_read_only_in_part_is_checked_whole_before_the_pass_ends(_run, tmp_path):
    """A read that starts or stops inside a chunk cannot compare its digest: the pass checks that chunk
    from the file before its results are used, so damage beside the values read is found too."""
    folder = tmp_path / "ckpts"
    _grown(_run, folder)
    slot, n, checkpoint = _newest_slot(folder)
    _edit(folder / ".pdt" / "snapshots.bin", (slot * n + 300) * 4, np.float32(7.0).tobytes())  # in chunk 1
    store = Store.open(folder / ".pdt")
    try:
        store.matrix.read([slot], 0, 256)  # chunk 0, whole: checked as read
        store.matrix.read([slot], 400, 700)  # inside chunks 1 and 2: not comparable yet
        with pytest.raises(StoreError, match=f"slot {slot} \\(checkpoint {checkpoint}\\): values 256 to 512 fail"):
            store.matrix.finish_reads()
    finally:
        store.close()


def test_slots_written_out_of_order_get_the_digests_of_an_in_order_write(_run, tmp_path):
    folder = tmp_path / "ckpts"
    _grown(_run, folder)
    store = Store.open(folder / ".pdt")
    try:
        slot = store.slot_of(store.window[-1])
        values = store.matrix.read([slot], 0, store.n)[0].copy()
        expected = store.matrix.sums.digests[slot].copy()
        store.matrix.sums.digests[slot] = 0
        for start in (2000, 300, 0, 1000):  # pieces in another order, one of them written twice
            store.matrix.write(slot, start, values[start:start + 1000])
        store.matrix.seal([s is not None for s in store.slots])
        assert np.array_equal(store.matrix.sums.digests[slot], expected)
    finally:
        store.close()


def _as_made_before_checksums(folder: Path) -> None:
    """The store as a pdt before checksums wrote it: no digests, store format 2."""
    path = folder / ".pdt" / "store.h5"
    with h5py.File(path, "r+") as f:
        del f["matrix"]
        state = json.loads(f["state"][()])
        del state["checksums"]
        del f["state"]
        f.create_dataset("state", data=json.dumps(state))
        records = {name: f[name][()] for name in ("state", "layout", "history")}
        records.update({f"{g}/{k}": f[g][k][()] for g in ("fit", "mask") if g in f for k in f[g]})
        f.attrs["checksum"] = _checksum(records)
        f.attrs["format_version"] = 2


def test_a_store_from_before_checksums_still_works_and_gains_them(_run, undamaged, tmp_path):
    """Its slots have no digests: they are read checked finite only, and get digests when written again."""
    folder = tmp_path / "ckpts"
    _grown(_run, folder)
    _as_made_before_checksums(folder)
    assert pdt("predict", folder)[0] == 0
    assert (folder / OUT).read_bytes() == undamaged
    store = Store.open(folder / ".pdt")
    lineage = store.slot_of(store.window[-1])  # the fused state, written by this run
    assert [bool(k) for k in store.matrix.sums.known] == [s == lineage for s in range(store.capacity)]
    store.close()

    _as_made_before_checksums(folder)
    slot, n, checkpoint = _newest_slot(folder, 0)  # a checkpoint of the stored fit, which `pdt apply` reads
    _edit(folder / ".pdt" / "snapshots.bin", (slot * n + 5) * 4, np.float32("nan").tobytes())
    (folder / OUT).unlink()
    line = _refused(folder, "apply")
    assert f"slot {slot} (checkpoint {checkpoint}): value 5 is NaN or Inf" in line
