"""CLIP towers against OpenAI CLIP's reference outputs on tiny random models (shared/golden)."""

from __future__ import annotations

import pytest
import torch

from qualiclip.clip import (
    CLIP,
    TINY_RN,
    AttentionPool2d,
    build_clip,
    config_from_state_dict,
    load_visual,
)

ATOL = 1e-4  # the golden README's tolerance for features and logits


@pytest.fixture(scope="module")
def io(golden_dir):
    return torch.load(golden_dir / "clip_tiny_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def rn_state(golden_dir):
    return torch.load(golden_dir / "clip_tiny_rn.pt", weights_only=True)


@pytest.fixture(scope="module")
def vit_state(golden_dir):
    return torch.load(golden_dir / "clip_tiny_vit.pt", weights_only=True)


def test_config_inferred_from_tensors(rn_state, vit_state):
    assert config_from_state_dict(rn_state) == TINY_RN
    vit = config_from_state_dict(vit_state)
    assert (vit.vision_layers, vit.vision_width, vit.vision_patch_size) == (2, 64, 32)
    assert vit.image_resolution == 224 and vit.embed_dim == 64


@pytest.mark.parametrize(
    ("pooling", "image_key", "expected_key"),
    [
        ("original", "images_224", "rn_image_224_with_pos"),
        ("none", "images_224", "rn_image_224_no_pos"),
        ("none", "images_160x288", "rn_image_160x288_no_pos"),
        ("interpolate", "images_160x288", "rn_image_160x288_interp_pos"),
    ],
)
@pytest.mark.parametrize("full_attention", [False, True])
@pytest.mark.slow
def test_resnet_image_features(io, rn_state, pooling, image_key, expected_key, full_attention):
    model = build_clip(rn_state, pooling=pooling)
    model.visual.attnpool.full_attention = full_attention
    with torch.no_grad():
        out = model.encode_image(io[image_key])
    torch.testing.assert_close(out, io[expected_key], atol=ATOL, rtol=0)


def test_text_features_and_logits(io, rn_state, vit_state):
    tokens = io["prompt_tokens"].long()
    rn = build_clip(rn_state, pooling="original")
    vit = build_clip(vit_state)
    with torch.no_grad():
        torch.testing.assert_close(rn.encode_text(tokens), io["rn_text"], atol=ATOL, rtol=0)
        torch.testing.assert_close(vit.encode_text(tokens), io["vit_text"], atol=ATOL, rtol=0)
        torch.testing.assert_close(
            vit.encode_image(io["images_224"]), io["vit_image_224"], atol=ATOL, rtol=0
        )
        rn_logits, rn_t = rn(io["images_224"], tokens)
        vit_logits, _ = vit(io["images_224"], tokens)
    torch.testing.assert_close(rn_logits, io["rn_logits_per_image_224"], atol=ATOL, rtol=0)
    torch.testing.assert_close(vit_logits, io["vit_logits_per_image_224"], atol=ATOL, rtol=0)
    assert torch.equal(rn_t, rn_logits.t())


def test_state_dict_round_trips_with_openai_names(rn_state):
    model = build_clip(rn_state)
    assert set(model.state_dict()) == set(rn_state)
    visual = load_visual(rn_state)
    assert set(visual.state_dict()) == {k[7:] for k in rn_state if k.startswith("visual.")}


def test_original_pooling_rejects_other_sizes(rn_state):
    model = build_clip(rn_state, pooling="original")
    with pytest.raises(ValueError, match="pooling='none'"):
        model.encode_image(torch.zeros(1, 3, 160, 288))


@pytest.mark.parametrize("pooling", ["none", "interpolate"])
def test_first_token_pooling_equals_full_attention(pooling):
    torch.manual_seed(0)
    pool = AttentionPool2d(7, 64, 4, 32, pooling=pooling)
    x = torch.randn(3, 64, 5, 9)
    fast = pool(x)
    pool.full_attention = True
    torch.testing.assert_close(fast, pool(x), atol=1e-5, rtol=1e-5)


def test_image_tower_only_state_dict_builds(rn_state):
    visual_only = {k: v for k, v in rn_state.items() if k.startswith("visual.")}
    model = build_clip(visual_only)
    assert not model.config.has_text
    with pytest.raises(ValueError, match="text tower"):
        model.encode_text(torch.zeros(1, 77, dtype=torch.long))


def test_random_constructor_is_pure_and_any_size():
    model = CLIP(TINY_RN).eval()
    with torch.no_grad():
        assert model.encode_image(torch.zeros(2, 3, 64, 96)).shape == (2, 64)
    with pytest.raises(ValueError, match="not an OpenAI-layout"):
        config_from_state_dict({"foo": torch.zeros(1)})


@pytest.mark.parametrize(
    ("pooling", "grid"),
    [("none", (7, 7)), ("none", (5, 9)), ("original", (7, 7)), ("interpolate", (5, 9))],
)
def test_first_token_pooling_forms_agree(pooling, grid):
    torch.manual_seed(0)
    pool = AttentionPool2d(7, 64, 4, 32, pooling=pooling)
    with torch.no_grad():  # non-zero biases, so the cancelling of k_proj's bias is really tested
        for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
            proj.bias.normal_()
    x = torch.randn(3, 64, *grid) * 2
    pool.eval()
    fast = pool(x)  # keys and values never projected
    pool.train()
    projected = pool(x)  # keys and values of every token projected, token 0 queries
    pool.full_attention = True
    full = pool(x)  # every token queries (the reference form), token 0 kept
    torch.testing.assert_close(fast, projected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
