"""ONNX export (``deris-export onnx``): graph contract, both MSDA representations, fp16, manifest,
parity with PyTorch in ONNX Runtime, the per-round chain, CLI errors and interrupted exports.

The tiny preset covers every code path quickly; deris-b-grefcoco (marked slow: its exports take
minutes) is checked against the official code's golden arrays, the encoders and the whole model per
sample.
"""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import exports
import numpy as np
import onnx
import pytest
import torch
from golden import case_paths, golden_check, golden_dir
from kernel_checks import assert_close, fused_inputs

import deris
from deris.export import cli, onnx_export
from deris.export.graphs import build_graph, example_inputs
from deris.export.manifest import sha256_file
from deris.export.msda import PLUGIN_ATTRIBUTES, PLUGIN_OP, _gridsample_fused
from deris.export.onnx_export import ExportOptions, export_onnx
from deris.export.runtime import OnnxPipeline
from deris.export.verify import format_table, synthetic_inputs, verify_export
from deris.kernels import ms_deform_attn_fused_reference
from deris.postprocess import decide
from deris.topology import pipeline_topology

TINY = "deris-tiny"
TINY_RESOLUTION = 128
GRAPH_NAMES = pipeline_topology(deris.get_config(TINY), TINY_RESOLUTION).graph_names


@pytest.fixture(scope="module")
def tiny_model() -> deris.DeRIS:
    """The weights of the session's tiny exports (conftest.py)."""
    return exports.tiny_model()


@pytest.fixture(scope="module")
def gridsample_export(tiny_export) -> Path:
    """The session's deris-tiny export (conftest.py): tiny_model's weights (seed 0), every graph at
    its preset's 128 px, GridSample MSDA. An export takes a minute on two cores: made once a run."""
    return tiny_export.onnx_dir


@pytest.fixture(scope="module")
def plugin_export(tiny_plugin_export) -> Path:
    """The session's deris-tiny export with TensorRT's MSDA plugin (conftest.py): tiny_model's weights."""
    return tiny_plugin_export


def assert_all_pass(checks, graphs, unoptimized=()) -> None:
    """Every graph checked at batches 1 and 3, as exported and (except ``unoptimized``) as rewritten
    for ONNX Runtime, and every output within tolerance."""
    files = {g: [f"{g}.onnx"] + ([] if g in unoptimized else [f"{g}.opt.onnx"]) for g in graphs}
    assert {(c.graph, c.file, c.batch) for c in checks} == {(g, f, b) for g in graphs for f in files[g] for b in (1, 3)}
    assert all(c.passed for c in checks), "\n" + format_table(checks)


def test_wrappers_follow_the_contract(tiny_model):
    """Forward arguments are named like the graph inputs (dynamic_shapes relies on it) and the
    wrappers' outputs have the contract's shapes."""
    specs = pipeline_topology(tiny_model.cfg, TINY_RESOLUTION).graphs
    assert tuple(specs) == ("cognition", "perception", "round_0", "round_1", "round_2", "round_3", "decoder")
    for name, spec in specs.items():
        graph = build_graph(spec, tiny_model)
        assert tuple(inspect.signature(graph.forward).parameters) == tuple(t.name for t in spec.inputs), name
        with torch.inference_mode():
            outputs = graph(*example_inputs(spec, 2, vocab_size=tiny_model.cfg.beit3.vocab_size))
        assert [tuple(o.shape) for o in outputs] == [tuple(2 if d == "batch" else d for d in t.shape) for t in spec.outputs], name


@pytest.mark.parametrize("shapes", [[(6, 6), (3, 3), (1, 1)], [(5, 7), (2, 9), (4, 1)]])
def test_gridsample_representation_computes_the_reference(shapes):
    """The exported MSDA (query-last, summed level by level) against the reference in float64, with
    points inside, on the edges of and outside every level, odd and one-pixel levels, batch 2."""
    value, reference_points, offsets, logits, _ = fused_inputs(2, 3, 8, shapes, 4, 11)
    expected = ms_deform_attn_fused_reference(value, shapes, None, reference_points, offsets, logits)
    inputs = [t.float() for t in (value, reference_points, offsets, logits)]
    actual = _gridsample_fused(inputs[0], shapes, None, *inputs[1:])
    assert actual.dtype == torch.float32 and actual.shape == expected.shape
    assert_close(actual, expected, torch.float32, "output")
    # float16 values (an fp16 graph): computed in float32, rounded once to value's dtype.
    stored = value.half()
    expected = ms_deform_attn_fused_reference(stored.double(), shapes, None, reference_points, offsets, logits)
    assert_close(_gridsample_fused(stored, shapes, None, *inputs[1:]), expected, torch.float16, "float16 output")


