"""Streams a dataset split through the model and keeps a compact attention summary per image.

Per image: label, prediction, the CLS-to-patch attention of every layer and head (``[L, H, P]``,
float16), the CLS row on the prefix tokens (``[L, H, prefix]``), the norm of every token at every
block's output (``[L, N]``, for `analysis.maps.sinks`), the CLS row of the attention rollout (``[P]``) and, with masks, the fraction of each
patch covered by the flower (``[P]``). Full ``N x N`` maps, with the input crops, only for
``full_maps`` images: half correct and half wrong predictions where the split has both
(`FullMapSlots`), from a second pass over those images. Every map is reduced as the model computes it
(`analysis.maps.reduce.AttentionReducer`) and dropped, so memory holds one layer's maps and the head-fused
map of every layer (1/H of the maps), never a batch's ``L x H x N x N``; the per-image rows go to disk as
they come (`analysis.maps.summary.SummaryWriter`), so memory does not grow with the split.

Many processes (``accelerate launch ... -m analysis extract``, or the training job on every rank):
each streams a contiguous share of the batches into a part file (`extract_shard`); rank 0 merges
the parts (`merge_shards`) into the summary and metrics one process would write, row order and
metric sums included.
"""
import contextlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from analysis.core.metrics import classification_metrics
from analysis.core.run_files import METRICS_FILE, SUMMARY_FILE
from analysis.maps.attention_metrics import AttentionMetricsAccumulator
from analysis.maps.reduce import AttentionReducer
from analysis.maps.rollout import rollout_cls
from analysis.maps.summary import SUMMARY_FORMAT, SUMMARY_VERSION, SummaryReader, SummaryWriter
from analysis.modeling.timm_internals import capture_token_norms
from analysis.modeling.tokens import TokenLayout
from analysis.modeling.transforms import batch_transform, collate, eval_geometry, eval_transform, model_data_config
from analysis.modeling.vit import TimmViTForImageClassification
from data_scripts.errors import UserError
from data_scripts.files import write_json

_logger = logging.getLogger(__name__)

METRICS_PREFIX = 'metrics.'  # a part's per-batch metric sums (AttentionMetricsAccumulator.batch_sums)
SELECTION_PREFIXES = ('example_', 'full_')  # rows chosen among the images (ExampleSlots, FullMapSlots)
PART_KEY = 'part'  # a part file's metadata: rank, world_size and the selection sizes



def _unnormalise(pixel_values: torch.Tensor, data_config: Dict) -> torch.Tensor:
    """``[B, 3, H, W]`` normalised -> ``[B, H, W, 3]`` uint8, the crop the model saw."""
    mean = torch.tensor(data_config['mean']).view(1, 3, 1, 1)
    std = torch.tensor(data_config['std']).view(1, 3, 1, 1)
    pixels = (pixel_values * std + mean).clamp(0, 1) * 255
    return pixels.round().to(torch.uint8).permute(0, 2, 3, 1)


def check_input_size(pixel_values: torch.Tensor, layout: TokenLayout) -> None:
    """Raises if the images do not tile the model's patch grid exactly."""
    if tuple(pixel_values.shape[-2:]) != layout.image_size:
        raise UserError(
            f'images are {tuple(pixel_values.shape[-2:])} pixels but the model takes {layout.image_size} '
            f'({layout.grid_size} patches of {layout.patch_size}); use the model\'s eval transform '
            '(analysis.modeling.transforms.eval_transform) to resize and crop them.')


