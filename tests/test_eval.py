"""``deris eval`` / ``deris eval-merge`` end to end on small datasets in the official layout, with deris-tiny.

The torch backend's metrics are recomputed here independently (the model's outputs through
``deris.postprocess.decide`` at the model resolution; ``Predictor.predict`` at the original size); ONNX
Runtime must agree with it in one table; a real Triton server must give the same masks, hence the same
metrics, at the original size. Shards merged give the single-process result.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from deris.cli import main as deris_main
from deris.datasets import load_split, official_gt_mask
from deris.evaluation import GresMetrics, RisMetrics
from deris.postprocess import decide
from deris.predictor import Predictor
from deris.triton_repo.client import DerisClient

PRESET = "deris-tiny"  # tis.PRESET
TinyExport = Any  # tis.TinyExport: checkpoint, onnx_dir, spm

SIZES = {1: (72, 100), 2: (60, 90), 3: (100, 70), 4: (128, 128)}  # image_id -> (height, width)
SCORE_ATOL = 1e-5
# With deris-tiny's fixed random weights the top scores of these samples lie in 0.757..0.790: this threshold
# (1.5e-3 from the nearest) makes some decisions "no target" and others not.
MIXED_THRESHOLD = "0.775"


def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    """One rectangle as a COCO polygon segmentation."""
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """seqtr_type/ with gRefCOCO val (targets, a multi-target and no-target expressions) and RefCOCO val."""
    root = tmp_path_factory.mktemp("eval_data") / "seqtr_type"
    images = root / "images/mscoco/train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for image_id, (height, width) in SIZES.items():
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        pixels[: height // 2, : width // 2] = (220, 40, 40)
        Image.fromarray(pixels).save(images / f"COCO_train2014_{image_id:012d}.jpg")

    def annotation(ann_id: int, segmentation: Any) -> dict[str, Any]:
        return {"id": ann_id, "segmentation": segmentation, "bbox": [0, 0, 1, 1], "category_id": 1, "iscrowd": 0}

    def gref(image_id: int, text: str, *annotations: dict[str, Any]) -> dict[str, Any]:
        height, width = SIZES[image_id]
        empty = {"id": -1, "segmentation": None, "empty": True}
        return {"image_id": image_id, "height": height, "width": width, "expressions": {"raw": text},
                "annotations": list(annotations) or [empty]}

    grefs = {"val": [
        gref(1, "the red box on the left", annotation(11, rect(0, 0, 50, 36))),
        gref(2, "both things", annotation(21, rect(2, 3, 40, 30)), annotation(22, rect(50, 30, 88, 58))),
        gref(3, "a unicorn"),
        gref(4, "the big square", annotation(41, rect(10, 10, 118, 118))),
        gref(1, "nothing like that"),
        gref(3, "the tall thing", annotation(31, rect(5, 20, 60, 95))),
        gref(2, "the small dog", annotation(23, rect(60, 5, 80, 25))),
        gref(4, "the corner", annotation(42, rect(0, 0, 32, 32))),
    ]}

    def ris(image_id: int, ann_id: int, mask: Any, *texts: str) -> dict[str, Any]:
        height, width = SIZES[image_id]
        return {"image_id": image_id, "id": ann_id, "expressions": list(texts), "mask": mask, "bbox": [0, 0, 1, 1],
                "height": height, "width": width}

    mixed = {"val_refcoco_unc": [
        ris(1, 101, rect(0, 0, 50, 36), "red man on the left", "the red one"),
        ris(2, 102, rect(2, 3, 40, 30), "blue car in the middle"),
        ris(3, 103, rect(5, 20, 60, 95), "tall giraffe", "giraffe at the top"),
        ris(4, 104, rect(64, 0, 128, 128), "the right half"),
        ris(2, 105, rect(50, 30, 88, 58), "small dog next to the door"),
    ]}
    (root / "annotations/grefs").mkdir(parents=True)
    (root / "annotations/grefs/instances.json").write_text(json.dumps(grefs))
    (root / "annotations/mixed-seg").mkdir(parents=True)
    (root / "annotations/mixed-seg/instances_nogoogle_withid.json").write_text(json.dumps(mixed))
    return root


def eval_args(data_root: Path, tiny: TinyExport, dataset: str, out: Path, *extra: str) -> list[str]:
    return ["eval", "--data-root", str(data_root), "--dataset", dataset, "--split", "val", "--preset", PRESET,
            "--checkpoint", str(tiny.checkpoint), "--tokenizer", str(tiny.spm), "--out", str(out), "--quiet", *extra]


def summary(out: Path) -> dict[str, Any]:
    return json.loads((out / "metrics.json").read_text())


def records(out: Path, label: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "records" / f"{label}.jsonl").read_text().splitlines()]


def backend(result: dict[str, Any], label: str) -> dict[str, Any]:
    return next(b for b in result["backends"] if b["label"] == label)


def gres_by_hand(data_root: Path, predictor: Any, threshold: float) -> GresMetrics:
    """gRefCOCO val scored without deris.eval: the model's outputs through decide() at 128x128 against the
    official GT."""
    expected = GresMetrics()
    for sample in load_split(data_root, "grefcoco", "val"):
        prepared = predictor.prepare(sample.image_path)
        token_ids, pad_mask = predictor.text_encoder.encode_batch([sample.expression])
        with torch.inference_mode():
            outputs = predictor.model(torch.from_numpy(prepared.img[None]), torch.from_numpy(prepared.img_mini[None]),
                                      torch.from_numpy(token_ids), torch.from_numpy(pad_mask))
        _, selected, mask = decide(outputs["pred_masks_lowres"], outputs["pred_refer_logits"], threshold)
        expected.update(mask[0].numpy(), official_gt_mask(sample, (128, 128)), not bool(selected[0].any()), sample.no_target)
    return expected


# --- torch and onnxruntime ------------------------------------------------------------------------------


def test_torch_and_onnxruntime_in_one_table(data_root: Path, tiny_export: TinyExport, local_predictor: Any,
                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = deris_main(eval_args(data_root, tiny_export, "grefcoco", out, "--backend", "torch",
                                "--backend", f"onnxruntime:{tiny_export.onnx_dir}", "--batch-size", "3",
                                "--score-threshold", MIXED_THRESHOLD))
    assert code == 0
    result = summary(out)
    assert result["run"]["protocol"] == "official" and result["run"]["eval_size"] == [128, 128]
    assert [b["label"] for b in result["backends"]] == ["torch", "onnxruntime"]
    torch_run, onnx_run = result["backends"]
    assert result["samples"] == torch_run["samples"] == onnx_run["samples"] == 8
    assert torch_run["agreement"] is None
    agreement = onnx_run["agreement"]
    assert agreement["mask_iou_mean"] > 0.99 and agreement["mask_iou_min"] > 0.9, agreement
    assert agreement["same_no_target"] == 100.0
    assert agreement["max_score_diff"] < 1e-4
    assert onnx_run["metrics"] == pytest.approx(torch_run["metrics"], abs=0.01)
    assert torch_run["samples_per_s"] > 0 and onnx_run["samples_per_s"] > 0

    # The torch metrics, recomputed: the model's outputs through decide() at 128x128 against the official GT.
    expected = gres_by_hand(data_root, local_predictor, float(MIXED_THRESHOLD))
    assert torch_run["metrics"] == expected.compute()
    assert torch_run["state"] == expected.to_state()

    rows = records(out, "torch")
    assert [r["index"] for r in rows] == list(range(8))
    assert {"intersection", "union", "iou", "outcome", "no_target", "scores", "selected_queries"} <= set(rows[0])
    assert sum(r["intersection"] for r in rows) == torch_run["state"]["sum_i"]
    onnx_rows = records(out, "onnxruntime")
    assert all(r["vs_reference"]["same_no_target"] for r in onnx_rows)
    assert [r["no_target"] for r in onnx_rows] == [r["no_target"] for r in rows]
    assert {r["no_target"] for r in rows} == {True, False}

    table = (out / "metrics.md").read_text()
    assert "| backend | gIoU | cIoU | N-acc | T-acc |" in table and "mask IoU vs torch" in table
    assert f"onnxruntime (onnxruntime:{tiny_export.onnx_dir})" in table
    assert table.strip() in capsys.readouterr().out


def test_score_sweep_decides_the_same_outputs_again(data_root: Path, tiny_export: TinyExport, local_predictor: Any,
                                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    sweep = ["0.9", "0.5", MIXED_THRESHOLD, "0.77"]  # any order: scored in increasing order
    assert deris_main(eval_args(data_root, tiny_export, "grefcoco", out, "--backend", "torch",
                                "--backend", f"onnxruntime:{tiny_export.onnx_dir}", "--score-threshold", MIXED_THRESHOLD,
                                "--score-sweep", ",".join(sweep))) == 0
    for run in summary(out)["backends"]:
        points = {p["score_threshold"]: p for p in run["sweep"]}
        assert list(points) == sorted(map(float, sweep))
        own = points[float(MIXED_THRESHOLD)]  # the run's own threshold, decided twice: the same numbers
        assert own["state"] == run["state"] and own["metrics"] == run["metrics"]
        n_acc = [p["metrics"]["N-acc"] for p in run["sweep"]]
        t_acc = [p["metrics"]["T-acc"] for p in run["sweep"]]
        # A higher threshold selects fewer queries: more "no target" decisions, never fewer.
        assert n_acc == sorted(n_acc) and t_acc == sorted(t_acc, reverse=True) and n_acc[0] < n_acc[-1]
    torch_points = {p["score_threshold"]: p for p in backend(summary(out), "torch")["sweep"]}
    for threshold in (0.5, 0.77, 0.9):
        assert torch_points[threshold]["state"] == gres_by_hand(data_root, local_predictor, threshold).to_state()

    table = (out / "metrics.md").read_text()
    assert "Score-threshold sweep" in table and f"| torch | {MIXED_THRESHOLD} * |" in table
    with Image.open(out / "score_sweep.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > plot.size[1] > 300
    assert "score_sweep.png" in capsys.readouterr().out

    refusals = {"0.5,1.0": "a score threshold must be a number inside (0, 1), got '1.0' (in '0.5,1.0')",
                "x": "a score threshold must be a number inside (0, 1), got 'x'", ",": "expected comma-separated score thresholds such as 0.5,0.7,0.9, got ','"}
    for bad, message in refusals.items():
        with pytest.raises(SystemExit):
            deris_main(eval_args(data_root, tiny_export, "grefcoco", tmp_path / "bad", "--score-sweep", bad))
        assert f"argument --score-sweep: {message}" in capsys.readouterr().err
    triton = eval_args(data_root, tiny_export, "grefcoco", tmp_path / "bad", "--backend", "triton:localhost:1",
                       "--at-original-size", "--score-sweep", "0.5,0.9")
    assert deris_main(triton) == 2
    assert "a Triton server returns only the mask it decided at one threshold" in capsys.readouterr().err


def test_batches_and_query_sa(data_root: Path, tiny_export: TinyExport, tmp_path: Path) -> None:
    """per_sample is batch-invariant; official_batch mixes the images of a batch, so its scores change."""
    runs = {"b1": ("--batch-size", "1"), "b4": ("--batch-size", "4"),
            "official": ("--batch-size", "4", "--query-sa", "official_batch")}
    scores = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert deris_main(eval_args(data_root, tiny_export, "refcoco", out, "--backend", "torch", "--limit", "5", *extra)) == 0
        details = summary(out)["backends"][0]["details"]
        assert details["batch_size"] == int(extra[1]) and details["query_sa"] == (extra[3] if len(extra) > 2 else "per_sample")
        scores[name] = np.array([r["scores"] for r in records(out, "torch")])
    assert scores["b1"].shape == (5, 5)
    np.testing.assert_allclose(scores["b4"], scores["b1"], rtol=0, atol=SCORE_ATOL)
    assert np.abs(scores["official"] - scores["b1"]).max() > 1e-3


def test_tensorrt_backend_chains_the_engines(data_root: Path, tiny_export: TinyExport, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Engine directories (the fused decoder; the rounds) whose engines polygraphy's ONNX Runtime runners stand
    in for, as in the TensorRT builder's CPU tests; with the real runners here, TensorRT's absence is the error."""
    from deris.export import tensorrt_build

    onnx_manifest = json.loads((tiny_export.onnx_dir / "manifest.json").read_text())
    directories = {}
    for layout, graphs in (("fused", ["cognition", "perception", "decoder"]), ("rounds", [g for g in onnx_manifest["graphs"] if g != "decoder"])):
        directory = directories[layout] = tmp_path / f"engines-{layout}"
        directory.mkdir()
        manifest = onnx_manifest | {"tensorrt": {"version": "stand-in", "profile": {"min": 1, "opt": 1, "max": 2},
                                                 "engines": {g: {"file": f"{g}.plan"} for g in graphs}, "parity": {"passed": True}}}
        (directory / "manifest.json").write_text(json.dumps(manifest))

    args = eval_args(data_root, tiny_export, "grefcoco", tmp_path / "out", "--limit", "4", "--batch-size", "3",
                     "--score-threshold", MIXED_THRESHOLD, "--backend", f"onnxruntime:{tiny_export.onnx_dir}",
                     "--backend", f"tensorrt:{directories['fused']}", "--backend", f"tensorrt:{directories['rounds']}")
    assert deris_main(args) == 2
    assert "TensorRT is not installed here" in capsys.readouterr().err

    monkeypatch.setattr(tensorrt_build, "engine_runner_factory", lambda _: tensorrt_build.ort_runner_factory(tiny_export.onnx_dir))
    assert deris_main(args) == 0
    reference, fused, rounds = summary(tmp_path / "out")["backends"]
    assert (fused["label"], rounds["label"]) == ("tensorrt", "tensorrt-2")
    for engines in (fused, rounds):
        assert engines["details"]["runtime"] == "tensorrt" and engines["details"]["batch_size"] == 2  # the profile's max
        assert engines["metrics"] == reference["metrics"]
        assert engines["agreement"]["mask_iou_min"] == 1.0 and engines["agreement"]["same_no_target"] == 100.0
        assert engines["agreement"]["max_score_diff"] < SCORE_ATOL


