"""Data handling for adapter fine-tuning on text classification, regression and multi-label tasks.

Everything ``train.py --data ...`` needs between a path on disk and a padded batch of token ids:

* reading labelled text from the IMDB archive (downloaded and checksummed on demand), an extracted
  ``aclImdb`` tree, a CSV/TSV file or a JSON Lines file (:func:`load_data`), one text or a pair of
  texts per example (``text`` + ``text_pair``, or any two named columns such as GLUE's
  ``sentence1``/``sentence2``), with a class, a score (regression) or a set of labels (multi-label);
* deterministic train/validation/test splits (:func:`train_val_split`);
* a content-addressed token cache, so the second run of an experiment skips tokenization
  (:func:`tokenize_cached`, :func:`tokenize_dataset`);
* length-bucketed batching, so little compute is spent on padding, and sharding for
  DistributedDataParallel (:func:`length_batches`, :func:`shard`, :func:`collate`).

Every mistake a user can make in their data or paths raises :class:`DataError`, whose message is one
self-contained line naming the file, line and value at fault: the CLI prints it as ``error: ...`` and
exits, so the message is all the user gets. Bad bytes in text never stop a run: they are replaced by
U+FFFD and counted in :attr:`TextDataset.replaced`. Files are written atomically (temp file + rename)
so an interrupted run never leaves a half-written download or cache behind, and nothing is ever
unpickled.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import http.client
import json
import logging
import math
import os
import re
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from tqdm import tqdm

from roberta_lite import tagging as T

__all__ = [
    "IMDB_BYTES",
    "IMDB_SHA256",
    "IMDB_URL",
    "MULTILABEL_SEPARATOR",
    "TASKS",
    "TOKEN_TASK",
    "DataError",
    "TaggedDataset",
    "TextDataset",
    "TokenizedSplit",
    "cache_dir",
    "collate",
    "download",
    "length_batches",
    "load_data",
    "padding_fraction",
    "shard",
    "tokenize_cached",
    "tokenize_dataset",
    "train_val_split",
]

log = logging.getLogger(__name__)

IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
IMDB_BYTES = 84125825
IMDB_SHA256 = "c40f74a18d3b61f90feba1e17730e0d38e8b97c05fde7008942e91923d1658fe"

#: Label names of the IMDB reviews; the index is the class id (neg=0, pos=1).
IMDB_LABELS = ("neg", "pos")
_IMDB_SPLITS = ("train", "test")
_IMDB_TEST_GLOBS = "aclImdb/test/pos/*.txt, aclImdb/test/neg/*.txt"
_IMDB_GLOBS = "aclImdb/train/pos/*.txt, aclImdb/train/neg/*.txt, " + _IMDB_TEST_GLOBS
# A labelled review inside an archive: optional "./" and "aclImdb/" prefixes, then split/label/file.
_IMDB_MEMBER = re.compile(r"^(?:\./)?(?:aclImdb/)?(train|test)/(pos|neg)/([^/]+\.txt)$")
_IMDB_ID = re.compile(r"^(\d+)_\d+\.txt$")
_BR_TAG = re.compile(r"<br\s*/?>", re.IGNORECASE)

#: The kinds of label :func:`load_data` reads: a class per text, a score per text, a set of classes per text.
TOKEN_TASK = "token-classification"  # a BIO tag per word: tagging files, read by load_tagged
TASKS = ("classification", "regression", "multilabel", TOKEN_TASK)
_TEXT_COLUMN, _PAIR_COLUMN, _LABEL_COLUMN = "text", "text_pair", "label"
#: Separates the labels of one multi-label example in a CSV/TSV cell (``action|comedy``).
MULTILABEL_SEPARATOR = "|"

_TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t"}
_JSONL_SUFFIXES = (".jsonl", ".json")
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
_ACCEPTED = (
    "'imdb', an aclImdb directory, a .tar.gz/.tgz/.tar archive in the aclImdb layout, "
    "a .csv/.tsv file with 'text' and 'label' columns, or a .jsonl/.json file of {\"text\", \"label\"} objects"
)

_INTEGER = re.compile(r"^[+-]?\d+$")
_DECIMAL = re.compile(r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
_SURROGATE = re.compile("[\ud800-\udfff]")

_DOWNLOAD_TIMEOUT_S = 30.0
_DOWNLOAD_CHUNK = 1 << 20
_ENCODE_CHUNK = 2048
_POOL_BATCHES = 100
_TOKEN_CACHE_VERSION = b"roberta_lite.tokens.v1"


def _archive_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a damaged archive can raise while being read, whichever compression it uses."""
    errors: list[type[BaseException]] = [tarfile.TarError, EOFError, OSError, zlib.error]
    with contextlib.suppress(ImportError):
        import lzma

        errors.append(lzma.LZMAError)
    return tuple(errors)


_ARCHIVE_ERRORS = _archive_errors()


class DataError(ValueError):
    """A mistake in the user's data or paths, explained in one self-contained line.

    The CLI prints ``error: <message>`` and exits 2, so the message must name the file, line and
    value at fault; line breaks are folded into spaces to keep it on one line.
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split("\n")).replace("\r", " "))


def _show(value: object, limit: int = 60) -> str:
    """A short one-line rendering of a user's value for an error message."""
    if isinstance(value, str):
        text = repr(value if len(value) <= limit else value[:limit] + "...")
    elif value is None or isinstance(value, (bool, int, float, list, dict)):
        try:
            text = json.dumps(value, ensure_ascii=False)  # the user wrote JSON: show it as JSON
        except (TypeError, ValueError):
            text = repr(value)
        if len(text) > limit:
            text = text[:limit] + "..."
    else:
        text = repr(value)
    return text


