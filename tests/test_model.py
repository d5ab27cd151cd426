"""Forward API, the two query_SA modes, batch and text-length invariance (deris-tiny, random weights)."""

from __future__ import annotations

import pytest
import torch

import deris


def make_inputs(batch: int, cfg: deris.DerisConfig, lengths: list[int], seed: int = 0, text_len: int | None = None):
    g = torch.Generator().manual_seed(seed)
    length = text_len or cfg.max_text_len
    img = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)
    img_mini = torch.randn(batch, 3, 224, 224, generator=g)
    ids = torch.ones(batch, length, dtype=torch.int64)
    pad = torch.ones(batch, length, dtype=torch.int64)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, 1000, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = 0, 2
        pad[b, :n] = 0
    return img, img_mini, ids, pad


@pytest.fixture(scope="module")
def tiny_models():
    torch.manual_seed(0)
    per_sample = deris.build_model("deris-tiny")
    official = deris.build_model("deris-tiny", query_sa="official_batch")
    official.load_state_dict(per_sample.state_dict())
    return per_sample, official


def outputs(model, *inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(*inputs)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def test_forward_shapes(tiny_models):
    model, _ = tiny_models
    cfg = model.cfg
    out = outputs(model, *make_inputs(2, cfg, [5, 9]))
    n, s = cfg.num_queries, cfg.image_size
    assert out["pred_masks"].shape == (2, n, s, s)
    assert out["pred_masks_lowres"].shape == (2, n, s // 4, s // 4)
    assert out["pred_refer_logits"].shape == (2, n, 2)
    assert out["pred_existence"].shape == (2, 1)
    assert all(torch.isfinite(v).all() for v in out.values())


def test_per_sample_is_batch_invariant(tiny_models):
    model, _ = tiny_models
    batch = make_inputs(4, model.cfg, [4, 7, 16, 3], seed=1)
    together = outputs(model, *batch)
    for b in range(4):
        alone = outputs(model, *(t[b : b + 1] for t in batch))
        for key, value in alone.items():
            torch.testing.assert_close(value, together[key][b : b + 1], atol=1e-5, rtol=0)


def test_official_batch_equals_per_sample_at_batch_one_and_mixes_at_two(tiny_models):
    per_sample, official = tiny_models
    batch = make_inputs(2, per_sample.cfg, [6, 11], seed=2)
    for b in range(2):
        single = tuple(t[b : b + 1] for t in batch)
        a, o = outputs(per_sample, *single), outputs(official, *single)
        for key in a:
            torch.testing.assert_close(a[key], o[key], atol=1e-5, rtol=0)
    # At batch size 2 the official layer attends across images: sample 0 depends on sample 1.
    mixed = outputs(official, *batch)["pred_refer_logits"][:1]
    alone = outputs(official, *(t[:1] for t in batch))["pred_refer_logits"]
    assert (mixed - alone).abs().max() > 1e-4


def test_text_length_invariance(tiny_models):
    model, _ = tiny_models
    n = 7
    padded = make_inputs(1, model.cfg, [n], seed=3, text_len=50)
    trimmed = (padded[0], padded[1], padded[2][:, :n], padded[3][:, :n])
    a, b = outputs(model, *padded), outputs(model, *trimmed)
    for key in ("pred_masks_lowres", "pred_refer_logits", "pred_existence"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


def test_rounds_on_request(tiny_models):
    model, _ = tiny_models
    with torch.no_grad():
        out = model(*make_inputs(1, model.cfg, [5]), return_rounds=True)
    rounds = out["rounds"]
    assert len(rounds) == 4
    torch.testing.assert_close(rounds[-1]["refer_logits"], out["pred_refer_logits"])
    # per_sample makes mask pooling inert: it is not computed.
    assert all("mask_embedding" not in r for r in rounds)


def test_perception_other_resolutions(tiny_models):
    model, _ = tiny_models
    with torch.no_grad():
        multi_scale, mask_features = model.perception(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape[-2:]) for m in multi_scale] == [(3, 5), (6, 10), (12, 20)]
    assert mask_features.shape[-2:] == (24, 40)
    with pytest.raises(ValueError, match="multiples of 32"):
        model.perception(torch.randn(1, 3, 100, 128))


def test_bad_configuration():
    with pytest.raises(ValueError, match="unknown preset 'deris-xl'.*deris-b-grefcoco"):
        deris.build_model("deris-xl")
    with pytest.raises(ValueError, match="query_sa must be one of"):
        deris.build_model("deris-tiny", query_sa="batch")
    with pytest.raises(ValueError, match=r"score_threshold must be a number inside \(0, 1\), got 1.5"):
        deris.build_model("deris-tiny", score_threshold=1.5)
    with pytest.raises(ValueError, match="unknown config field"):
        deris.build_model("deris-tiny", num_querys=3)


def test_presets_match_official_numbers():
    base, large = deris.get_config("deris-b-grefcoco"), deris.get_config("deris-l-refcoco")
    assert (base.beit3.embed_dim, base.beit3.depth, base.swin.embed_dim, base.swin.window_size) == (768, 12, 96, 7)
    assert (large.beit3.embed_dim, large.beit3.depth, large.swin.embed_dim, large.swin.window_size) == (1024, 24, 128, 12)
    assert (base.num_queries, base.max_text_len, base.score_threshold) == (20, 50, 0.7)
    assert (large.num_queries, large.max_text_len, large.score_threshold) == (10, 20, 0.9)
    assert deris.get_config("DERIS-L-grefcoco").name == "deris-l-grefcoco"


def test_triton_kernels_path_equals_reference(tiny_models):
    """The whole model with the Triton kernels (interpreter on CPU) equals the reference path;
    official_batch mode so that mask pooling is live too."""
    import deris.kernels as kernels

    _, official = tiny_models
    batch = make_inputs(2, official.cfg, [5, 12], seed=4)
    with kernels.backend("torch"):
        reference = outputs(official, *batch)
    with kernels.backend("triton"):
        triton = outputs(official, *batch)
    for key, value in reference.items():
        torch.testing.assert_close(triton[key], value, atol=1e-4 * float(value.abs().max()), rtol=0)


def test_training_regularisation_only_in_train_mode():
    """Stochastic depth (BEiT-3, Swin) and the aligner's dropout change train-mode outputs only."""
    torch.manual_seed(0)
    model = deris.build_model("deris-tiny")
    cfg = model.cfg
    assert (cfg.beit3.drop_path_rate, cfg.swin.drop_path_rate, cfg.decoder.aligner_dropout) == (0.1, 0.3, 0.1)
    assert deris.get_config("deris-l-refcoco").beit3.drop_path_rate == 0.0  # the official typo: no drop path for L
    generator = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 3, 128, 128, generator=generator), torch.randn(2, 3, 224, 224, generator=generator),
            torch.randint(3, 50, (2, 16), generator=generator), torch.zeros(2, 16, dtype=torch.long))
    with torch.no_grad():
        first, second = model(*args), model(*args)
        assert torch.equal(first["pred_masks_lowres"], second["pred_masks_lowres"])
        model.train()
        trained = model(*args)
    assert not torch.allclose(trained["pred_masks_lowres"], first["pred_masks_lowres"])
    assert not torch.allclose(trained["pred_existence"], first["pred_existence"])
