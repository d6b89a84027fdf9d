"""The attention summary file (``attentions.safetensors``): its format, writing and reading.

Tensors (``M`` images, ``L`` layers, ``H`` heads, ``P`` patches, ``N`` tokens): ``labels`` and
``predictions`` ``[M]``; ``cls_attention`` ``[M, L, H, P]`` float16; ``rollout`` ``[M, P]``;
``fg_fraction`` ``[M, P]`` (only with masks); ``full_attention`` ``[K, L, H, N, N]`` (only if
asked for) with ``full_indices`` ``[K]`` (the images they belong to; absent in older files, where
they are the first ``K``) and ``full_images`` ``[K, H_px, W_px, 3]`` uint8 (their input crops);
``example_images`` ``[E, H_px, W_px, 3]`` uint8 and ``example_indices`` ``[E]``.
``logits`` ``[M, C]`` float32 (the classifier's output of the same pass: its argmax is ``predictions``).
The safetensors metadata key ``"analysis"`` holds a JSON dict: format, version, model_id,
class_names, num_layers, num_heads, layout (`TokenLayout.to_dict`), image_size, has_masks,
dataset, split, num_images.

Large splits are written and read in row chunks: `SummaryWriter` streams the rows of every tensor to
a raw file of its own and composes the one safetensors file at the end (header, then the raw files
copied in); `SummaryReader` reads row ranges with plain file reads (no memory map, whose touched pages
would count in the reader's resident memory). `load_summary` holds everything asked for at once,
for small summaries.
"""
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open

from analysis.maps.attention_metrics import class_cls_map_sums
from analysis.modeling.tokens import TokenLayout
from data_scripts.errors import MissingFileError, UserError
from data_scripts.files import atomic_path

SUMMARY_FORMAT = 'flower-vit-lens/attention-summary'
SUMMARY_VERSION = 1
EXTRACT_COMMAND = 'python -m analysis extract --model {model}'  # .format(model=the run directory)


