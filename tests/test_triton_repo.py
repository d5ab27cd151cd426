"""`deris-export triton-repo`: generated repositories for every backend and decoder layout.

No server here: configs are parsed with Triton's protobuf schema, the ensemble wiring is checked
step by step, and every graph model's dims and dtypes are compared with the ONNX manifest. The
tensorrt repository is generated from a fake engines directory with placeholder plans.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from tis import MAX_BATCH_SIZE, TinyExport, check_ensemble, type_name  # noqa: E402

from deris.atomic import OutputError  # noqa: E402
from deris.export.cli import main as export_main  # noqa: E402
from deris.triton_repo.repository import RepoError, generate_triton_repo, graph_names, read_export, register  # noqa: E402
from deris.triton_repo.server import TritonServer, onnxruntime_pool_args  # noqa: E402

MANIFEST_TYPES = {"float32": "TYPE_FP32", "int64": "TYPE_INT64"}


def fake_engines(tiny_export: TinyExport, folder: Path, max_batch: int = MAX_BATCH_SIZE, parity: bool = True) -> Path:
    """A `deris-export trt` directory with placeholder plans (the configs do not look inside them),
    built from the export's graphs, with the parity result ``parity``."""
    manifest = json.loads((tiny_export.onnx_dir / "manifest.json").read_text())
    engines = {}
    folder.mkdir()
    for name, entry in manifest["graphs"].items():
        data = f"placeholder engine for {name}".encode()
        (folder / f"{name}.plan").write_bytes(data)
        engines[name] = {"file": f"{name}.plan", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                         "onnx_sha256": entry["files"][0]["sha256"]}
    manifest["tensorrt"] = {"version": "placeholder", "profile": {"min": 1, "opt": 1, "max": max_batch}, "engines": engines,
                            "parity": {"passed": parity, "report": "parity.txt"}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("decoder", ["rounds", "fused"])
@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime", "python"])
def test_repository_configs(tiny_export: TinyExport, tmp_path: Path, backend: str, decoder: str) -> None:
    engines = fake_engines(tiny_export, tmp_path / "engines") if backend == "tensorrt" else None
    repo = generate_triton_repo(
        tiny_export.onnx_dir, tmp_path / "repo", backend, decoder, engines_dir=engines, spm_path=tiny_export.spm,
        max_batch_size=MAX_BATCH_SIZE, instances=2,
    )
    configs = check_ensemble(repo)
    graphs = graph_names(read_export(tiny_export.onnx_dir), decoder)
    assert set(configs) == {"deris", "preprocess", "postprocess", *graphs}
    manifest = json.loads((tiny_export.onnx_dir / "manifest.json").read_text())
    for name in graphs:
        config, entry = configs[name], manifest["graphs"][name]
        assert config.max_batch_size == MAX_BATCH_SIZE and config.HasField("dynamic_batching")
        for tensors, expected in ((config.input, entry["inputs"]), (config.output, entry["outputs"])):
            got = [(t.name, type_name(t.data_type), [-1, *t.dims]) for t in tensors]
            want = [(e["name"], MANIFEST_TYPES[e["dtype"]], [-1, *e["shape"][1:]]) for e in expected]
            assert got == want, name
        (group,) = config.instance_group
        assert group.count == 2
        version = sorted(p.name for p in (repo / name / "1").iterdir())
        if backend == "tensorrt":
            assert (config.platform, group.kind, version) == ("tensorrt_plan", group.KIND_GPU, ["model.plan"])
            # READY only once warm: zero requests at batch 1 and at the largest batch, every input.
            assert [(w.batch_size, w.count) for w in config.model_warmup] == [(1, 1), (MAX_BATCH_SIZE, 1)]
            for warmup in config.model_warmup:
                assert {n: (type_name(i.data_type), list(i.dims), i.zero_data) for n, i in warmup.inputs.items()} == {
                    t.name: (type_name(t.data_type), list(t.dims), True) for t in config.input
                }
        elif backend == "onnxruntime":
            assert (config.platform, group.kind, version) == ("onnxruntime_onnx", group.KIND_CPU, ["model.onnx"])
        else:
            assert (config.backend, group.kind, version) == ("python", group.KIND_CPU, ["model.onnx", "model.py"])
            assert config.parameters["onnx_file"].string_value == "model.onnx"
            # The CPU session settings of export/ort_optimize.py, for the model's own session.
            assert config.parameters["disabled_optimizers"].string_value == "SkipLayerNormFusion"
        if backend != "tensorrt":
            assert not config.model_warmup
            # Both CPU backends serve the graph's ONNX Runtime rewrite, byte for byte.
            served = hashlib.sha256((repo / name / "1" / "model.onnx").read_bytes()).hexdigest()
            assert served == entry["optimized"]["files"][0]["sha256"] != entry["files"][0]["sha256"]
    for name in ("preprocess", "postprocess"):
        assert configs[name].backend == "python"
        assert configs[name].instance_group[0].kind == configs[name].instance_group[0].KIND_CPU
    assert (repo / "preprocess" / "1" / "beit3.spm").read_bytes() == tiny_export.spm.read_bytes()
    assert configs["postprocess"].max_batch_size == 0
    top = configs["deris"]
    assert top.max_batch_size == MAX_BATCH_SIZE
    assert [t.name for t in top.input] == ["IMAGE", "TEXT"]
    assert [t.name for t in top.output] == ["MASK", "SCORES", "NO_TARGET", "EXISTENCE_PROB"]
    assert top.parameters["score_threshold"].string_value == str(manifest["score_threshold"])
    assert not list(tmp_path.glob(".repo*")), "staging folders left behind"


def test_onnxruntime_models_share_one_thread_pool(tiny_export: TinyExport, tmp_path: Path) -> None:
    ort_repo = generate_triton_repo(tiny_export.onnx_dir, tmp_path / "ort", "onnxruntime", spm_path=tiny_export.spm,
                                    intra_op_threads=3)
    pool = ["--backend-config=onnxruntime,enable-global-threadpool=1", "--backend-config=onnxruntime,inter_op_thread_count=1",
            "--backend-config=onnxruntime,intra_op_thread_count=3"]
    assert onnxruntime_pool_args(ort_repo) == pool
    command, _ = TritonServer(ort_repo, binary="/opt/tritonserver/bin/tritonserver").command()
    assert command[-len(pool):] == pool
    # The caller's own onnxruntime backend settings win; python-backend repositories need none.
    assert onnxruntime_pool_args(ort_repo, ["--backend-config=onnxruntime,enable-global-threadpool=0"]) == []
    python_repo = generate_triton_repo(tiny_export.onnx_dir, tmp_path / "py", "python", spm_path=tiny_export.spm)
    assert onnxruntime_pool_args(python_repo) == []


def test_tensorrt_engines_must_come_from_the_export_and_pass_parity(tiny_export: TinyExport, tmp_path: Path) -> None:
    def generate(engines: Path) -> None:
        generate_triton_repo(tiny_export.onnx_dir, tmp_path / "repo", "tensorrt", engines_dir=engines,
                             spm_path=tiny_export.spm, max_batch_size=MAX_BATCH_SIZE)

    with pytest.raises(RepoError, match="failed their parity check .*parity.txt.*not served"):
        generate(fake_engines(tiny_export, tmp_path / "failed", parity=False))
    stale = fake_engines(tiny_export, tmp_path / "stale")
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["tensorrt"]["engines"]["round_2"]["onnx_sha256"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepoError, match="engines for round_2 .* were not built from this ONNX export's graphs"):
        generate(stale)
    assert not (tmp_path / "repo").exists()


def test_rounds_have_unique_tensor_names(tiny_export: TinyExport, tmp_path: Path) -> None:
    repo = generate_triton_repo(tiny_export.onnx_dir, tmp_path / "repo", "python", spm_path=tiny_export.spm)
    steps = {s.model_name: s for s in check_ensemble(repo)["deris"].ensemble_scheduling.step}
    for r in (1, 2, 3):
        assert steps[f"round_{r}"].input_map["query"] == f"query_{r - 1}"
        assert steps[f"round_{r}"].input_map["prev_mask_logits"] == f"mask_logits_{r - 1}"
        assert steps[f"round_{r}"].input_map["level_feature"] == f"ms{r - 1}"
    assert steps["postprocess"].input_map["mask_logits"] == "mask_logits_3"


def test_existing_output_needs_force(tiny_export: TinyExport, tmp_path: Path) -> None:
    out = tmp_path / "repo"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        generate_triton_repo(tiny_export.onnx_dir, out, "python", spm_path=tiny_export.spm)
    generate_triton_repo(tiny_export.onnx_dir, out, "python", spm_path=tiny_export.spm, force=True)
    assert not (out / "old.txt").exists() and (out / "deris" / "config.pbtxt").is_file()


def test_failed_generation_leaves_nothing(tiny_export: TinyExport, tmp_path: Path) -> None:
    """A graph that no longer matches its manifest checksum stops the generation; no partial repository."""
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_export.onnx_dir, onnx_dir)
    with open(onnx_dir / "round_2.opt.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(RepoError, match="round_2.opt.onnx does not match the sha256"):
        generate_triton_repo(onnx_dir, tmp_path / "repo", "onnxruntime", spm_path=tiny_export.spm)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]


