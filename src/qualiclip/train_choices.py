"""The named choices of training options, as ``Literal`` types and the tuples of their values.

:mod:`qualiclip.train_config` types its dataclass fields with them and checks values against
them; the command line offers them as ``choices``. They live apart from the dataclasses because
the command line builds every subcommand's flags at start-up, and importing
:mod:`qualiclip.train_config` loads torch (seconds), which ``qualiclip --help`` should not pay
for. So this module, like :mod:`qualiclip.precision` (where training precisions live, with the
others), imports nothing.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "BN_MODES", "DEGRADE_IN", "PROMPT_FEATURE_SOURCES", "BatchNormMode", "DegradeIn",
    "PromptFeatures",
]

#: Batch-norm statistics while training (``model.bn``): ``frozen`` keeps them fixed (eval mode)
#: while the rest trains; ``train`` updates them (needed from random initialisation).
BatchNormMode = Literal["frozen", "train"]
BN_MODES: tuple[str, ...] = get_args(BatchNormMode)

#: Where crops are degraded (``data.degrade_in``): in the training ``step``, or in the DataLoader
#: workers (``loader``).
DegradeIn = Literal["step", "loader"]
DEGRADE_IN: tuple[str, ...] = get_args(DegradeIn)

#: Where a trained model's prompt features come from (``model.prompt_features``): the start
#: point's ``text`` tower, or fixed ``orthogonal`` unit vectors.
PromptFeatures = Literal["text", "orthogonal"]
PROMPT_FEATURE_SOURCES: tuple[str, ...] = get_args(PromptFeatures)
