"""hetmap's built-in text corpus: the Python standard library's own source files.

The corpus needs no download: every machine that runs hetmap has a Python interpreter, and
its standard library is a few megabytes of real, varied text. It is used to train the
built-in ``demo`` model, to calibrate expert activation densities and to measure perplexity.

Rules:

1. Candidate files are the ``*.py`` files under ``sysconfig.get_paths()["stdlib"]``, except
   anything under ``site-packages``, ``test`` / ``tests`` directories, ``idlelib``,
   ``lib2to3`` and ``__pycache__``.
2. Each file goes to one split by a hash of its relative POSIX path (never by random state):
   bucket = first 8 hex digits of SHA-256 modulo 100; buckets 0-79 are ``train``, 80-89
   ``calib``, 90-99 ``eval``.
3. The split actually used is the list committed at ``compiler/assets/corpus_split.json``
   (written by :func:`write_split`), so every machine reads the same files in the same order.
   Listed files missing on a machine (another Python version) are skipped.
4. Text becomes tokens byte by byte: token = byte value modulo the vocabulary size. This is
   how hetmap tokenizes text for a model without a tokenizer.

A second corpus, ``c-headers``, trains the ``demo-c`` model on a different kind of text: the
CPython C headers (``*.h`` files, recursively, under ``sysconfig.get_paths()["include"]``),
which ship with every Python that can build extensions. Same hash rule (2) on the path
relative to the include directory; its split list is ``compiler/assets/corpus_split_c.json``.
Select it with ``corpus="c-headers"`` (every function defaults to ``"stdlib"``).

A third corpus, ``package-docs``, trains ``demo-ds`` on prose: the ``METADATA`` files of the
installed packages (``<name>-<version>.dist-info/METADATA`` directly under
``sysconfig.get_paths()["purelib"]``: each package's description, mostly English Markdown or
reStructuredText, and its header fields), hetmap's own excluded. Same hash rule (2) on the
path relative to that directory; its split list is ``compiler/assets/corpus_split_docs.json``,
so the pinned environment of ``make venv`` reads the same files everywhere.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
import torch

from hetmap.common.errors import HetmapError, MissingDataError

SPLITS: tuple[str, ...] = ("train", "calib", "eval")
SPLIT_PATH = Path(__file__).resolve().parent.parent / "assets" / "corpus_split.json"

SPLIT_PATH_C = Path(__file__).resolve().parent.parent / "assets" / "corpus_split_c.json"
SPLIT_PATH_DOCS = Path(__file__).resolve().parent.parent / "assets" / "corpus_split_docs.json"
CORPORA: tuple[str, ...] = ("stdlib", "c-headers", "package-docs")

_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
_SPLIT_BOUNDS = (("train", 80), ("calib", 90), ("eval", 100))


def stdlib_root() -> Path:
    """The directory holding the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def include_root() -> Path:
    """The directory holding the running interpreter's C headers (the ``c-headers`` corpus)."""
    return Path(sysconfig.get_paths()["include"])


def packages_root() -> Path:
    """The running interpreter's site-packages (the ``package-docs`` corpus)."""
    return Path(sysconfig.get_paths()["purelib"])


def _check_corpus(corpus: str) -> None:
    if corpus not in CORPORA:
        raise HetmapError(f"unknown corpus '{corpus}': use one of {', '.join(CORPORA)}")


def corpus_root(corpus: str = "stdlib") -> Path:
    """The directory a corpus's listed paths are relative to."""
    _check_corpus(corpus)
    return {"stdlib": stdlib_root, "c-headers": include_root,
            "package-docs": packages_root}[corpus]()


def split_path(corpus: str = "stdlib") -> Path:
    """The committed split list of a corpus."""
    _check_corpus(corpus)
    return {"stdlib": SPLIT_PATH, "c-headers": SPLIT_PATH_C, "package-docs": SPLIT_PATH_DOCS}[corpus]


