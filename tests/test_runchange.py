"""A run that changes keeps going (issue 21 §4).

The model changes mid-run and training goes on saving into the same folder: the window waits
(`waiting`, exit 0, one line) until h checkpoints of the new layout exist, then restarts on them
by itself. A run folder copied or renamed takes its store along: pdt adopts it when the window's
checkpoints are found there, and otherwise names `--rebuild`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import pytest
import torch
from conftest import digest_tree
from torch import nn
from typer.testing import CliRunner

from pdtcli.cli import app

TOKENS, WIDTH, CLASSES = 64, 16, 4


def pdt(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def predict(folder: Path, *args) -> dict:
    code, output = pdt("predict", folder, "--json", *args)
    assert code == 0, output
    return json.loads(output)


class Net(nn.Module):
    """Token embeddings and a linear head (and, `heads=2`, a second head)."""

    def __init__(self, rows: int = TOKENS, heads: int = 1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(rows, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)
        if heads == 2:
            self.head2 = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.emb(tokens).mean(1)
        out = self.head(pooled)
        return out + self.head2(pooled) if hasattr(self, "head2") else out


class Run:
    """Training that saves one checkpoint per epoch into `folder` (epoch_0001.pt, …), as a script does."""

    def __init__(self, folder: Path, net: Net, dtype: torch.dtype | None = None) -> None:
        self.folder, self.net, self.dtype, self.epoch = folder, net, dtype, 0
        folder.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(1)
        self.tokens = torch.randint(0, TOKENS, (256, 8), generator=gen)
        self.labels = self.tokens[:, 0] % CLASSES
        self.renew_optimizer()

    def renew_optimizer(self) -> None:
        self.optim = torch.optim.SGD(self.net.parameters(), lr=0.5, momentum=0.9)

    def save_next(self) -> Path:
        self.epoch += 1
        order = torch.randperm(len(self.tokens), generator=torch.Generator().manual_seed(self.epoch))
        for i in range(0, len(order), 32):
            batch = order[i: i + 32]
            self.optim.zero_grad()
            nn.functional.cross_entropy(self.net(self.tokens[batch]), self.labels[batch]).backward()
            self.optim.step()
        state = {k: v.to(self.dtype) if self.dtype is not None else v for k, v in self.net.state_dict().items()}
        path = self.folder / f"epoch_{self.epoch:04d}.pt"
        torch.save({"model": state, "optimizer": self.optim.state_dict(), "epoch": self.epoch}, path)
        return path


def resize_embeddings(net: Net, rows: int) -> None:
    """What Hugging Face's `resize_token_embeddings` does: the old rows copied, the new ones drawn afresh."""
    old = net.emb
    net.emb = nn.Embedding(rows, WIDTH)
    with torch.no_grad():
        net.emb.weight[: old.num_embeddings] = old.weight
        net.emb.weight[old.num_embeddings:].normal_(0.0, 0.02)


def change_waits_then_restarts(run: Run, history: int, what: str) -> dict:
    """After the model changed: `predict` after each of the next h-1 saves waits (exit 0, the line, how many
    more); after the h-th it restarts the window on them and writes the fused checkpoint."""
    first = None
    for more in range(history - 1, 0, -1):
        saved = run.save_next()
        first = first or saved.name
        payload = predict(run.folder, "--history", history)
        assert payload["status"] == "waiting" and payload["needed"] == more, payload
        assert payload["message"] == (f"the model changed at {first} ({what}); the window restarts once "
                                      f"{history} checkpoints of the new layout exist: {more} more")
    code, output = pdt("predict", run.folder, "--history", history)  # what a person reads: the one line
    assert code == 0 and output.strip().splitlines() == [payload["message"]], output
    run.save_next()
    payload = predict(run.folder, "--history", history)
    assert payload["status"] == "written", payload
    assert payload["warnings"][0] == (f"the model changed at {first} ({what}): the window restarts on the "
                                      f"{history} checkpoints of the new layout, {first} to "
                                      f"epoch_{run.epoch:04d}.pt")
    return payload