class FullMapSlots:
    """Which images keep their full maps: ``capacity`` of them, correct and wrong predictions alike.

    The choice is the first ``ceil(K / 2)`` correct and the first ``floor(K / 2)`` wrong predictions
    in split order; when one kind runs short, the next images of the other kind fill its places.
    Streaming, with ``K`` slots: an image takes a free slot, or the slot of the last image taken of
    the other kind while that kind holds more than its half and its own kind less.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.quota = {True: capacity - capacity // 2, False: capacity // 2}  # correct? -> places
        self.taken: List[Tuple[int, bool]] = []  # slot -> (image index, correct?)

    def slot_for(self, index: int, correct: bool) -> Optional[int]:
        """The slot that image ``index`` takes (its maps go there), or None."""
        if len(self.taken) < self.capacity:
            self.taken.append((index, correct))
            return len(self.taken) - 1
        own = sum(c == correct for _, c in self.taken)
        if own < self.quota[correct] and len(self.taken) - own > self.quota[not correct]:
            _, slot = max((i, s) for s, (i, c) in enumerate(self.taken) if c != correct)
            self.taken[slot] = (index, correct)
            return slot
        return None

    def order(self) -> List[int]:
        """The taken slots, sorted by image index."""
        return sorted(range(len(self.taken)), key=lambda s: self.taken[s][0])


class ExampleSlots:
    """The example crops: the first ``n`` correct and the first ``n`` wrong predictions (as `FullMapSlots`)."""

    def __init__(self, n: int):
        self.n = n
        self.taken: List[Tuple[int, bool]] = []  # slot -> (image index, correct?)

    def slot_for(self, index: int, correct: bool) -> Optional[int]:
        if sum(c == correct for _, c in self.taken) >= self.n:
            return None
        self.taken.append((index, correct))
        return len(self.taken) - 1

    def order(self) -> List[int]:
        return sorted(range(len(self.taken)), key=lambda s: self.taken[s][0])


class _Candidates:
    """The images of a shard that a selection (`ExampleSlots`, `FullMapSlots`) could choose, written to its part.

    Neither selection ever takes an image of one kind (correct / wrong) after the first ``cap`` of
    that kind, so the first ``cap`` of each kind in each shard, replayed through the selection in
    split order (`_merge_selection`), give exactly what it chooses over the whole split.
    """

    def __init__(self, part: SummaryWriter, prefix: str, cap: int, rows: Dict[str, Tuple[Tuple[int, ...], torch.dtype]]):
        self.part, self.prefix, self.cap = part, prefix, cap
        self.count = {True: 0, False: 0}
        part.append(prefix + 'indices', torch.empty(0, dtype=torch.long))
        part.append(prefix + 'correct', torch.empty(0, dtype=torch.bool))
        for name, (shape, dtype) in rows.items():
            part.append(prefix + name, torch.empty(0, *shape, dtype=dtype))

    def taken_of(self, correct: List[bool]) -> List[int]:
        """The images of a batch (``correct``: of each, in order) this takes: the first of each kind it still wants."""
        room, taken = {c: self.cap - self.count[c] for c in (True, False)}, []
        for i, c in enumerate(correct):
            if room[c] > 0:
                taken.append(i)
                room[c] -= 1
        return taken

    def add(self, index: int, correct: bool, rows: Dict[str, torch.Tensor]) -> None:
        self.part.append(self.prefix + 'indices', torch.tensor([index]))
        self.part.append(self.prefix + 'correct', torch.tensor([correct]))
        for name, row in rows.items():
            self.part.append(self.prefix + name, row[None])
        self.count[correct] += 1


@dataclass
class Extraction:
    """What one pass of the extraction leaves in memory: a few numbers per image, never the maps."""
    metadata: Dict  # the summary's metadata
    metrics: Dict  # the attention metrics (attention_metrics.json)
    labels: torch.Tensor  # [M] int64
    predictions: torch.Tensor  # [M] int64: argmax of the logits of the same eager pass (the summary's "logits")
    path: Optional[Path] = None  # the summary file, when one was written
    runtime_s: float = 0.0  # wall time of the pass (all of it: shards, merge)


def shard_batches(num_batches: int, rank: int, world_size: int) -> range:
    """The contiguous batches of process ``rank``: the first ``num_batches % world_size`` processes take one more.

    Processes past the last batch get none (and contribute nothing).
    """
    assert 0 <= rank < world_size, f'rank {rank} of {world_size} processes'
    base, extra = divmod(num_batches, world_size)
    first = rank * base + min(rank, extra)
    return range(first, first + base + (rank < extra))


class _Fetch:
    """DataLoader ``collate_fn``: row indices -> the model's batch (raw rows, ``prepare``, eval transform, collate)."""

    def __init__(self, dataset: datasets.Dataset, to_model: Callable, prepare: Optional[Callable]):
        self.dataset, self.to_model, self.prepare = dataset, to_model, prepare

    def __call__(self, indices: List[int]) -> Dict[str, torch.Tensor]:
        batch = self.dataset[indices]  # {column: [values]}, images decoded
        if self.prepare is not None:
            batch = self.prepare(batch, indices)
        out = self.to_model(batch)  # {pixel_values, labels(, fg_mask): [values]}
        return collate([dict(zip(out, values)) for values in zip(*out.values())])