def split_of(relative_path: str) -> str:
    """The split a file belongs to, from a hash of its relative POSIX path (rule 2)."""
    bucket = int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(name for name, bound in _SPLIT_BOUNDS if bucket < bound)


def scan_stdlib(root: Path | None = None) -> dict[str, list[str]]:
    """Assign every candidate file under ``root`` (default: the stdlib) to a split (rules 1-2).

    Returns relative POSIX paths per split, each list sorted.
    """
    root = stdlib_root() if root is None else root
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if _EXCLUDED_DIRS.intersection(relative.parts[:-1]) or not path.is_file():
            continue
        parts[split_of(relative.as_posix())].append(relative.as_posix())
    return {name: sorted(files) for name, files in parts.items()}


def scan_headers(root: Path | None = None) -> dict[str, list[str]]:
    """Assign every ``*.h`` file under ``root`` (default: the C include dir) to a split."""
    root = include_root() if root is None else root
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    for path in root.rglob("*.h"):
        if path.is_file():
            relative = path.relative_to(root).as_posix()
            parts[split_of(relative)].append(relative)
    return {name: sorted(files) for name, files in parts.items()}


def scan_package_docs(root: Path | None = None) -> dict[str, list[str]]:
    """Assign every ``*.dist-info/METADATA`` under ``root`` (default: site-packages), hetmap's
    own excepted, to a split."""
    root = packages_root() if root is None else root
    parts: dict[str, list[str]] = {name: [] for name in SPLITS}
    for path in root.glob("*.dist-info/METADATA"):
        if path.is_file() and not path.parent.name.startswith("hetmap-"):
            relative = path.relative_to(root).as_posix()
            parts[split_of(relative)].append(relative)
    return {name: sorted(files) for name, files in parts.items()}


def write_split_docs(path: Path = SPLIT_PATH_DOCS, root: Path | None = None
                     ) -> dict[str, list[str]]:
    """Scan site-packages and write the ``package-docs`` split list (the committed asset)."""
    return _write_split_document(
        path, scan_package_docs(root), "hetmap package-docs corpus split: installed packages' "
        "dist-info/METADATA files, relative to sysconfig purelib; see "
        "hetmap.compiler.data.corpus for the rules")


def _write_split_document(path: Path, parts: dict[str, list[str]], description: str
                          ) -> dict[str, list[str]]:
    document = {"description": description, "python": ".".join(map(str, sys.version_info[:3])),
                "splits": parts}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    return parts


def write_split_c(path: Path = SPLIT_PATH_C, root: Path | None = None) -> dict[str, list[str]]:
    """Scan the C include dir and write the ``c-headers`` split list (the committed asset)."""
    return _write_split_document(
        path, scan_headers(root), "hetmap c-headers corpus split: CPython *.h files, relative "
        "to sysconfig include dir; see hetmap.compiler.data.corpus for the rules")


def write_split(path: Path = SPLIT_PATH, root: Path | None = None) -> dict[str, list[str]]:
    """Scan the stdlib and write the split list to ``path`` (the committed asset by default)."""
    return _write_split_document(
        path, scan_stdlib(root), "hetmap corpus split: stdlib *.py files, relative to the "
        "stdlib dir; see hetmap.compiler.data.corpus for the rules")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise HetmapError(f"unknown corpus split '{split}': use one of {', '.join(SPLITS)}")


def listed_files(split: str, corpus: str = "stdlib") -> list[str]:
    """The relative paths the committed split list holds for ``split``, in listed order."""
    _check_split(split)
    path = split_path(corpus)
    if not path.is_file():
        writer = {"stdlib": "write_split", "c-headers": "write_split_c",
                  "package-docs": "write_split_docs"}[corpus]
        raise MissingDataError(
            f"corpus split list {path} is missing: regenerate it with "
            f"hetmap.compiler.data.corpus.{writer}()"
        )
    document = json.loads(path.read_text(encoding="utf-8"))
    return list(document["splits"][split])


