"""The reference model against arrays produced by the official DeRIS code (shared/golden).

Weights come from the synthetic rule by official key names and go through the official-checkpoint
converter, so these tests also prove the key mapping. Tolerance is golden_check's default.
"""

from __future__ import annotations

import functools
import gc

import numpy as np
import pytest
import torch
from golden import CONFIGS, case_paths, golden_check, golden_dir
from synthetic_weights import checksum, load_manifest, official_state_dict

import deris
from deris.postprocess import decide


def spatial_summary(prefix: str, f: torch.Tensor, channel_step: int, spatial_step: int = 1) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}_chmean": f.mean((2, 3)),
        f"{prefix}_posmean": f.mean(1),
        f"{prefix}_slice": f[:, ::channel_step, ::spatial_step, ::spatial_step],
    }


def encoder_arrays(model: deris.DeRIS, img, img_mini, ids, pad) -> dict[str, torch.Tensor]:
    cls, image_tokens, text_tokens = model.cognition.beit3(img_mini, ids, pad)
    img_feat, text_feat = model.cognition(img_mini, ids, pad)
    res = model.perception.swin(img)
    multi_scale, mask_features = model.perception(img)
    out = {
        "beit3_cls": cls,
        "beit3_text_tokens": text_tokens,
        "beit3_img_tokens_chmean": image_tokens.mean(1),
        "beit3_img_tokens_posmean": image_tokens.mean(2),
        "beit3_img_tokens_slice": image_tokens[:, :, ::16],
        "pre_img_feat": img_feat,
        "pre_text_feat": text_feat,
        "pre_query_feat": model.cognition.initial_queries().expand(img.shape[0], -1, -1),
        "swin_res5": res[3],
        "pd_msf0": multi_scale[0],
        "pd_msf1": multi_scale[1],
    }
    for name, f in zip(("res2", "res3", "res4"), res):
        out.update(spatial_summary(f"swin_{name}", f, f.shape[1] // 16, 2 if name == "res2" else 1))
    out.update(spatial_summary("pd_msf2", multi_scale[2], 16))
    out.update(spatial_summary("pd_mask_features", mask_features, 16, 2))
    return out


def decoder_arrays(model: deris.DeRIS, img, img_mini, ids, pad, score_threshold: float) -> dict[str, torch.Tensor]:
    out = model(img, img_mini, ids, pad, return_rounds=True)
    rounds = out["rounds"]
    arrays = spatial_summary("fused_mask_features", rounds[0]["fused"], 16, 2)
    for r, record in enumerate(rounds):
        masks = record["mask_logits_lowres"]
        if r == len(rounds) - 1:
            arrays[f"r{r}_mask_logits_lowres"] = masks
        else:
            arrays[f"r{r}_mask_logits_lowres_s2"] = masks[..., ::2, ::2]
            # The mask round r builds for decoder layer r, recorded where layer r uses it.
            arrays[f"r{r}_attn_mask"] = rounds[r + 1]["attn_mask_used"].to(torch.uint8)
            arrays[f"aux{r}_refer_logits"] = record["refer_logits"]
        arrays[f"r{r}_mask_logits_lowres_qmean"] = masks.mean((2, 3))
        arrays[f"r{r}_decoder_output"] = record["decoder_output"]
        arrays[f"r{r}_refer_logits"] = record["refer_logits"]
        for key in ("mask_embedding", "query_sa_out", "query_refer", "query_after_loopback"):
            if key in record:
                arrays[f"r{r}_{key}"] = record[key]
    _, aligned = model.existence(out["query_feat"], model.cognition(img_mini, ids, pad)[1], pad)
    scores, _, global_mask = decide(out["pred_masks_lowres"], out["pred_refer_logits"], score_threshold)
    arrays.update(
        out_pred_masks_q0=out["pred_masks"][:, :1],
        out_pred_refer_logits=out["pred_refer_logits"],
        out_pred_existence=out["pred_existence"],
        out_query_feat=out["query_feat"],
        und_query_feat=aligned,
        post_scores=scores,
        post_nt=1 - out["pred_existence"].sigmoid(),
        post_global_mask=global_mask.to(torch.uint8),
    )
    return arrays


def inputs(golden: dict[str, np.ndarray], index: slice = slice(None)) -> tuple[torch.Tensor, ...]:
    keys = ("in_img", "in_img_mini", "in_ref_expr_inds", "in_text_attention_mask")
    return tuple(torch.from_numpy(golden[k][index]) for k in keys)


def assert_golden(golden: dict[str, np.ndarray], produced: dict[str, torch.Tensor], prefix: str = "") -> None:
    arrays = {prefix + k: v.detach().numpy() for k, v in produced.items() if prefix + k in golden}
    assert arrays, "nothing to compare"
    ok, rows = golden_check().check(golden, arrays, verbose=False)
    failures = [f"{k}: {msg}" for k, passed, msg in rows if not passed]
    assert ok, "golden mismatch:\n" + "\n".join(failures)


@functools.lru_cache(maxsize=1)  # one model at a time: the L configs hold ~3 GB each
def loaded_case(config: str, salt: str) -> tuple[dict, deris.DeRIS, dict[str, torch.Tensor], object]:
    """(manifest, model loaded through the converter in official_batch mode, the official state dict,
    the conversion report) for one config and weight salt."""
    gc.collect()
    manifest = load_manifest(golden_dir() / f"manifest_{config}.json")
    model = deris.build_model(config, query_sa="official_batch")
    state = official_state_dict(manifest, salt, model)
    report = deris.load_checkpoint(model, state)
    return manifest, model, state, report


@pytest.fixture(scope="module", params=CONFIGS)
def config(request: pytest.FixtureRequest) -> str:
    """A module-scoped parameter: pytest runs every test of one config before the next, so each
    model is built and loaded once (loaded_case keeps one at a time)."""
    return str(request.param)


def cases(config: str) -> list[tuple[dict[str, np.ndarray], dict]]:
    """Every golden case of ``config`` with its metadata (its own weight salt among it); a config
    without any case fails rather than passing vacuously."""
    found = [golden_check().load_case(str(path)) for path in case_paths(config)]
    if not found:
        pytest.fail(f"no golden case for {config} in {golden_dir()}")
    return found


def test_manifest_weights_load_strictly(config):
    for _, meta in cases(config):
        manifest, model, state, report = loaded_case(config, meta["weight_salt"])
        entries = manifest["state_dict"]
        assert len(state) == len(entries) == manifest["num_state_dict_entries"]
        # Our generator reproduces the manifest's fingerprints for every generated tensor.
        checked = 0
        for entry in entries:
            theirs = entry.get(f"checksum_case{meta['case']}")
            if theirs is None:
                continue
            mine = checksum(state[entry["key"]])
            assert mine["first"] == theirs["first"], entry["key"]
            assert mine["sum"] == pytest.approx(theirs["sum"], rel=1e-9, abs=1e-9), entry["key"]
            assert mine["abs_sum"] == pytest.approx(theirs["abs_sum"], rel=1e-9), entry["key"]
            checked += 1
        assert checked > 0.9 * len(entries), f"only {checked} of {len(entries)} tensors have a checksum for case {meta['case']}"
        # Nothing unmapped; exactly the dead tensors were dropped; every kept tensor was loaded.
        assert not report.unmapped
        assert set(report.dropped) == set(manifest["unused_in_inference"]) | {
            k for k in state if ".box_embed." in k or ".cls_embed." in k
        }
        loaded = model.state_dict()
        for official, ours in report.mapped.items():
            assert torch.equal(loaded[ours], state[official]), official


def test_encoders_match_official(config):
    for golden, meta in cases(config):
        _, model, _, _ = loaded_case(config, meta["weight_salt"])
        with torch.no_grad():
            produced = encoder_arrays(model, *inputs(golden))
        assert_golden(golden, produced)


def test_decoder_official_batch_matches_official(config):
    for golden, meta in cases(config):
        _, model, _, _ = loaded_case(config, meta["weight_salt"])
        with torch.no_grad():
            produced = decoder_arrays(model, *inputs(golden), model.cfg.score_threshold)
        assert_golden(golden, produced)


def test_per_sample_matches_official_batch_of_one(config):
    for golden, meta in cases(config):
        _, model, _, _ = loaded_case(config, meta["weight_salt"])
        per_sample = deris.build_model(config)
        per_sample.load_state_dict(model.state_dict())
        for b in range(golden["in_img"].shape[0]):
            with torch.no_grad():
                produced = decoder_arrays(per_sample, *inputs(golden, slice(b, b + 1)), model.cfg.score_threshold)
            assert_golden(golden, produced, prefix=f"b1_s{b}_")
        del per_sample
