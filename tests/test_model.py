"""The QualiCLIP scorer against the authors' reference scores (shared/golden)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from qualiclip import engine
from qualiclip.model import QualiCLIP, Scorer, create_model, list_models
from qualiclip.precision import PrecisionError
from qualiclip.prompts import CLIP_MEAN, CLIP_STD, PROMPT_PAIRS

SCORE_ATOL = 1e-5  # the golden README's tolerance for scores


def to_unit_rgb(normalised: torch.Tensor) -> torch.Tensor:
    """Undo CLIP normalisation: the golden inputs are stored normalised, the model takes [0, 1]."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return normalised * std + mean


@pytest.fixture(scope="module")
def io(golden_dir):
    return torch.load(golden_dir / "clip_tiny_io.pt", weights_only=True)


@pytest.fixture(scope="module")
def official(golden_dir):
    return create_model(golden_dir / "qualiclip_tiny_official_format.pth")


def test_official_scores_match_reference(io, official):
    with torch.no_grad():
        s224 = official(to_unit_rgb(io["images_224"]))
        s160 = official(to_unit_rgb(io["images_160x288"]))
    torch.testing.assert_close(s224, io["qualiclip_official_score_224"], atol=SCORE_ATOL, rtol=0)
    torch.testing.assert_close(
        s160, io["qualiclip_official_score_160x288"], atol=SCORE_ATOL, rtol=0
    )


def test_pyiqa_formula_matches_reference(io, golden_dir):
    model = create_model(golden_dir / "qualiclip_tiny_official_format.pth", formula="pyiqa")
    with torch.no_grad():
        scores = model(to_unit_rgb(io["images_224"]))
    torch.testing.assert_close(scores, io["qualiclip_pyiqa_score_224"], atol=SCORE_ATOL, rtol=0)


def test_stored_prompt_features_are_the_reference(io, official):
    flat = official.prompt_features.reshape(-1, official.embed_dim)
    torch.testing.assert_close(flat, io["prompts_features"], atol=1e-4, rtol=0)
    assert official.prompt_pairs == PROMPT_PAIRS


def test_three_checkpoint_formats_give_the_same_scores(io, golden_dir, official):
    plain = create_model(golden_dir / "clip_tiny_rn.pt")  # prompt features from the text tower
    script = create_model(golden_dir / "clip_tiny_rn_torchscript.pt", trust_torchscript=True)
    x = to_unit_rgb(io["images_160x288"])
    with torch.no_grad():
        expected = io["qualiclip_official_score_160x288"]
        for model in (official, plain, script):
            torch.testing.assert_close(model(x), expected, atol=SCORE_ATOL, rtol=0)


def test_torchscript_by_path_needs_opt_in(golden_dir):
    with pytest.raises(ValueError, match="(?i)torchscript"):
        create_model(golden_dir / "clip_tiny_rn_torchscript.pt")


def test_official_state_dict_round_trip(tmp_path, io, official, golden_dir):
    text_state = torch.load(golden_dir / "clip_tiny_rn.pt", weights_only=True)
    saved = official.official_state_dict(text_state)
    reference = torch.load(golden_dir / "qualiclip_tiny_official_format.pth", weights_only=True)
    assert set(saved) == set(reference)
    torch.save(saved, tmp_path / "model.pth")
    reloaded = create_model(tmp_path / "model.pth")
    x = to_unit_rgb(io["images_224"])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), official(x), atol=0, rtol=0)


def test_custom_prompts_use_the_text_tower(golden_dir):
    model = create_model(
        golden_dir / "qualiclip_tiny_official_format.pth",
        prompt_pairs=[("Good photo.", "Bad photo.")],
    )
    assert model.prompt_features.shape[:2] == (1, 2)