def test_resized_embeddings_wait_then_the_window_restarts_on_the_new_layout(tmp_path):
    run = Run(tmp_path / "run", Net())
    for epoch in range(1, 7):
        run.save_next()
        payload = predict(run.folder)
        assert payload["status"] == ("waiting" if epoch < 5 else "written"), payload
    resize_embeddings(run.net, 72)
    run.renew_optimizer()
    payload = change_waits_then_restarts(run, 5, "emb.weight 64×16 → 72×16")
    fused = Path(payload["output"])
    assert fused.name == "epoch_0011.pdt.pt"
    state = torch.load(fused, weights_only=True)
    resized = Net(72)
    resized.load_state_dict(state["model"])  # the fused checkpoint is of the new layout and loads
    assert not torch.equal(state["model"]["emb.weight"], run.net.emb.weight.detach())  # predicted, not copied
    report = json.loads(pdt("report", run.folder, "--json")[1])
    assert [t["shape"] for t in report["tensors"] if t["name"] == "emb.weight"] == [[72, 16]]
    assert len(report["history"]) == 3  # the two steps of the old layout are kept, and this one
    assert sorted(p.name for p in (run.folder / ".pdt").iterdir()) == ["lock", "snapshots.bin", "store.h5"]
    run.save_next()  # and the run goes on as ever
    assert predict(run.folder)["status"] == "written"


@pytest.mark.parametrize("change", ["added", "removed", "float32"])
def test_a_tensor_added_or_removed_or_a_new_precision_restarts_the_window_too(tmp_path, change):
    heads = 2 if change == "removed" else 1
    run = Run(tmp_path / "run", Net(heads=heads), dtype=torch.bfloat16 if change == "float32" else None)
    for _ in range(3):
        run.save_next()
    assert predict(run.folder, "--history", 3)["status"] == "written"
    if change == "added":
        run.net.head2 = nn.Linear(WIDTH, CLASSES)
        what = "head2.weight added; head2.bias added"
    elif change == "removed":
        del run.net.head2
        what = "head2.weight removed; head2.bias removed"
    else:
        run.dtype = None
        what = "emb.weight bfloat16 → float32 (this store keeps bfloat16); head.weight bfloat16 → float32 " \
               "(this store keeps bfloat16); head.bias bfloat16 → float32 (this store keeps bfloat16)"
    run.renew_optimizer()
    payload = change_waits_then_restarts(run, 3, what)
    state = torch.load(payload["output"], weights_only=True)["model"]
    assert sorted(state) == sorted(run.net.state_dict())
    assert {v.dtype for v in state.values()} == {torch.float32}


def test_more_than_h_new_checkpoints_at_once_restart_on_the_newest_h(tmp_path):
    """pdt did not run while training saved 4 checkpoints of the resized model (h = 3)."""
    run = Run(tmp_path / "run", Net())
    for _ in range(3):
        run.save_next()
    assert predict(run.folder, "--history", 3)["status"] == "written"
    resize_embeddings(run.net, 72)
    run.renew_optimizer()
    saved = [run.save_next() for _ in range(4)]
    payload = predict(run.folder)
    assert payload["status"] == "written" and payload["output"].endswith("epoch_0007.pdt.pt")
    assert payload["warnings"] == ["the model changed at epoch_0005.pt (emb.weight 64×16 → 72×16): the window "
                                   "restarts on the 3 checkpoints of the new layout, epoch_0005.pt to epoch_0007.pt"]
    assert [s["path"] for s in payload["skipped"]] == [str(saved[0])]
    assert predict(run.folder)["status"] == "up-to-date"


