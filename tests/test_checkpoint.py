"""Strict checkpoint loading: clear errors that name every offending key; round trips; convert CLI."""

from __future__ import annotations

import re

import pytest
import torch

import deris
from deris.checkpoint import CheckpointError, official_to_ours
from deris.cli import main as cli_main
from deris.synthetic import load_manifest, official_state_dict
from golden import golden_dir


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return deris.build_model("deris-tiny")


def test_own_format_round_trip(tiny, tmp_path):
    for name in ("w.safetensors", "w.pt"):
        path = deris.save_checkpoint(tiny, tmp_path / name)
        other = deris.from_checkpoint("deris-tiny", path)
        for k, v in tiny.state_dict().items():
            assert torch.equal(v, other.state_dict()[k]), k


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
