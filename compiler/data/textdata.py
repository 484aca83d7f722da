"""Text for calibration and evaluation, tokenized the way the model expects.

A model with a tokenizer gets its tokenizer's ids; one without reads bytes modulo its
vocabulary size. With no file given, the default corpus split (Python standard library
sources, see :mod:`hetmap.compiler.data.corpus`) is used deterministically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hetmap.common.errors import MissingDataError
from hetmap.compiler.data import corpus
from hetmap.compiler.frontend.loader import LoadedModel


def load_tokens(model: LoadedModel, file: str | Path | None, split: str, max_tokens: int) -> torch.Tensor:
    """At most ``max_tokens`` tokens of ``file`` (or the corpus ``split``), as a 1-D tensor."""
    vocab = model.vocab_size
    if vocab is None:
        raise MissingDataError(f"model {model.name!r} has no vocabulary size (no config and no "
                               "nn.Embedding): hetmap cannot tokenize text for it")
    if model.tokenizer is not None:
        text = (corpus.read_text_file_bytes(file, max_tokens * 8).decode(errors="replace")
                if file is not None
                else corpus.read_corpus_bytes(split, max_tokens * 8).decode(errors="replace"))
        ids = model.tokenizer(text, return_tensors="pt")["input_ids"][0][:max_tokens]
        return ids % vocab
    if file is not None:
        return corpus.read_text_file_tokens(file, vocab, max_tokens)
    return corpus.bytes_to_tokens(corpus.read_corpus_bytes(split, max_tokens), vocab)


def batches(tokens: torch.Tensor, seq_len: int, batch: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``seq_len`` tokens (a shorter text gives one window)."""
    seq_len = max(2, min(seq_len, tokens.numel()))
    windows = corpus.token_windows(tokens, seq_len)
    return [windows[i:i + batch] for i in range(0, windows.shape[0], batch)]