def test_bad_inputs_are_refused(tiny_export: TinyExport, tmp_path: Path) -> None:
    def generate(**kwargs: object) -> None:
        options = {"backend": "python", "spm_path": tiny_export.spm} | kwargs
        generate_triton_repo(tiny_export.onnx_dir, tmp_path / "repo", **options)  # type: ignore[arg-type]

    with pytest.raises(RepoError, match="unknown backend 'gpu'; accepted: tensorrt, onnxruntime, python"):
        generate(backend="gpu")
    with pytest.raises(RepoError, match="unknown decoder layout 'loop'; accepted: rounds, fused"):
        generate(decoder="loop")
    with pytest.raises(RepoError, match="engines directory .* is required with the tensorrt backend"):
        generate(backend="tensorrt")
    with pytest.raises(RepoError, match="above the engines' profile maximum 4"):
        generate(backend="tensorrt", engines_dir=fake_engines(tiny_export, tmp_path / "engines", max_batch=4), max_batch_size=8)
    with pytest.raises(RepoError, match="above the export's batch limit 64"):
        generate(max_batch_size=65)
    with pytest.raises(RepoError, match="max_batch_size must be an integer >= 1"):
        generate(max_batch_size=0)
    with pytest.raises(RepoError, match="not a sentencepiece model"):
        generate(spm_path=tiny_export.onnx_dir / "manifest.json")
    with pytest.raises(RepoError, match="no manifest.json|manifest.json is missing"):
        generate_triton_repo(tmp_path, tmp_path / "repo", "python", spm_path=tiny_export.spm)
    assert not (tmp_path / "repo").exists()


