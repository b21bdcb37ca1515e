"""Every format round-trips through its framework's own save and load functions.

Each test trains a tiny model for real with the framework, saves one checkpoint per epoch
the way that framework's users do, runs `pdt predict`, and loads the fused checkpoint back
with the framework's own loader (and, where the framework resumes, resumes from it).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import training
from safetensors.torch import load_file
from typer.testing import CliRunner

from pdtcli.cli import app


def predict(folder, *args: str) -> dict:
    result = CliRunner().invoke(app, ["predict", str(folder), "--json", *args])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["status"] == "written"
    return payload


def load_any(path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {k: torch.from_numpy(archive[k]) for k in archive.files}
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
def test_one_trajectory_gives_the_same_fused_weights_in_every_format(tmp_path, fmt):
    training.train(tmp_path / "pt", 6)
    training.train(tmp_path / fmt, 6, fmt=fmt)
    predict(tmp_path / "pt")
    reference = load_any(tmp_path / "pt" / "epoch_6.pdt.pt")
    fused_path = tmp_path / fmt / f"epoch_6.pdt.{fmt}"
    assert predict(tmp_path / fmt)["output"] == str(fused_path)
    fused, newest = load_any(fused_path), load_any(tmp_path / fmt / f"epoch_6.{fmt}")
    assert list(fused) == list(newest)  # same keys, same order
    for name, tensor in reference.items():
        assert torch.equal(fused[name], tensor), name
    assert torch.equal(fused["1.running_var"], newest["1.running_var"])
    if fmt == "npz":
        assert int(fused["epoch"]) == 6


@pytest.mark.parametrize(("fmt", "dtype"), [("safetensors", torch.float16), ("safetensors", torch.bfloat16),
                                            ("pt", torch.bfloat16), ("pt", torch.float64), ("npz", torch.float16),
                                            ("npz", torch.float64)])
def test_low_and_high_precision_are_written_back_in_their_dtype(tmp_path, fmt, dtype):
    training.train(tmp_path, 6, fmt=fmt, dtype=dtype)
    payload = predict(tmp_path)
    fused = load_any(tmp_path / f"epoch_6.pdt.{fmt}")
    newest = load_any(tmp_path / f"epoch_6.{fmt}")
    changed = 0
    for name in ("0.weight", "0.bias", "3.weight"):
        assert fused[name].dtype == dtype
        moved = fused[name] != newest[name]
        changed += int(moved.sum())
        assert torch.isfinite(fused[name].float()).all()
    accepted = payload["mask"]["totals"]["accepted"]
    # accepted elements whose prediction rounds to the stored value look unchanged, never the reverse
    assert 0 < changed <= accepted


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_model_is_stored_in_its_own_dtype_and_fused_exactly_as_from_float32(tmp_path, dtype):
    import h5py

    for store_dtype in (None, "float32"):
        folder = tmp_path / str(store_dtype)
        training.train(folder, 7, dtype=dtype)
        (folder / "epoch_7.pt").rename(tmp_path / f"later-{store_dtype}.pt")
        predict(folder, *(["--store-dtype", store_dtype] if store_dtype else []))
        (tmp_path / f"later-{store_dtype}.pt").rename(folder / "epoch_7.pt")
        predict(folder)  # a steady step: its window holds the fused state of the first
    with h5py.File(tmp_path / "None" / ".pdt" / "store.h5") as f:
        state = json.loads(f["state"][()])
    assert state["dtype"] == str(dtype).removeprefix("torch.")
    assert (tmp_path / "None" / ".pdt" / "snapshots.bin").stat().st_size == 6 * state["n"] * 2  # (h + 1) x N x 2
    for name in ("epoch_6.pdt.pt", "epoch_7.pdt.pt"):  # bf16 and fp16 are exact in float32: same output
        assert (tmp_path / "None" / name).read_bytes() == (tmp_path / "float32" / name).read_bytes()


def test_a_model_of_mixed_precision_is_stored_in_float32(tmp_path):
    import h5py

    training.train(tmp_path, 5)
    for epoch in range(1, 6):
        state = torch.load(tmp_path / f"epoch_{epoch}.pt", weights_only=True)
        state["model"]["0.weight"] = state["model"]["0.weight"].to(torch.bfloat16)
        torch.save(state, tmp_path / f"epoch_{epoch}.pt")
    predict(tmp_path)
    with h5py.File(tmp_path / ".pdt" / "store.h5") as f:
        assert json.loads(f["state"][()])["dtype"] == "float32"


@pytest.mark.slow
def test_keras_weights_round_trip_and_keep_training(tmp_path):
    import keras

    x, y = (t.numpy() for t in training.data())

    def build() -> keras.Model:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((training.INPUTS,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.BatchNormalization(), keras.layers.Dense(training.CLASSES)])
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    model = build()
    for epoch in range(1, 7):
        model.fit(x, y, batch_size=64, epochs=1, verbose=0, shuffle=False)
        model.save_weights(tmp_path / f"epoch_{epoch}.weights.h5")
    payload = predict(tmp_path)
    fused_path = tmp_path / "epoch_6.pdt.weights.h5"
    assert payload["output"] == str(fused_path)
    skipped = {s["name"]: s["reason"] for s in json.loads(
        CliRunner().invoke(app, ["report", str(tmp_path), "--json"]).output)["skipped_tensors"]}
    assert skipped["layers/batch_normalization/vars/2"] == "normalisation running statistic"

    resumed, newest = build(), build()
    for model, path in ((resumed, fused_path), (newest, tmp_path / "epoch_6.weights.h5")):
        model.optimizer.build(model.trainable_variables)  # so that load_weights restores its state too
        model.load_weights(path)
    fused_kernel, kernel = resumed.layers[0].kernel.numpy(), newest.layers[0].kernel.numpy()
    assert 0 < np.mean(fused_kernel != kernel) < 1
    np.testing.assert_array_equal(resumed.layers[1].moving_variance.numpy(), newest.layers[1].moving_variance.numpy())
    assert int(resumed.optimizer.iterations.numpy()) == int(newest.optimizer.iterations.numpy()) > 0
    history = resumed.fit(x, y, batch_size=64, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.slow
def test_flax_state_bytes_round_trip(tmp_path):
    import jax
    import jax.numpy as jnp
    from flax import serialization

    x, y, state, step, epoch = training.flax_run()

    for number in range(1, 7):
        state = epoch(state)
        (tmp_path / f"epoch_{number}.msgpack").write_bytes(serialization.to_bytes(state))
    payload = predict(tmp_path)
    assert payload["output"] == str(tmp_path / "epoch_6.pdt.msgpack")
    assert set(payload["mask"]["by_layer_type"]) == {"linear", "bias"}  # params/layers_i/{kernel,bias}
    fused = serialization.from_bytes(state, (tmp_path / "epoch_6.pdt.msgpack").read_bytes())
    newest = serialization.from_bytes(state, (tmp_path / "epoch_6.msgpack").read_bytes())
    assert int(fused.step) == int(newest.step) == 6 * ((len(x) + 63) // 64)
    kernel = fused.params["params"]["layers_0"]["kernel"]
    assert kernel.dtype == jnp.float32
    assert 0 < float(jnp.mean(kernel != newest.params["params"]["layers_0"]["kernel"])) < 1
    for got, want in zip(jax.tree_util.tree_leaves(fused.opt_state), jax.tree_util.tree_leaves(newest.opt_state),
                         strict=True):
        assert jnp.array_equal(got, want)  # optimizer state carried over bit-exact
    assert bool(jnp.isfinite(step(fused, x[:64], y[:64]).params["params"]["layers_0"]["kernel"]).all())


@pytest.mark.slow
def test_lightning_checkpoints_resume_from_the_fused_file(tmp_path):

    x, y = training.data()

    Module = training.lightning_module(lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9))

    def loader():
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)

    training.lightning_trainer(tmp_path, 6).fit(Module(), loader())
    payload = predict(tmp_path)
    fused_path = tmp_path / "epoch=5.pdt.ckpt"
    assert payload["output"] == str(fused_path)
    fused = torch.load(fused_path, weights_only=True)
    newest = torch.load(tmp_path / "epoch=5.ckpt", weights_only=True)
    assert fused["global_step"] == newest["global_step"] and fused["epoch"] == newest["epoch"]
    assert torch.equal(fused["optimizer_states"][0]["state"][0]["momentum_buffer"],
                       newest["optimizer_states"][0]["state"][0]["momentum_buffer"])
    assert not torch.equal(fused["state_dict"]["net.0.weight"], newest["state_dict"]["net.0.weight"])
    assert torch.equal(fused["state_dict"]["net.1.running_mean"], newest["state_dict"]["net.1.running_mean"])
    resumed = training.lightning_trainer(tmp_path, 7)
    resumed.fit(Module(), loader(), ckpt_path=fused_path)
    assert resumed.current_epoch == 7 and resumed.global_step == newest["global_step"] + len(loader())


@pytest.mark.parametrize("step", [np.int32(7), np.array(7, np.int64), 7])
def test_flax_recorded_step_from_scalar_array_or_int(tmp_path, step):
    from flax import serialization

    from pdtcli.formats import open_checkpoint

    path = tmp_path / "state.msgpack"
    path.write_bytes(serialization.to_bytes({"step": step, "params": {"w": np.ones(3, np.float32)}}))
    with open_checkpoint(path) as reader:
        assert reader.recorded_step() == 7


@pytest.mark.parametrize("fmt", ["npz", "safetensors", "pt"])
def test_writers_decode_only_the_tensors_they_replace(tmp_path, fmt, monkeypatch):
    from pdtcli.formats import open_checkpoint

    path = training.train(tmp_path, 1, fmt=fmt)[0]
    with open_checkpoint(path) as reader:
        names = [info.name for info in reader.tensors()]
        wanted = names[0]
        decoded: list[str] = []
        real_read = reader.read
        monkeypatch.setattr(reader, "read", lambda name: decoded.append(name) or real_read(name))

        class OnlyOne:
            def wants(self, name: str) -> bool:
                return name == wanted

            def __call__(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
                return torch.zeros_like(tensor)

        reader.write_fused(tmp_path / f"out.{fmt}", OnlyOne())
    assert decoded in ([], [wanted])  # a pickle's tensors are all in memory already: none is decoded again
    written = load_any(tmp_path / f"out.{fmt}")
    original = load_any(path)
    assert torch.equal(written[wanted], torch.zeros_like(original[wanted]))
    assert all(torch.equal(written[n], original[n]) for n in names[1:])


def test_a_16_bit_store_refuses_to_round_what_it_cannot_hold(tmp_path):
    from typer.testing import CliRunner as Runner

    training.train(tmp_path / "bf16", 5, dtype=torch.bfloat16)
    predict(tmp_path / "bf16")
    state = torch.load(tmp_path / "bf16" / "epoch_5.pt", weights_only=True)
    state["model"] = {k: v.float() if v.is_floating_point() else v for k, v in state["model"].items()}
    state["epoch"] = 6
    torch.save(state, tmp_path / "bf16" / "epoch_6.pt")  # training switched to float32
    result = Runner().invoke(app, ["predict", str(tmp_path / "bf16")])  # rounded never: a new store, once h are
    assert result.exit_code == 0 and "0.weight bfloat16 → float32 (this store keeps bfloat16)" in result.output
    assert "the window restarts once 5 checkpoints of the new layout exist: 4 more" in result.output  # (test_runchange)

    training.train(tmp_path / "fp32", 5)
    result = Runner().invoke(app, ["predict", str(tmp_path / "fp32"), "--store-dtype", "bfloat16"])
    assert result.exit_code == 2 and "would round the model's float32 tensors" in result.output
    assert not (tmp_path / "fp32" / ".pdt").exists()


def test_layer_types_come_from_names_and_what_each_format_declares():
    from pdtcli.selection import layer_type

    assert layer_type("encoder.0.bias", (16,)) == "bias"
    assert layer_type("layers/dense/vars/1", (16,)) == "bias"  # Keras numbers its variables
    assert layer_type("layers/dense/vars/0", (16, 4)) == "linear"
    assert layer_type("layers/batch_normalization/vars/1", (16,)) == "norm"
    assert layer_type("transformer.wte.weight", (50257, 768)) == "embedding"
    assert layer_type("conv1.weight", (8, 3, 3, 3)) == "conv"