def _show_names(names: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# --------------------------------------------------------------------------------------------------
# Files: cache location, atomic writes, downloads


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/roberta_lite`` (or ``~/.cache/roberta_lite``), created if missing.

    A relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec requires, so the cache does not move
    with the working directory.
    """
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    path = root / "roberta_lite"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _atomic_writer(dest: Path) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``dest`` only when the block finishes without error.

    The temp file lives in the destination's directory so ``os.replace`` is an atomic rename:
    readers see either the old file or the complete new one, never a partial write.
    """
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_DOWNLOAD_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _network_reason(err: BaseException) -> str:
    """The most specific description of a network failure (URLError wraps the socket error)."""
    reason = getattr(err, "reason", None) or err
    return str(reason) or type(reason).__name__


def download(url: str, dest: str | os.PathLike[str], *, sha256: str, size: int | None = None) -> Path:
    """Fetch ``url`` to ``dest`` unless a copy with the right sha256 is already there.

    The body is streamed into a temp file next to ``dest`` (with a progress bar), its size and
    sha256 are checked, and only then is it renamed into place, so ``dest`` is either absent or
    verified. Network failures and checksum mismatches raise :class:`DataError` telling the user how
    to supply the file by hand (``--data PATH/<name>``), since the usual cause is a machine without
    internet access.
    """
    dest = Path(dest)
    expected = sha256.lower()
    if dest.is_file():
        if (size is None or dest.stat().st_size == size) and _sha256_file(dest) == expected:
            return dest
        log.warning("%s does not match its expected sha256; downloading it again", dest)
    hint = f"download it elsewhere and pass the local copy with --data PATH/{dest.name}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"cannot create {dest.parent} to download {url} into ({err.strerror or err})") from err

    try:
        response = urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S)
    except urllib.error.HTTPError as err:
        raise DataError(f"could not download {url} (the server answered HTTP {err.code} {err.reason}); {hint}") from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = _network_reason(err)
        raise DataError(f"could not download {url} ({reason}); you seem to be offline — {hint}") from err
    except ValueError as err:  # a malformed URL or an unsupported scheme
        raise DataError(f"could not download {url} ({err}); {hint}") from err

    with response:
        header_size = response.headers.get("Content-Length")
        total = size if size is not None else (int(header_size) if header_size and header_size.isdigit() else None)
        digest = hashlib.sha256()
        received = 0
        try:
            with _atomic_writer(dest) as out, tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"downloading {dest.name}"
            ) as bar:
                while True:
                    try:
                        chunk = response.read(_DOWNLOAD_CHUNK)
                    except (OSError, http.client.HTTPException) as err:
                        raise DataError(
                            f"could not download {url} (connection lost after {received} bytes: "
                            f"{_network_reason(err)}); try again, or {hint}"
                        ) from err
                    if not chunk:
                        break
                    received += len(chunk)
                    if size is not None and received > size:
                        raise DataError(
                            f"downloaded {url} but it is larger than the expected {size} bytes; "
                            f"the file has changed or the server sent something else — {hint}"
                        )
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
                if size is not None and received != size:
                    raise DataError(
                        f"downloaded {url} but got {received} bytes, expected {size}; "
                        f"the download was cut short — try again, or {hint}"
                    )
                actual = digest.hexdigest()
                if actual != expected:
                    raise DataError(
                        f"downloaded {url} but its sha256 is {actual}, expected {expected}; "
                        f"the file is corrupt or has changed — {hint}"
                    )
        except OSError as err:  # the temp file could not be created or written (disk full, permissions)
            raise DataError(f"could not save the download of {url} in {dest.parent} ({err.strerror or err})") from err
    return dest


# --------------------------------------------------------------------------------------------------
# Datasets


@dataclass
class TextDataset:
    """Labelled texts (or text pairs) for one task of :data:`TASKS`.

    ``labels[i]`` depends on ``task``: an index into ``label_names`` (classification), a float
    (regression; ``label_names`` is then the one name of the label column), or a sorted tuple of
    indices into ``label_names`` (multilabel). ``text_pairs`` holds the second text of each example
    for pair tasks (None otherwise). ``source`` says where the examples came from (for logs);
    ``replaced`` counts examples in which undecodable bytes were replaced by U+FFFD, so a run can
    report it instead of silently training on mangled text.
    """

    texts: list[str]
    labels: list
    label_names: list[str]
    source: str
    replaced: int = 0
    text_pairs: list[str] | None = None
    task: str = "classification"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"{self.source}: task {self.task!r} is not one of {', '.join(TASKS)}")
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{self.source}: {len(self.texts)} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise ValueError(f"{self.source}: {len(self.texts)} texts but {len(self.text_pairs)} second texts")
        ids = [i for row in self.labels for i in row] if self.task == "multilabel" else self.labels
        if self.task != "regression" and ids and (min(ids) < 0 or max(ids) >= len(self.label_names)):
            raise ValueError(f"{self.source}: labels must lie in 0..{len(self.label_names) - 1}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_outputs(self) -> int:
        """Width of the model's head: one score for regression, else one logit per label name."""
        return 1 if self.task == "regression" else len(self.label_names)

    def label_array(self) -> np.ndarray:
        """Labels as the loss wants them: int64 ``(N,)`` class ids, float32 ``(N,)`` scores, or a float32
        ``(N, K)`` multi-hot matrix (``K = len(label_names)``) for multilabel."""
        if self.task == "classification":
            return np.asarray(self.labels, dtype=np.int64).reshape(len(self))
        if self.task == "regression":
            return np.asarray(self.labels, dtype=np.float32).reshape(len(self))
        hot = np.zeros((len(self), len(self.label_names)), dtype=np.float32)
        for row, ids in enumerate(self.labels):
            hot[row, list(ids)] = 1.0
        return hot

    def subset(self, indices: Iterable[int]) -> TextDataset:
        """The examples at ``indices``, in that order, sharing this dataset's label names and task.

        ``replaced`` is recounted as the number of selected examples containing U+FFFD (exact unless
        the original data itself contained U+FFFD).
        """
        idx = [int(i) for i in indices]
        texts = [self.texts[i] for i in idx]
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in idx]
        joined = texts if pairs is None else [a + b for a, b in zip(texts, pairs)]
        replaced = sum("\ufffd" in t for t in joined) if self.replaced else 0
        labels = [self.labels[i] for i in idx]
        return TextDataset(texts, labels, list(self.label_names), self.source, replaced, pairs, self.task)


