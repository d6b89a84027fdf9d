"""What a compression found: ``compress.json`` as dataclasses, and its line in a comparison table."""
import dataclasses
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from analysis.compress.speed import SPEED_BATCH_SIZE, SPEED_THREADS

HEADS_KEPT = ('none: timm\'s VisionTransformer has one num_heads for every block and head_dim = embed_dim / '
              'num_heads, so fewer heads cannot be rebuilt from config.json')
FLOPS_COUNTED = 'torch.utils.flop_counter, one image, a multiply-add = 2 FLOPs, attention included'
SPEED_MEASURED = ('alternately in one process (full, candidates, ... round by round); the speed-up is the median of '
                  'the per-round ratios')


@dataclass
class Candidate:
    """One depth the search walked (an entry of compress.json's ``search``)."""
    depth: int
    kept_blocks: List[int]  # 0-based, in depth order
    candidate: str  # 'layer skip', 'truncation' or 'truncation = layer skip': where the kept blocks come from
    probe_accuracy: float  # validation accuracy of a linear probe on the last kept block's CLS token
    val_accuracy_before: float  # before distillation
    val_accuracy: float  # after distillation
    val_macro_f1: float
    within_tolerance: bool
    distill_seconds: float
    # measured once the search is over, every candidate alternately with the full model (`measure_candidates`)
    speedup: Optional[float] = None
    gflops: Optional[float] = None
    parameters: Optional[int] = None
    images_per_s: Optional[float] = None  # median over rounds


@dataclass(kw_only=True)
class CompressResult:
    """What compress.json holds (`to_json`); the entries about the compressed model are None until there is one."""
    outcome: Optional[str] = None  # 'compressed', 'single block' or 'nothing removable'
    message: Optional[str] = None  # one line: what the command prints
    base_model: Dict  # path, name, hub_id, weights_sha256, architecture, num_blocks, num_heads
    settings: Dict  # the command's settings, the distillation's learning rate and seed
    blocks: Dict  # num_full, kept, num_kept, removed
    heads: Dict  # per_block, num_full, num_kept, removed (why none are)
    parameters: Optional[Dict] = None  # full, compressed, ratio
    gflops: Optional[Dict] = None  # full, compressed, ratio, input_size, counted
    throughput: Optional[Dict] = None  # device, threads, batch_size, rounds, images_per_s, speedup, per_round
    validation: Dict  # full_accuracy, threshold, compressed_accuracy, num_images
    test: Dict  # split, full / compressed: `split_scores`
    search: List[Candidate] = field(default_factory=list)  # every depth walked, in order
    selection: Optional[Dict] = None  # `Selection.to_json`
    seconds: Dict[str, float] = field(default_factory=dict)  # selection, search, total

    def to_json(self) -> Dict:
        return dataclasses.asdict(self)

    def full_numbers(self) -> str:
        """The full model's scores, for the line that ends a compression."""
        full = self.test['full']
        return (f'full model: validation accuracy {self.validation["full_accuracy"]:.4f}, {self.test["split"]} '
                f'accuracy {full["accuracy"]:.4f}, macro F1 {full["macro_f1"]:.4f}')


def split_scores(metrics: Mapping) -> Dict:
    """Accuracy, macro F1 and F1 per class of `analysis.train.job.evaluate_test`'s metrics."""
    return {'accuracy': metrics['test_accuracy'], 'macro_f1': metrics['test_macro_f1'],
            'f1_per_class': metrics['test_f1_per_class']}


def full_model_result(base_model: Dict, settings: Dict, num_heads: int, val_accuracy: float,
                      max_accuracy_drop: float, num_val_images: int, test_metrics: Mapping) -> CompressResult:
    """The result before anything is removed: every block kept, the full model's scores."""
    num_blocks = base_model['num_blocks']
    return CompressResult(
        base_model=base_model, settings=settings,
        blocks={'num_full': num_blocks, 'kept': list(range(num_blocks)), 'num_kept': num_blocks, 'removed': []},
        heads={'per_block': num_heads, 'num_full': num_blocks * num_heads, 'num_kept': num_blocks * num_heads,
               'removed': HEADS_KEPT},
        validation={'full_accuracy': val_accuracy, 'threshold': val_accuracy - max_accuracy_drop,
                    'compressed_accuracy': None, 'num_images': num_val_images},
        test={'split': test_metrics['test_split'], 'full': split_scores(test_metrics), 'compressed': None})


