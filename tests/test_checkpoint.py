"""Strict checkpoint loading: clear errors that name every offending key; round trips; convert CLI;
files written the way the official DeRIS training loop writes them, unpickled weights-only."""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from golden import golden_dir
from official_files import ddp, epoch_metrics, fresh_tiny, official_keyed, write_official_file
from synthetic_weights import load_manifest, official_state_dict

import deris
from deris.checkpoint import OFFICIAL_SAFE_GLOBALS, CheckpointError, official_to_ours
from deris.cli import main as cli_main


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return deris.build_model("deris-tiny")


def test_own_format_round_trip(tiny, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    for name in ("w.safetensors", "w.pt"):
        path = deris.save_checkpoint(tiny, tmp_path / name)
        other = deris.from_checkpoint("deris-tiny", path)
        for k, v in tiny.state_dict().items():
            assert torch.equal(v, other.state_dict()[k]), k
        # The usual mode, not the temporary file's private 0600 (a server running as another user reads it).
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt", "w.safetensors"]


def test_a_failed_save_leaves_the_previous_file_and_no_temporary(tiny, tmp_path, monkeypatch):
    path = deris.save_checkpoint(tiny, tmp_path / "w.pt")
    before = path.read_bytes()

    def half_written(obj, f):
        Path(f).write_bytes(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        deris.save_checkpoint(tiny, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]


def test_missing_extra_and_misshaped_keys_are_all_named(tiny):
    state = dict(tiny.state_dict())
    del state["decoder.refer_head.bias"]
    del state["cognition.init_query.weight"]
    state["decoder.not_a_layer.weight"] = torch.zeros(3)
    state["decoder.fusion.weight"] = torch.zeros(64, 64, 1, 1)
    with pytest.raises(CheckpointError) as err:
        deris.load_checkpoint(deris.build_model("deris-tiny"), state)
    msg = str(err.value)
    assert "2 missing, 1 unexpected, 1 mis-shaped" in msg
    for key in ("decoder.refer_head.bias", "cognition.init_query.weight", "decoder.not_a_layer.weight"):
        assert key in msg
    assert "decoder.fusion.weight: checkpoint (64, 64, 1, 1) vs model (64, 128, 1, 1)" in msg


def test_wrong_preset_in_saved_metadata(tiny, tmp_path):
    path = deris.save_checkpoint(tiny, tmp_path / "tiny.safetensors")
    with pytest.raises(CheckpointError, match="saved for preset 'deris-tiny', model is 'deris-b-grefcoco'"):
        deris.from_checkpoint("deris-b-grefcoco", path)


def manifest_shaped(config: str, model: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """An official state dict with the right keys and shapes, cheaply (float values irrelevant);
    index buffers from ``model`` if given."""
    manifest = load_manifest(golden_dir() / f"manifest_{config}.json")
    state = {e["key"]: torch.zeros(e["shape"], dtype=getattr(torch, e["dtype"])) for e in manifest["state_dict"]}
    if model is not None:
        buffers = dict(model.named_buffers())
        for key in state:
            if key.endswith("relative_position_index"):
                state[key] = buffers[official_to_ours(key)]
    return state


def test_large_weights_into_base_preset_name_first_mismatches():
    state = manifest_shaped("DERIS-L-grefcoco")
    with pytest.raises(CheckpointError) as err:
        deris.load_checkpoint(deris.build_model("deris-b-grefcoco"), state)
    msg = str(err.value)
    first = msg.splitlines()[1]
    assert first.startswith("first shape mismatches")
    # Names our key, the official key, and both shapes.
    assert re.search(r"cognition\.beit3\.\S+ \(official understanding_branch\.vis_enc\.beit3\.\S+\): checkpoint \(\d+", first)
    assert "(64010, 1024) vs model (64010, 768)" in msg
    assert "unexpected" in msg and "layers.23." in msg


def test_official_dead_keys_are_dropped_and_unknown_keys_reported():
    model = deris.build_model("deris-b-refcoco")
    state = manifest_shaped("DERIS-B-refcoco", model)
    state["perception_branch.predictor.new_head.weight"] = torch.zeros(2)
    state["perception_branch.mystery.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError) as err:
        deris.load_checkpoint(model, state)
    msg = str(err.value)
    assert "0 missing, 2 unexpected, 0 mis-shaped" in msg
    assert "decoder.new_head.weight (official perception_branch.predictor.new_head.weight)" in msg
    assert "  perception_branch.mystery.weight" in msg
    # Without the extra keys it loads: every dead-at-inference key was accepted and dropped.
    del state["perception_branch.predictor.new_head.weight"], state["perception_branch.mystery.weight"]
    report = deris.load_checkpoint(model, state)
    assert "perception_branch.predictor.box_embed.layers.0.weight" in report.dropped


def test_corrupt_and_missing_files(tmp_path):
    model = deris.build_model("deris-tiny")
    with pytest.raises(CheckpointError, match="not found"):
        deris.load_checkpoint(model, tmp_path / "nope.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        deris.load_checkpoint(model, tmp_path / "empty.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        deris.load_checkpoint(model, tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        deris.load_checkpoint(model, tmp_path / "junk.safetensors")


def test_convert_cli_official_to_safetensors(tmp_path, capsys):
    """An mmcv-style file ({'state_dict': ...} with a 'module.' prefix) converts and reloads exactly."""
    manifest = load_manifest(golden_dir() / "manifest_DERIS-B-refcoco.json")
    model = deris.build_model("deris-b-refcoco")
    state = official_state_dict(manifest, "", model)
    official = tmp_path / "official.pth"
    torch.save({"meta": {"epoch": 20}, "state_dict": {"module." + k: v for k, v in state.items()}}, official)
    out = tmp_path / "deris_b_refcoco.safetensors"
    assert cli_main(["convert", "--preset", "deris-b-refcoco", "--checkpoint", str(official), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dead-at-inference tensors dropped" in printed and "mapped" in printed
    reloaded = deris.from_checkpoint("deris-b-refcoco", out).state_dict()
    for key, value in state.items():
        ours = official_to_ours(key)
        if ours in reloaded and not key.endswith("relative_position_index"):
            assert torch.equal(reloaded[ours], value), key


# ---- files as the official training loop writes them -------------------------------------------


def assert_holds(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    ours = model.state_dict()
    for key, value in weights.items():
        assert torch.equal(ours[official_to_ours(key)], value), key


@pytest.mark.parametrize("dataset", ["GRefCOCO", "RefZOM", "MixedSeg"])
def test_official_training_file_loads_weights_only(tmp_path, dataset):
    path = tmp_path / "latest.pth"
    weights = write_official_file(path, fresh_tiny(1), dataset)
    # The file really is one that plain weights-only loading refuses (numpy metrics), where there are any.
    if dataset != "MixedSeg":
        with pytest.raises(pickle.UnpicklingError, match="numpy"):
            torch.load(path, weights_only=True)
    model = fresh_tiny(2)
    report = deris.load_checkpoint(model, path)
    assert_holds(model, weights)
    source = report.source
    assert (source.weights, source.epoch, source.lr) == ("state_dict", 11, pytest.approx(5e-5))
    expected = {k: float(v) for k, v in epoch_metrics(dataset).items()}
    assert source.metrics == pytest.approx(expected)
    assert source.not_loaded == {"optimizer": "training state", "scheduler": "training state"}
    summary = report.summary()
    assert "weights loaded: state_dict" in summary and "saved after epoch 12, lr 5e-05" in summary
    name = next(iter(expected))
    assert f"{name} {expected[name]:.2f}" in summary
    # The allowlist was in force for this load only.
    assert not set(OFFICIAL_SAFE_GLOBALS) & set(torch.serialization.get_safe_globals())


def test_callers_own_safe_globals_survive_a_load(tmp_path):
    path = tmp_path / "latest.pth"
    write_official_file(path, fresh_tiny(1))
    torch.serialization.add_safe_globals([np.dtype])
    try:
        deris.load_checkpoint(fresh_tiny(2), path)
        assert np.dtype in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()


def test_ema_file_loads_state_dict_as_the_official_test_script_does(tmp_path, capsys):
    """tools/test.py -> deris/utils/checkpoint.py::load_checkpoint reads ema_state_dict but loads state_dict."""
    path = tmp_path / "ema.pth"
    ema = {k: v + 1.0 for k, v in official_keyed(fresh_tiny(3)).items()}
    weights = write_official_file(path, fresh_tiny(1), ema_state_dict=ddp(ema))
    out = tmp_path / "tiny.safetensors"
    assert cli_main(["convert", "--preset", "deris-tiny", "--checkpoint", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "weights loaded: state_dict" in printed
    assert "not loaded: ema_state_dict (EMA weights; the official test script reads them but loads state_dict)" in printed
    assert_holds(deris.from_checkpoint("deris-tiny", out), weights)


def test_ema_without_state_dict_is_refused(tmp_path):
    path = tmp_path / "ema_only.pth"
    torch.save({"epoch": 3, "ema_state_dict": ddp(official_keyed(fresh_tiny(1)))}, path)
    with pytest.raises(CheckpointError, match="holds ema_state_dict but no state_dict"):
        deris.load_checkpoint(fresh_tiny(2), path)


def test_amp_entry_is_read_and_not_loaded(tmp_path):
    path = tmp_path / "fp16.pth"
    # What apex.amp.state_dict() returns: one entry per loss scaler.
    amp = OrderedDict(loss_scaler0={"loss_scale": 65536.0, "unskipped": 17})
    weights = write_official_file(path, fresh_tiny(1), amp=amp)
    model = fresh_tiny(2)
    report = deris.load_checkpoint(model, path)
    assert_holds(model, weights)
    assert report.source.not_loaded["amp"] == "apex loss-scaler state, training only"
    assert "not loaded: amp (apex loss-scaler state, training only)" in report.summary()


@dataclass
class EvalRecord:
    """A custom class someone pickled into a checkpoint."""

    ciou: float


class RunsShell:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class RunsPython:
    """Unpickling this executes Python through a builtin that no module blocklist covers."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize(
    "payload, global_name",
    [
        (RunsShell, f"{os.system.__module__}.system"),
        (RunsPython, "builtins.exec"),
        (lambda marker: EvalRecord(1.0), f"{EvalRecord.__module__}.EvalRecord"),
        (lambda marker: np.random.RandomState(0), "numpy.random._pickle.__randomstate_ctor"),
        # No official evaluator saves an int64 scalar: its dtype class is not allowlisted either.
        (lambda marker: np.int64(3), "numpy.dtypes.Int64DType"),
    ],
)
@pytest.mark.parametrize("zipfile", [True, False], ids=["zip", "legacy"])
def test_disallowed_global_is_refused_by_name_and_never_run(tmp_path, payload, global_name, zipfile):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pth"
    weights = ddp(official_keyed(fresh_tiny(1)))
    torch.save({"epoch": 1, "state_dict": weights, "extra": payload(marker)}, path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(CheckpointError) as err:
        deris.load_checkpoint(fresh_tiny(2), path)
    msg = str(err.value)
    if zipfile or global_name != "builtins.exec":  # legacy files: torch's refusal writes builtins unqualified
        assert global_name in msg
    assert msg.startswith(f"{path} holds ")
    assert "not among the types official DeRIS checkpoints contain" in msg and "refusing to unpickle" in msg
    assert "weights_only=False" not in msg
    assert not marker.exists()
    if payload in (RunsShell, RunsPython):  # the payload is live: unpickled unrestricted, it does run
        pickle.loads(pickle.dumps(payload(marker)))
        assert marker.exists()