@dataclass
class _Records:
    """Examples as read from one file, before labels are mapped to class ids.

    Parsed labels are kept (ints or names, floats, or tuples of those) with a location per example,
    so that a label that turns out to be unknown only later (a test label unseen in training) can
    still be reported by file and line. ``columns`` are the text columns actually read (one, or two
    for pairs, whose second texts are in ``pairs``).
    """

    texts: list[str]
    labels: list
    where: list[str]
    replaced: list[bool]
    source: str
    pairs: list[str] | None = None
    columns: tuple[str, ...] = (_TEXT_COLUMN,)

    def take(self, indices: Sequence[int], source: str) -> _Records:
        return _Records(
            [self.texts[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.where[i] for i in indices],
            [self.replaced[i] for i in indices],
            source,
            None if self.pairs is None else [self.pairs[i] for i in indices],
            self.columns,
        )

    def add(self, texts: list[tuple[str, bool]], label: object, where: str) -> None:
        """Append one example: its text (and second text) as ``(text, replaced)``, its parsed label."""
        self.texts.append(texts[0][0])
        if self.pairs is not None:
            self.pairs.append(texts[1][0])
        self.labels.append(label)
        self.where.append(where)
        self.replaced.append(any(replaced for _, replaced in texts))


@dataclass(frozen=True)
class _Columns:
    """Where a CSV/TSV/JSONL file keeps its texts and labels, and how its labels are read.

    ``texts`` names one text column, or two for sentence pairs. With ``optional_pair`` (the default
    columns) a ``text_pair`` column, when the file has one, makes it a pair file.
    """

    texts: tuple[str, ...] = (_TEXT_COLUMN,)
    label: str = _LABEL_COLUMN
    task: str = "classification"
    optional_pair: bool = True

    def with_pair(self, present: bool) -> _Columns:
        """The columns of one file, once it is known whether it has the optional ``text_pair``."""
        texts = self.texts + (_PAIR_COLUMN,) if present and self.optional_pair else self.texts
        return _Columns(texts, self.label, self.task, optional_pair=False)


def _columns(text_columns: Sequence[str] | None, label_column: str | None, task: str) -> _Columns:
    """Check the user's column names and task; a mistake is a DataError naming the value."""
    if task not in TASKS:
        raise DataError(f"task {task!r} is not one of {', '.join(TASKS)}")
    label = _LABEL_COLUMN if label_column is None else label_column
    if not isinstance(label, str) or not label.strip():
        raise DataError(f"label column {_show(label)} is not a column name")
    if text_columns is None:
        return _Columns(label=label, task=task)
    names = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if not 1 <= len(names) <= 2 or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"text columns {_show(list(names))}: give one column name, or two for sentence pairs")
    if len(set(names + (label,))) != len(names) + 1:
        raise DataError(f"text columns {', '.join(names)} and label column {label}: each must be a different column")
    return _Columns(names, label, task, optional_pair=False)


def _new_records(source: str, columns: _Columns) -> _Records:
    pairs: list[str] | None = [] if len(columns.texts) == 2 else None
    return _Records([], [], [], [], source, pairs, columns.texts)


def _fix_surrogates(text: str) -> tuple[str, bool]:
    """Replace undecodable bytes (carried as lone surrogates) by U+FFFD; report whether any were.

    Text files are decoded with ``surrogateescape`` so each bad byte survives parsing as a lone
    surrogate; JSON can also spell lone surrogates as ``\\udxxx`` escapes. Neither can be encoded
    by a tokenizer, so both become U+FFFD here.
    """
    if _SURROGATE.search(text) is None:
        return text, False
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace"), True
    except UnicodeEncodeError:  # a JSON-escaped surrogate, not an escaped byte
        return _SURROGATE.sub("\ufffd", text), True


def _decode(raw: bytes) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), True


def _review_text(raw: bytes) -> tuple[str, bool]:
    text, replaced = _decode(raw)
    return _BR_TAG.sub("\n", text), replaced


def _review_key(name: str) -> tuple[int, str]:
    """Sort reviews by numeric id (``123_8.txt`` -> 123), so order never depends on the archive."""
    match = _IMDB_ID.match(name)
    return (int(match.group(1)) if match else 1 << 62, name)


def _imdb_records(found: dict[tuple[str, str, str], tuple[str, bool, str]], shown: str) -> dict[str, _Records]:
    """Group reviews found in an archive or tree into sorted per-split records."""
    splits: dict[str, _Records] = {}
    for split in _IMDB_SPLITS:
        keys = sorted(
            (key for key in found if key[0] == split),
            key=lambda k: (IMDB_LABELS.index(k[1]), *_review_key(k[2])),
        )
        records = _Records([], [], [], [], f"{shown} ({split})")
        for key in keys:
            text, replaced, where = found[key]
            records.texts.append(text)
            records.labels.append(key[1])
            records.where.append(where)
            records.replaced.append(replaced)
        splits[split] = records
    return splits


def _read_imdb_archive(path: Path, shown: str) -> dict[str, _Records]:
    """Read labelled reviews straight out of a tar archive in one pass, without extracting it.

    Anything that is not ``[aclImdb/]{train,test}/{pos,neg}/*.txt`` (``unsup``, bag-of-words
    features, URL lists, macOS ``._`` metadata) is skipped without being decompressed into memory.
    """
    found: dict[tuple[str, str, str], tuple[str, bool, str]] = {}
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                match = _IMDB_MEMBER.match(member.name)
                if match is None or match.group(3).startswith("."):
                    continue
                handle = archive.extractfile(member)
                if handle is None:
                    continue
                text, replaced = _review_text(handle.read())
                found[match.groups()] = (text, replaced, f"{shown}: {member.name}")
    except _ARCHIVE_ERRORS as err:
        raise DataError(f"{shown}: cannot read the archive, it is corrupt or truncated ({err})") from err
    return _imdb_records(found, shown)


def _read_imdb_dir(path: Path, shown: str) -> dict[str, _Records]:
    """Read an extracted aclImdb tree (``path`` may be the tree itself or its parent)."""
    root = path
    if not any((path / split).is_dir() for split in _IMDB_SPLITS) and (path / "aclImdb").is_dir():
        root = path / "aclImdb"
    found: dict[tuple[str, str, str], tuple[str, bool, str]] = {}
    for split in _IMDB_SPLITS:
        for label in IMDB_LABELS:
            folder = root / split / label
            if not folder.is_dir():
                continue
            for entry in os.scandir(folder):
                if not entry.name.endswith(".txt") or entry.name.startswith(".") or not entry.is_file():
                    continue
                try:
                    with open(entry.path, "rb") as f:
                        raw = f.read()
                except OSError as err:
                    raise DataError(f"cannot read {entry.path} ({err.strerror or err})") from err
                text, replaced = _review_text(raw)
                found[(split, label, entry.name)] = (text, replaced, entry.path)
    return _imdb_records(found, shown)


