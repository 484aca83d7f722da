"""Tests for hetmap.compiler.data.corpus: the stdlib corpus split, tokenization and errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hetmap.common.errors import HetmapError, MissingDataError
from hetmap.compiler.data import corpus


def test_committed_split_is_disjoint_and_non_empty() -> None:
    parts = {split: set(corpus.listed_files(split)) for split in corpus.SPLITS}
    assert all(parts.values())
    assert not parts["train"] & parts["calib"]
    assert not parts["train"] & parts["eval"]
    assert not parts["calib"] & parts["eval"]
    assert len(parts["train"]) > 4 * len(parts["eval"])


def test_committed_split_follows_the_path_hash() -> None:
    for split in corpus.SPLITS:
        assert all(corpus.split_of(path) == split for path in corpus.listed_files(split))


def test_committed_split_excludes_tests_and_tools() -> None:
    excluded = {"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"}
    for split in corpus.SPLITS:
        for path in corpus.listed_files(split):
            assert path.endswith(".py")
            assert not excluded & set(Path(path).parts[:-1]), path


def test_scan_excludes_directories_and_is_deterministic(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    kept = ["a.py", "pkg/b.py", "pkg/sub/c.py", "email/d.py"]
    dropped = ["test/x.py", "pkg/tests/y.py", "idlelib/z.py", "lib2to3/w.py",
               "site-packages/v.py", "__pycache__/u.py", "notes.txt"]
    for relative in kept + dropped:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text("x = 1\n")
    parts = corpus.scan_stdlib(root)
    assert sorted(p for files in parts.values() for p in files) == sorted(kept)
    first = corpus.write_split(tmp_path / "one.json", root)
    corpus.write_split(tmp_path / "two.json", root)
    assert (tmp_path / "one.json").read_text() == (tmp_path / "two.json").read_text()
    assert json.loads((tmp_path / "one.json").read_text())["splits"] == first


def test_split_of_is_stable() -> None:
    # Pinned values: changing the hash rule would silently reshuffle the corpus.
    pinned = {"os.py": "train", "typing.py": "train", "asyncio/base_futures.py": "calib",
              "asyncio/protocols.py": "calib", "_pydecimal.py": "eval", "_sitebuiltins.py": "eval"}
    assert {path: corpus.split_of(path) for path in pinned} == pinned
    assert {corpus.split_of(f"m{i}.py") for i in range(200)} == set(corpus.SPLITS)


def test_read_corpus_bytes_is_deterministic_and_truncates() -> None:
    files = corpus.corpus_files("eval")
    assert files and all(path.is_file() for path in files)
    data = corpus.read_corpus_bytes("eval", max_bytes=50_000)
    assert len(data) == 50_000
    assert data == corpus.read_corpus_bytes("eval", max_bytes=50_000)
    assert data.startswith(files[0].read_bytes()[:1000])


def test_bytes_to_tokens_takes_byte_modulo_vocab() -> None:
    data = bytes(range(256))
    tokens = corpus.bytes_to_tokens(data, 100)
    assert tokens.dtype == torch.long and tokens.shape == (256,)
    assert tokens.tolist() == [b % 100 for b in range(256)]
    assert corpus.bytes_to_tokens(data, 256).tolist() == list(range(256))
    assert corpus.bytes_to_tokens(b"", 256).shape == (0,)
    with pytest.raises(HetmapError):
        corpus.bytes_to_tokens(data, 0)


def test_read_text_file_tokens(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    path.write_bytes(b"hello world")
    assert corpus.read_text_file_tokens(path, 256).tolist() == list(b"hello world")
    assert corpus.read_text_file_tokens(path, 256, max_tokens=5).tolist() == list(b"hello")


@pytest.mark.parametrize("content", [None, b""])
def test_read_text_file_tokens_rejects_missing_and_empty(
    tmp_path: Path, content: bytes | None
) -> None:
    path = tmp_path / "calib.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MissingDataError) as raised:
        corpus.read_text_file_tokens(path, 256, 100)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


@pytest.mark.parametrize("call", [corpus.corpus_files, corpus.read_corpus_bytes])
def test_unknown_split_is_a_one_line_error(call: Callable[[str], object]) -> None:
    with pytest.raises(HetmapError) as raised:
        call("validation")
    assert "validation" in str(raised.value) and "\n" not in str(raised.value)


def test_token_windows() -> None:
    windows = corpus.token_windows(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(MissingDataError):
        corpus.token_windows(torch.arange(3), 4)


def test_bigram_perplexity_add_one() -> None:
    train = torch.tensor([0, 1] * 50)  # 50 transitions 0->1, 49 transitions 1->0
    ppl = corpus.bigram_perplexity(train, torch.tensor([[0, 1]]), vocab_size=2)
    assert math.isclose(ppl, (50 + 2) / (50 + 1))