def eval_loader(dataset: datasets.Dataset, images: Sequence[int], data_config: Dict, has_masks: bool, batch_size: int,
                prepare: Optional[Callable] = None, num_workers: int = 0) -> DataLoader:
    """Batches of the rows ``images`` (in order) under the eval transform: ``{pixel_values, labels(, fg_mask)}``.

    The split's own format (e.g. a training transform) is ignored; ``prepare`` as in `extract_shard`.
    """
    dataset = dataset.with_format(None)
    if prepare is None:
        dataset = dataset.select_columns(['image', 'label'] + (['mask'] if has_masks else []))
    to_model = batch_transform(eval_transform(data_config), eval_geometry(data_config) if has_masks else None)
    return DataLoader(images, batch_size=batch_size, shuffle=False, collate_fn=_Fetch(dataset, to_model, prepare),
                      num_workers=num_workers)


def _check_extract_options(batch_size: int, max_batches: Optional[int], full_maps: int) -> None:
    if batch_size < 1:
        raise UserError(f'--batch_size must be >= 1, got {batch_size}')
    if max_batches is not None and max_batches < 1:
        raise UserError(f'--max_batches must be >= 1, got {max_batches}')
    if full_maps < 0:
        raise UserError(f'--full_maps must be >= 0, got {full_maps}')


def _map_shape(model: TimmViTForImageClassification) -> Tuple[int, int, int]:
    """``(L, H, N)``: the blocks, the heads per block and the tokens of the model's attention maps."""
    return model.num_blocks, model.num_heads, model.token_layout.num_tokens


