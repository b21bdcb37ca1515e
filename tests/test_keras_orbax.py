"""Keras 3 `.keras` archives and Orbax `CheckpointManager` steps, as their users save them now (issue 22 §4).

Each test trains a tiny model for real, saves the way the framework's own guide does (Keras'
`ModelCheckpoint` default, Flax's Orbax `CheckpointManager`), runs `pdt predict`, loads the fused
checkpoint back through the framework's own loader and trains on from it.
"""

from __future__ import annotations

import io
import json
import re
import sys
import zipfile

import h5py
import numpy as np
import pytest
import training
from test_hostile import one_error_line, pdt
from typer.testing import CliRunner

from pdtcli.cli import app
from pdtcli.formats import open_checkpoint


def predict(folder, *args: str) -> dict:
    result = CliRunner().invoke(app, ["predict", str(folder), "--json", *args])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["status"] == "written"
    return payload


def archived_weights(path) -> dict[str, np.ndarray]:
    """Every dataset of a `.keras` archive's `model.weights.h5`, by its HDF5 path."""
    with zipfile.ZipFile(path) as archive, h5py.File(io.BytesIO(archive.read("model.weights.h5"))) as weights:
        found: dict[str, np.ndarray] = {}
        weights.visititems(lambda name, obj: found.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
    return found


@pytest.mark.slow
def test_keras_archives_from_model_checkpoint_are_fused_loaded_and_trained_on(tmp_path):
    import keras

    x, y = (t.numpy() for t in training.data())
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((training.INPUTS,)), keras.layers.Dense(16, activation="relu"),
                              keras.layers.BatchNormalization(), keras.layers.Dense(training.CLASSES)])
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    folder = tmp_path / "ckpts"
    model.fit(x, y, batch_size=64, epochs=6, verbose=0, shuffle=False,
              callbacks=[keras.callbacks.ModelCheckpoint(filepath=str(folder / "epoch_{epoch:02d}.keras"))])

    payload = predict(folder)
    fused_path, newest_path = folder / "epoch_06.pdt.keras", folder / "epoch_06.keras"
    assert payload["output"] == str(fused_path)
    with open_checkpoint(newest_path) as reader:
        assert reader.recorded_step() == 6 * 8  # the optimizer's iterations, 8 batches an epoch
    with zipfile.ZipFile(fused_path) as fused, zipfile.ZipFile(newest_path) as newest:
        assert fused.namelist() == newest.namelist()
        for name in newest.namelist():
            if name != "model.weights.h5":
                assert fused.read(name) == newest.read(name), name
    fused, newest = archived_weights(fused_path), archived_weights(newest_path)
    kernel = "layers/dense/vars/0"
    assert 0 < np.mean(fused[kernel] != newest[kernel]) < 1
    for name in newest:  # the optimizer's state and BatchNormalization's running statistics are carried
        if name.startswith("optimizer/") or name.endswith(("/vars/2", "/vars/3")):
            np.testing.assert_array_equal(fused[name], newest[name], err_msg=name)

    resumed = keras.saving.load_model(fused_path)
    np.testing.assert_array_equal(resumed.layers[0].kernel.numpy(), fused[kernel])
    assert int(resumed.optimizer.iterations.numpy()) == 6 * 8
    np.testing.assert_array_equal(resumed.optimizer.variables[2].numpy(), newest["optimizer/vars/2"])
    history = resumed.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert int(resumed.optimizer.iterations.numpy()) == 7 * 8
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.slow
def test_orbax_steps_of_a_flax_run_are_fused_after_every_save_and_the_manager_restores_and_rotates(tmp_path):
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    x, y, state, step, epoch = training.flax_run()

    folder = tmp_path / "ckpts"
    manager = ocp.CheckpointManager(folder, options=ocp.CheckpointManagerOptions(max_to_keep=3))
    for number in range(1, 7):
        state = epoch(state)
        manager.save(number, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
        code, output = pdt("predict", folder, "--history", "2", "--json")
        assert code == 0, output
        assert manager.all_steps() == list(range(max(1, number - 2), number + 1))  # pdt's entries are not steps
    assert json.loads(output)["output"] == str(folder / "6.pdt")
    outputs = {f"{number}.pdt" for number in range(1, 7)}  # pdt's fused steps, which the manager passes over
    assert {p.name for p in folder.iterdir()} - outputs == {".pdt", "4", "5", "6"}
    assert manager.latest_step() == 6

    fused = ocp.StandardCheckpointer().restore(folder / "6.pdt" / "default", state)  # the documented resume line
    newest = manager.restore(6, args=ocp.args.StandardRestore(state))
    assert int(fused.step) == int(newest.step) == 6 * 8
    with open_checkpoint(folder / "6.pdt") as written, open_checkpoint(folder / "6") as saved:
        assert saved.recorded_step() == 6
        assert [i.name for i in written.tensors()] == [i.name for i in saved.tensors()] == [
            f"default/params/params/layers_{layer}/{kind}" for layer in (0, 2) for kind in ("bias", "kernel")]
        kernel = fused.params["params"]["layers_0"]["kernel"]
        np.testing.assert_array_equal(np.asarray(kernel), written.read("default/params/params/layers_0/kernel"))
    assert 0 < float(jnp.mean(kernel != newest.params["params"]["layers_0"]["kernel"])) < 1
    for got, want in zip(jax.tree_util.tree_leaves(fused.opt_state), jax.tree_util.tree_leaves(newest.opt_state),
                         strict=True):
        np.testing.assert_array_equal(got, want)  # the optimizer's state is carried, not predicted

    resumed = epoch(fused)
    assert int(resumed.step) == 7 * 8 and bool(jnp.isfinite(resumed.params["params"]["layers_0"]["kernel"]).all())
    manager.save(7, args=ocp.args.StandardSave(resumed))
    manager.wait_until_finished()
    assert manager.all_steps() == [5, 6, 7]
    code, output = pdt("predict", folder, "--history", "2", "--json")
    assert code == 0, output
    assert json.loads(output)["output"] == str(folder / "7.pdt")


def orbax_steps(folder, count: int) -> None:
    """`count` steps of a CheckpointManager, each a params tree of real arrays that drift a little."""
    import orbax.checkpoint as ocp

    rng = np.random.default_rng(0)
    params = {"params": {"kernel": rng.standard_normal((4, 3), np.float32), "bias": np.zeros(3, np.float32)}}
    with ocp.CheckpointManager(folder) as manager:
        for number in range(1, count + 1):
            params = {"params": {k: v - 0.01 * (v + 1) for k, v in params["params"].items()}}
            manager.save(number, args=ocp.args.StandardSave(params))


def test_an_orbax_folder_without_orbax_installed_is_named_and_refused(tmp_path, monkeypatch):
    orbax_steps(tmp_path, 3)
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # as if the optional extra were not installed
    code, output = pdt("predict", tmp_path)
    assert code == 3, output
    line = one_error_line(output)
    assert re.fullmatch(rf"pdt: error: {re.escape(str(tmp_path))}/[123]: an Orbax checkpoint; reading it needs "
                        r"orbax-checkpoint \(.*\): pip install 'pdtcli\[orbax\]'", line), line
    assert not (tmp_path / ".pdt").exists()


@pytest.mark.slow
def test_keras_sharded_weights_are_refused_in_one_line_not_taken_as_one_checkpoint_per_shard(tmp_path):
    import keras

    x, y = (t.numpy() for t in training.data())
    model = keras.Sequential([keras.Input((training.INPUTS,)), keras.layers.Dense(16), keras.layers.Dense(4)])
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    for epoch in range(1, 4):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0)
        model.save_weights(tmp_path / f"epoch_{epoch}.weights.json", max_shard_size=1e-6)  # in GB: a few shards
    assert (tmp_path / "epoch_3_00001.weights.h5").is_file()
    code, output = pdt("predict", tmp_path)
    assert code == 3, output
    line = one_error_line(output)
    shard = re.fullmatch(rf"pdt: error: {re.escape(str(tmp_path))}/epoch_(\d)_0000[01]\.weights\.h5: a shard of the "
                         r"Keras sharded weights epoch_(\d)\.weights\.json, which pdt does not read: save each "
                         r"checkpoint as one file \(`save_weights` without `max_shard_size`, or the \.keras archive "
                         r"`ModelCheckpoint` writes\)", line)
    assert shard and shard.group(1) == shard.group(2), line


def test_an_orbax_step_holding_a_link_out_is_refused_before_orbax_reads_it(tmp_path):
    folder, outside = tmp_path / "ckpts", tmp_path / "secret.bin"
    orbax_steps(folder, 3)
    outside.write_bytes(b"not the checkpoint's")
    (folder / "3" / "default" / "d" / "extra").symlink_to(outside)
    code, output = pdt("predict", folder)
    assert code == 3, output
    assert one_error_line(output) == (f"pdt: error: {folder / '3'}: default/d/extra is a symbolic link to {outside}, "
                                      "outside the checkpoint; pdt does not follow links out of a checkpoint")
    assert outside.read_bytes() == b"not the checkpoint's" and not list(tmp_path.rglob("*.pdt"))