def test_two_models_saving_into_one_folder_are_refused(tmp_path):
    """A checkpoint of the window's layout saved after one of a new layout: no model change."""
    run = Run(tmp_path / "run", Net())
    for _ in range(3):
        run.save_next()
    assert predict(run.folder, "--history", 3)["status"] == "written"
    other = Run(tmp_path / "other", Net(72))
    other.epoch = run.epoch
    shutil.copy(other.save_next(), run.folder)  # epoch_0004.pt, of another model
    assert predict(run.folder)["status"] == "waiting"
    run.epoch = other.epoch
    run.save_next()  # epoch_0005.pt, of the first model again
    store = (run.folder / ".pdt" / "store.h5").read_bytes()
    code, output = pdt("predict", run.folder)
    lines = output.strip().splitlines()
    assert code == 3 and len(lines) == 1, output
    assert lines[0] == (f"pdt: error: {run.folder / 'epoch_0005.pt'}: has the window's layout, but epoch_0004.pt, "
                        "saved before it, has another (emb.weight 64×16 → 72×16): are two models saving into this "
                        "folder? Keep one model's checkpoints here (`--files GLOB` names them)")
    assert (run.folder / ".pdt" / "store.h5").read_bytes() == store


# ---- a run folder copied or renamed ------------------------------------------------------------------


def written_run(folder: Path) -> Run:
    run = Run(folder, Net())
    for _ in range(5):
        run.save_next()
    assert predict(folder)["status"] == "written"
    return run


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_copied_run_folder_adopts_its_store_and_leaves_the_original_alone(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    run = written_run(a)
    shutil.copytree(a, b, symlinks=True, copy_function=shutil.copy2)  # cp -a runs/a runs/b
    before = tree(a)
    run.folder = b
    run.save_next()
    payload = predict(b)
    assert payload["status"] == "written" and payload["output"] == str(b.resolve() / "epoch_0006.pdt.pt")
    # first the adoption; (training here went on from the plain checkpoint, which the lineage line says next)
    assert payload["warnings"][0] == (f"this store was made for {a.resolve()}; its checkpoints are here: adopted for "
                                      f"{b.resolve()}")
    assert tree(a) == before  # runs/a and its store, byte for byte
    report = json.loads(pdt("report", b, "--json")[1])
    assert report["folder"] == str(b.resolve())
    assert all(str(b.resolve()) in w["path"] for w in report["window"])
    assert predict(b)["status"] == "up-to-date"


def test_a_renamed_run_folder_adopts_its_store(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    run = written_run(a)
    a.rename(b)
    code, output = pdt("predict", b)
    assert code == 0, output
    assert f"warning: this store was made for {a.resolve()}; its checkpoints are here: adopted for {b.resolve()}" \
        in output.splitlines()
    run.folder = b
    run.save_next()
    assert predict(b)["status"] == "written"
    with h5py.File(b / ".pdt" / "store.h5") as f:
        assert str(a) not in f["state"][()].decode()


def test_a_copied_run_whose_checkpoints_changed_names_rebuild(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    written_run(a)
    shutil.copytree(a, b, symlinks=True, copy_function=shutil.copy2)
    state = torch.load(b / "epoch_0004.pt", weights_only=True)
    state["model"]["head.bias"] += 1
    torch.save(state, b / "epoch_0004.pt")
    before, store_a = tree(b), tree(a)
    code, output = pdt("predict", b)
    lines = output.strip().splitlines()
    assert code == 4 and len(lines) == 1, output
    assert lines[0] == (f"pdt: error: {b / '.pdt'}: this store was made for {a.resolve()}, and its checkpoint "
                        "epoch_0004.pt is not the same here; `pdt snapshot --rebuild` makes a store for this folder")
    assert tree(b) == before and tree(a) == store_a
    assert pdt("snapshot", b, "--rebuild")[0] == 0
    assert predict(b)["status"] == "written"


def test_another_folders_store_given_with_store_is_still_refused(tmp_path):
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    written_run(a)
    shutil.copytree(a, b, symlinks=True, copy_function=shutil.copy2, ignore=shutil.ignore_patterns(".pdt"))
    before = tree(a)
    code, output = pdt("predict", b, "--store", a / ".pdt")
    assert code == 4 and "belongs to another folder" in output and len(output.strip().splitlines()) == 1, output
    assert tree(a) == before and digest_tree(b) == digest_tree(a)