def _find_column(header: list[str], name: str) -> int | None:
    """Index of column ``name``: an exact match, else a unique case-insensitive one."""
    if name in header:
        return header.index(name)
    folded = [i for i, column in enumerate(header) if column.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def _and(names: Sequence[str]) -> str:
    quoted = [repr(name) for name in names]
    return ", ".join(quoted[:-1]) + " and " + quoted[-1] if len(quoted) > 1 else quoted[0]


def _parse_label(value: object, where: str) -> int | str:
    """Validate one raw label: a non-negative integer class id (int or digit string) or a name."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        kind = {bool: "a boolean", float: "a float", type(None): "null", list: "a list", dict: "an object"}
        raise DataError(
            f"{where}: label {_show(value)} is {kind.get(type(value), type(value).__name__)}; "
            "labels must be integer class ids or label names"
        )
    if isinstance(value, str):
        value = _fix_surrogates(value.strip())[0]
        if not value:
            raise DataError(f"{where}: empty label")
        if _INTEGER.match(value) is None:
            return value
        number = int(value)
    else:
        number = value
    if number < 0:
        raise DataError(f"{where}: label {number} is negative; integer labels are class ids 0, 1, 2, ...")
    return number


def _parse_score(value: object, where: str) -> float:
    """A regression target: a JSON number or a decimal string (``3.8``, ``-1e-3``); never NaN or infinite."""
    if isinstance(value, str) and _DECIMAL.match(value.strip()):
        number = float(value.strip())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
    else:
        raise DataError(f"{where}: label {_show(value)} is not a number; regression labels are numbers such as 3.8")
    if not math.isfinite(number):
        raise DataError(f"{where}: label {_show(value)} is not a finite number")
    return number


def _label_set(items: list[object], where: str) -> tuple[int | str, ...]:
    """The labels of one multilabel example, each checked like a class label; a repeated one is a mistake."""
    labels = tuple(_parse_label(item, where) for item in items)
    for i, label in enumerate(labels):
        if label in labels[:i]:
            raise DataError(f"{where}: label {_show(label)} is listed twice")
    return labels


def _parse_label_list(value: object, where: str) -> tuple[int | str, ...]:
    """Multilabel in JSON Lines: a non-empty list of class ids or names, ``["action", "comedy"]``."""
    if not isinstance(value, list):
        raise DataError(
            f"{where}: label {_show(value)} is not a list; multilabel labels are lists such as [\"action\", \"comedy\"]"
        )
    if not value:
        raise DataError(f"{where}: empty label list; a multilabel example needs at least one label")
    return _label_set(value, where)


def _parse_label_cell(value: str, where: str) -> tuple[int | str, ...]:
    """Multilabel in a CSV/TSV cell: labels separated by ``|``, ``action|comedy``."""
    if not value.strip():
        raise DataError(f"{where}: no labels; a multilabel example needs at least one (e.g. action|comedy)")
    return _label_set(value.split(MULTILABEL_SEPARATOR), where)


def _label_parser(task: str, cell: bool) -> Callable[[object, str], object]:
    """How a raw label becomes a parsed one for ``task``; ``cell``: the raw label is CSV/TSV text."""
    if task == "regression":
        return _parse_score
    if task == "multilabel":
        return _parse_label_cell if cell else _parse_label_list  # type: ignore[return-value]
    return _parse_label


def _check_text(value: object, where: str, column: str) -> tuple[str, bool]:
    if not isinstance(value, str):
        raise DataError(f"{where}: {column!r} value {_show(value)} is not a string")
    if not value.strip():
        raise DataError(f"{where}: empty text in {column!r}")
    return _fix_surrogates(value)


def _add_example(records: _Records, values: list[object], where: str, parse: Callable[[object, str], object]) -> None:
    """Check one example's texts (in ``records.columns`` order) and parse its label (the last value)."""
    texts = [_check_text(value, where, column) for column, value in zip(records.columns, values)]
    records.add(texts, parse(values[-1], where), where)


def _header_columns(header: list[str], columns: _Columns, shown: str) -> tuple[_Columns, list[int]]:
    """Resolve the columns of a CSV/TSV from its header: the file's columns and their indices (label last)."""
    if columns.optional_pair:
        columns = columns.with_pair(_find_column(header, _PAIR_COLUMN) is not None)
    names = columns.texts + (columns.label,)
    index = [_find_column(header, name) for name in names]
    missing = [name for name, col in zip(names, index) if col is None]
    if missing:
        what = " and no ".join(repr(name) for name in missing)
        raise DataError(f"{shown}: no {what} column (columns: {', '.join(header)})")
    return columns, index  # type: ignore[return-value]


def _read_csv(path: Path, shown: str, delimiter: str, columns: _Columns = _Columns()) -> _Records:
    """Read a CSV/TSV with a header row naming the text and label columns (others ignored).

    A ``.csv`` is quoted CSV (texts may hold commas and line breaks inside quotes); a ``.tsv`` is read
    literally, one example per line with no quoting, as GLUE writes it (its texts contain stray ``"``).
    Line numbers in errors are the physical line on which the offending record starts, so they
    stay right when quoted texts span several lines.
    """
    parse = _label_parser(columns.task, cell=True)
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    records: _Records | None = None
    old_limit = csv.field_size_limit(2**31 - 1)  # reviews can exceed the 128 KiB default field size
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quoting=quoting)
            previous = 0
            try:
                for row in reader:
                    start, previous = previous + 1, reader.line_num
                    if not row or (len(row) == 1 and not row[0].strip()):
                        continue
                    if records is None:
                        header = [_fix_surrogates(column.strip())[0] for column in row]
                        file_columns, index = _header_columns(header, columns, shown)
                        records = _new_records(shown, file_columns)
                        continue
                    where = f"{shown} line {start}"
                    for name, col in zip(file_columns.texts + (file_columns.label,), index):
                        if col >= len(row):
                            raise DataError(
                                f"{where}: no {name!r} value (the row has {len(row)} fields, the header {len(header)})"
                            )
                    _add_example(records, [row[col] for col in index], where, parse)
            except csv.Error as err:
                raise DataError(f"{shown} line {reader.line_num}: malformed CSV ({err})") from err
    finally:
        csv.field_size_limit(old_limit)
    if records is None:
        raise DataError(f"{shown}: empty file (expected a header row with {_and(columns.texts + (columns.label,))} columns)")
    return records


_NOT_JSON_LINES = "looks like a JSON array; expected JSON Lines (one object per line)"