def read_summary_meta(path: Union[str, Path]) -> Dict:
    """Reads only the ``"analysis"`` metadata of an attention summary (no tensors).

    Args:
        path: the summary file.

    Returns:
        The parsed metadata.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not an attention summary of this version.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f'{path} does not exist; run the attention analysis first '
                                f'({EXTRACT_COMMAND.format(model="<dir>")}) or pass the right path.')
    not_summary = (f'{path} is not an attention summary (expected a safetensors file with metadata '
                   f'"analysis" of format {SUMMARY_FORMAT!r}); pass the attentions.safetensors written by '
                   'the attention analysis.')
    try:
        with safe_open(str(path), framework='pt') as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise UserError(f'{not_summary} ({e})') from e
    if 'analysis' not in metadata:
        raise UserError(not_summary)
    try:
        meta = json.loads(metadata['analysis'])
    except json.JSONDecodeError as e:
        raise UserError(f'{not_summary} (its "analysis" metadata is not JSON: {e})') from e
    if not isinstance(meta, dict) or meta.get('format') != SUMMARY_FORMAT:
        raise UserError(not_summary)
    if meta.get('version') != SUMMARY_VERSION:
        raise UserError(f'{path} is an attention summary of version {meta.get("version")}; this code reads '
                         f'version {SUMMARY_VERSION}. Re-run the attention analysis.')
    return meta


def load_summary(path: Union[str, Path], keys: Optional[Sequence[str]] = None) -> Tuple[Dict[str, torch.Tensor], Dict]:
    """Loads an attention summary (``attentions.safetensors``): every tensor, or only ``keys`` (those the file has),
    the small tensors of a large summary.

    Returns:
        ``(tensors, meta)``: the tensors by name and the parsed ``"analysis"`` metadata.

    Raises:
        MissingFileError: the file does not exist.
        UserError: the file is not an attention summary of this version.
    """
    with SummaryReader(path) as reader:  # checks the metadata
        return {k: reader.read(k) for k in (reader.keys() if keys is None else keys) if k in reader}, reader.meta


def check_summary_matches(metadata: Dict, model: torch.nn.Module) -> None:
    """Raises if a summary was written by a model with another layout or other classes."""
    theirs = (TokenLayout.from_dict(metadata['layout']), metadata['num_layers'], metadata['num_heads'])
    ours = (model.token_layout, model.num_blocks, model.num_heads)
    if theirs != ours:
        raise UserError(
            f'the attention summary comes from another model (layout, layers, heads {theirs} vs {ours}); '
            're-run `python -m analysis extract` with this model.')




# safetensors dtype names (https://huggingface.co/docs/safetensors: the header's "dtype")
_DTYPE_NAMES = {torch.float64: 'F64', torch.float32: 'F32', torch.float16: 'F16', torch.bfloat16: 'BF16',
                torch.int64: 'I64', torch.int32: 'I32', torch.int16: 'I16', torch.int8: 'I8', torch.uint8: 'U8',
                torch.bool: 'BOOL'}
_DTYPES = {name: dtype for dtype, name in _DTYPE_NAMES.items()}
CHUNK_BYTES = 16 << 20  # rows per read chunk are chosen to hold about this many bytes


@dataclass
class _Rows:
    dtype: torch.dtype
    row_shape: Tuple[int, ...]
    file: BinaryIO
    path: Path
    num_rows: int = 0

    @property
    def row_bytes(self) -> int:
        return math.prod(self.row_shape) * self.dtype.itemsize


class SummaryWriter:
    """Writes an attention summary row chunk by row chunk; memory holds one chunk, never the split.

    Rows of each tensor go to a raw file of their own (in a hidden folder beside ``path``) as they
    come; `close` composes the safetensors file from them (header, then every raw file copied in,
    largest element size first, as ``save_file`` orders them) and renames it into place. A writer left
    without `close` (an exception) removes its raw files and writes nothing.

    Any key may be appended: a tensor is its rows concatenated in append order (``[0, ...]`` rows
    declare a key that may stay empty). ``with SummaryWriter(path) as w: w.append(...); w.close(meta)``.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._dir = Path(tempfile.mkdtemp(prefix=f'.{self.path.name}.', suffix='.rows', dir=self.path.parent))
        self._rows: Dict[str, _Rows] = {}

    def __enter__(self) -> 'SummaryWriter':
        return self

    def __exit__(self, *exc) -> None:
        self._discard()

    def append(self, name: str, rows: torch.Tensor) -> None:
        """Appends ``rows`` ``[n, ...]`` to tensor ``name``; later rows must have the same dtype and row shape."""
        if rows.dim() == 0:
            raise UserError(f'{name}: append rows [n, ...], not a scalar')
        if rows.dtype not in _DTYPE_NAMES:
            raise UserError(f'{name}: dtype {rows.dtype} cannot be stored in safetensors')
        rows = rows.detach().cpu().contiguous()
        spec = self._rows.get(name)
        if spec is None:
            path = self._dir / f'{len(self._rows)}.bin'
            spec = self._rows[name] = _Rows(rows.dtype, tuple(rows.shape[1:]), open(path, 'wb'), path)
        elif (rows.dtype, tuple(rows.shape[1:])) != (spec.dtype, spec.row_shape):
            raise UserError(f'{name}: rows of {rows.dtype} {tuple(rows.shape[1:])} after rows of {spec.dtype} '
                             f'{spec.row_shape}')
        if rows.numel():
            spec.file.write(memoryview(rows.reshape(-1).view(torch.uint8).numpy()))
        spec.num_rows += rows.shape[0]

    def num_rows(self, name: str) -> int:
        return self._rows[name].num_rows if name in self._rows else 0

    def close(self, metadata: Dict) -> Path:
        """Composes ``path`` (whole or not at all) with ``metadata`` as its ``"analysis"`` JSON; returns it."""
        for spec in self._rows.values():
            spec.file.close()
        # Largest element size first keeps every tensor aligned to its element size (as save_file does).
        order = sorted(self._rows, key=lambda k: (-self._rows[k].dtype.itemsize, k))
        header: Dict = {'__metadata__': {'analysis': json.dumps(metadata)}}
        offset = 0
        for name in order:
            spec = self._rows[name]
            size = spec.num_rows * spec.row_bytes
            assert spec.path.stat().st_size == size, f'{name}: {spec.path.stat().st_size} bytes written, {size} expected'
            header[name] = {'dtype': _DTYPE_NAMES[spec.dtype], 'shape': [spec.num_rows, *spec.row_shape],
                            'data_offsets': [offset, offset + size]}
            offset += size
        blob = json.dumps(header, separators=(',', ':')).encode('utf-8')
        blob += b' ' * (-len(blob) % 8)  # the data starts 8-byte aligned
        try:
            with atomic_path(self.path) as tmp:
                with open(tmp, 'wb') as out:
                    out.write(struct.pack('<Q', len(blob)))
                    out.write(blob)
                    for name in order:
                        with open(self._rows[name].path, 'rb') as src:
                            shutil.copyfileobj(src, out, 16 << 20)
        finally:
            self._discard()
        return self.path

    def _discard(self) -> None:
        for spec in self._rows.values():
            spec.file.close()
        self._rows = {}
        shutil.rmtree(self._dir, ignore_errors=True)


