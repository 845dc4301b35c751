"""The embedded corpus: Jane Austen's six novels, shipped as package data so that training works on a
fresh machine with nothing to download.

The files live in ``megacore/data/corpus/austen/*.txt.xz`` (one UTF-8 novel each, xz-compressed, 1.2 MB;
provenance in the README next to them). The default split holds ``persuasion`` out for validation and
evaluation and trains on the other five.
"""

from __future__ import annotations

import lzma
import os
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent / "corpus" / "austen"

#: The novels, by file stem, in a fixed order (the order of ``corpus_files``).
NOVELS = (
    "emma",
    "mansfield_park",
    "northanger_abbey",
    "persuasion",
    "pride_and_prejudice",
    "sense_and_sensibility",
)
VALID_NOVELS = ("persuasion",)
TRAIN_NOVELS = tuple(n for n in NOVELS if n not in VALID_NOVELS)
SPLITS = ("train", "valid", "all")

_XZ_MAGIC = b"\xfd7zXZ\x00"


def corpus_files(split: str = "train") -> list[Path]:
    """Paths of the embedded corpus's files for ``split``.

    ``"train"``: the five training novels; ``"valid"``: ``persuasion``; ``"all"``: all six. Paths are
    absolute, ``.txt.xz`` (read them with :func:`read_text`), in the order of :data:`NOVELS`.

    Raises ValueError for an unknown split, FileNotFoundError when the package data is missing (a broken
    installation).
    """
    if split == "train":
        names = TRAIN_NOVELS
    elif split == "valid":
        names = VALID_NOVELS
    elif split == "all":
        names = NOVELS
    else:
        raise ValueError(f"megacore.data.corpus_files: split must be one of {SPLITS}, got {split!r}")
    paths = [CORPUS_DIR / f"{name}.txt.xz" for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"megacore.data.corpus_files: the embedded corpus is incomplete: {missing} not found in "
            f"{CORPUS_DIR} (a broken installation: reinstall megacore)"
        )
    return paths


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of ``path``, decompressed when it is xz (recognised by its magic bytes, not its name).

    Raises FileNotFoundError for a missing file, ValueError for a corrupt or truncated xz stream.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"megacore.data.read_text: {path} does not exist or is not a file")
    data = path.read_bytes()
    if data.startswith(_XZ_MAGIC):
        try:
            return lzma.decompress(data)
        except lzma.LZMAError as e:
            raise ValueError(f"megacore.data.read_text: {path} is a corrupt or truncated xz file: {e}") from e
    return data


def read_text(path: str | os.PathLike, errors: str = "strict") -> str:
    """The text of ``path`` decoded as UTF-8; xz-compressed files (like the embedded corpus) are
    decompressed transparently.

    ``errors`` is the codec's error policy (``"strict"``, ``"replace"``, ``"ignore"``, ...). Under
    ``"strict"``, undecodable bytes raise a ValueError (a UnicodeDecodeError) that names the file and the
    byte offset in the decompressed text. Missing files raise FileNotFoundError.
    """
    data = read_bytes(path)
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise UnicodeDecodeError(
            e.encoding, e.object, e.start, e.end,
            f"{e.reason} (megacore.data.read_text: {path}, byte {e.start}; pass errors='replace' to keep going)",
        ) from None  # fmt: skip