def _read_jsonl(path: Path, shown: str, columns: _Columns = _Columns()) -> _Records:
    """Read JSON Lines: one object with the text field(s) and the label per line (blank lines allowed).

    With the default columns, the first object decides whether the file holds pairs (a ``text_pair``
    field); every other line must then agree.
    """
    parse = _label_parser(columns.task, cell=False)
    records: _Records | None = None
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8", "surrogateescape").lstrip("\ufeff")
            if not line.strip():
                continue
            where = f"{shown} line {lineno}"
            first = records is None
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                if first and line.lstrip().startswith("["):
                    raise DataError(f"{shown}: {_NOT_JSON_LINES}") from err
                raise DataError(f"{where}: invalid JSON ({err.msg})") from err
            if first and isinstance(obj, list):
                raise DataError(f"{shown}: {_NOT_JSON_LINES}")
            if records is None:
                records = _new_records(shown, columns.with_pair(isinstance(obj, dict) and _PAIR_COLUMN in obj))
            names = records.columns + (columns.label,)
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object with {_and(names)}, got {_show(obj)}")
            for name in names:
                if name not in obj:
                    raise DataError(f"{where}: no {name!r} field (keys: {', '.join(map(str, obj))})")
            if columns.optional_pair and records.pairs is None and _PAIR_COLUMN in obj:
                raise DataError(
                    f"{where}: a {_PAIR_COLUMN!r} field, but {records.where[0]} has none; "
                    "either every example is a pair of texts or none is"
                )
            _add_example(records, [obj[name] for name in names], where, parse)
    if records is None:
        raise DataError(f"{shown}: no examples (the file is empty)")
    return records


def _class_labels(records: _Records, task: str) -> tuple[list, list[str]]:
    """Each class label with its location: one per example, or every label of a multilabel example."""
    if task != "multilabel":
        return records.labels, records.where
    flat = [(label, where) for labels, where in zip(records.labels, records.where) for label in labels]
    return [label for label, _ in flat], [where for _, where in flat]


def _check_label_kinds(records: _Records, task: str) -> None:
    """Class labels of one file must be all integer class ids or all names; report the odd one out.

    The minority kind is taken to be the mistake (e.g. one ``maybe`` among thousands of 0/1s).
    """
    if task == "regression":
        return
    labels, where = _class_labels(records, task)
    ints = [i for i, label in enumerate(labels) if isinstance(label, int)]
    n_names = len(labels) - len(ints)
    if not ints or not n_names:
        return
    first_name = next(i for i, label in enumerate(labels) if isinstance(label, str))
    if len(ints) >= n_names:
        example = ints[0]
        raise DataError(
            f"{where[first_name]}: label {_show(labels[first_name])} is neither an integer "
            f"nor a known label name (the other labels in {records.source} are integer class ids, "
            f"e.g. {where[example]}: {labels[example]}); labels must be all integers or all names"
        )
    raise DataError(
        f"{where[ints[0]]}: label {labels[ints[0]]} is an integer but the other labels in "
        f"{records.source} are names (e.g. {where[first_name]}: {_show(labels[first_name])}); "
        "labels must be all integers or all names"
    )


def _check_imdb_columns(shown: str, columns: _Columns) -> None:
    """An aclImdb source has one review and a pos/neg class per example; other column settings are mistakes."""
    if columns.texts != (_TEXT_COLUMN,) or columns.label != _LABEL_COLUMN or columns.task != "classification":
        raise DataError(
            f"{shown}: aclImdb reviews are single texts with pos/neg classes; text columns, a label column "
            f"and the {columns.task} task apply to .csv/.tsv/.jsonl files"
        )


def _read_source(spec: str, columns: _Columns = _Columns()) -> tuple[_Records, _Records | None]:
    """Read a data spec into (train records, official test records or None for flat files)."""
    if spec == "imdb":
        _check_imdb_columns(spec, columns)
        path = download(IMDB_URL, cache_dir() / "aclImdb_v1.tar.gz", sha256=IMDB_SHA256, size=IMDB_BYTES)
        shown = str(path)
    else:
        path = Path(spec).expanduser()
        shown = spec
        if not path.exists():
            raise DataError(f"data path not found: {spec}")

    name = path.name.lower()
    try:
        if path.is_dir():
            _check_imdb_columns(shown, columns)
            splits = _read_imdb_dir(path, shown)
        elif path.suffix.lower() in _TEXT_SUFFIXES or name.endswith(_JSONL_SUFFIXES):
            delimiter = _TEXT_SUFFIXES.get(path.suffix.lower())
            records = _read_csv(path, shown, delimiter, columns) if delimiter else _read_jsonl(path, shown, columns)
            _check_label_kinds(records, columns.task)
            return records, None
        elif tarfile.is_tarfile(path):
            _check_imdb_columns(shown, columns)
            splits = _read_imdb_archive(path, shown)
        elif name.endswith(_ARCHIVE_SUFFIXES):
            raise DataError(f"{shown}: not a readable tar archive (corrupt or incomplete download?)")
        else:
            raise DataError(f"{shown}: unsupported data file type; expected {_ACCEPTED}")
    except OSError as err:  # unreadable file or folder (permissions, I/O error)
        raise DataError(f"cannot read {err.filename or shown} ({err.strerror or err})") from err

    if not splits["train"].texts and not splits["test"].texts:
        raise DataError(f"{shown}: no labelled reviews found (expected {_IMDB_GLOBS})")
    return splits["train"], splits["test"]


def _label_space(records: _Records, columns: _Columns) -> list[str]:
    """Label names of a training file: ``0..max`` for class ids, else the names sorted alphabetically.

    For regression it is the one name of the label column (the model's single output).
    """
    if columns.task == "regression":
        return [columns.label]
    labels, _ = _class_labels(records, columns.task)
    if not labels:
        return []
    if isinstance(labels[0], int):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(set(labels))


def _to_dataset(records: _Records, label_names: list[str], train_source: str, task: str) -> TextDataset:
    """Map parsed labels to class ids of ``label_names``, naming the first label that has none."""
    index = {name: i for i, name in enumerate(label_names)}

    def class_id(label: object, where: str) -> int:
        found = index.get(str(label))
        if found is None:
            raise DataError(
                f"{where}: label {_show(label)} does not occur in the training data "
                f"{train_source} (labels: {_show_names(label_names)})"
            )
        return found

    pairs = list(zip(records.labels, records.where))
    if task == "regression":
        labels: list = list(records.labels)
    elif task == "multilabel":
        labels = [tuple(sorted(class_id(label, where) for label in row)) for row, where in pairs]
    else:
        labels = [class_id(label, where) for label, where in pairs]
    return TextDataset(
        records.texts, labels, list(label_names), records.source, sum(records.replaced), records.pairs, task
    )


