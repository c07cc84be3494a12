"""QualiCLIP+: learned prompt context, pyiqa's prompt files, and scoring with them.

The token layout is checked against the tokenizer and the plain text tower (learned vectors equal
to a word's embedding must give that word's sentence); the file format against pyiqa's keys and
``weights_only`` loading; the score against the formula written out by hand. pyiqa's own code
was run on the same tiny model by ``benchmarks/crosscheck_pyiqa_plus.py`` (docs/method.md §6).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as stdio
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qualiclip import cli, pretrained
from qualiclip.clip import CLIP, build_clip
from qualiclip.model import create_model
from qualiclip.prompt_learning import (
    CTX_KEY,
    PREFIX_KEY,
    SUFFIX_KEY,
    LearnedPrompts,
    prompt_lengths,
    read_prompt_file,
    save_prompt_file,
)
from qualiclip.prompts import PROMPT_PAIRS, flatten_pairs
from qualiclip.tokenizer import tokenize

PROMPTS = flatten_pairs(PROMPT_PAIRS)


@pytest.fixture(scope="module")
def base(golden_dir: Path) -> Path:
    return golden_dir / "qualiclip_tiny_official_format.pth"


@pytest.fixture(scope="module")
def clip(base: Path) -> CLIP:
    return build_clip(pretrained.load_checkpoint(base)[0])


def _random_prompts(clip: CLIP, seed: int = 0, n_ctx: int = 16) -> LearnedPrompts:
    tokens = tokenize(PROMPTS, clip.context_length)
    g = torch.Generator().manual_seed(seed)
    learned = LearnedPrompts.initial(clip, tokens, n_ctx, generator=g)
    with torch.no_grad():
        learned.ctx.normal_(0.0, 0.5, generator=g)  # far from zero: the context matters
    return learned


def _prompt_file(tmp_path: Path, clip: CLIP, seed: int = 0) -> Path:
    return save_prompt_file(_random_prompts(clip, seed), tmp_path / f"p{seed}.pth", PROMPT_PAIRS)


def test_prompt_lengths_count_bpe_tokens() -> None:
    tokens = tokenize(["Good photo.", "High-resolution image."])
    assert prompt_lengths(tokens) == [3, 5]  # good, photo, . / high, -, resolution, image, .


def test_layout_is_start_half_prompt_half_rest(clip: CLIP) -> None:
    """Context vectors set to the embedding of "x" must read as "x x x x <prompt> x x x x":
    pyiqa's order (start, first half, prompt, second half, end...), through the real tower."""
    n_ctx = 8
    tokens = tokenize(PROMPTS, clip.context_length)
    learned = LearnedPrompts.initial(clip, tokens, n_ctx)
    x = clip.token_embedding(tokenize("x")[0, 1:2])  # one BPE token: "x</w>"
    with torch.no_grad():
        learned.ctx.copy_(x.expand(len(PROMPTS), n_ctx, -1))
        sentences = [f"{' '.join(['x'] * 4)} {p} {' '.join(['x'] * 4)}" for p in PROMPTS]
        expected_tokens = tokenize(sentences, clip.context_length)
        torch.testing.assert_close(learned.embeddings(), clip.token_embedding(expected_tokens))
        assert learned.eot_positions().tolist() == expected_tokens.argmax(-1).tolist()
        torch.testing.assert_close(learned.text_features(clip), clip.encode_text(expected_tokens))


def test_initial_prefix_and_suffix_are_pyiqas(clip: CLIP) -> None:
    """pyiqa embeds "X X ... X <prompt>" and keeps the start token and what follows the X's."""
    n_ctx = 16
    learned = LearnedPrompts.initial(clip, tokenize(PROMPTS), n_ctx)
    padded = tokenize([" ".join(["X"] * n_ctx) + " " + p for p in PROMPTS])
    with torch.no_grad():
        emb = clip.token_embedding(padded)
    torch.testing.assert_close(learned.token_prefix, emb[:, :1])
    torch.testing.assert_close(learned.token_suffix, emb[:, 1 + n_ctx :])
    assert learned.ctx.shape == (14, 16, 64) and learned.ctx.std().item() == pytest.approx(
        0.02, rel=0.1
    )


def test_shared_context_is_used_for_every_prompt(clip: CLIP) -> None:
    per_prompt = _random_prompts(clip)
    shared = LearnedPrompts(per_prompt.ctx[0], per_prompt.token_prefix, per_prompt.token_suffix,
                            per_prompt.lengths)
    expanded = LearnedPrompts(per_prompt.ctx[0].expand(14, -1, -1), per_prompt.token_prefix,
                              per_prompt.token_suffix, per_prompt.lengths)
    with torch.no_grad():
        torch.testing.assert_close(shared.text_features(clip), expanded.text_features(clip))


