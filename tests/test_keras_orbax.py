"""Keras 3 `.keras` archives and Orbax `CheckpointManager` steps, as their users save them now (issue 22 §4).

Each test trains a tiny model for real, saves the way the framework's own guide does (Keras'
`ModelCheckpoint` default, Flax's Orbax `CheckpointManager`), runs `pdt predict`, loads the fused
checkpoint back through the framework's own loader and trains on from it.
"""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import numpy as np
import pytest
import training
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