def corpus_files(split: str, corpus: str = "stdlib") -> list[Path]:
    """Absolute paths of the listed files of ``split`` that exist on this machine (rule 3)."""
    root = corpus_root(corpus)
    return [
        root / relative
        for relative in listed_files(split, corpus)
        if (root / relative).is_file()
    ]


def read_corpus_bytes(split: str, max_bytes: int | None = None, corpus: str = "stdlib") -> bytes:
    """The files of ``split`` concatenated in listed order, cut to ``max_bytes`` if given."""
    chunks: list[bytes] = []
    total = 0
    for path in corpus_files(split, corpus):
        if max_bytes is not None and total >= max_bytes:
            break
        chunk = path.read_bytes()
        chunks.append(chunk)
        total += len(chunk)
    data = b"".join(chunks)
    if not data:
        raise MissingDataError(
            f"corpus split '{split}' is empty on this machine: none of its files exist under "
            f"{corpus_root(corpus)}"
        )
    return data if max_bytes is None else data[:max_bytes]


def bytes_to_tokens(data: bytes, vocab_size: int) -> torch.Tensor:
    """Tokenize bytes for a model without a tokenizer: token = byte value % ``vocab_size``.

    Returns a 1-D ``torch.long`` tensor with one token per byte.
    """
    if vocab_size < 1:
        raise HetmapError(f"vocab_size must be positive, got {vocab_size}")
    if not data:
        return torch.empty(0, dtype=torch.long)
    values = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    return values % vocab_size


def read_text_file_tokens(
    path: str | Path, vocab_size: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Tokens of a user-given text file (``--calib FILE`` / ``--eval FILE``), bytewise.

    Raises :class:`MissingDataError` when the file is missing, unreadable or empty.
    """
    data = read_text_file_bytes(path, max_tokens)
    return bytes_to_tokens(data, vocab_size)


def read_text_file_bytes(path: str | Path, limit: int | None = None) -> bytes:
    """At most ``limit`` bytes of a user-given text file (a huge file is not read whole); a
    missing, unreadable, empty or binary file is a one-line MissingDataError."""
    path = Path(path)
    if path.is_dir():
        raise MissingDataError(f"{path} is a directory, not a file: pass a text file")
    if not path.is_file():
        raise MissingDataError(f"text file {path} does not exist: pass an existing file")
    try:
        with path.open("rb") as handle:
            data = handle.read(-1 if limit is None else limit)
    except OSError as error:
        raise MissingDataError(f"cannot read text file {path}: {error.strerror}") from error
    if not data:
        raise MissingDataError(f"text file {path} is empty: pass a file with some text")
    sample = data[:65536]
    if b"\0" in sample:
        raise MissingDataError(f"{path} looks binary (NUL bytes), not text: pass a text file")
    return data


def token_windows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Cut a 1-D token tensor into non-overlapping [windows, length] rows, dropping the rest."""
    if length < 2:
        raise HetmapError(f"window length must be at least 2, got {length}")
    count = tokens.numel() // length
    if count == 0:
        raise MissingDataError(
            f"{tokens.numel()} tokens are fewer than one window of {length}: pass more text"
        )
    return tokens[: count * length].reshape(count, length)


def bigram_perplexity(train: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one smoothed token bigram model fitted on ``train``.

    ``targets`` is a 2-D [windows, length] tensor; each window's first token is context only,
    as for a causal language model scored on the same windows.
    """
    train_np = train.numpy().astype(np.int64)
    pairs = np.bincount(train_np[:-1] * vocab_size + train_np[1:], minlength=vocab_size**2)
    counts = pairs.reshape(vocab_size, vocab_size).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum(axis=1, keepdims=True))
    windows = targets.numpy().astype(np.int64)
    scored = log_probs[windows[:, :-1], windows[:, 1:]]
    return float(np.exp(-scored.mean()))