# --- the original size and a real Triton server ---------------------------------------------------------


def test_triton_gives_the_torch_metrics_at_the_original_size(
    data_root: Path, tiny_export: TinyExport, local_predictor: Any, triton_server: Any, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = deris_main(eval_args(data_root, tiny_export, "grefcoco", out, "--at-original-size", "--concurrency", "3",
                                "--score-threshold", MIXED_THRESHOLD,
                                "--backend", "torch", "--backend", f"triton:{triton_server.grpc_url}",
                                "--backend", f"triton:http://{triton_server.http_url}"))
    assert code == 0
    result = summary(out)
    assert result["run"]["protocol"] == "original-size" and result["run"]["eval_size"] is None
    torch_run, grpc_run, http_run = result["backends"]
    assert (grpc_run["label"], http_run["label"]) == ("triton", "triton-2")
    assert (grpc_run["details"]["protocol"], http_run["details"]["protocol"]) == ("grpc", "http")

    # The served masks, asked for here one by one, scored directly: the same masks give the same metrics.
    samples = list(load_split(data_root, "grefcoco", "val"))
    served = GresMetrics()
    with DerisClient(triton_server.grpc_url, "grpc") as client:
        for sample in samples:
            prediction = client.predict(sample.image_path.read_bytes(), sample.expression, float(MIXED_THRESHOLD))
            served.update(prediction.mask, sample.gt_mask, prediction.no_target, sample.no_target)
    for run in (grpc_run, http_run):
        assert run["score_threshold"] == torch_run["score_threshold"] == float(MIXED_THRESHOLD)
        assert run["metrics"] == served.compute() and run["state"] == served.to_state()

    # What `deris predict` writes (Predictor.predict: original size) scored against the original GT.
    expected = GresMetrics()
    predictor = Predictor(local_predictor.model, local_predictor.text_encoder, score_threshold=float(MIXED_THRESHOLD))
    for sample in samples:
        prediction = predictor.predict(sample.image_path, sample.expression)
        expected.update(prediction.mask, sample.gt_mask, prediction.no_target, sample.no_target)
    assert torch_run["metrics"] == expected.compute() and torch_run["state"] == expected.to_state()

    # The server runs the graphs in ONNX Runtime: masks equal PyTorch's up to a pixel whose logit sits on the
    # mask threshold; decisions and metrics agree.
    for run in (grpc_run, http_run):
        agreement = run["agreement"]
        assert agreement["mask_iou_min"] > 0.99 and agreement["same_no_target"] == 100.0, agreement
        assert agreement["max_score_diff"] < SCORE_ATOL
        assert run["metrics"] == pytest.approx(torch_run["metrics"], abs=0.01)
    assert records(out, "triton")[0]["mask_size"] == list(SIZES[1])
    assert {r["no_target"] for r in records(out, "triton")} == {True, False}


def test_refcoco_at_the_original_size_is_predict(data_root: Path, tiny_export: TinyExport, local_predictor: Any,
                                                 tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert deris_main(eval_args(data_root, tiny_export, "refcoco", out, "--backend", "torch", "--at-original-size")) == 0
    expected = RisMetrics()
    for sample in load_split(data_root, "refcoco", "val"):
        expected.update(local_predictor.predict(sample.image_path, sample.expression).mask, sample.gt_mask)
    torch_run = summary(out)["backends"][0]
    assert list(torch_run["metrics"]) == ["mIoU", "oIoU", "Pr@0.5", "Pr@0.6", "Pr@0.7", "Pr@0.8", "Pr@0.9"]
    assert torch_run["metrics"] == expected.compute() and torch_run["samples"] == 7


def test_triton_is_refused_under_the_official_protocol(data_root: Path, tiny_export: TinyExport, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    code = deris_main(eval_args(data_root, tiny_export, "grefcoco", tmp_path / "out", "--backend", "torch",
                                "--backend", "triton:127.0.0.1:1"))
    assert code == 2
    assert "--at-original-size" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# --- shards ---------------------------------------------------------------------------------------------


def test_shards_merge_to_the_single_process_run(data_root: Path, tiny_export: TinyExport, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    two = ("--backend", "torch", "--backend", f"onnxruntime:{tiny_export.onnx_dir}", "--limit", "6",
           "--score-sweep", "0.6,0.9")
    assert deris_main(eval_args(data_root, tiny_export, "refcoco", tmp_path / "full", *two)) == 0
    assert deris_main(eval_args(data_root, tiny_export, "refcoco", tmp_path / "run", *two, "--shard", "0/2")) == 0
    with monkeypatch.context() as env:  # as torchrun starts the second process
        env.setenv("RANK", "1")
        env.setenv("WORLD_SIZE", "2")
        assert deris_main(eval_args(data_root, tiny_export, "refcoco", tmp_path / "run", *two)) == 0
        # --shard and torchrun together are refused
        assert deris_main(eval_args(data_root, tiny_export, "refcoco", tmp_path / "x", *two, "--shard", "0/2")) == 2
    shards = [tmp_path / "run" / f"shard-{i}-of-2" for i in (1, 0)]
    assert [summary(s)["samples"] for s in shards] == [3, 3]
    assert [r["index"] for r in records(shards[1], "torch")] == [0, 2, 4]

    merged = tmp_path / "merged"
    assert deris_main(["eval-merge", *map(str, shards), "--out", str(merged)]) == 0
    full, combined = summary(tmp_path / "full"), summary(merged)
    assert combined["merged_shards"] == 2 and combined["samples"] == 6
    for whole, parts in zip(full["backends"], combined["backends"]):
        assert parts["metrics"] == pytest.approx(whole["metrics"], abs=1e-9)
        assert {k: v for k, v in parts["state"].items() if k != "sum_iou"} == {k: v for k, v in whole["state"].items() if k != "sum_iou"}
        for whole_point, parts_point in zip(whole["sweep"], parts["sweep"], strict=True):
            assert parts_point["score_threshold"] == whole_point["score_threshold"]
            assert parts_point["metrics"] == pytest.approx(whole_point["metrics"], abs=1e-9)
        if whole["agreement"] is not None:
            assert parts["agreement"]["state"]["count"] == 6
            assert parts["agreement"]["mask_iou_min"] == whole["agreement"]["mask_iou_min"]
            assert parts["agreement"]["same_no_target"] == whole["agreement"]["same_no_target"]
    for label in ("torch", "onnxruntime"):
        assert (merged / "records" / f"{label}.jsonl").read_text() == (tmp_path / "full" / "records" / f"{label}.jsonl").read_text()

    capsys.readouterr()
    assert deris_main(["eval-merge", str(shards[0]), "--out", str(tmp_path / "m2")]) == 2
    assert "exactly once" in capsys.readouterr().err
    assert deris_main(["eval-merge", str(shards[0]), str(tmp_path / "full"), "--out", str(tmp_path / "m3")]) == 2
    assert "not a shard of the same run" in capsys.readouterr().err
    assert (merged / "score_sweep.png").is_file()  # RefCOCO: mIoU and oIoU against the threshold
    # A shard scored without the sweep belongs to another run.
    plain = [arg for arg in two if arg not in ("--score-sweep", "0.6,0.9")]
    assert deris_main(eval_args(data_root, tiny_export, "refcoco", tmp_path / "plain", *plain, "--shard", "0/2")) == 0
    capsys.readouterr()
    assert deris_main(["eval-merge", str(tmp_path / "plain" / "shard-0-of-2"), str(shards[0]), "--out", str(tmp_path / "m4")]) == 2
    assert "not a shard of the same run" in capsys.readouterr().err


# --- outputs and errors ---------------------------------------------------------------------------------


def test_outputs_are_atomic_and_errors_are_clear(data_root: Path, tiny_export: TinyExport, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    args = eval_args(data_root, tiny_export, "grefcoco", out, "--backend", "torch", "--limit", "2")
    assert deris_main(args) == 0 and summary(out)["samples"] == 2
    assert len(records(out, "torch")) == 2
    capsys.readouterr()
    assert deris_main(args) == 2 and "--force" in capsys.readouterr().err
    assert deris_main([*args, "--force", "--score-threshold", "0.3"]) == 0
    assert summary(out)["backends"][0]["score_threshold"] == 0.3

    from deris.eval import TorchBackend

    def interrupted(self: Any, items: Any) -> Any:
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(TorchBackend, "predict", interrupted)
        assert deris_main(eval_args(data_root, tiny_export, "grefcoco", tmp_path / "cut", "--backend", "torch")) == 130
    assert not (tmp_path / "cut").exists() and not list(tmp_path.glob(".cut*"))
    assert capsys.readouterr().err == "deris eval: interrupted\n"

    failures = {
        "is not a `deris-export trt` engine directory": ("--backend", f"tensorrt:{tmp_path}"),
        "holds no TensorRT engines": ("--backend", f"tensorrt:{tiny_export.onnx_dir}"),
        "needs --checkpoint": ("--backend", "torch"),
        f"beit3.spm) is required with {tiny_export.onnx_dir} (an export of {PRESET})": ("--backend", f"onnxruntime:{tiny_export.onnx_dir}"),
        "not of deris-b-grefcoco (--preset's model": ("--backend", f"onnxruntime:{tiny_export.onnx_dir}", "--preset", "deris-b-grefcoco"),
        "--score-threshold must be": ("--backend", "torch", "--score-threshold", "1.5"),
        "split 'nope' is not in": ("--backend", "torch", "--split", "nope"),
    }
    for message, extra in failures.items():
        argv = eval_args(data_root, tiny_export, "grefcoco", tmp_path / "bad", *extra)
        if message == "needs --checkpoint":
            argv.remove("--checkpoint")
            argv.remove(str(tiny_export.checkpoint))
        if "is required with" in message:
            argv.remove("--tokenizer")
            argv.remove(str(tiny_export.spm))
        assert deris_main(argv) == 2, message
        err = capsys.readouterr().err
        assert message in err and err.startswith("deris eval: error: "), err
    assert not (tmp_path / "bad").exists()

    for bad in ("onnxruntime", "torch:x", "pytorch", "triton"):
        with pytest.raises(SystemExit) as exit_info:
            deris_main(eval_args(data_root, tiny_export, "grefcoco", tmp_path / "bad", "--backend", bad))
        assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        deris_main(eval_args(data_root, tiny_export, "grefcoco", tmp_path / "bad", "--backend", "torch", "--shard", "2/2"))


def test_help_needs_no_torch() -> None:
    code = ("import sys; from deris.cli import build_parser; parser = build_parser(); "
            "bad = {'torch', 'cv2'} & set(sys.modules); assert not bad, bad; parser.parse_args(['eval', '--help'])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--query-sa official_batch --batch-size 16 --score-threshold 0.7" in result.stdout
    assert "0.9,0.95 \\\n      --out eval/demo-sweep" in result.stdout  # the example's line continuation is shown