def test_custom_ops_need_tensorrt(tiny_export: TinyExport, tmp_path: Path) -> None:
    onnx_dir = tmp_path / "onnx"
    shutil.copytree(tiny_export.onnx_dir, onnx_dir)
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    manifest["graphs"]["perception"]["custom_ops"] = ["trt::MultiscaleDeformableAttnPlugin_TRT"]
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RepoError, match="custom ops .*MultiscaleDeformableAttnPlugin_TRT.* only TensorRT runs"):
        generate_triton_repo(onnx_dir, tmp_path / "repo", "onnxruntime", spm_path=tiny_export.spm)


def test_cli(tiny_export: TinyExport, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser(prog="deris-export")
    register(parser.add_subparsers())
    out = tmp_path / "repo"
    argv = ["triton-repo", "--onnx", str(tiny_export.onnx_dir), "--backend", "python", "--decoder", "fused",
            "--tokenizer", str(tiny_export.spm), "--out", str(out)]
    args = parser.parse_args(argv)
    assert args.run(args) == 0
    assert "wrote" in capsys.readouterr().out
    check_ensemble(out)
    assert export_main(argv) == 2
    assert "deris-export triton-repo: error: output directory" in capsys.readouterr().err
    # A threshold chosen with `deris eval --score-sweep` becomes the server's default: the postprocess model
    # decides with it, and clients read it from the ensemble.
    assert export_main([*argv, "--force", "--score-threshold", "0.65"]) == 0
    configs = check_ensemble(out)
    for name in ("deris", "postprocess"):
        assert configs[name].parameters["score_threshold"].string_value == "0.65", name
    assert export_main([*argv, "--force", "--score-threshold", "1"]) == 2
    assert "score_threshold must be a number inside (0, 1), got 1.0" in capsys.readouterr().err