def test_score_accepts_every_input_kind(tmp_path, official):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    expected = engine.score(official, torch.from_numpy(array).permute(2, 0, 1).float() / 255)
    assert isinstance(expected, float) and 0.0 <= expected <= 1.0
    for source in (
        array,
        Image.fromarray(array),
        tmp_path / "x.png",
        str(tmp_path / "x.png"),
        (tmp_path / "x.png").read_bytes(),
    ):
        assert engine.score(official, source) == pytest.approx(expected, abs=1e-6)
    batch = torch.from_numpy(np.stack([array, array[::-1]])).permute(0, 3, 1, 2).float() / 255
    scores = engine.score(official, batch)
    assert isinstance(scores, torch.Tensor) and scores.shape == (2,)
    assert float(scores[0]) == pytest.approx(expected, abs=1e-6)


def test_scores_are_probabilities_and_batch_independent():
    model = create_model("random-tiny")
    torch.manual_seed(0)
    x = torch.rand(4, 3, 64, 96)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(4)])
    assert ((together >= 0) & (together <= 1)).all()
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)


def test_input_validation_names_the_problem():
    model = create_model("random-tiny")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match="at least 32 px"):
        model(torch.rand(1, 3, 16, 64))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="random-tiny"):
        create_model("no-such-model")
    with pytest.raises(ValueError, match="prompt_features"):
        QualiCLIP(torch.nn.Identity(), torch.zeros(3, 3, 8))


def test_list_models_names_the_table():
    names = list_models()
    assert {"qualiclip", "clip-rn50", "clip-iqa", "random-tiny", "random-rn50"} <= set(names)


def test_model_moves_with_its_buffers():
    model = create_model("random-tiny").double()
    assert model.prompt_features.dtype == torch.float64 and model.mean.dtype == torch.float64
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def scorer_members() -> list[str]:
    """What the :class:`Scorer` protocol promises (properties and methods, ``forward`` included)."""
    return sorted(n for n in vars(Scorer) if not n.startswith("_"))


def test_qualiclip_is_a_scorer_whose_input_dtype_follows_its_weights():
    model = create_model("random-tiny")
    assert {"name", "weights_sha256", "min_size", "device", "input_dtype", "check_precision",
            "forward"} <= set(scorer_members())
    for member in scorer_members():
        assert hasattr(model, member), member
    assert model.input_dtype == torch.float32 and model.device == torch.device("cpu")
    model.check_precision("fp32")
    with pytest.raises(PrecisionError, match="fp16"):
        model.check_precision("fp16")  # CUDA only
    with pytest.raises(PrecisionError, match="int4"):
        model.check_precision("int4")  # no such precision
    assert model.double().input_dtype == torch.float64


def test_named_weights_download_once_then_score(monkeypatch, tmp_path, golden_dir, io):
    """create_model("qualiclip") with the network call patched to serve a known file."""
    import dataclasses
    import hashlib
    import io as stdio

    from qualiclip import pretrained

    blob = (golden_dir / "qualiclip_tiny_official_format.pth").read_bytes()
    file = dataclasses.replace(
        pretrained.QUALICLIP_FILE, sha256=hashlib.sha256(blob).hexdigest(), size=len(blob)
    )
    entry = dataclasses.replace(pretrained.PRETRAINED["qualiclip"], file=file)
    monkeypatch.setitem(pretrained.PRETRAINED, "qualiclip", entry)
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> stdio.BytesIO:
        calls.append(url)
        return stdio.BytesIO(blob)

    monkeypatch.setattr(pretrained, "_urlopen", fake_urlopen)
    model = create_model("qualiclip", cache_dir=tmp_path)
    assert calls == [file.urls[0]]
    assert model.name == "qualiclip" and model.weights_sha256 == file.sha256
    with torch.no_grad():
        scores = model(to_unit_rgb(io["images_224"]))
    torch.testing.assert_close(scores, io["qualiclip_official_score_224"], atol=SCORE_ATOL, rtol=0)
    create_model("qualiclip", cache_dir=tmp_path)
    assert len(calls) == 1, "a cached, verified file is not fetched again"


