"""Files written for users are written whole or not at all: a temporary name, then a rename."""
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, os.PathLike]


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yields a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    A run killed mid-write leaves the old file (or none), never a cut-off one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding='utf-8')
    return Path(path)


def write_json(path: PathLike, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, default=str) + '\n')