def compressed_result(result: CompressResult, kept: Candidate, full_cost: Mapping, input_size: Sequence[int],
                      images_per_s: Mapping[str, List[float]], test_metrics: Mapping, message: str) -> CompressResult:
    """``result`` with the compressed model ``kept`` in it.

    Args:
        full_cost: ``{"gflops", "parameters"}`` of the full model.
        input_size: ``(3, H, W)``, the image the GFLOPs were counted on.
        images_per_s: `inference_throughput` of the full model and ``kept``, named ``full`` and ``compressed``.
        test_metrics: the compressed model's `analysis.train.job.evaluate_test` metrics.
    """
    num_full = result.blocks['num_full']
    rounds = len(images_per_s['full'])
    return dataclasses.replace(
        result, outcome='compressed', message=message,
        blocks={'num_full': num_full, 'kept': kept.kept_blocks, 'num_kept': kept.depth,
                'removed': [b for b in range(num_full) if b not in kept.kept_blocks]},
        heads={**result.heads, 'num_kept': kept.depth * result.heads['per_block']},
        parameters={'full': full_cost['parameters'], 'compressed': kept.parameters,
                    'ratio': full_cost['parameters'] / kept.parameters},
        gflops={'full': full_cost['gflops'], 'compressed': kept.gflops, 'ratio': full_cost['gflops'] / kept.gflops,
                'input_size': list(input_size), 'counted': FLOPS_COUNTED},
        throughput={'device': 'cpu', 'threads': SPEED_THREADS, 'batch_size': SPEED_BATCH_SIZE, 'rounds': rounds,
                    'images_per_s': {name: statistics.median(rates) for name, rates in images_per_s.items()},
                    'speedup': kept.speedup, 'per_round': dict(images_per_s), 'measured': SPEED_MEASURED},
        validation={**result.validation, 'compressed_accuracy': kept.val_accuracy},
        test={'split': test_metrics['test_split'], 'full': result.test['full'],
              'compressed': split_scores(test_metrics)})


def compress_summary(compress: Mapping) -> Dict:
    """The numbers of one compression (a parsed compress.json) that go into a comparison table (e.g. the study's).

    Returns:
        ``{"outcome", "num_blocks", "num_kept", "kept_blocks" (0-based), "speedup", "gflops_ratio",
        "val_accuracy_full", "val_accuracy_compressed", "test_accuracy_full", "test_accuracy_compressed",
        "test_macro_f1_full", "test_macro_f1_compressed", "min_class_f1_compressed", "depths_tried"}``;
        the compressed model's entries are None when no block was removed.
    """
    compressed = compress['test'].get('compressed')
    full = compress['test']['full']
    return {
        'outcome': compress['outcome'],
        'num_blocks': compress['blocks']['num_full'],
        'num_kept': compress['blocks']['num_kept'],
        'kept_blocks': compress['blocks']['kept'],
        'speedup': (compress.get('throughput') or {}).get('speedup'),
        'gflops_ratio': (compress.get('gflops') or {}).get('ratio'),
        'val_accuracy_full': compress['validation']['full_accuracy'],
        'val_accuracy_compressed': compress['validation']['compressed_accuracy'],
        'test_accuracy_full': full['accuracy'],
        'test_accuracy_compressed': compressed['accuracy'] if compressed else None,
        'test_macro_f1_full': full['macro_f1'],
        'test_macro_f1_compressed': compressed['macro_f1'] if compressed else None,
        'min_class_f1_compressed': min(compressed['f1_per_class'].values()) if compressed else None,
        'depths_tried': [{'depth': s['depth'], 'val_accuracy': s['val_accuracy']} for s in compress['search']],
    }