class SummaryReader:
    """Reads tensors of an attention summary by row ranges, with plain reads (memory: what is asked for).

    ``with SummaryReader(path) as r: r.meta, r.keys(), r.shape(k), r.read(k, start, stop), r.rows(k, idx),
    r.chunks([k1, k2])``. The file is checked as `read_summary_meta` checks it.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.meta = read_summary_meta(self.path)
        self._file = open(self.path, 'rb')
        size = struct.unpack('<Q', self._file.read(8))[0]
        header = json.loads(self._file.read(size))
        self._data_start = 8 + size
        self._specs = {k: v for k, v in header.items() if k != '__metadata__'}

    def __enter__(self) -> 'SummaryReader':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def keys(self) -> List[str]:
        return sorted(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._spec(name)['shape'])

    def _spec(self, name: str) -> Dict:
        if name not in self._specs:
            raise KeyError(f'{self.path} has no tensor {name!r}; it has {self.keys()}')
        return self._specs[name]

    def read(self, name: str, start: int = 0, stop: Optional[int] = None) -> torch.Tensor:
        """Rows ``start:stop`` of tensor ``name`` (the whole tensor by default)."""
        spec = self._spec(name)
        dtype, shape = _DTYPES[spec['dtype']], spec['shape']
        if not shape:
            start, stop, row_shape = 0, 1, []
        else:
            stop = shape[0] if stop is None else min(stop, shape[0])
            start, row_shape = min(max(start, 0), stop), shape[1:]
        row_bytes = math.prod(row_shape) * dtype.itemsize
        count = stop - start
        if count * row_bytes == 0:
            return torch.empty((count, *row_shape) if shape else (), dtype=dtype)
        self._file.seek(self._data_start + spec['data_offsets'][0] + start * row_bytes)
        buffer = bytearray(count * row_bytes)
        if self._file.readinto(buffer) != len(buffer):
            raise UserError(f'{self.path} is cut off inside tensor {name!r}; re-run the attention analysis.')
        tensor = torch.frombuffer(buffer, dtype=dtype)
        return tensor.reshape(count, *row_shape) if shape else tensor.reshape(())

    def rows(self, name: str, indices: Sequence[int]) -> torch.Tensor:
        """The rows ``indices`` of tensor ``name``, in that order (for a few rows)."""
        shape = self.shape(name)
        if not len(indices):
            return torch.empty(0, *shape[1:], dtype=_DTYPES[self._spec(name)['dtype']])
        return torch.cat([self.read(name, int(i), int(i) + 1) for i in indices])

    def chunk_rows(self, names: Sequence[str]) -> int:
        """Rows per chunk so that one chunk of all ``names`` holds about `CHUNK_BYTES`."""
        row_bytes = sum(math.prod(self.shape(n)[1:]) * _DTYPES[self._spec(n)['dtype']].itemsize for n in names)
        return max(1, CHUNK_BYTES // max(row_bytes, 1))

    def chunks(self, names: Sequence[str], rows: Optional[int] = None) -> Iterator[Dict[str, torch.Tensor]]:
        """``{name: rows}`` chunk after chunk, the tensors in lock-step (they must have the same row count)."""
        counts = {self.shape(n)[0] for n in names}
        if len(counts) > 1:
            raise UserError(f'{list(names)} have different numbers of rows ({counts}); read them apart')
        total = counts.pop() if counts else 0
        rows = rows or self.chunk_rows(names)
        for start in range(0, total, rows):
            yield {n: self.read(n, start, start + rows) for n in names}


def class_mean_cls_maps_streamed(path: Union[str, Path], num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """`attention_metrics.class_mean_cls_maps` of a summary file, read chunk by chunk.

    Returns:
        ``(maps [C, L, P], counts [C])``, as `class_mean_cls_maps`.
    """
    sums = counts = None
    with SummaryReader(path) as reader:
        for chunk in reader.chunks(['cls_attention', 'labels']):
            s, c = class_cls_map_sums(chunk['cls_attention'], chunk['labels'], num_classes)  # [C, L, P], [C]
            sums, counts = (s, c) if sums is None else (sums + s, counts + c)
        if sums is None:
            _, L, _, P = reader.shape('cls_attention')
            sums, counts = torch.zeros(num_classes, L, P, dtype=torch.float64), torch.zeros(num_classes, dtype=torch.long)
    return (sums / counts.clamp(min=1)[:, None, None]).float(), counts