def test_file_is_pyiqas_format_and_round_trips(tmp_path: Path, clip: CLIP) -> None:
    learned = _random_prompts(clip)
    path = save_prompt_file(learned, tmp_path / "p.pth", PROMPT_PAIRS, {"base": "tiny"})
    raw = torch.load(path, weights_only=True)
    assert set(raw["params"]) == {CTX_KEY, PREFIX_KEY, SUFFIX_KEY}  # what pyiqa load_state_dicts
    assert raw["qualiclip"]["base"] == "tiny"
    # Saved tensors own their storage (a slice would drag the whole embedding table along).
    assert path.stat().st_size < 1.2 * sum(4 * t.numel() for t in raw["params"].values())
    back = read_prompt_file(path)
    assert back.prompt_pairs == PROMPT_PAIRS and back.info["base"] == "tiny"
    torch.testing.assert_close(back.params[CTX_KEY], learned.ctx.detach())
    # pyiqa's own files: only "params" (and DDP-prefixed keys are accepted).
    torch.save({"params": {f"module.{k}": v for k, v in raw["params"].items()}},
               tmp_path / "pyiqa.pth")
    theirs = read_prompt_file(tmp_path / "pyiqa.pth")
    assert theirs.prompt_pairs == PROMPT_PAIRS and theirs.info == {}


def test_bad_files_and_shapes_are_named(tmp_path: Path, clip: CLIP) -> None:
    torch.save({"params": {"prompt_learner.ctx": torch.zeros(14, 16, 64)}}, tmp_path / "a.pth")
    with pytest.raises(ValueError, match="token_prefix"):
        read_prompt_file(tmp_path / "a.pth")
    with pytest.raises(FileNotFoundError):
        read_prompt_file(tmp_path / "missing.pth")
    learned = _random_prompts(clip)
    with pytest.raises(ValueError, match="do not fit together"):
        LearnedPrompts(learned.ctx[:, :, :32], learned.token_prefix, learned.token_suffix,
                       learned.lengths)
    with pytest.raises(ValueError, match="13 prompts for 14"):
        LearnedPrompts(learned.ctx, learned.token_prefix, learned.token_suffix,
                       learned.lengths[:13])
    # A prompt file of another width (RN50's 512) on this base: the base is named as the cause.
    wide = LearnedPrompts(torch.zeros(14, 16, 512), torch.zeros(14, 1, 512),
                          torch.zeros(14, 60, 512), learned.lengths)
    with pytest.raises(ValueError, match="another base model"):
        wide.text_features(clip)
    with pytest.raises(ValueError, match="do not fit"):
        LearnedPrompts.initial(clip, tokenize(PROMPTS), n_ctx=74)


@pytest.mark.slow
def test_score_is_pyiqas_formula_by_default(tmp_path: Path, base: Path, clip: CLIP) -> None:
    path = _prompt_file(tmp_path, clip)
    learned = read_prompt_file(path).learned(tokenize(PROMPTS))
    model = create_model(base, prompts=path)
    x = torch.rand(3, 3, 96, 128)
    with torch.no_grad():
        text = F.normalize(learned.text_features(clip), dim=-1).view(7, 2, -1)
        image = F.normalize(clip.encode_image(model.normalize(x)), dim=-1)
        scale = clip.logit_scale.exp() / 2
        expected = (scale * torch.einsum("bd,pkd->bpk", image, text)).softmax(-1)[..., 0].mean(1)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)
    assert model.logit_scale == pytest.approx(math.exp(clip.logit_scale.item()) / 2)
    assert model.formula == "pyiqa"
    official = create_model(base, prompts=path, formula="official")
    assert official.logit_scale == 100 and official.formula == "official"
    # The prompts change the score; a second file gives other scores again.
    plain = create_model(base)
    other = create_model(base, prompts=_prompt_file(tmp_path, clip, seed=1))
    with torch.no_grad():
        assert (model(x) - plain(x)).abs().max() > 1e-3
        assert (model(x) - other(x)).abs().max() > 1e-4


def test_identity_names_base_and_prompts(tmp_path: Path, base: Path, clip: CLIP) -> None:
    path = _prompt_file(tmp_path, clip)
    model = create_model(base, prompts=path)
    assert model.name == f"{base}+{path}"
    text = f"{pretrained.sha256_file(base)}+{pretrained.sha256_file(path)}"
    assert model.weights_sha256 == hashlib.sha256(text.encode()).hexdigest()
    assert pretrained.weights_identity(base, path) == (model.name, model.weights_sha256)
    assert pretrained.weights_identity(base)[1] != model.weights_sha256


