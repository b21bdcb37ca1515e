"""The frameworks' own rotation, discovery and resume, with pdt run after every save (from the command
line and in the loop): each run completes, keeps exactly the checkpoints it was configured to keep,
pdt's store and outputs are where `pdtcli.placement` puts them, and the framework resumes from the
fused state, and from its own latest checkpoint, as documented in the README's workflow section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import training
from safetensors.torch import load_file
from test_hostile import pdt
from test_integrations import gpt, same, started_from, trainer_for

pytestmark = pytest.mark.slow

HOW = ("cli", "loop")


def predicted(folder: Path, *args: str) -> dict:
    """`pdt predict FOLDER --history 2 ARGS --json`, as a cron line would run it after a save."""
    code, output = pdt("predict", folder, "--history", "2", "--json", *args)
    assert code == 0, output
    return json.loads(output)


# ---- Hugging Face Trainer: save_total_limit=2 ---------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_trainer_keeps_two_checkpoints_with_pdt_after_every_save(tmp_path, how):
    """The Trainer's rotation counts every `checkpoint-*` folder, newest by time first: a fused
    `checkpoint-N.pdt` beside them made it keep one real checkpoint. The fused folders go to `run.pdt/`."""
    from transformers import TrainerCallback

    from pdtcli.integrations.hf import PDTCallback

    class Cli(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            predicted(Path(args.output_dir), "--files", "checkpoint-*")

    run = tmp_path / "run"
    trainer_for(gpt(), run, 40, [Cli() if how == "cli" else PDTCallback(history=2)], save_total_limit=2).train()
    assert sorted(p.name for p in run.iterdir()) == [".pdt", "checkpoint-30", "checkpoint-40"]
    side = tmp_path / "run.pdt"
    if how == "loop":  # the fused state lives in the model and the store: `pdt apply` writes it to resume from
        assert not side.exists()
        code, output = pdt("apply", run, "--json")
        assert code == 0, output
    fused = side / "checkpoint-40.pdt"
    assert sorted(p.name for p in side.iterdir())[-1] == fused.name
    # the Trainer's own "latest" first (a resumed run saves checkpoint-50): its newest real checkpoint
    assert same(load_file(run / "checkpoint-40" / "model.safetensors"), started_from(run, 50, True))
    assert same(load_file(fused / "model.safetensors"), started_from(run, 50, str(fused)))


# ---- accelerate: automatic_checkpoint_naming=True, total_limit=2 --------------------------------------


def _accelerator(project: Path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    config = ProjectConfiguration(project_dir=str(project), automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(cpu=True, project_config=config)
    net = training.model(16)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    return accelerator, *accelerator.prepare(net, optimizer)


@pytest.mark.parametrize("how", HOW)
def test_accelerate_keeps_two_checkpoints_with_pdt_after_every_save(tmp_path, how):
    """accelerate reads a number out of every entry of `checkpoints/`: pdt's `.pdt` store there made
    its next `save_state` raise IndexError. The store and the fused folders go to `checkpoints.pdt/`."""
    from pdtcli.integrations import PDTStep

    project = tmp_path / "project"
    folder = project / "checkpoints"
    accelerator, net, optimizer = _accelerator(project)
    step = PDTStep(folder, history=2)
    x, y = training.data()
    for _ in range(5):
        for batch in range(0, len(x), 64):
            loss = torch.nn.functional.cross_entropy(net(x[batch:batch + 64]), y[batch:batch + 64])
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        accelerator.save_state()
        newest = folder / f"checkpoint_{accelerator.save_iteration - 1}"
        if how == "cli":
            predicted(folder)
        else:
            assert step.step(net, newest) is not None
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint_3", "checkpoint_4"]
    side = project / "checkpoints.pdt"
    assert (side / ".pdt" / "store.h5").is_file()
    if how == "loop":
        code, output = pdt("apply", folder, "--json")
        assert code == 0, output
    fused = side / "checkpoint_4.pdt"
    assert sorted(p.name for p in side.iterdir())[-1] == fused.name

    resumed, net, _ = _accelerator(project)
    resumed.load_state(str(fused))  # from the fused state
    assert same(load_file(fused / "model.safetensors"), net.state_dict())
    resumed.load_state()  # accelerate's own "latest": its newest real checkpoint
    assert same(load_file(folder / "checkpoint_4" / "model.safetensors"), net.state_dict())


# ---- Lightning: save_top_k=2, save_last=True -------------------------------------------------------


@pytest.mark.parametrize("how", HOW)
def test_lightning_keeps_two_checkpoints_with_pdt_after_every_save(tmp_path, how):
    """ModelCheckpoint rotates the files it made itself and `ckpt_path="last"` takes a `last*.ckpt`:
    the store and the fused `NAME.pdt.ckpt` files beside them are passed over."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pdtcli.integrations.lightning import PDTCallback

    class Cli(L.Callback):  # Lightning saves after every other callback's epoch end: run pdt at the next start
        def on_train_epoch_start(self, trainer, module):
            if trainer.current_epoch:
                predicted(folder)

    folder = tmp_path / "ckpts"
    x, y = training.data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    Module = training.lightning_module(lambda params: torch.optim.AdamW(params, lr=3e-3))

    def fit(epochs: int, ckpt_path: str | None = None, pdt_step: L.Callback | None = None) -> L.LightningModule:
        checkpoints = ModelCheckpoint(dirpath=folder, filename="{epoch}-{step}", save_top_k=2, monitor="step",
                                      mode="max", save_last=True)
        trainer = L.Trainer(max_epochs=epochs, callbacks=[pdt_step or L.Callback(), checkpoints], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        module = Module()
        trainer.fit(module, loader, ckpt_path=ckpt_path)
        return module

    fit(5, pdt_step=Cli() if how == "cli" else PDTCallback(history=2))
    steps = len(loader)
    real = [f"epoch=3-step={4 * steps}.ckpt", f"epoch=4-step={5 * steps}.ckpt", "last.ckpt"]
    assert sorted(p.name for p in folder.iterdir() if ".pdt" not in p.name) == real
    # in the loop, the newest fused state is that of the checkpoint before the last (no batch followed the last)
    result = predicted(folder) if how == "cli" else json.loads(pdt("apply", folder, "--json")[1])
    epoch = 4 if how == "cli" else 3
    fused = folder / f"epoch={epoch}-step={(epoch + 1) * steps}.pdt.ckpt"
    assert result["output"] == str(fused) and (folder / ".pdt" / "store.h5").is_file()
    expected = {path: torch.load(path, weights_only=True)["state_dict"] for path in (fused, folder / "last.ckpt")}

    loaded = {}

    class Capture(L.Callback):
        def on_train_start(self, trainer, module):
            loaded[trainer.ckpt_path] = {k: v.clone() for k, v in module.state_dict().items()}

    fit(6, "last", Capture())  # Lightning's own "last": the real last.ckpt, not a fused file
    fit(6, str(fused), Capture())  # from the fused state
    assert sorted(loaded) == sorted(str(path) for path in expected)
    assert all(same(expected[Path(path)], state) for path, state in loaded.items())


# ---- the side folder's safety ------------------------------------------------------------------------


def _saved_by_accelerate(project: Path, saves: int = 3) -> Path:
    """`saves` real accelerate checkpoints in `project/checkpoints/`, the folder they are in."""
    accelerator, net, optimizer = _accelerator(project)
    for _ in range(saves):
        for param in net.parameters():
            param.data.add_(0.01 * torch.randn_like(param))
        accelerator.save_state()
    return project / "checkpoints"


def test_a_link_planted_at_the_side_folder_is_refused(tmp_path):
    """`checkpoints.pdt` is derived from the folder's path: a link there (to anywhere) is never written through."""
    from test_hostile import one_error_line, snapshot_of

    folder = _saved_by_accelerate(tmp_path / "project")
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "project" / "checkpoints.pdt").symlink_to(outside)
    before = snapshot_of(folder)
    code, output = pdt("predict", folder, "--history", "2")
    assert code == 4, output
    line = one_error_line(output)
    assert "checkpoints.pdt" in line and "symbolic link" in line
    assert not any(outside.iterdir()) and snapshot_of(folder) == before


def test_the_side_store_is_found_by_its_own_path_and_an_old_store_inside_is_kept(tmp_path):
    """`pdt report` on `checkpoints.pdt/.pdt` reads it as the folder's store; a store an older pdt made inside
    `checkpoints/` stays the folder's store (its backups are recorded there), with a warning to move it."""
    folder = _saved_by_accelerate(tmp_path / "project")
    side_store = tmp_path / "project" / "checkpoints.pdt" / ".pdt"
    assert predicted(folder)["store"] == str(side_store)
    code, output = pdt("report", side_store, "--json")
    assert code == 0, output
    assert json.loads(output)["folder"] == str(folder)

    old = _saved_by_accelerate(tmp_path / "old")
    code, output = pdt("predict", old, "--history", "2", "--store", old / ".pdt")  # where an older pdt kept it
    assert code == 0, output
    assert predicted(old)["store"] == str(old / ".pdt")  # found without --store
    assert not (tmp_path / "old" / "checkpoints.pdt" / ".pdt").exists()