def _shard_images(num_images: int, batch_size: int, rank: int, world_size: int) -> Tuple[range, range]:
    """This process's batches of the split (`shard_batches`) and the rows of their images."""
    num_batches = -(-num_images // batch_size)
    batches = shard_batches(num_batches, rank, world_size)
    images = range(min(batches.start * batch_size, num_images), min(batches.stop * batch_size, num_images))
    if world_size > 1:
        _logger.info(f'process {rank} of {world_size}: {len(batches)} of {num_batches} batches, '
                     f'{len(images)} images' + (f' ({images.start}..{images.stop - 1})' if images else ''))
    return batches, images


def _part_metadata(model: TimmViTForImageClassification, class_names: List[str], *, has_masks: bool, scored: bool,
                   num_images: int, model_id: str, dataset_name: str, split: str, part: Dict) -> Dict:
    """The summary's metadata plus the part's own (`PART_KEY`: rank, world_size, selection sizes)."""
    layout = model.token_layout
    L, H, _ = _map_shape(model)
    return {
        'format': SUMMARY_FORMAT, 'version': SUMMARY_VERSION, 'model_id': model_id, 'class_names': class_names,
        'num_layers': L, 'num_heads': H, 'layout': layout.to_dict(), 'image_size': list(layout.image_size),
        'has_masks': has_masks, 'dataset': dataset_name, 'split': split, 'num_images': num_images,
        'predictions_scored': scored, 'model_class_names': model.class_names if not scored else None,
        PART_KEY: part,
    }


def _selection_candidates(part: SummaryWriter, model: TimmViTForImageClassification, num_examples: int,
                          num_full: int) -> Tuple[_Candidates, Optional[_Candidates]]:
    """The example and full-map candidates of a part, declared in it (full: None without full maps)."""
    L, H, N = _map_shape(model)
    crop_shape = ((*model.token_layout.image_size, 3), torch.uint8)
    examples = _Candidates(part, 'example_', num_examples, {'images': crop_shape})
    full = _Candidates(part, 'full_', num_full, {'attention': ((L, H, N, N), torch.float16), 'images': crop_shape}
                       ) if num_full else None
    return examples, full


def _full_maps(model: TimmViTForImageClassification, pixel_values: torch.Tensor, images: List[int]) -> torch.Tensor:
    """``[K, L, H, N, N]`` float16: the maps of the batch's ``images``, each from a pass over that image alone.

    The extraction's own pass keeps no maps (`AttentionReducer`). One image at a time, so that its maps do
    not depend on the images beside it (kernels may round differently for another batch size): the same
    whatever share of the split a process streams. At most ``2 * full_maps`` images per process.
    """
    maps = [model(pixel_values[i:i + 1].to(model.device, model.dtype), output_attentions=True).attentions
            for i in images]  # K x L x [1, H, N, N]
    return torch.stack([torch.cat(layers).half().cpu() for layers in maps])


def _add_candidates(model: TimmViTForImageClassification, examples: _Candidates, full: Optional[_Candidates],
                    start: int, correct: torch.Tensor, pixel_values: torch.Tensor, data_config: Dict) -> None:
    """Offers the images of a batch (split rows ``start``...) to the selections; crops only those taken, and runs
    `_full_maps` only for a batch with images the full-map selection takes."""
    correct = correct.tolist()
    taken_examples = examples.taken_of(correct)
    taken_full = full.taken_of(correct) if full is not None else []
    maps = dict(zip(taken_full, _full_maps(model, pixel_values, taken_full))) if taken_full else {}
    for i in sorted(set(taken_examples) | set(maps)):
        crop = _unnormalise(pixel_values[i:i + 1], data_config)[0]  # [H_px, W_px, 3]
        if i in taken_examples:
            examples.add(start + i, correct[i], {'images': crop})
        if i in maps:
            full.add(start + i, correct[i], {'attention': maps[i], 'images': crop})


def _extract_batch(model: TimmViTForImageClassification, batch: Dict[str, torch.Tensor], start: int,
                   part: SummaryWriter, reducer: AttentionReducer, metrics: AttentionMetricsAccumulator,
                   examples: _Candidates, full: Optional[_Candidates], *, data_config: Dict, has_masks: bool,
                   keep_rows: bool, scored: bool) -> int:
    """One batch (split rows ``start``...) into the part: its rows, its metric sums, its selection candidates.

    Every map is reduced as the model computes it (`AttentionReducer`): memory never holds a batch's maps.

    Returns:
        The number of images in the batch.
    """
    layout = model.token_layout
    pixel_values, labels = batch['pixel_values'], batch['labels']  # [B, 3, H_px, W_px], [B]
    check_input_size(pixel_values, layout)
    # the token norms are rows of the summary: not captured for a pass that keeps none (e.g. background variants)
    with capture_token_norms(model.timm_model) if keep_rows else contextlib.nullcontext() as norms, \
            reducer.capture(model.timm_model):
        logits = model(pixel_values.to(model.device, model.dtype)).logits.float().cpu()  # [B, C]
    maps = reducer.result()
    cls_rows = layout.cls_to_patches(maps.cls_query).float()  # [B, L, H, P]
    fg = layout.patch_fraction(batch['fg_mask'].to(model.device)) if has_masks else None  # [B, P]
    pred = logits.argmax(-1)
    sums = metrics.batch_sums(None, cls_rows, labels.to(model.device), fg_fraction=fg, rollout_cls=maps.rollout,
                              distances=maps.distances)
    for name, value in sums.items():
        part.append(METRICS_PREFIX + name, value[None])
    part.append('labels', labels)
    part.append('predictions', pred)
    if keep_rows:
        part.append('logits', logits)
        part.append('cls_attention', cls_rows.half().cpu())
        part.append('rollout', maps.rollout.half().cpu())
        part.append('token_norms', torch.stack(norms, dim=1).cpu())  # [B, L, N] float32
        part.append('prefix_attention', layout.cls_to_prefix(maps.cls_query).half().cpu())  # [B, L, H, prefix]
        if has_masks:
            part.append('fg_fraction', fg.half().cpu())
    correct = pred == labels if scored else torch.ones(len(pred), dtype=torch.bool)
    _add_candidates(model, examples, full, start, correct, pixel_values, data_config)
    return len(pred)


@torch.inference_mode()
def extract_shard(
        model: TimmViTForImageClassification,
        dataset: datasets.Dataset,
        part_path: Union[str, Path],
        *,
        rank: int = 0,
        world_size: int = 1,
        data_config: Optional[Dict] = None,
        batch_size: int = 64,
        full_maps: int = 0,
        num_examples: int = 4,
        max_batches: Optional[int] = None,
        keep_rows: bool = True,
        model_id: str = '',
        dataset_name: str = '',
        split: str = '',
        progress: bool = True,
        prepare: Optional[Callable[[Dict, List[int]], Dict]] = None,
        num_workers: int = 0,
) -> Path:
    """Streams one process's share of a split through the model, its maps reduced as they come, into a part file.

    The split's batches are cut into ``world_size`` contiguous shares (`shard_batches`), the same
    batches whatever ``world_size``; this process takes share ``rank``. Every batch's rows go to the
    part file as they come (`SummaryWriter`): labels, predictions and, with ``keep_rows``, logits,
    cls_attention, rollout, token_norms (``[L, N]``: every token's norm at every block's output),
    prefix_attention (``[L, H, prefix]``: the CLS row on the CLS and register tokens), fg_fraction; its metric sums (``metrics.*``,
    `AttentionMetricsAccumulator.batch_sums`); and the candidates of the example and full-map
    selections (``example_*``, ``full_*``). `merge_shards` turns the parts into the summary.

    Args:
        model: the ViT.
        dataset: raw split with ``image``, ``label`` and optionally ``mask`` columns.
        part_path: the part file to write.
        rank / world_size: which share of the batches, of how many.
        data_config: timm data config (default: the model's).
        batch_size: images per forward pass.
        full_maps: keep the full ``[L, H, N, N]`` maps and input crops of this many images,
            correct and wrong predictions alike (`FullMapSlots`).
        num_examples: keep the input crops of up to this many correct and as many wrong predictions.
        max_batches: only the first this many batches of the split (default: the whole split).
        keep_rows: False keeps only labels, predictions and the metric sums (no maps).
        model_id / dataset_name / split: recorded in the metadata.
        progress: show a tqdm bar.
        prepare: ``prepare(batch, row_indices)`` is applied to every raw batch (a dict of the dataset's
            columns) before the eval transform, e.g. to render background variants
            (`analysis.studies.background.VariantRenderer`); it returns image, label (and mask) columns.
        num_workers: DataLoader worker processes.

    Returns:
        ``part_path``.
    """
    _check_extract_options(batch_size, max_batches, full_maps)
    model.eval()
    data_config = data_config or model_data_config(model.timm_model)
    class_names = dataset.features['label'].names
    scored = model.class_names == class_names
    if not scored and rank == 0:
        _logger.warning(f'the model predicts {model.num_labels} classes of its own, not the dataset\'s '
                        f'{class_names}: attention is measured, predictions are not scored.')
    has_masks = 'mask' in dataset.column_names
    num_images = len(dataset) if max_batches is None else min(len(dataset), max_batches * batch_size)
    if num_images == 0:
        raise UserError('the split has no images to extract attention from.')
    batches, images = _shard_images(num_images, batch_size, rank, world_size)
    num_full = min(full_maps, num_images)
    metadata = _part_metadata(model, class_names, has_masks=has_masks, scored=scored, num_images=num_images,
                              model_id=model_id, dataset_name=dataset_name, split=split,
                              part={'rank': rank, 'world_size': world_size, 'num_examples': num_examples,
                                    'full_maps': num_full})
    L, H, _ = _map_shape(model)
    metrics = AttentionMetricsAccumulator(model.token_layout, L, H, class_names)  # only its batch_sums: parts merge
    reducer = AttentionReducer(model.token_layout, L)
    with SummaryWriter(part_path) as part:
        examples, full = _selection_candidates(part, model, num_examples, num_full)
        loader = eval_loader(dataset, images, data_config, has_masks, batch_size, prepare, num_workers) if images else []
        start = images.start
        for batch in tqdm(loader, total=len(batches), disable=not progress, desc='attention'):
            start += _extract_batch(model, batch, start, part, reducer, metrics, examples, full,
                                    data_config=data_config, has_masks=has_masks, keep_rows=keep_rows, scored=scored)
        assert start == images.stop, f'streamed images up to {start}, expected {images.stop}'
        return part.close(metadata)


def _merge_selection(parts: Sequence[SummaryReader], prefix: str, slots, out: SummaryWriter) -> None:
    """The rows a selection chooses among the candidates of all parts (in split order), sorted by image index."""
    chosen: Dict[int, Tuple[int, int]] = {}  # slot -> (part, row)
    for p, reader in enumerate(parts):
        indices, correct = reader.read(prefix + 'indices').tolist(), reader.read(prefix + 'correct').tolist()
        for row, (index, c) in enumerate(zip(indices, correct)):
            slot = slots.slot_for(index, c)
            if slot is not None:
                chosen[slot] = (p, row)
    names = [k for k in parts[0].keys() if k.startswith(prefix) and k != prefix + 'correct']
    for name in names:
        out.append(name, parts[0].read(name, 0, 0))  # declared even when nothing is chosen
        for slot in slots.order():
            p, row = chosen[slot]
            out.append(name, parts[p].read(name, row, row + 1))


def merge_shards(parts: Sequence[Union[str, Path]], path: Optional[Union[str, Path]] = None, *,
                 metrics_path: Optional[Union[str, Path]] = None) -> Extraction:
    """The summary and the metrics of a split from the parts of its shares (`extract_shard`), in rank order.

    Per-image rows are concatenated in rank order (the shares are contiguous), the metric sums are
    added batch by batch in split order (so the metrics equal, bit for bit, those of one process), and
    the example and full-map selections are replayed over the candidates of all parts.

    Args:
        parts: the part files, rank 0 first.
        path: the summary file to write (None: none, only the returned labels, predictions and metrics).
        metrics_path: where to write the metrics JSON (None: not written).
    """
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(SummaryReader(p)) for p in parts]
        metadata = {k: v for k, v in readers[0].meta.items() if k != PART_KEY}
        info = readers[0].meta[PART_KEY]
        assert [r.meta[PART_KEY]['rank'] for r in readers] == list(range(info['world_size'])), 'parts out of rank order'
        accumulator = AttentionMetricsAccumulator(TokenLayout.from_dict(metadata['layout']), metadata['num_layers'],
                                                  metadata['num_heads'], metadata['class_names'])
        for reader in readers:
            names = [k for k in reader.keys() if k.startswith(METRICS_PREFIX)]
            for b in range(reader.shape(names[0])[0] if names else 0):
                accumulator.merge({n[len(METRICS_PREFIX):]: reader.read(n, b, b + 1)[0] for n in names})
        labels = torch.cat([r.read('labels') for r in readers if 'labels' in r])
        predictions = torch.cat([r.read('predictions') for r in readers if 'predictions' in r])
        assert len(labels) == metadata['num_images'], f'{len(labels)} rows for {metadata["num_images"]} images'
        if path is not None:
            with SummaryWriter(path) as out:
                rows = dict.fromkeys(k for r in readers for k in r.keys()
                                     if not k.startswith((METRICS_PREFIX,) + SELECTION_PREFIXES))
                for name in rows:
                    for reader in readers:
                        if name in reader:
                            for chunk in reader.chunks([name]):
                                out.append(name, chunk[name])
                _merge_selection(readers, 'example_', ExampleSlots(info['num_examples']), out)
                if info['full_maps']:
                    _merge_selection(readers, 'full_', FullMapSlots(info['full_maps']), out)
                path = out.close(metadata)
    metrics = accumulator.compute()
    if metrics_path is not None:
        write_json(metrics_path, metrics)
    return Extraction(metadata, metrics, labels, predictions, Path(path) if path is not None else None)


