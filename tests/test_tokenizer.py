"""Tokenizer conformance with OpenAI CLIP's reference outputs (shared/golden)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qualiclip.prompts import PROMPT_PAIRS, flatten_pairs
from qualiclip.tokenizer import get_tokenizer, tokenize


@pytest.fixture(scope="module")
def cases(golden_dir):
    return json.loads((golden_dir / "tokenizer_cases.json").read_text())["cases"]


def test_bpe_ids_match_reference(cases):
    tok = get_tokenizer()
    for case in cases:
        assert tok.encode(case["text"]) == case["bpe_ids"], case["text"]


def test_tokenize_truncate_matches_reference(cases):
    for case in cases:
        row = tokenize(case["text"], truncate=True)[0].tolist()
        assert row == case["tokenize_truncate_77"], case["text"]


def test_too_long_raises_unless_truncated(cases):
    long_cases = [c for c in cases if not c["fits_77"]]
    assert long_cases, "the golden cases include over-long text"
    for case in long_cases:
        with pytest.raises(ValueError, match="truncate=True"):
            tokenize(case["text"])
    for case in (c for c in cases if c["fits_77"]):
        assert tokenize(case["text"])[0].tolist() == case["tokenize_truncate_77"]


def test_prompt_tokens_match_reference(golden_dir):
    io = torch.load(golden_dir / "clip_tiny_io.pt", weights_only=True)
    assert io["prompts"] == flatten_pairs(PROMPT_PAIRS)
    assert torch.equal(tokenize(io["prompts"]), io["prompt_tokens"].long())


def test_decode_round_trips_plain_text():
    tok = get_tokenizer()
    assert tok.decode(tok.encode("a sharp photo of a cat")).strip() == "a sharp photo of a cat"


def test_prompt_pairs_are_pairs():
    assert len(PROMPT_PAIRS) == 7
    assert all(len(p) == 2 for p in PROMPT_PAIRS)
    with pytest.raises(ValueError):
        flatten_pairs([("Good photo.",)])  # type: ignore[list-item]


def test_vocabulary_is_shipped_and_verified() -> None:
    """The vocabulary is package data (an offline install can tokenize) with the known checksum."""
    from qualiclip import pretrained, tokenizer

    shipped = Path(tokenizer.__file__).parent / "assets" / tokenizer.VOCAB_FILENAME
    assert shipped.is_file()
    assert pretrained.sha256_file(shipped) == pretrained.BPE_VOCAB.sha256
    env = os.environ.pop("QUALICLIP_VOCAB", None)
    try:
        assert tokenizer.vocab_path() == shipped
    finally:
        if env is not None:
            os.environ["QUALICLIP_VOCAB"] = env