def test_clip_iqa_entry_uses_its_single_pair(monkeypatch, tmp_path, golden_dir):
    """The CLIP-IQA baseline: OpenAI's TorchScript archive (trusted after its checksum matched)."""
    import dataclasses
    import hashlib
    import shutil

    from qualiclip import pretrained

    archive = golden_dir / "clip_tiny_rn_torchscript.pt"
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    file = dataclasses.replace(pretrained.CLIP_RN50_FILE, sha256=digest)
    entry = dataclasses.replace(pretrained.PRETRAINED["clip-iqa"], file=file)
    monkeypatch.setitem(pretrained.PRETRAINED, "clip-iqa", entry)
    shutil.copy(archive, tmp_path / file.filename)
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")  # must come from the cache, not the network
    model = create_model("clip-iqa", cache_dir=tmp_path)
    assert model.prompt_pairs == (("Good photo.", "Bad photo."),)
    assert model.prompt_features.shape[:2] == (1, 2)


def test_pyiqa_formula_without_a_logit_scale_is_a_clear_error(tmp_path):
    """An image-tower-only checkpoint has no logit scale for pyiqa's formula: say so."""
    model = create_model("random-tiny")
    torch.save(model.official_state_dict(), tmp_path / "image_only.pth")
    assert create_model(str(tmp_path / "image_only.pth")).logit_scale == 100.0
    with pytest.raises(ValueError, match="has none .*formula='official'"):
        create_model(str(tmp_path / "image_only.pth"), formula="pyiqa")


# --- broken weights: non-finite values and wrong shapes (hostile input, round 3) ---------------


def _saved(tmp_path, name: str, edit) -> str:
    """The random tiny model in the authors' format, edited by ``edit(state)``, saved."""
    state = create_model("random-tiny").official_state_dict()
    edit(state)
    path = tmp_path / name
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("key", ["clip_model.visual.layer1.0.conv1.weight", "prompts_features"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_at_load_naming_the_key(tmp_path, key, bad):
    def poison(state):
        state[key].view(-1)[3] = bad

    path = _saved(tmp_path, "poisoned.pth", poison)
    short = key.removeprefix("clip_model.")
    with pytest.raises(ValueError, match=rf"{short} holds 1 non-finite value") as info:
        create_model(path)
    assert "\n" not in str(info.value)


def test_wrong_shapes_are_refused_at_load_naming_key_and_both_shapes(tmp_path):
    def widen(state):
        w = state["clip_model.visual.layer1.0.conv2.weight"]
        state["clip_model.visual.layer1.0.conv2.weight"] = torch.zeros(*w.shape[:2], 5, 5)

    path = _saved(tmp_path, "conv.pth", widen)
    with pytest.raises(ValueError) as info:
        create_model(path)
    text = str(info.value)
    assert "visual.layer1.0.conv2.weight" in text and "(16, 16, 5, 5)" in text
    assert "(16, 16, 3, 3)" in text and "\n" not in text

    def narrow(state):
        state["prompts_features"] = state["prompts_features"][:, :48].contiguous()

    path = _saved(tmp_path, "prompts.pth", narrow)
    with pytest.raises(ValueError, match=r"prompts_features.*\(14, 48\).*\(14, 64\)"):
        create_model(path)


def test_a_non_finite_score_is_an_error_row_never_a_score(tmp_path):
    model = create_model("random-tiny")
    with torch.no_grad():
        model.visual.attnpool.c_proj.bias.fill_(float("nan"))  # broken after loading
    Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(tmp_path / "x.png")
    (row,) = engine.score_paths(model, [tmp_path / "x.png"])
    assert row.score is None and row.error == "model produced a non-finite score"
    outcomes, _ = engine.score_arrays(model, [np.full((64, 80, 3), 9, np.uint8)])
    assert isinstance(outcomes[0], ValueError)
    assert str(outcomes[0]) == "model produced a non-finite score"