def distributed_rank() -> Tuple[int, int]:
    """This process's rank and the number of processes of the torch.distributed group (0, 1 without one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def read_extraction(path: Union[str, Path], metrics_path: Union[str, Path]) -> Extraction:
    """The `Extraction` of a written summary and its metrics file (labels and predictions read back)."""
    with SummaryReader(path) as reader:
        labels, predictions, metadata = reader.read('labels'), reader.read('predictions'), reader.meta
    return Extraction(metadata, json.loads(Path(metrics_path).read_text()), labels, predictions, Path(path))


def extract_to_file(model: TimmViTForImageClassification, dataset: datasets.Dataset, path: Union[str, Path], *,
                    metrics_path: Optional[Union[str, Path]] = None, sharded: bool = False, **options) -> Extraction:
    """The attention summary of a split into ``path`` and its metrics into ``metrics_path``, streamed.

    Memory holds one layer's maps of a batch, the head-fused maps of its layers, and the selected crops and full
    maps, whatever the split's size; the rows go through part files beside ``path`` (`extract_shard`, `merge_shards`).

    Args:
        model: the ViT, on the device it runs on.
        dataset: raw split with ``image``, ``label`` and optionally ``mask`` columns.
        path: the summary file (``attentions.safetensors``).
        metrics_path: the metrics file (default: ``attention_metrics.json`` beside ``path``).
        sharded: every process of the torch.distributed group calls this (e.g. under ``accelerate
            launch``): each streams a contiguous share of the batches into a part file beside ``path``
            (the processes share that folder), rank 0 merges them into the same files one process would
            write, and every process returns the merged result. Without a process group, one process does it all.
        **options: those of `extract_shard` (batch_size, max_batches, full_maps, num_examples, model_id, ...).

    Returns:
        The `Extraction`: metadata, metrics, labels and predictions of every image, the path.
    """
    began = time.perf_counter()
    path = Path(path)
    metrics_path = Path(metrics_path) if metrics_path is not None else path.parent / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    rank, world_size = distributed_rank() if sharded else (0, 1)
    if world_size == 1:
        with tempfile.TemporaryDirectory(prefix=f'.{path.name}.', suffix='.parts', dir=path.parent) as parts:
            part = extract_shard(model, dataset, Path(parts) / 'rank0.safetensors', **options)
            result = merge_shards([part], path, metrics_path=metrics_path)
    else:
        parts = path.parent / f'.{path.name}.parts'
        parts.mkdir(exist_ok=True)
        options['progress'] = options.get('progress', True) and rank == 0
        extract_shard(model, dataset, parts / f'rank{rank}.safetensors', rank=rank, world_size=world_size, **options)
        torch.distributed.barrier()
        if rank == 0:
            try:
                result = merge_shards([parts / f'rank{r}.safetensors' for r in range(world_size)], path,
                                      metrics_path=metrics_path)
            finally:
                shutil.rmtree(parts, ignore_errors=True)
        torch.distributed.barrier()
        if rank != 0:
            result = read_extraction(path, metrics_path)
    result.runtime_s = time.perf_counter() - began
    if rank == 0:
        _logger.info(f'attention summary of {result.metadata["num_images"]} images -> {path} '
                     f'({world_size} process{"es" if world_size > 1 else ""}, {result.runtime_s:.1f} s)')
    return result


@torch.inference_mode()
def _predict_rows(model: TimmViTForImageClassification, dataset: datasets.Dataset, images: range, data_config: Dict,
                  batch_size: int, num_workers: int) -> torch.Tensor:
    """``[len(images)]`` predictions of a plain (fused) pass over the rows ``images``, as the extraction loads them."""
    loader = eval_loader(dataset, images, data_config, False, batch_size, num_workers=num_workers)
    return torch.cat([model(batch['pixel_values'].to(model.device, model.dtype)).logits.float().argmax(-1).cpu()
                      for batch in loader]) if images else torch.empty(0, dtype=torch.long)


def extract_and_score(model: TimmViTForImageClassification, dataset: datasets.Dataset,
                      output_dir: Union[str, Path], *, split: str, summary_file: str = SUMMARY_FILE,
                      metrics_file: str = METRICS_FILE, sharded: bool = True,
                      **options) -> Tuple[Extraction, Dict]:
    """The end of a run in one pass over the scored split: its attention summary and its test metrics.

    The predictions are the argmax of the logits of the extraction's own eager forward pass (the
    summary's ``logits``), not of a second ``Trainer.predict`` pass; they are scored as the training
    job scores test predictions (`analysis.core.metrics.classification_metrics`). When ``max_batches``
    leaves images out of the summary, a plain forward pass predicts the rest, so that the scores
    still cover the whole split (still one pass over it).

    Args:
        model: the trained ViT, on the device it runs on.
        dataset: the raw scored split (``image``, ``label``, optionally ``mask``; any transform set on
            it is ignored: the eval transform of the model's data config is applied).
        output_dir: where ``summary_file`` and ``metrics_file`` go.
        split: the split's name (``test``, or ``validation`` when test is missing or unlabeled).
        sharded: every process of the torch.distributed group calls this (`extract_to_file`); without a
            group one process does it all.
        **options: those of `extract_shard` (batch_size, max_batches, model_id, dataset_name, progress, ...).

    Returns:
        ``(extraction, test_metrics)``; ``test_metrics`` has the keys the training job writes to
        ``all_results.json``: ``test_<key>`` for every key of `classification_metrics`, ``test_split``,
        ``test_runtime`` (seconds of the pass).
    """
    output_dir = Path(output_dir)
    began = time.perf_counter()
    extraction = extract_to_file(model, dataset, output_dir / summary_file, metrics_path=output_dir / metrics_file,
                                 sharded=sharded, split=split, **options)
    labels, predictions = extraction.labels, extraction.predictions  # [M'], [M']
    if len(labels) < len(dataset):  # max_batches: the rest of the split, predicted only
        rest = range(len(labels), len(dataset))
        data_config = options.get('data_config') or model_data_config(model.timm_model)
        predictions = torch.cat([predictions, _predict_rows(model, dataset, rest, data_config,
                                                            options.get('batch_size', 64), options.get('num_workers', 0))])
        labels = torch.cat([labels, torch.as_tensor(dataset.with_format(None).select(rest)['label'], dtype=torch.long)])
    scores = classification_metrics(labels.numpy(), predictions.numpy(), model.class_names)
    metrics = {f'test_{k}': v for k, v in scores.items()}
    metrics['test_split'] = split
    metrics['test_runtime'] = round(time.perf_counter() - began, 4)
    return extraction, metrics


def extract_metrics(model: TimmViTForImageClassification, dataset: datasets.Dataset, **options) -> Extraction:
    """One pass that keeps labels, predictions and the attention metrics only (no maps, no file), e.g. for the
    background variants. Options of `extract_shard` (not keep_rows / full_maps / num_examples)."""
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        part = extract_shard(model, dataset, Path(tmp) / 'part.safetensors', keep_rows=False, full_maps=0,
                             num_examples=0, **options)
        result = merge_shards([part])
    result.runtime_s = time.perf_counter() - began
    return result


@torch.inference_mode()
def attend_images(model: TimmViTForImageClassification, images, data_config: Optional[Dict] = None) -> Dict:
    """Attention of the model on a few user images (any size: the eval transform resizes and crops).

    Args:
        model: the ViT.
        images: PIL images.
        data_config: timm data config (default: the model's).

    Returns:
        ``images`` ``[E, H, W, 3]`` uint8 (the crops the model saw), ``cls_maps`` ``[E, L, P]``
        (head-averaged CLS attention), ``cls_attention`` ``[E, L, H, P]``, ``rollout`` ``[E, P]``,
        ``probs`` ``[E, C]``, ``token_norms`` ``[E, L, N]`` (every token at every block's output),
        ``prefix_attention`` ``[E, L, H, prefix]`` (the CLS row on the prefix tokens).
    """
    model.eval()
    data_config = data_config or model_data_config(model.timm_model)
    pixel_values = image_inputs(images, eval_transform(data_config), model.token_layout)
    with capture_token_norms(model.timm_model) as norms:
        out = model(pixel_values.to(model.device, model.dtype), output_attentions=True)
    return attention_of_pass(model.token_layout, pixel_values, out.logits, out.attentions, norms, data_config)


def image_inputs(images, transform: Callable, layout: TokenLayout) -> torch.Tensor:
    """``[E, 3, H, W]``: PIL images (any mode, any size) through the model's eval ``transform``."""
    from data_scripts import to_rgb
    pixel_values = torch.stack([transform(to_rgb(img)) for img in images])
    check_input_size(pixel_values, layout)
    return pixel_values


def attention_of_pass(layout: TokenLayout, pixel_values: torch.Tensor, logits: torch.Tensor,
                      attentions: Sequence[torch.Tensor], norms: Sequence[torch.Tensor], data_config: Dict) -> Dict:
    """What `attend_images` returns, from a pass already run on ``pixel_values``: its logits, every block's map
    and every block's token norms (`capture_token_norms`)."""
    attentions = [a.detach().float().cpu() for a in attentions]
    cls_query = torch.stack([layout.cls_query(a) for a in attentions], dim=1)  # [E, L, H, 1, N]
    cls_rows = layout.cls_to_patches(cls_query)  # [E, L, H, P]
    return {
        'images': _unnormalise(pixel_values.cpu(), data_config), 'cls_attention': cls_rows,
        'cls_maps': cls_rows.mean(dim=2), 'rollout': rollout_cls(attentions, layout=layout),
        'probs': logits.detach().float().softmax(-1).cpu(),
        'token_norms': torch.stack(norms, dim=1).cpu(),  # [E, L, N]
        'prefix_attention': layout.cls_to_prefix(cls_query),  # [E, L, H, prefix]
    }