def test_bases_without_a_text_tower_and_conflicts_are_refused(
    tmp_path: Path, base: Path, clip: CLIP
) -> None:
    path = _prompt_file(tmp_path, clip)
    state = torch.load(base, weights_only=True)
    visual_only = {k: v for k, v in state.items()
                   if k.startswith("clip_model.visual.") or k == "prompts_features"}
    torch.save(visual_only, tmp_path / "visual.pth")
    with pytest.raises(ValueError, match="no text tower"):
        create_model(tmp_path / "visual.pth", prompts=path)
    with pytest.raises(ValueError, match="own prompt pairs"):
        create_model(base, prompts=path, prompt_pairs=[("Good.", "Bad.")])
    with pytest.raises(ValueError, match="unknown prompts"):
        create_model(base, prompts=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="qualiclip with learned prompts already"):
        create_model("qualiclip+", prompts=path)


def test_random_bases_take_prompts(tmp_path: Path) -> None:
    tiny = build_clip(pretrained.resolve_weights("random-tiny").state)
    path = save_prompt_file(_random_prompts(tiny), tmp_path / "p.pth", PROMPT_PAIRS)
    model = create_model("random-tiny", prompts=path)
    assert model.name == f"random-tiny+{path}"
    with torch.no_grad():
        assert model(torch.rand(1, 3, 64, 64)).shape == (1,)


# --- the weight table ---------------------------------------------------------------------------


def test_table_holds_the_four_qualiclip_plus_files() -> None:
    table = pretrained.PRETRAINED_PROMPTS
    expected = {
        "qualiclip+": ("QualiCLIP+_koniq.pth",
                       "450292893e96f38dca09d51ca2e0e1cd7cb1c2c55d444cfe2ac8ea2ab5d1d894"),
        "qualiclip+-clive": ("QualiCLIP+_clive.pth",
                             "5a2c75e4586abbaf1bc55e945691be14c70d68ede7dbabd86caebaf838ec50a3"),
        "qualiclip+-flive": ("QualiCLIP+_flive.pth",
                             "ac20494683fb8c26abae04c6df671c389bf42f08461b2eac8497d91d53d558cc"),
        "qualiclip+-spaq": ("QualiCLIP+_spaq.pth",
                            "2d9c2ef6b746d0f42573c24a118a6f0bf1f919d60163b5dbd6de0b6fc7e1a0e9"),
    }
    assert set(table) == set(expected)
    for name, (filename, digest) in expected.items():
        entry = table[name]
        assert entry.base == "qualiclip" and entry.file.filename == filename
        assert entry.file.sha256 == digest and entry.file.size == 2_209_627
        assert entry.file.urls == (
            f"https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/{filename}",
        )
    from qualiclip.model import list_models

    assert set(expected) <= set(list_models())


def _serve_tiny_plus(monkeypatch: pytest.MonkeyPatch, base: Path, prompts: Path) -> list[str]:
    """Point the table's qualiclip and qualiclip+ at tiny files and serve them from memory."""
    blobs = {"base": base.read_bytes(), "plus": prompts.read_bytes()}
    files = {
        "base": dataclasses.replace(pretrained.QUALICLIP_FILE, size=len(blobs["base"]),
                                    sha256=hashlib.sha256(blobs["base"]).hexdigest()),
        "plus": dataclasses.replace(pretrained.PRETRAINED_PROMPTS["qualiclip+"].file,
                                    size=len(blobs["plus"]),
                                    sha256=hashlib.sha256(blobs["plus"]).hexdigest()),
    }
    monkeypatch.setitem(pretrained.PRETRAINED, "qualiclip", dataclasses.replace(
        pretrained.PRETRAINED["qualiclip"], file=files["base"]))
    monkeypatch.setitem(pretrained.PRETRAINED_PROMPTS, "qualiclip+", dataclasses.replace(
        pretrained.PRETRAINED_PROMPTS["qualiclip+"], file=files["plus"]))
    routes = {files[k].urls[0]: blobs[k] for k in files}
    calls: list[str] = []

    def fake_urlopen(url: str, timeout: float) -> stdio.BytesIO:
        calls.append(url)
        return stdio.BytesIO(routes[url])

    monkeypatch.delenv("QUALICLIP_OFFLINE", raising=False)
    monkeypatch.setattr(pretrained, "_urlopen", fake_urlopen)
    return calls


def test_named_prompts_download_verified_then_score(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: Path, clip: CLIP
) -> None:
    path = _prompt_file(tmp_path, clip)
    calls = _serve_tiny_plus(monkeypatch, base, path)
    cache = tmp_path / "cache"
    model = create_model("qualiclip+", cache_dir=cache)
    assert sorted(Path(c).name for c in calls) == ["QualiCLIP+_koniq.pth", "QualiCLIP.pth"]
    assert model.name == "qualiclip+"
    same = create_model("qualiclip", prompts="qualiclip+", cache_dir=cache)
    by_path = create_model(base, prompts=path)
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), by_path(x))
        torch.testing.assert_close(same(x), by_path(x))
    assert len(calls) == 2, "cached, verified files are not fetched again"
    assert pretrained.weights_identity("qualiclip+") == (model.name, model.weights_sha256)