def _split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded disjoint (kept, held-out) index lists, each in ascending order.

    At least one example is held out and one kept whenever ``n >= 2``, so tiny datasets still get
    a non-empty evaluation split.
    """
    if n < 2:
        return list(range(n)), []
    held = min(n - 1, max(1, round(n * fraction)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[held:].tolist()), sorted(order[:held].tolist())


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise DataError(f"{name} must be between 0 and 1 (exclusive), got {value}")


def load_data(
    spec: str,
    test_spec: str | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    text_columns: Sequence[str] | None = None,
    label_column: str | None = None,
    task: str = "classification",
) -> tuple[TextDataset, TextDataset]:
    """Load ``(train, test)`` datasets from a data spec.

    ``spec`` is ``"imdb"`` (downloaded once into :func:`cache_dir`), an aclImdb ``.tar.gz``/``.tar``
    archive or extracted directory, a ``.csv``/``.tsv`` file, or a ``.jsonl``/``.json`` lines file.

    Flat files keep their texts in ``text`` (and, for sentence pairs, ``text_pair`` when the file has
    one) and their labels in ``label``, or in the columns (JSON keys) named by ``text_columns`` (one
    name, or two for pairs, e.g. ``("sentence1", "sentence2")``) and ``label_column``. ``task`` says
    how labels are read: ``"classification"`` (a class id or name), ``"regression"`` (a number) or
    ``"multilabel"`` (a JSON list, or ``a|b`` in a CSV/TSV cell). The test file must have the same
    columns as the training file.

    The test split is, in order of preference: ``test_spec`` (any of the same formats; for an aclImdb
    source its ``test/`` reviews), the official ``test/`` split of an aclImdb source, or a seeded
    random ``test_fraction`` of a flat file's examples. Class ids come from the training data
    (``0..max`` for integer labels, alphabetical order for names; IMDB is ``neg``=0, ``pos``=1) and
    a test label that does not occur in training is an error, since the classifier would have no
    output for it.
    """
    if task == TOKEN_TASK:
        if text_columns is not None or label_column is not None:
            raise DataError("text and label columns do not apply to token classification (CoNLL or "
                            "{\"tokens\", \"tags\"} JSONL files)")
        return load_tagged(spec, test_spec, seed=seed, test_fraction=test_fraction)  # type: ignore[return-value]
    _check_fraction("test_fraction", test_fraction)
    columns = _columns(text_columns, label_column, task)
    train_records, test_records = _read_source(spec, columns)
    if not train_records.texts:
        raise DataError(f"{spec}: no labelled training reviews found (expected {_IMDB_GLOBS})")
    label_names = _label_space(train_records, columns)
    if task == "classification" and len(label_names) < 2:
        raise DataError(
            f"{spec}: every training example has label {_show(str(train_records.labels[0]))}; "
            "a classifier needs at least two classes"
        )

    if test_spec is not None:
        # The test file is read with the training file's columns, pair or not: a model sees one layout.
        test_columns = _Columns(train_records.columns, columns.label, task, optional_pair=False)
        given_train, given_test = _read_source(test_spec, test_columns)
        if given_test is None:
            test_records = given_train
        elif given_test.texts:
            test_records = given_test
        else:
            raise DataError(f"{test_spec}: no labelled test reviews found (expected {_IMDB_TEST_GLOBS})")

    if test_records is None or not test_records.texts:
        if len(train_records.texts) < 2:
            raise DataError(f"{spec}: only 1 example; need at least 2 to hold out a test split (or pass a test file)")
        keep, held = _split_indices(len(train_records.texts), test_fraction, seed)
        percent = f"{test_fraction * 100:g}%"
        test_records = train_records.take(held, f"{spec} (held-out {percent}, seed {seed})")
        train_records = train_records.take(keep, f"{spec} (train, {len(keep)} of {len(keep) + len(held)})")

    train = _to_dataset(train_records, label_names, train_records.source, task)
    test = _to_dataset(test_records, label_names, train_records.source, task)
    return train, test


@dataclass
class TaggedDataset:
    """Sentences of words with one BIO tag each (:func:`tagging.read_tagged`) for token classification, with the
    label names (:func:`tagging.label_list` of the training file). Splits and subsets as :class:`TextDataset`."""

    sentences: list[T.TaggedSentence]
    label_names: list[str]
    source: str
    replaced: int = 0  # files are read as UTF-8 strictly: a bad byte is a DataError, never replaced
    task: str = TOKEN_TASK

    def __len__(self) -> int:
        return len(self.sentences)

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    def subset(self, indices: Iterable[int]) -> TaggedDataset:
        return TaggedDataset([self.sentences[int(i)] for i in indices], list(self.label_names), self.source)


def _read_tagged(spec: str) -> list[T.TaggedSentence]:
    if not Path(spec).is_file():
        raise DataError(f"{spec}: no such file (token classification reads a CoNLL .conll/.txt/.tsv or a "
                        f".jsonl file)")
    try:
        sentences = T.read_tagged(spec)
    except UnicodeDecodeError as e:
        raise DataError(f"{spec}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except ValueError as e:
        raise DataError(str(e)) from None
    if not sentences:
        raise DataError(f"{spec}: no tagged sentences found")
    return sentences


def load_tagged(spec: str, test_spec: str | None = None, *, seed: int = 0,
                test_fraction: float = 0.2) -> tuple[TaggedDataset, TaggedDataset]:
    """``(train, test)`` tagging datasets: ``test_spec``'s sentences, or a seeded held-out ``test_fraction`` of
    ``spec``'s (the label names then come from the whole file, as :func:`load_data` does). A test tag that the
    training file never has is a DataError naming its file, line and value."""
    _check_fraction("test_fraction", test_fraction)
    sentences = _read_tagged(spec)
    labels = T.label_list(sentences)
    if test_spec is not None:
        test = _read_tagged(test_spec)
        try:
            T.check_labels(test, labels)
        except ValueError as e:
            raise DataError(str(e)) from None
        return TaggedDataset(sentences, labels, spec), TaggedDataset(test, list(labels), spec)
    if len(sentences) < 2:
        raise DataError(f"{spec}: only 1 sentence; need at least 2 to hold out a test split (or pass a test file)")
    keep, held = _split_indices(len(sentences), test_fraction, seed)
    whole = TaggedDataset(sentences, labels, spec)
    return whole.subset(keep), whole.subset(held)


def train_val_split(ds: TextDataset, fraction: float = 0.05, seed: int = 0) -> tuple[TextDataset, TextDataset]:
    """Split ``ds`` into seeded, disjoint ``(train, val)`` parts; val has >= 1 example if ``len(ds) >= 2``.

    Both parts keep the original order of ``ds``, so the split is reproducible across runs and
    machines for the same data, fraction and seed.
    """
    _check_fraction("validation fraction", fraction)
    keep, held = _split_indices(len(ds), fraction, seed)
    return ds.subset(keep), ds.subset(held)


# --------------------------------------------------------------------------------------------------
# Tokenization cache


def _texts_digest(texts: Sequence[str]) -> bytes:
    """sha256 of a list of texts, each length-prefixed so that ["ab", "c"] and ["a", "bc"] differ."""
    digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.digest()


def _token_cache_key(
    texts: Sequence[str], fingerprint: str, max_length: int, text_pairs: Sequence[str] | None = None
) -> str:
    """sha256 over (tokenizer fingerprint, max_length, digest of the texts[, digest of the second texts]).

    Every part is length-prefixed, so single texts and pairs never share a key; the key of single
    texts is the one earlier versions wrote, so their caches stay valid.
    """
    parts = [fingerprint.encode("utf-8"), str(int(max_length)).encode("ascii"), _texts_digest(texts)]
    if text_pairs is not None:
        parts.append(b"pairs:" + _texts_digest(text_pairs))
    key = hashlib.sha256(_TOKEN_CACHE_VERSION)
    for part in parts:
        key.update(len(part).to_bytes(8, "little"))
        key.update(part)
    return key.hexdigest()


def _load_tokens(path: Path, count: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Load a cache file, or None if it is missing or not exactly what this call would have written."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ids, offsets = data["ids"], data["offsets"]
        if not (
            ids.ndim == 1
            and ids.dtype == np.int32
            and offsets.dtype == np.int64
            and offsets.shape == (count + 1,)
            and offsets[0] == 0
            and offsets[-1] == ids.size
            and bool(np.all(np.diff(offsets) >= 0))
        ):
            raise ValueError("unexpected contents")
    except Exception as err:  # noqa: BLE001 - a damaged cache must never stop a run; it is rebuilt
        log.warning("ignoring damaged token cache %s (%s); rebuilding it", path, err)
        return None
    return ids, offsets


def _encode_all(
    texts: Sequence[str], tokenizer: object, max_length: int, text_pairs: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Encode in chunks (with a texts/s progress bar) into flat int32 ids plus int64 offsets."""
    pieces: list[np.ndarray] = []
    lengths = np.zeros(len(texts), dtype=np.int64)
    with tqdm(total=len(texts), unit="texts", desc="tokenizing") as bar:
        for start in range(0, len(texts), _ENCODE_CHUNK):
            chunk = list(texts[start : start + _ENCODE_CHUNK])
            if text_pairs is None:
                encoded = tokenizer.encode_batch(chunk, max_length)  # type: ignore[attr-defined]
            else:
                pairs = list(text_pairs[start : start + _ENCODE_CHUNK])
                encoded = tokenizer.encode_batch(chunk, max_length, text_pairs=pairs)  # type: ignore[attr-defined]
            if len(encoded) != len(chunk):
                raise RuntimeError(f"tokenizer.encode_batch returned {len(encoded)} sequences for {len(chunk)} texts")
            sizes = [len(seq) for seq in encoded]
            lengths[start : start + len(chunk)] = sizes
            flat = np.fromiter((i for seq in encoded for i in seq), dtype=np.int64, count=sum(sizes))
            if flat.size and (flat.min() < np.iinfo(np.int32).min or flat.max() > np.iinfo(np.int32).max):
                raise RuntimeError("tokenizer returned ids that do not fit in int32")
            pieces.append(flat.astype(np.int32))
            bar.update(len(chunk))
    offsets = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    return ids, offsets


