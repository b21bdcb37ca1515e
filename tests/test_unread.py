"""What pdt cannot read, it names (issue 22 §5): a folder of checkpoints in a format pdt does not read
gets one line (exit 2) saying what it found and what to save instead or how to convert, never "no
checkpoints here"; a torch archive of a newer format version than pdt knows is refused by name (exit 3)."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path

import pytest
import torch
import training
from test_hostile import one_error_line, pdt


def deepspeed_save(folder: Path, step: int, stage: int) -> None:
    """The files DeepSpeed's `engine.save_checkpoint(folder)` writes for one rank (DeepSpeed does not
    install here: its dicts are rebuilt with torch.save, keys as DeepSpeed 0.14 writes them). Under
    ZeRO-3 the module's parameters are empty placeholders; the fp32 partitions are in the optimizer file."""
    net = training.model()
    state = net.state_dict() if stage < 3 else {k: torch.empty(0) for k in net.state_dict()}
    shard = folder / f"global_step{step}"
    shard.mkdir(parents=True)
    common = {"ds_config": {"zero_optimization": {"stage": stage}}, "ds_version": "0.14.4"}
    torch.save(dict(common, module=state, buffer_names=[], optimizer=None, lr_scheduler=None, global_steps=step,
                    param_shapes=[{k: v.shape for k, v in net.state_dict().items()}], dp_world_size=1,
                    mp_world_size=1), shard / ("zero_pp_rank_0_" * (stage == 3) + "mp_rank_00_model_states.pt"))
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    torch.save(dict(common, optimizer_state_dict={"zero_stage": stage, "loss_scaler": None, "overflow": False,
                                                  "single_partition_of_fp32_groups": [flat]}),
               shard / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (folder / "latest").write_text(f"global_step{step}")
    (folder / "zero_to_fp32.py").write_text("# DeepSpeed's converter, copied beside every checkpoint\n")


def test_a_deepspeed_folder_is_named_with_the_way_to_convert_it(tmp_path):
    run = tmp_path / "ds"
    for step in (10, 20, 30):
        deepspeed_save(run, step, stage=2)
    code, output = pdt("predict", run)
    assert code == 2
    # before: "no checkpoints here (…); sub-folders that hold checkpoints: global_step10/, …"
    assert one_error_line(output) == (
        f"pdt: error: {run}: found 3 DeepSpeed checkpoint folders (global_step10/, global_step20/ …): pdt does "
        "not read DeepSpeed ZeRO shards; convert with DeepSpeed's zero_to_fp32.py (saved beside them), or save "
        "full weights with stage3_gather_16bit_weights_on_model_save (the Trainer then writes model.safetensors)")
    assert not (run / ".pdt").exists()


def test_a_trainer_run_under_zero3_is_named_by_its_checkpoint_folders(tmp_path):
    """Trainer + ZeRO-3 without gathering the weights: `checkpoint-N/` holds `global_stepN/`, no model."""
    run = tmp_path / "run"
    for step in (10, 20):
        deepspeed_save(run / f"checkpoint-{step}", step, stage=3)
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
    code, output = pdt("snapshot", run, "--files", "checkpoint-*")
    assert code == 2
    assert one_error_line(output).startswith(
        f"pdt: error: {run}: found 2 DeepSpeed checkpoint folders (checkpoint-10/, checkpoint-20/): ")


def test_a_gguf_file_is_named(tmp_path):
    """A GGUF v3 header as llama.cpp's writer makes it (magic, version, tensor and metadata counts), for
    a file of no tensors: the `gguf` package does not install here."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model-q4.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 0))
    code, output = pdt("predict", folder)
    assert code == 2
    assert one_error_line(output) == (f"pdt: error: {folder}: found 1 GGUF file (model-q4.gguf): pdt does not read "
                                      "GGUF (an inference format, often quantised); run pdt on the training "
                                      "checkpoints it was converted from")


def test_tensorflow_checkpoints_are_named(tmp_path):
    """TensorFlow does not install here: the files of `tf.train.Checkpoint.save` and of a SavedModel
    are made by name (pdt decides from names alone)."""
    ckpts = tmp_path / "tf"
    ckpts.mkdir()
    for name in ("ckpt-1.index", "ckpt-1.data-00000-of-00001", "ckpt-2.index", "ckpt-2.data-00000-of-00001"):
        (ckpts / name).write_bytes(b"\0" * 16)
    (ckpts / "checkpoint").write_text('model_checkpoint_path: "ckpt-2"\n')
    code, output = pdt("predict", ckpts)
    assert code == 2
    assert one_error_line(output) == (f"pdt: error: {ckpts}: found 2 TensorFlow checkpoints (ckpt-1.index, "
                                      "ckpt-2.index): pdt does not read TensorFlow checkpoints; save the "
                                      "weights with Keras model.save_weights('NAME.weights.h5')")
    saved = tmp_path / "saved"
    (saved / "1" / "variables").mkdir(parents=True)
    (saved / "1" / "saved_model.pb").write_bytes(b"\x08\x01")
    code, output = pdt("predict", saved)
    assert code == 2 and ": found 1 TensorFlow SavedModel folder (1/): " in one_error_line(output)


def test_an_onnx_export_is_named(tmp_path):
    """Named by its file name, as pdt finds it (torch.onnx.export needs the onnx package, which the test extra
    does not pull in for this: the file holds the first bytes of an ONNX protobuf, an ir_version field)."""
    folder = tmp_path / "onnx"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\x08\x09\x12\x07pytorch")
    code, output = pdt("predict", folder)
    assert code == 2 and ": found 1 ONNX model (model.onnx): " in one_error_line(output)


def with_record(src: Path, dst: Path, record: str, value: bytes) -> None:
    """A copy of the torch.save archive `src` with its version record `record` set to `value`, as a newer
    torch would write it (members stored, as torch stores them)."""
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for info in old.infolist():
            new.writestr(info, value if info.filename.endswith(f"/{record}") else old.read(info))


@pytest.mark.parametrize(("record", "value", "known"), [("version", b"11\n", 10), (".format_version", b"2", 1)])
def test_a_torch_archive_of_a_newer_format_version_is_named(sgd_run, record, value, known):
    newest = sorted(sgd_run.glob("*.pt"))[-1]
    with_record(newest, newest.with_suffix(".tmp"), record, value)
    newest.with_suffix(".tmp").replace(newest)
    if record == "version":  # torch itself refuses it: this is not a layout torch 2.13 knows
        with pytest.raises(RuntimeError):
            torch.load(newest, weights_only=True)
    code, output = pdt("predict", sgd_run)
    assert code == 3
    assert one_error_line(output) == (
        f"pdt: error: {newest}: torch archive format {record} {value.strip().decode()!r} is newer than pdt reads "
        f"(up to {known}): a torch newer than pdt knows saved it; "
        "upgrade pdt")