def test_manifest(gridsample_export, tiny_model):
    manifest = json.loads((gridsample_export / "manifest.json").read_text())
    cfg = tiny_model.cfg
    assert manifest["format_version"] == 1
    assert {k: manifest[k] for k in ("preset", "resolution", "opset", "msda", "precision", "weights")} == {
        "preset": TINY, "resolution": TINY_RESOLUTION, "opset": 18, "msda": "gridsample", "precision": "fp32", "weights": "random",
    }
    assert (manifest["max_text_len"], manifest["num_queries"], manifest["hidden_dim"]) == (cfg.max_text_len, cfg.num_queries, cfg.hidden_dim)
    assert manifest["deris_version"] == deris.__version__
    assert manifest["batch"] == {"name": "batch", "min": 1, "max": 64}
    assert list(manifest["graphs"]) == list(GRAPH_NAMES)
    specs = pipeline_topology(cfg, TINY_RESOLUTION).graphs
    assert manifest["topology"]["num_rounds"] == 4
    for name, entry in manifest["graphs"].items():
        assert entry["file"] == f"{name}.onnx"
        assert [f["name"] for f in entry["files"]] == [entry["file"]]  # small graphs: no external data
        optimized = entry["optimized"]
        assert optimized["file"] == f"{name}.opt.onnx" and [f["name"] for f in optimized["files"]] == [optimized["file"]]
        for f in entry["files"] + optimized["files"]:
            assert sha256_file(gridsample_export / f["name"]) == f["sha256"]
        assert entry["custom_ops"] == []
        expected_in = [[t.name, "int64" if t.dtype == "int64" else "float32", list(t.shape)] for t in specs[name].inputs]
        assert [[t["name"], t["dtype"], t["shape"]] for t in entry["inputs"]] == expected_in
        assert [t["name"] for t in entry["outputs"]] == [t.name for t in specs[name].outputs]
    assert manifest["graphs"]["perception"]["outputs"][0]["shape"] == ["batch", cfg.hidden_dim, TINY_RESOLUTION // 32, TINY_RESOLUTION // 32]
    assert manifest["graphs"]["round_3"]["outputs"][-1] == {"name": "existence", "dtype": "float32", "shape": ["batch", 1]}
    # Every GELU fused for ONNX Runtime (the encoders' MLPs, the deformable layers' FFNs).
    assert manifest["graphs"]["cognition"]["optimized"]["fused"].get("BiasGelu", 0) >= cfg.beit3.depth
    files = [f"{g}{suffix}" for g in GRAPH_NAMES for suffix in (".onnx", ".opt.onnx")]
    assert sorted(p.name for p in gridsample_export.iterdir()) == sorted(files + ["manifest.json"])


def test_graphs_pass_checker_and_polygraphy(gridsample_export, plugin_export):
    for path in [*gridsample_export.glob("*.onnx"), plugin_export / "perception.onnx"]:
        onnx.checker.check_model(str(path), full_check=True)
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent))
    assert polygraphy, "polygraphy is not installed beside the interpreter"
    result = subprocess.run([polygraphy, "inspect", "model", str(plugin_export / "perception.onnx"), "--show", "layers"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert PLUGIN_OP in result.stdout and "'trt': 1" in result.stdout


def test_gridsample_graphs_match_pytorch(gridsample_export, tiny_model):
    assert_all_pass(verify_export(gridsample_export, tiny_model), GRAPH_NAMES)
    ops = {n.op_type for n in onnx.load(str(gridsample_export / "perception.onnx")).graph.node}
    assert "GridSample" in ops and PLUGIN_OP not in ops


def test_plugin_graph_follows_tensorrt_contract_and_matches_pytorch(plugin_export, tiny_model):
    model = onnx.load(str(plugin_export / "perception.onnx"))
    graph = model.graph
    nodes = [n for n in graph.node if n.op_type == PLUGIN_OP]
    assert len(nodes) == tiny_model.cfg.pixel_decoder.num_layers  # one per deformable layer
    assert "GridSample" not in {n.op_type for n in graph.node}
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), ("trt", 1)}
    types = {v.name: v.type.tensor_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i for i in graph.initializer})
    heads, points = tiny_model.cfg.pixel_decoder.num_heads, tiny_model.cfg.pixel_decoder.num_points
    head_dim = tiny_model.cfg.hidden_dim // heads
    tokens = sum((TINY_RESOLUTION // s) ** 2 for s in (32, 16, 8))

    def dims(name: str) -> list:
        return [d.dim_param or d.dim_value for d in types[name].shape.dim]

    for node in nodes:
        assert node.domain == "trt"
        assert {a.name: a.s.decode() for a in node.attribute} == PLUGIN_ATTRIBUTES
        value, shapes, starts, locations, weights = node.input
        assert types[shapes].data_type == types[starts].data_type == onnx.TensorProto.INT32
        assert onnx.numpy_helper.to_array(types[shapes]).tolist() == [[TINY_RESOLUTION // s] * 2 for s in (32, 16, 8)]
        assert onnx.numpy_helper.to_array(types[starts]).tolist() == [0, 16, 80]
        assert dims(value) == ["batch", tokens, heads, head_dim]
        assert dims(locations) == ["batch", tokens, heads, 3, points, 2]
        assert dims(weights) == ["batch", tokens, heads, 3, points]
        assert dims(node.output[0]) == ["batch", tokens, heads, head_dim]
    manifest = json.loads((plugin_export / "manifest.json").read_text())
    assert manifest["msda"] == "trt-plugin"
    assert manifest["graphs"]["perception"]["custom_ops"] == [f"trt::{PLUGIN_OP}"]
    assert_all_pass(verify_export(plugin_export, tiny_model), GRAPH_NAMES, unoptimized=("perception",))


def test_msda_mode_changes_only_the_perception_graph(gridsample_export, plugin_export):
    graphs = {
        mode: json.loads((directory / "manifest.json").read_text())["graphs"]
        for mode, directory in (("gridsample", gridsample_export), ("trt-plugin", plugin_export))
    }
    for name in GRAPH_NAMES:
        same = graphs["gridsample"][name]["files"] == graphs["trt-plugin"][name]["files"]
        assert same == (name != "perception"), name


def test_round_chain_reproduces_decoder_and_model(gridsample_export, plugin_export, tiny_model):
    inputs = synthetic_inputs(tiny_model.cfg, TINY_RESOLUTION, batch=3, seed=7)
    feeds = {k: v.numpy() for k, v in inputs.items()}
    pipeline = OnnxPipeline(gridsample_export)
    chained = pipeline(feeds, layout="rounds")
    fused = pipeline(feeds)
    with torch.inference_mode():
        expected = tiny_model(inputs["img"], inputs["img_mini"], inputs["token_ids"], inputs["text_pad_mask"])
    # The perception graph with the plugin node feeds the same decoder.
    plugin_values = dict(feeds, **OnnxPipeline(plugin_export).run("perception", feeds))
    plugin_values.update(pipeline.run("cognition", feeds))
    via_plugin = pipeline.run("decoder", plugin_values)
    for name, reference in (("mask_logits", "pred_masks_lowres"), ("refer_logits", "pred_refer_logits"), ("existence", "pred_existence")):
        ref = expected[reference].numpy()
        tolerance = 1e-4 * np.abs(ref).max() + 1e-5
        assert np.abs(chained[name] - fused[name]).max() <= tolerance, name
        for produced in (chained[name], fused[name], via_plugin[name]):
            assert np.abs(produced - ref).max() <= tolerance, name
    scores, _, masks = decide(torch.from_numpy(chained["mask_logits"]), torch.from_numpy(chained["refer_logits"]), tiny_model.cfg.score_threshold)
    ref_scores, _, ref_masks = decide(expected["pred_masks_lowres"], expected["pred_refer_logits"], tiny_model.cfg.score_threshold)
    assert torch.equal(scores > tiny_model.cfg.score_threshold, ref_scores > tiny_model.cfg.score_threshold)
    assert (masks != ref_masks).float().mean() < 1e-3


def background_jobs(directory: Path) -> dict[str, list[str]]:
    """Run beside the other tests (tests/background.py): the fp16 plugin export through the command
    line, and the slow tests' deris-b-grefcoco exports (tests/exports.py)."""
    return {
        "cli_fp16_plugin_export": [
            sys.executable, "-m", "deris.export.cli", "onnx", "--preset", TINY, "--random-weights", "--msda", "trt-plugin",
            "--precision", "fp16", "--graphs", "perception", "--out", str(directory / "cli_fp16_plugin_export"), "--quiet"],
        **exports.jobs(exports.GOLDEN_B_EXPORTS, directory),
    }


@pytest.fixture(scope="module")
def cli_fp16_plugin_export(background) -> subprocess.CompletedProcess[str]:
    return background.result("cli_fp16_plugin_export")


def test_cli_fp16_plugin_export(background, cli_fp16_plugin_export):
    result, out = cli_fp16_plugin_export, background.folder("cli_fp16_plugin_export")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "RANDOM weights" in result.stderr
    assert "verification passed" in result.stdout and "FAIL" not in result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and list(manifest["graphs"]) == ["perception"]
    entry = manifest["graphs"]["perception"]
    assert [t["dtype"] for t in entry["inputs"] + entry["outputs"]] == ["float16"] * 5
    # Normalisation, softmax and MSDA run in float32 inside the fp16 graph.
    graph = onnx.load(str(out / "perception.onnx")).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.value_info, *graph.input, *graph.output]}
    types.update({i.name: i.data_type for i in graph.initializer})
    kept = [n for n in graph.node if n.op_type in ("LayerNormalization", "Softmax", "InstanceNormalization", PLUGIN_OP)]
    assert kept and all(types[n.input[0]] == onnx.TensorProto.FLOAT for n in kept)
    assert any(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in graph.node if n.op_type == "MatMul")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", TINY, "--resolution", "100"], "deris-export onnx: error: resolution must be a positive multiple of 32"),
        (["--preset", TINY, "--resolution", "0"], "positive multiple of 32"),
        (["--preset", TINY, "--graphs", "encoder"], "unknown graph name(s) ['encoder']; accepted: cognition, perception, round_0"),
    ],
)
def test_cli_rejects_bad_requests(tmp_path, capsys, args, message):
    code = cli.main(["onnx", *args, "--random-weights", "--out", str(tmp_path / "out")])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_preset_names(tmp_path, capsys):
    """Presets are accepted the same way as in every command: our names and the official ones, any case;
    an unknown one is an argparse error (exit 2) that lists them."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["onnx", "--preset", "deris-huge", "--random-weights", "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "unknown preset 'deris-huge'; accepted: deris-b-grefcoco" in capsys.readouterr().err
    from deris.cli_support import preset_name

    assert preset_name("DERIS-B-grefcoco") == preset_name("Deris-B-GRefCOCO") == "deris-b-grefcoco"


def test_cli_rejects_existing_and_unwritable_output(tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    assert cli.main(["onnx", "--preset", TINY, "--random-weights", "--out", str(existing)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["onnx", "--preset", TINY, "--random-weights", "--out", str(blocker / "out")]) == 2
    assert "cannot write the output directory" in capsys.readouterr().err
    assert cli.main(["onnx", "--preset", TINY, "--random-weights", "--out", "/proc/deris-export-test"]) == 2
    assert "cannot write the output directory" in capsys.readouterr().err
    # --preset without weights is refused; no preset and no weights means the built-in demo model.
    assert cli.main(["onnx", "--preset", TINY, "--out", str(tmp_path / "x")]) == 2
    assert "pass exactly one of --checkpoint FILE or --random-weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse-level errors exit 2 as well
        cli.main(["onnx", "--random-weights", "--checkpoint", "w.pth", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2


def test_cli_with_checkpoint(tmp_path, tiny_model, capsys):
    checkpoint = deris.save_checkpoint(tiny_model, tmp_path / "tiny.safetensors")
    out = tmp_path / "out"
    assert cli.main(["onnx", "--preset", TINY, "--checkpoint", str(checkpoint), "--graphs", "round_1", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "verification passed" in captured.out and "RANDOM" not in captured.err
    assert json.loads((out / "manifest.json").read_text())["weights"] == "tiny.safetensors"
    missing = ["onnx", "--preset", TINY, "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "x")]
    assert cli.main(missing) == 2 and "does not exist" in capsys.readouterr().err
    wrong_preset = ["onnx", "--preset", "deris-b-refcoco", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "x")]
    assert cli.main(wrong_preset) == 2 and "does not fit preset deris-b-refcoco" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_trt_needs_tensorrt(gridsample_export, tmp_path, capsys):
    """Without TensorRT, `trt` still checks the graphs, keeps them in OUT/onnx, builds nothing and
    exits 2 saying what to install (tests/test_tensorrt.py covers the export from a checkpoint)."""
    from deris.export.tensorrt_build import tensorrt_module

    if tensorrt_module() is not None:
        pytest.skip("TensorRT is installed here")
    out = tmp_path / "engines"
    assert cli.main(["trt", "--onnx", str(gridsample_export), "--out", str(out), "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "preflight passed for TensorRT 10.13" in captured.out
    assert "TensorRT is not installed here" in captured.err and f"are in {out / 'onnx'}" in captured.err
    assert [p.name for p in out.iterdir()] == ["onnx"]  # no engines, no engine manifest
    assert (out / "onnx" / "manifest.json").read_bytes() == (gridsample_export / "manifest.json").read_bytes()
    assert cli.main(["trt", "--onnx", str(tmp_path), "--out", str(tmp_path / "other")]) == 2
    assert "manifest.json is missing" in capsys.readouterr().err and not (tmp_path / "other").exists()


def _interrupt_after(monkeypatch, graphs_done: int) -> None:
    real = onnx_export.export_graph
    calls = []

    def export_then_interrupt(*args, **kwargs):
        if len(calls) == graphs_done:
            raise KeyboardInterrupt
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(onnx_export, "export_graph", export_then_interrupt)


def test_interrupted_export_leaves_no_output(tmp_path, monkeypatch, tiny_model, capsys):
    out = tmp_path / "out"
    _interrupt_after(monkeypatch, graphs_done=1)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(tiny_model, out, ExportOptions(TINY_RESOLUTION, graphs=("round_1", "round_2")), progress=False)
    assert list(tmp_path.iterdir()) == []  # neither out nor the staging directory
    # Through the CLI, and with --force over an existing export: the old directory survives intact.
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    _interrupt_after(monkeypatch, graphs_done=0)
    code = cli.main(["onnx", "--preset", TINY, "--random-weights", "--graphs", "round_1", "--force", "--out", str(out), "--quiet"])
    assert code == 130 and "interrupted" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "manifest.json").read_text() == "{}"


def test_force_replaces_and_external_data(tmp_path, tiny_model):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.onnx").write_text("")
    export_onnx(tiny_model, out, ExportOptions(TINY_RESOLUTION, graphs=("round_1",)), force=True, progress=False, external_data_threshold=0)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "round_1.onnx", "round_1.onnx.data",
                                                     "round_1.opt.onnx", "round_1.opt.onnx.data"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    entry = json.loads((out / "manifest.json").read_text())["graphs"]["round_1"]
    assert [f["name"] for f in entry["files"]] == ["round_1.onnx", "round_1.onnx.data"]
    assert [f["name"] for f in entry["optimized"]["files"]] == ["round_1.opt.onnx", "round_1.opt.onnx.data"]
    assert all(sha256_file(out / f["name"]) == f["sha256"] for f in entry["files"] + entry["optimized"]["files"])
    onnx.checker.check_model(str(out / "round_1.onnx"), full_check=True)
    assert_all_pass(verify_export(out, tiny_model), ["round_1"])


# ------------------------------------------------------------------------------------------------
# deris-b-grefcoco with the golden (synthetic official) weights against the official code's arrays
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def golden_b():
    """(the preset's config, golden case A, the comparison helper); the weights are the export jobs'."""
    case, _ = golden_check().load_case(str(golden_dir() / f"golden_{exports.GOLDEN_B}_caseA.npz"))
    assert case_paths(exports.GOLDEN_B)
    return deris.get_config(exports.GOLDEN_B), case, golden_check()


def golden_inputs(case, index: slice = slice(None)) -> dict[str, np.ndarray]:
    return {
        "img": case["in_img"][index],
        "img_mini": case["in_img_mini"][index],
        "token_ids": case["in_ref_expr_inds"][index],
        "text_pad_mask": case["in_text_attention_mask"][index],
    }


def assert_golden(checker, case, produced: dict[str, np.ndarray]) -> None:
    ok, rows = checker.check(case, produced, verbose=False)
    assert ok, "\n".join(f"{k}: {msg}" for k, passed, msg in rows if not passed)


def summaries(prefix: str, f: np.ndarray, channel_step: int, spatial_step: int) -> dict[str, np.ndarray]:
    """The golden file's reductions of a large feature map (see shared/golden/README.md)."""
    return {
        f"{prefix}_chmean": f.mean((2, 3)),
        f"{prefix}_posmean": f.mean(1),
        f"{prefix}_slice": f[:, ::channel_step, ::spatial_step, ::spatial_step],
    }


@pytest.fixture(scope="module")
def golden_b_export(background) -> Callable[[str], OnnxPipeline]:
    """caseA's weights exported at 384 as a pipeline per MSDA representation (tests/exports.py's
    background jobs: about three CPU-minutes and 2.2 GB for every graph with GridSample MSDA, one
    for the plugin's perception graph, whose pipeline takes the other graphs from the first)."""
    def exported(msda: str) -> OnnxPipeline:
        return OnnxPipeline(exports.exported(background, f"golden_b_export:{msda}"))

    made: dict[str, OnnxPipeline] = {}

    def pipeline(msda: str) -> OnnxPipeline:
        if "gridsample" not in made:
            made["gridsample"] = exported("gridsample")
        if msda not in made:
            made[msda] = MixedPipeline(made["gridsample"], exported(msda))
        return made[msda]

    return pipeline


class MixedPipeline(OnnxPipeline):
    """An export's pipeline whose perception graph comes from another export; the other graphs run
    in ``base``'s own sessions (opened once)."""

    def __init__(self, base: OnnxPipeline, perception: OnnxPipeline) -> None:
        super().__init__(base.directory)
        self.base, self.perception = base, perception

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return (self.perception if graph == "perception" else self.base).run(graph, feeds)


@pytest.mark.slow
def test_b_grefcoco_encoders_match_official(golden_b, golden_b_export):
    _, case, checker = golden_b
    pipeline = golden_b_export("gridsample")
    feeds = golden_inputs(case)  # the golden batch of 2; the encoders are batch-independent
    cognition = pipeline.run("cognition", feeds)
    perception = pipeline.run("perception", feeds)
    produced = {
        "pre_img_feat": cognition["img_feat"],
        "pre_text_feat": cognition["text_feat"],
        "pd_msf0": perception["ms0"],
        "pd_msf1": perception["ms1"],
        **summaries("pd_msf2", perception["ms2"], 16, 1),
        **summaries("pd_mask_features", perception["mask_features"], 16, 2),
    }
    assert_golden(checker, case, produced)


@pytest.mark.slow
@pytest.mark.parametrize("msda", ["gridsample", "trt-plugin"])
def test_b_grefcoco_full_model_matches_official_per_sample(golden_b, golden_b_export, msda):
    cfg, case, checker = golden_b
    pipeline = golden_b_export(msda)
    threshold = cfg.score_threshold
    for b in range(case["in_img"].shape[0]):
        feeds = golden_inputs(case, slice(b, b + 1))
        for layout in ("fused", "rounds"):
            result = pipeline(feeds, layout=layout)
            _, _, mask = decide(torch.from_numpy(result["mask_logits"]), torch.from_numpy(result["refer_logits"]), threshold)
            assert_golden(checker, case, {
                f"b1_s{b}_r3_mask_logits_lowres": result["mask_logits"],
                f"b1_s{b}_out_pred_refer_logits": result["refer_logits"],
                f"b1_s{b}_out_pred_existence": result["existence"],
                f"b1_s{b}_post_global_mask": mask.numpy().astype(np.uint8),
            })


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_demo_model_masks_survive_export(demo_export, demo_fp16_export, precision):
    """The shipped demo model on its own kind of images: the ONNX Runtime pipeline's masks match
    PyTorch float32 (IoU >= 0.99 per sample) with the same no-target decisions. The exports are the
    session's (tests/exports.py); fp32 is as deris-export makes it by default."""
    from deris.demo import load_demo_predictor

    model = load_demo_predictor().model
    cfg = model.cfg
    out = {"fp32": demo_export, "fp16": demo_fp16_export}[precision]
    inputs = synthetic_inputs(cfg, cfg.image_size, batch=6, seed=3)
    produced = OnnxPipeline(out)({k: v.numpy() for k, v in inputs.items()})
    with torch.inference_mode():
        expected = model(inputs["img"], inputs["img_mini"], inputs["token_ids"], inputs["text_pad_mask"])
    _, selected, masks = decide(torch.from_numpy(produced["mask_logits"]).float(),
                                torch.from_numpy(produced["refer_logits"]).float(), cfg.score_threshold)
    _, ref_selected, ref_masks = decide(expected["pred_masks_lowres"], expected["pred_refer_logits"], cfg.score_threshold)
    assert torch.equal(selected.any(1), ref_selected.any(1)), "no-target decisions differ"
    assert ref_selected.any(1).sum() >= 2, "the check needs samples with a target"
    for sample in range(masks.shape[0]):
        union = (masks[sample] | ref_masks[sample]).sum().item()
        iou = (masks[sample] & ref_masks[sample]).sum().item() / union if union else 1.0
        assert iou >= 0.99, f"sample {sample}: mask IoU {iou:.4f}"