def tokenize_cached(
    texts: list[str],
    tokenizer: object,
    max_length: int,
    *,
    cache: Path | None = None,
    text_pairs: list[str] | None = None,
) -> list[np.ndarray]:
    """Token ids of each text, or of each ``(texts[i], text_pairs[i])`` pair joined with the special
    tokens (1-D int32 arrays), cached on disk by content.

    ``tokenizer`` needs ``encode_batch(texts, max_length) -> list[list[int]]`` (and, for pairs,
    ``encode_batch(texts, max_length, text_pairs=...)``) and a ``fingerprint`` string identifying its
    definition. The cache file (one ``.npz`` of flat ``ids`` + ``offsets`` in ``cache`` or
    ``cache_dir()/"tokens"``) is keyed by fingerprint, ``max_length``, the texts and the second
    texts, so any change to one of them is a miss rather than stale ids. A damaged cache file is
    rebuilt; one that cannot be written only costs the next run a re-tokenization. The returned
    arrays are views into one buffer, which keeps 50k reviews in a single allocation.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if text_pairs is not None and len(text_pairs) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(text_pairs)} second texts")
    if not texts:
        return []
    directory = Path(cache) if cache is not None else cache_dir() / "tokens"
    fingerprint = str(tokenizer.fingerprint)  # type: ignore[attr-defined]
    path = directory / f"{_token_cache_key(texts, fingerprint, max_length, text_pairs)}.npz"

    loaded = _load_tokens(path, len(texts))
    if loaded is None:
        ids, offsets = _encode_all(texts, tokenizer, max_length, text_pairs)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with _atomic_writer(path) as out:
                np.savez(out, ids=ids, offsets=offsets)
        except OSError as err:
            log.warning("could not write token cache %s (%s); continuing without it", path, err)
    else:
        ids, offsets = loaded
    return np.split(ids, offsets[1:-1])


@dataclass
class TokenizedSplit:
    """One split ready for training: token ids per example (pairs already joined with the special
    tokens), the label array of :meth:`TextDataset.label_array`, the label names and the task."""

    seqs: list[np.ndarray]
    labels: np.ndarray | T.TokenTargets  # token classification: each sentence's token labels, words and tags
    label_names: list[str]
    task: str
    cut: int = 0  # token classification: sentences longer than max_length, cut (their last words get no label)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per example (both texts and the special tokens), for :func:`length_batches`."""
        return np.fromiter((len(seq) for seq in self.seqs), dtype=np.int64, count=len(self.seqs))


def tokenize_dataset(
    ds: TextDataset | TaggedDataset, tokenizer: object, max_length: int, *, cache: Path | None = None
) -> TokenizedSplit:
    """:func:`tokenize_cached` for a whole dataset, pairs included, with its labels as an array.

    A :class:`TaggedDataset` is tokenized as words (:func:`tagging.encode_tagged`: each word's tag on its first
    token), uncached: its words are not the texts the cache is keyed by, and tagging files are small."""
    if isinstance(ds, TaggedDataset):
        enc = T.encode_tagged(tokenizer, ds.sentences, ds.label_names, max_length)  # type: ignore[arg-type]
        targets = T.TokenTargets(enc.labels, enc.word_ids, [s.tags for s in ds.sentences], list(ds.label_names))
        seqs = [np.asarray(ids, dtype=np.int32) for ids in enc.input_ids]
        return TokenizedSplit(seqs, targets, list(ds.label_names), ds.task, enc.cut)
    seqs = tokenize_cached(ds.texts, tokenizer, max_length, cache=cache, text_pairs=ds.text_pairs)
    return TokenizedSplit(seqs, ds.label_array(), list(ds.label_names), ds.task)


