"""Antonym prompt pairs and CLIP's input normalisation.

QualiCLIP scores an image by how much closer it sits to the positive prompt of each pair than to
the negative one (Agnolucci et al., arXiv 2403.11176, §3). Prompts are kept as
``(positive, negative)`` tuples so that a missing comma cannot silently fuse two prompts.
"""

from __future__ import annotations

PromptPair = tuple[str, str]

#: The seven antonym pairs of the QualiCLIP release, positive first.
PROMPT_PAIRS: tuple[PromptPair, ...] = (
    ("Good photo.", "Bad photo."),
    ("Sharp image.", "Blurry image."),
    ("Sharp edges.", "Blurry edges."),
    ("High-resolution image.", "Low-resolution image."),
    ("Noise-free image.", "Noisy image."),
    ("High-quality image.", "Low-quality image."),
    ("Good picture.", "Bad picture."),
)

#: The single pair of CLIP-IQA (Wang et al., AAAI 2023), the zero-shot baseline.
CLIP_IQA_PAIRS: tuple[PromptPair, ...] = (("Good photo.", "Bad photo."),)

#: Per-channel RGB mean and standard deviation of CLIP's training data (OpenAI CLIP).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)


def flatten_pairs(pairs: tuple[PromptPair, ...] | list[PromptPair]) -> list[str]:
    """Return ``[pos_1, neg_1, pos_2, neg_2, ...]``: the order of stored prompt features.

    Raises:
        ValueError: when an entry is not a ``(positive, negative)`` pair of non-empty strings.
    """
    flat: list[str] = []
    for pair in pairs:
        if (
            not isinstance(pair, (tuple, list))
            or len(pair) != 2
            or not all(isinstance(p, str) and p.strip() for p in pair)
        ):
            raise ValueError(f"a prompt pair must be (positive, negative) strings, got {pair!r}")
        flat.extend(pair)
    if not flat:
        raise ValueError("at least one prompt pair is needed")
    return flat
