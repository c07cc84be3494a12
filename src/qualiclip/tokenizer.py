"""CLIP's byte-level BPE tokenizer.

The tokenizer of OpenAI CLIP (byte-level BPE as in GPT-2, lower-cased, 49,152 merges; Radford et
al. 2021). The vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` (MIT) is looked up in this order:
the ``QUALICLIP_VOCAB`` environment variable, then the package's own copy
(``qualiclip/assets/``, shipped in every install; provenance in ``assets/README.md``), and only if
that was removed the qualiclip cache, where it is downloaded once and checksum-verified (see
:mod:`qualiclip.pretrained`).
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from collections.abc import Sequence
from pathlib import Path

import ftfy
import regex
import torch

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
START, END = "<|startoftext|>", "<|endoftext|>"
_TOKEN_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


def _bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, so BPE never sees whitespace or control bytes."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return regex.sub(r"\s+", " ", text).strip()


def vocab_path() -> Path:
    """Locate the BPE vocabulary, downloading it (verified) into the cache as a last resort."""
    env = os.environ.get("QUALICLIP_VOCAB")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"QUALICLIP_VOCAB points to {env}, which is not a file")
        return Path(env)
    packaged = Path(__file__).parent / "assets" / VOCAB_FILENAME
    if packaged.is_file():
        return packaged
    from qualiclip import pretrained

    return pretrained.download(pretrained.BPE_VOCAB)


class Tokenizer:
    """Byte-level BPE encoder with CLIP's vocabulary.

    Args:
        path: the gzipped merges file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [START, END]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot_token, self.eot_token = self.encoder[START], self.encoder[END]

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one long-lived instance per process
    def bpe(self, token: str) -> tuple[str, ...]:
        """Merge the characters of one pre-token, lowest-ranked pair first."""
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:], strict=True))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        ids: list[int] = []
        for piece in _TOKEN_PATTERN.findall(_clean(text).lower()):
            if piece in (START, END):
                ids.append(self.encoder[piece])
                continue
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self.bpe(mapped))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The process-wide tokenizer (the vocabulary is read once)."""
    return Tokenizer(vocab_path())


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
) -> torch.Tensor:
    """Token ids of ``texts``: start token, BPE ids, end token, zero-padded.

    Args:
        texts: one string or a sequence of strings.
        context_length: row length (77 for every released CLIP).
        truncate: cut texts that do not fit, keeping the end token last; otherwise they raise.

    Returns:
        ``LongTensor[len(texts), context_length]``.

    Raises:
        ValueError: a text is too long and ``truncate`` is false.
    """
    if isinstance(texts, str):
        texts = [texts]
    tok = get_tokenizer()
    out = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [tok.sot_token, *tok.encode(text), tok.eot_token]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"text of {len(ids)} tokens is longer than the context of {context_length}: "
                    f"{text[:60]!r}... (pass truncate=True to cut it)"
                )
            ids = ids[:context_length]
            ids[-1] = tok.eot_token
        out[row, : len(ids)] = torch.tensor(ids)
    return out