# --------------------------------------------------------------------------------------------------
# Batching


def _effective_lengths(lengths: Sequence[int]) -> np.ndarray:
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError("lengths must be a 1-D sequence of integers")
    if lens.size and lens.min() < 0:
        raise ValueError("lengths must be non-negative")
    return np.maximum(lens, 1)  # an empty sequence still occupies a row


def _cut_batches(
    order: np.ndarray, lens: np.ndarray, batch_size: int | None, max_tokens: int | None
) -> list[list[int]]:
    """Cut ``order`` greedily into batches within ``batch_size`` and ``max_len * n <= max_tokens``.

    A sequence longer than the token budget gets a batch of its own rather than being dropped.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    current_max = 0
    for index, length in zip(order.tolist(), lens[order].tolist()):
        longest = max(current_max, length)
        full = (batch_size is not None and len(current) >= batch_size) or (
            max_tokens is not None and longest * (len(current) + 1) > max_tokens
        )
        if current and full:
            batches.append(current)
            current, longest = [], length
        current.append(index)
        current_max = longest
    if current:
        batches.append(current)
    return batches


def length_batches(
    lengths: Sequence[int],
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
) -> list[list[int]]:
    """Group example indices into batches of similar length, so little compute goes to padding.

    Batches hold at most ``batch_size`` examples and/or at most ``max_tokens`` padded tokens
    (``longest * n``; at least one example per batch); give either or both. With ``shuffle``, the
    indices are shuffled (seeded by ``seed`` and ``epoch``), split into pools of about 100 batches,
    each pool is sorted by length and cut into batches, and the batch order is shuffled: batches are
    nearly padding-free yet their contents and order vary between epochs. Without ``shuffle``,
    all examples are sorted by length (stable, so ties keep index order) and cut, deterministically.
    Every index appears in exactly one batch. The result is identical on every process that calls it
    with the same arguments, which :func:`shard` relies on.
    """
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens or both")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    lens = _effective_lengths(lengths)
    if lens.size == 0:
        return []
    if not shuffle:
        return _cut_batches(np.argsort(lens, kind="stable"), lens, batch_size, max_tokens)

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(lens.size)
    # Pool boundaries: every ~100 batches' worth of examples (by count and/or by tokens).
    boundary = np.zeros(lens.size, dtype=bool)
    if batch_size is not None:
        pool = np.arange(lens.size) // (_POOL_BATCHES * batch_size)
        boundary[1:] |= pool[1:] != pool[:-1]
    if max_tokens is not None:
        tokens_before = np.cumsum(lens[order]) - lens[order]
        pool = tokens_before // (_POOL_BATCHES * max_tokens)
        boundary[1:] |= pool[1:] != pool[:-1]
    batches: list[list[int]] = []
    for pool_indices in np.split(order, np.flatnonzero(boundary)):
        by_length = pool_indices[np.argsort(lens[pool_indices], kind="stable")]
        batches.extend(_cut_batches(by_length, lens, batch_size, max_tokens))
    return [batches[i] for i in rng.permutation(len(batches)).tolist()]


def shard(batches: Sequence[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's share of ``batches`` for DistributedDataParallel: every ``world_size``-th batch.

    Each rank gets exactly ``len(batches) // world_size`` batches; the last ``len(batches) %
    world_size`` batches are dropped so that all ranks run the same number of steps (a rank with an
    extra step would wait forever in the gradient all-reduce). The dropped examples differ each
    epoch when batches are shuffled. For evaluation, where every example must count, evaluate
    unsharded or gather results yourself. Interleaving (rather than contiguous blocks) keeps the
    batches that ranks process in the same step similar in size when batches are length-sorted.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in 0..{world_size - 1}, got {rank}")
    per_rank = len(batches) // world_size
    return list(batches[rank : per_rank * world_size : world_size])


PAD_MULTIPLE = 16  # batch lengths are rounded up to a multiple of this (see `padded_length`)


def padded_length(longest: int, multiple: int = PAD_MULTIPLE, limit: int | None = None) -> int:
    """The batch length for a longest sequence of ``longest`` tokens: rounded up to a multiple of ``multiple``,
    but never past ``limit`` (the model's longest input) nor below ``longest``.

    Every distinct (B, T) shape costs memory that is never given back: oneDNN, which runs bf16 matmuls on CPU,
    caches a primitive per shape (up to 1,024 of them), and the allocator keeps the activations of each size.
    Batches cut at every length from 1 to 512 make hundreds of shapes in an IMDB epoch; rounded to 16 they make
    at most 32, so memory levels off after the first few dozen steps. The extra padding is masked out."""
    if multiple < 1:
        raise ValueError(f"multiple must be positive, got {multiple}")
    rounded = -(-longest // multiple) * multiple
    return max(longest, min(rounded, limit)) if limit is not None else rounded


def collate(seqs: list[np.ndarray], pad_id: int, multiple: int = 1,
            limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences into ``(B, T)`` int64 ids and a ``(B, T)`` int64 mask (1 = real token); T is the
    longest sequence's length, rounded up to a multiple of ``multiple`` within ``limit`` (:func:`padded_length`)."""
    if not seqs:
        raise ValueError("collate needs at least one sequence")
    longest = padded_length(max(len(seq) for seq in seqs), multiple, limit)
    ids = np.full((len(seqs), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(seqs), longest), dtype=np.int64)
    for row, seq in enumerate(seqs):
        seq = np.asarray(seq)
        if seq.ndim != 1:
            raise ValueError(f"sequence {row} is not 1-D (shape {seq.shape})")
        ids[row, : seq.size] = seq
        mask[row, : seq.size] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def padding_fraction(batches: Iterable[Sequence[int]], lengths: Sequence[int], multiple: int = 1,
                     limit: int | None = None) -> float:
    """Share of the padded ``(B, T)`` token slots across ``batches`` that are padding (0.0 to 1.0), with batch
    lengths rounded as :func:`collate` rounds them."""
    lens = np.asarray(lengths, dtype=np.int64)
    slots = real = 0
    for batch in batches:
        if len(batch):
            batch_lens = lens[np.asarray(batch, dtype=np.int64)]
            slots += padded_length(int(batch_lens.max()), multiple, limit) * len(batch)
            real += int(batch_lens.sum())
    return 1.0 - real / slots if slots else 0.0