def test_named_prompts_offline_through_models_add(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: Path, clip: CLIP, capsys
) -> None:
    path = _prompt_file(tmp_path, clip)
    calls = _serve_tiny_plus(monkeypatch, base, path)
    monkeypatch.setenv("QUALICLIP_OFFLINE", "1")
    cache = tmp_path / "cache"
    with pytest.raises(pretrained.OfflineError, match="qualiclip models --add qualiclip"):
        create_model("qualiclip+", cache_dir=cache)
    assert cli.main(["models", "--add", "qualiclip", str(base), "--cache-dir", str(cache)]) == 0
    with pytest.raises(pretrained.OfflineError) as info:
        create_model("qualiclip+", cache_dir=cache)
    assert "qualiclip models --add qualiclip+ PATH" in str(info.value)
    wrong = tmp_path / "wrong.pth"
    wrong.write_bytes(b"not it")
    assert cli.main(["models", "--add", "qualiclip+", str(wrong), "--cache-dir", str(cache)]) == 1
    assert cli.main(["models", "--add", "qualiclip+", str(path), "--cache-dir", str(cache)]) == 0
    assert create_model("qualiclip+", cache_dir=cache).name == "qualiclip+"
    assert calls == []
    capsys.readouterr()
    assert cli.main(["models", "--cache-dir", str(cache)]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if line.startswith("qualiclip+ "))
    assert " yes " in row and "CC BY-NC-SA 4.0" in row
    assert any(line.startswith("qualiclip+-spaq ") and " no " in line
               for line in listing.splitlines())


# --- front ends ---------------------------------------------------------------------------------


def test_cli_score_with_prompts(tmp_path: Path, base: Path, clip: CLIP, capsys) -> None:
    from PIL import Image

    path = _prompt_file(tmp_path, clip)
    image = tmp_path / "a.png"
    Image.effect_noise((80, 64), 40).convert("RGB").save(image)
    code = cli.main(["score", str(image), "--model", str(base), "--prompts", str(path),
                     "--format", "csv", "--device", "cpu"])
    assert code == 0
    row = capsys.readouterr().out.strip().splitlines()[-1].split(",")
    from qualiclip.engine import score

    assert float(row[1]) == pytest.approx(score(create_model(base, prompts=path), image),
                                          abs=1e-5)
    assert cli.main(["score", str(image), "--model", str(base), "--prompts",
                     str(tmp_path / "none.pth")]) == 2


@pytest.mark.slow
def test_onnx_export_of_a_prompted_model(tmp_path: Path, base: Path, clip: CLIP) -> None:
    pytest.importorskip("onnxruntime")
    from qualiclip.onnx_export import export_onnx

    model = create_model(base, prompts=_prompt_file(tmp_path, clip))
    result = export_onnx(model, tmp_path / "plus.onnx")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4
    scorer = create_model(tmp_path / "plus.onnx")
    assert scorer.formula == "pyiqa"
    x = torch.rand(1, 3, 96, 64)
    with torch.no_grad():
        torch.testing.assert_close(scorer(x), model(x), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_ray_scoring_carries_the_prompts(tmp_path: Path, base: Path, clip: CLIP) -> None:
    pa = pytest.importorskip("pyarrow")
    from qualiclip import ray_scoring

    path = _prompt_file(tmp_path, clip)
    config = ray_scoring.RayScoreConfig(model=str(base), prompts=str(path), device="cpu")
    actor = ray_scoring._ActorScorer(config)
    assert (actor.model.name, actor.model.weights_sha256) == pretrained.weights_identity(base, path)
    # A folder of the base's scores is not taken for the prompted model's (nor the reverse).
    name, sha = pretrained.weights_identity(base)
    row = {"path": ["/x.png"], "score": [0.5], "error": [None], "width": [64], "height": [64],
           "model": [name], "weights_sha256": [sha],
               "precision": ["fp32"]}
    out = tmp_path / "out"
    out.mkdir()
    table = pa.Table.from_pydict(row, schema=ray_scoring._schema())
    ray_scoring._write_part(table, out, "part-a-00000.parquet", "parquet")
    assert ray_scoring.scored_paths(out, ray_scoring.RayScoreConfig(model=str(base))) == {"/x.png"}
    with pytest.raises(ValueError, match="holds scores of model"):
        ray_scoring.scored_paths(out, config)
