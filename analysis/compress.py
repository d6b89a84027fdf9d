"""A smaller, faster ViT from a trained one: blocks removed by importance, recovered by distillation.

``python -m analysis compress --model DIR --output_dir OUT`` (`compress_run`):

1. **What to remove.** The importance study's layer skip (`analysis.importance.skip_blocks`) ranks
   the blocks: greedily, the block whose skipping (on top of those already skipped) changes the
   full model's predictions least is removed next (KL divergence to the full model's logits on
   training images, eval transform). The linear probe (`analysis.importance.linear_probe`) gives
   the other natural candidate, truncation: the first ``d`` blocks, whose CLS token the probe
   already reads. For each depth the candidate whose last CLS token a fresh linear probe
   classifies better (fit on train, scored on validation) is distilled.
2. **A real smaller model.** The candidate is a timm ``VisionTransformer`` with ``depth = d``, its
   blocks the kept blocks' weights renumbered 0..d-1, so ``timm.create_model`` rebuilds it from
   ``config.json`` (``model_args.depth``). Heads are not removed: timm's ViT has one
   ``num_heads`` for every block and ``head_dim = embed_dim / num_heads``, so fewer heads cannot be
   written into ``config.json``, and zeroed heads cost the same compute.
3. **Recovery.** A short knowledge-distillation fine-tune (Hinton et al. 2015) with the training
   job's Trainer, data and seeded augmentation (`analysis.training.build_trainer` with
   `DistillationTrainer`): ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) +
   (1 - alpha) * CE(student, labels)``, the full model as the frozen teacher.
4. **Search over depth.** Binary search for the smallest depth whose validation accuracy after
   distillation is within ``max_accuracy_drop`` of the full model's (accuracy is assumed to grow
   with depth; every depth walked is recorded). The test split is used once, for the final numbers.
5. **Measured, not estimated.** Parameters, GFLOPs (``torch.utils.flop_counter``) and CPU
   inference images/s of the full and the compressed model, measured alternately in one process
   (2 threads, batch 64), and accuracy / macro F1 / per-class F1 of both on the test split.

The output directory is a normal run directory (``config.json`` + ``model.safetensors``,
``all_results.json``, ``run_config.json``, attention summary, report, card) plus ``compress.json``.
"""
import copy
import hashlib
import json
import logging
import re
import shutil
import statistics
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import datasets
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser, Trainer

from data_scripts import DataArguments
from data_scripts.files import write_json

from . import plots, training  # the training job: arguments, data, Trainer, evaluation, analysis
from .importance import cls_features, image_tensors, linear_probe, skip_blocks
from .metrics import classification_metrics
from .modeling import CONFIG_NAME, WEIGHTS_NAME, TimmViTForImageClassification, vit_attention_modules
from .run_files import COMPRESS_FILE, RESULTS_FILE, RUN_CONFIG_FILE, read_json, read_optional_json
from .transforms import model_data_config

_logger = logging.getLogger(__name__)

DEFAULT_MAX_ACCURACY_DROP = 0.01
DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5
DEFAULT_SELECTION_IMAGES = 256  # training images that rank the blocks (the greedy order costs L^2 / 2 passes)
SPEED_BATCH_SIZE = 64  # the acceptance measurement: CPU inference, batch 64, 2 threads
SPEED_THREADS = 2


# --------------------------------------------------------------------------- distillation


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = DEFAULT_TEMPERATURE, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """Knowledge distillation loss (Hinton et al. 2015), a mean over the batch.

    ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, labels)``;
    the ``T^2`` keeps the soft term's gradients on the scale of the hard term's whatever ``T``.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]``.
        labels: ``[B]`` class indices.
        temperature: ``T`` > 0.
        alpha: weight of the soft (teacher) term, in [0, 1].
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)  # [B, C]
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)  # [B, C]
    soft = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction='batchmean')
    hard = F.cross_entropy(student_logits, labels)
    return alpha * temperature ** 2 * soft + (1.0 - alpha) * hard


class DistillationTrainer(Trainer):
    """The training job's Trainer with `distillation_loss` against a frozen teacher.

    The teacher runs in eval mode on the same device, without gradients, on the very batch the
    student sees (the same augmented images).

    Args:
        teacher: the full model.
        temperature / alpha: see `distillation_loss`.
        *args / **kwargs: those of `transformers.Trainer`.
    """
    loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides it by the accumulation steps

    def __init__(self, *args, teacher: nn.Module, temperature: float = DEFAULT_TEMPERATURE,
                 alpha: float = DEFAULT_ALPHA, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.to(self.args.device).eval().requires_grad_(False)
        self.temperature = temperature
        self.alpha = alpha

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(pixel_values=inputs['pixel_values'])
        with torch.no_grad():
            teacher_logits = self.teacher(pixel_values=inputs['pixel_values']).logits
        loss = distillation_loss(outputs.logits, teacher_logits, inputs['labels'], self.temperature, self.alpha)
        return (loss, outputs) if return_outputs else loss


# --------------------------------------------------------------------------- the smaller model


def check_compressible(model: nn.Module) -> VisionTransformer:
    """The timm ``VisionTransformer`` inside the model; anything else cannot lose blocks through config.json."""
    vit = getattr(model, 'timm_model', model)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f'{type(vit).__name__} is not a timm VisionTransformer (vit_*, deit_*); only those can be '
                         'rebuilt with fewer blocks from config.json.')
    vit_attention_modules(vit)  # standard blocks with timm Attention, or a clear error
    return vit


def kept_blocks_state_dict(state_dict: Mapping[str, torch.Tensor], kept: Sequence[int]) -> Dict[str, torch.Tensor]:
    """A timm ViT state dict with only the ``kept`` blocks, renumbered ``0..len(kept)-1`` in the given order.

    Everything outside ``blocks.*`` (patch embedding, tokens, final norm, head) is kept as it is.
    """
    new_index = {int(old): new for new, old in enumerate(kept)}
    out = {}
    for key, value in state_dict.items():
        match = re.fullmatch(r'blocks\.(\d+)\.(.+)', key)
        if match is None:
            out[key] = value
        elif int(match.group(1)) in new_index:
            out[f'blocks.{new_index[int(match.group(1))]}.{match.group(2)}'] = value
    return out


def build_student(teacher: TimmViTForImageClassification, kept: Sequence[int]) -> TimmViTForImageClassification:
    """The ViT with only the ``kept`` blocks (0-based, in depth order) of ``teacher``, same everything else.

    Its config is the teacher's with ``model_args.depth = len(kept)``, so the checkpoint it saves
    rebuilds with ``timm.create_model`` / transformers like any other. Before any training its
    logits equal the teacher's with the other blocks skipped (`analysis.importance.skip_blocks`).
    """
    vit = check_compressible(teacher)
    num_blocks = len(vit.blocks)
    kept = [int(b) for b in kept]
    if not kept or sorted(set(kept)) != kept or not 0 <= kept[0] <= kept[-1] < num_blocks:
        raise ValueError(f'kept blocks must be increasing block indices in 0..{num_blocks - 1}, got {kept}')
    config = copy.deepcopy(teacher.config)
    config.model_args = {**(config.model_args or {}), 'depth': len(kept)}
    student = TimmViTForImageClassification(config)
    student.timm_model.load_state_dict(kept_blocks_state_dict(vit.state_dict(), kept))
    return student.to(next(vit.parameters()).device)


# --------------------------------------------------------------------------- what to remove


@torch.inference_mode()
def logits_of(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """``[M, C]`` float32 logits of the timm ViT inside ``model``."""
    vit = getattr(model, 'timm_model', model).eval()
    device = next(vit.parameters()).device
    return torch.cat([vit(pixel_values[i:i + batch_size].to(device)).float().cpu()
                      for i in range(0, len(pixel_values), batch_size)])


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean ``KL(softmax(reference) || softmax(logits))`` over images; ``[M, C]`` each."""
    return float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference_logits, -1), log_target=True,
                          reduction='batchmean'))


def removal_order(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor,
                  batch_size: int = 128) -> Dict:
    """Greedy block removal by layer skipping: each step skips the block that changes the predictions least.

    Step ``k`` tries every remaining block on top of the ``k`` already skipped and removes the one
    with the smallest KL divergence from the full model's predictions (ties: the later block).
    The last block standing is never removed.

    Args:
        model: the full ViT (or its wrapper).
        pixel_values: ``[M, 3, H, W]`` images (eval transform) to measure on.
        labels: ``[M]``, for the accuracy that is recorded alongside.
        batch_size: images per forward pass.

    Returns:
        ``{"order": [L - 1 block indices, first removed first], "kl": [...], "accuracy": [...]}``,
        the last two after each removal.
    """
    num_blocks = len(check_compressible(model).blocks)
    reference = logits_of(model, pixel_values, batch_size)
    removed: List[int] = []
    kls: List[float] = []
    accs: List[float] = []
    for _ in range(num_blocks - 1):
        scores = []
        for block in (b for b in range(num_blocks) if b not in removed):
            with skip_blocks(model, removed + [block]):
                logits = logits_of(model, pixel_values, batch_size)
            scores.append((mean_kl(reference, logits), -block, float((logits.argmax(-1) == labels).float().mean())))
        kl, negative_block, acc = min(scores)
        removed.append(-negative_block)
        kls.append(kl)
        accs.append(acc)
    return {'order': removed, 'kl': kls, 'accuracy': accs}


def kept_after_removal(order: Sequence[int], num_blocks: int, depth: int) -> List[int]:
    """The blocks left when the first ``num_blocks - depth`` blocks of ``order`` are removed, in depth order."""
    return sorted(set(range(num_blocks)) - set(order[:num_blocks - depth]))


# --------------------------------------------------------------------------- measuring


def num_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in getattr(model, 'timm_model', model).parameters()))


@contextmanager
def eager_attention(vit: nn.Module) -> Iterator[None]:
    """timm's eager attention path while open (fused SDPA on CPU is invisible to the FLOP counter)."""
    modules = vit_attention_modules(vit)
    flags = [attn.fused_attn for _, attn in modules]
    try:
        for _, attn in modules:
            attn.fused_attn = False
        yield
    finally:
        for (_, attn), fused in zip(modules, flags):
            attn.fused_attn = fused


def gflops(model: nn.Module) -> float:
    """GFLOPs of one image through the ViT (`torch.utils.flop_counter`: a multiply-add counts 2), attention included."""
    vit = getattr(model, 'timm_model', model).eval()
    parameter = next(vit.parameters())
    x = torch.zeros(1, *model_data_config(vit)['input_size'], device=parameter.device, dtype=parameter.dtype)
    with eager_attention(vit), FlopCounterMode(display=False) as counter, torch.no_grad():
        vit(x)
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def inference_throughput(models: Mapping[str, nn.Module], *, batch_size: int = SPEED_BATCH_SIZE,
                         threads: int = SPEED_THREADS, rounds: int = 5, batches_per_round: int = 2,
                         device: str = 'cpu', dtype: torch.dtype = torch.float32) -> Dict[str, List[float]]:
    """Inference images/s of several models, measured alternately in this process.

    Every round runs ``batches_per_round`` batches through each model in turn (the order reversed
    every other round), so a change in the machine's load hits all models alike; compare the
    models round by round (`speedup`). The models are moved to ``device`` / ``dtype`` and set to
    eval mode.

    Args:
        models: ``{name: model}``, all with the same input size (the first one's data config).
        batch_size: images per forward pass.
        threads: torch intra-op threads while measuring (restored after).
        rounds: measurement rounds (after one warm-up batch per model).
        batches_per_round: batches per model per round.
        device / dtype: where and in which precision to run (``cuda`` + ``torch.bfloat16`` for GPUs).

    Returns:
        ``{name: [images/s in each round]}``.
    """
    vits = {name: getattr(m, 'timm_model', m).to(device=device, dtype=dtype).eval() for name, m in models.items()}
    input_size = model_data_config(next(iter(vits.values())))['input_size']
    x = torch.randn(batch_size, *input_size, device=device, dtype=dtype)  # the content does not change the cost

    def sync() -> None:
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize()

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for vit in vits.values():  # warm-up: allocator, kernels, caches
            vit(x)
        images_per_s: Dict[str, List[float]] = {name: [] for name in vits}
        for r in range(rounds):
            for name in (list(vits) if r % 2 == 0 else list(vits)[::-1]):
                sync()
                start = time.perf_counter()
                for _ in range(batches_per_round):
                    vits[name](x)
                sync()
                images_per_s[name].append(batch_size * batches_per_round / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(previous_threads)
    return images_per_s


def speedup(images_per_s: Mapping[str, Sequence[float]], model: str, reference: str) -> float:
    """Median over rounds of ``images/s(model) / images/s(reference)`` (same rounds of `inference_throughput`)."""
    return float(statistics.median(m / r for m, r in zip(images_per_s[model], images_per_s[reference])))


# --------------------------------------------------------------------------- the search


def search_depth(num_blocks: int, within_tolerance: Callable[[int], bool]) -> Tuple[Optional[int], List[int]]:
    """Binary search for the smallest depth in ``1..num_blocks - 1`` that is within tolerance.

    Accuracy is assumed to grow with depth (the full model, ``num_blocks``, is within tolerance by
    definition), so ``ceil(log2(num_blocks))`` candidates are trained at most.

    Args:
        num_blocks: depth of the full model.
        within_tolerance: trains and scores the candidate of a depth; True when it is good enough.

    Returns:
        ``(smallest depth within tolerance, or None when no depth below num_blocks is, depths walked in order)``.
    """
    low, high = 1, num_blocks  # invariant: depth `high` is within tolerance
    walked = []
    while low < high:
        mid = (low + high) // 2
        walked.append(mid)
        if within_tolerance(mid):
            high = mid
        else:
            low = mid + 1
    return (high if high < num_blocks else None), walked


# --------------------------------------------------------------------------- the command


# TrainingArguments of the full model's run that its compression keeps: the same batches, seed and precision.
KEPT_TRAINING_KEYS = ('per_device_train_batch_size', 'per_device_eval_batch_size', 'seed', 'data_seed', 'weight_decay',
                      'bf16', 'fp16', 'tf32', 'gradient_accumulation_steps', 'max_grad_norm', 'optim',
                      'dataloader_num_workers')
# A short fine-tune from trained weights, scored once at its end (the search scores it itself).
DISTILL_DEFAULTS = {'learning_rate': 5e-4, 'warmup_steps': 0.1, 'lr_scheduler_type': 'cosine', 'eval_strategy': 'no',
                    'save_strategy': 'no', 'report_to': 'none', 'logging_steps': 10}
DEFAULT_DISTILL_EPOCHS = 3.0
# train_hf flags the command decides itself.
OWN_FLAGS = {'--model_name_or_path': '--model', '--model_args': 'the search', '--output_dir': '--output_dir',
             '--num_train_epochs': '--distill_epochs', '--push_to_hub': 'python -m analysis push OUT',
             '--resume_from_checkpoint': 'nothing (candidates are short and start over)'}
DATASET_FLAGS = ('--dataset_name', '--dataset', '--train_dir', '--data_dir')
SEARCH_DIR = 'compress_search'  # OUT/compress_search/depth_<d>/: the candidates' Trainer output (logs, no weights)
CLAIM_FILE = 'run.json'  # OUT/compress_search/run.json: which compression OUT holds (written first)


def _flag_names(flags: Sequence[str]) -> List[str]:
    return [f.split('=', 1)[0] for f in flags if f.startswith('--')]


def distill_parser(model_dir: Path, run_config: Optional[Mapping], distill_epochs: float,
                   flags: Sequence[str]) -> HfArgumentParser:
    """train_hf's argument parser with the distillation's defaults: the full run's data, batches, seed and
    precision (its ``run_config.json``), then `DISTILL_DEFAULTS`; ``flags`` (train_hf flags) override them."""
    given = _flag_names(flags)
    taken = [f'{f} (set by {OWN_FLAGS[f]})' for f in given if f in OWN_FLAGS]
    if taken:
        raise ValueError(f'compress sets {", ".join(taken)} itself; leave them out.')
    defaults: Dict = {}
    if run_config is not None:
        data_fields = DataArguments.__dataclass_fields__
        defaults.update({k: v for k, v in (run_config.get('data') or {}).items() if k in data_fields and v is not None})
        full_training = run_config.get('training') or {}
        defaults.update({k: full_training[k] for k in KEPT_TRAINING_KEYS if full_training.get(k) is not None})
        if (run_config.get('model') or {}).get('min_crop_scale') is not None:
            defaults['min_crop_scale'] = run_config['model']['min_crop_scale']
    elif not any(f in DATASET_FLAGS for f in given):
        raise ValueError(f'{model_dir} has no {RUN_CONFIG_FILE}, so its dataset is unknown: name it '
                         '(--dataset_name synthetic|oxford102|<hub id>, --train_dir DIR, ...).')
    defaults.update(DISTILL_DEFAULTS, num_train_epochs=distill_epochs, model_name_or_path=str(model_dir))
    parser = HfArgumentParser((training.ModelArguments, DataArguments, training.FlowerTrainingArguments))
    parser.set_defaults(**defaults)
    return parser


def weights_sha256(model_dir: Path) -> str:
    digest = hashlib.sha256()
    with open(model_dir / WEIGHTS_NAME, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def published_id(model_dir: Path, run_config: Optional[Mapping]) -> Optional[str]:
    """The Hub repo id the full model was published under, if its files say so.

    ``train_hf.py --push_to_hub --hub_model_id`` records it in ``run_config.json``; ``python -m
    analysis push`` renders the card (README.md) with the repo id as its model name.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    candidates = [((run_config or {}).get('training') or {}).get('hub_model_id')]
    if (model_dir / 'README.md').is_file():
        try:
            candidates.append(ModelCard.load(model_dir / 'README.md').data.to_dict().get('model_name'))
        except Exception as e:  # a hand-edited card: no id from it
            _logger.warning('could not read the model card of %s (%s)', model_dir, e)
    for candidate in candidates:
        if candidate and candidate.count('/') == 1:
            try:
                validate_repo_id(candidate)
                return candidate
            except HFValidationError:
                pass
    return None


def claim_output_dir(output_dir: Path, claim: Mapping) -> None:
    """Refuses an output directory that holds anything but this same compression (same model, same settings).

    Raises:
        ValueError: ``output_dir`` holds another run (a training run, another model's compression, other settings).
    """
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise NotADirectoryError(f'--output_dir {output_dir} is a file; give a new folder.')
    if not any(output_dir.iterdir()):
        return
    held = read_optional_json(output_dir / SEARCH_DIR / CLAIM_FILE)
    if held is None:
        compress = read_optional_json(output_dir / COMPRESS_FILE)
        held = None if compress is None else {k: compress.get(k) for k in claim}
    if held is None:
        what = 'a training run' if (output_dir / RESULTS_FILE).is_file() else 'other files'
        raise ValueError(f'--output_dir {output_dir} already holds {what}; give a new folder (or delete it).')
    if json.loads(json.dumps(held)) != json.loads(json.dumps(claim)):
        differ = sorted(k for k in set(held) | set(claim) if held.get(k) != claim.get(k))
        raise ValueError(f'--output_dir {output_dir} holds another compression (different {", ".join(differ)}); '
                         'give a new folder (or delete it).')
    _logger.info('%s holds this same compression; running it again', output_dir)


def _fresh(dataset: datasets.DatasetDict) -> datasets.DatasetDict:
    """The splits without transforms, for another Trainer (`build_trainer` attaches its own)."""
    return datasets.DatasetDict({split: data.with_format(None) for split, data in dataset.items()})


def _test_numbers(metrics: Mapping) -> Dict:
    return {'accuracy': metrics['test_accuracy'], 'macro_f1': metrics['test_macro_f1'],
            'f1_per_class': metrics['test_f1_per_class']}


def compress_run(
        model_dir,
        output_dir,
        *,
        max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
        distill_epochs: float = DEFAULT_DISTILL_EPOCHS,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        selection_images: int = DEFAULT_SELECTION_IMAGES,
        speed_rounds: int = 5,
        base_model: Optional[str] = None,
        flags: Sequence[str] = (),
) -> Dict:
    """Compresses the model of a training run into ``output_dir``: the whole command (see the module doc).

    Args:
        model_dir: the full model's output directory (config.json, model.safetensors; run_config.json
            gives the dataset and the training settings kept).
        output_dir: where the compressed run goes (new, empty, or an earlier run of this same compression).
        max_accuracy_drop: the tolerance, in [0, 1): validation accuracy may fall this much below the full model's.
        distill_epochs: epochs of each candidate's distillation.
        temperature / alpha: see `distillation_loss`.
        selection_images: training images (eval transform, shuffled with the run's seed) that rank the blocks.
        speed_rounds: rounds of the alternating CPU throughput measurement.
        base_model: the full model's Hub repo id, when its files do not say it (for the card's ``base_model``).
        flags: train_hf flags that override the full run's settings (``--learning_rate``, ``--max_steps``,
            ``--cache_dir``, ...).

    Returns:
        what ``compress.json`` holds: ``outcome`` (``compressed``, ``single block`` or ``nothing removable``),
        ``message`` (one line), ``base_model``, ``settings``, ``blocks``, ``heads``, ``parameters``,
        ``gflops``, ``throughput``, ``validation``, ``test`` (``full`` / ``compressed``: accuracy, macro F1, F1
        per class), ``search`` (every depth walked), ``selection``, ``seconds``. Without a compressed model
        the entries about it are None and ``output_dir`` holds compress.json, its figure and the search logs.
    """
    if not 0.0 <= max_accuracy_drop < 1.0:
        raise ValueError(f'--max_accuracy_drop must lie in [0, 1) (a share of accuracy, 0.01 = 1 point), '
                         f'got {max_accuracy_drop}')
    if not distill_epochs > 0:
        raise ValueError(f'--distill_epochs must be > 0, got {distill_epochs}')
    if not temperature > 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f'--temperature must be > 0 and --alpha in [0, 1]; got {temperature} and {alpha}')
    if selection_images < 2 or speed_rounds < 1:
        raise ValueError(f'--selection_images must be >= 2 and --speed_rounds >= 1; got {selection_images}, '
                         f'{speed_rounds}')
    model_dir, output_dir = Path(model_dir).expanduser(), Path(output_dir).expanduser()
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (model_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f'--model {model_dir} has no {" / ".join(missing)}: give the output directory of a '
                                'training run.')
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError('--output_dir is the full model\'s own folder; give a new folder for the compressed model.')
    started = time.time()
    run_config = read_optional_json(model_dir / RUN_CONFIG_FILE)
    parser = distill_parser(model_dir, run_config, distill_epochs, flags)

    def arguments(folder: Path):
        return parser.parse_args_into_dataclasses(args=[*flags, '--output_dir', str(folder)])

    model_args, data_args, training_args = arguments(output_dir)
    settings = {'max_accuracy_drop': max_accuracy_drop, 'distill_epochs': distill_epochs, 'temperature': temperature,
                'alpha': alpha, 'selection_images': selection_images, 'flags': list(flags),
                'learning_rate': training_args.learning_rate, 'seed': training_args.seed}
    base = {'path': str(model_dir.resolve()), 'name': model_dir.resolve().name,
            'hub_id': base_model or published_id(model_dir, run_config), 'weights_sha256': weights_sha256(model_dir)}
    claim = {'base_model': base, 'settings': settings}
    claim_output_dir(output_dir, claim)
    write_json(output_dir / SEARCH_DIR / CLAIM_FILE, claim)

    dataset = training.load_data(data_args, training_args)
    teacher = TimmViTForImageClassification.from_pretrained(str(model_dir)).eval()
    class_names = dataset['train'].features['label'].names
    if teacher.class_names != class_names:
        raise ValueError(f'{model_dir} was trained for classes {teacher.class_names}, the dataset has {class_names}; '
                         'compress a model on the dataset it was trained on.')
    vit = check_compressible(teacher)
    num_blocks, num_heads = len(vit.blocks), vit.blocks[0].attn.num_heads
    base.update(architecture=teacher.config.architecture, num_blocks=num_blocks, num_heads=num_heads)

    # The full model, measured as the candidates will be: validation (the search), test (the report).
    val_x, val_y = image_tensors(teacher, dataset['validation'])
    full_val = share_correct(predict_labels(teacher, val_x), val_y)
    full_data = _fresh(dataset)
    full_test = training.evaluate_test(training.build_trainer(teacher, full_data, model_args, training_args),
                                       full_data, class_names)
    compress: Dict = {
        'outcome': None, 'message': None, 'base_model': base, 'settings': settings,
        'blocks': {'num_full': num_blocks, 'kept': list(range(num_blocks)), 'num_kept': num_blocks, 'removed': []},
        'heads': {'per_block': num_heads, 'num_full': num_blocks * num_heads, 'num_kept': num_blocks * num_heads,
                  'removed': 'none: timm\'s VisionTransformer has one num_heads for every block and head_dim = '
                             'embed_dim / num_heads, so fewer heads cannot be rebuilt from config.json'},
        'parameters': None, 'gflops': None, 'throughput': None,
        'validation': {'full_accuracy': full_val, 'threshold': full_val - max_accuracy_drop,
                       'compressed_accuracy': None, 'num_images': int(len(val_y))},
        'test': {'split': full_test['test_split'], 'full': _test_numbers(full_test), 'compressed': None},
        'search': [], 'selection': None, 'seconds': {},
    }
    full_numbers = (f'full model: validation accuracy {full_val:.4f}, {full_test["test_split"]} accuracy '
                    f'{full_test["test_accuracy"]:.4f}, macro F1 {full_test["test_macro_f1"]:.4f}')
    if num_blocks == 1:
        return _without_compression(compress, output_dir, 'single block',
                                    f'{model_dir} has a single block, so there is no block to remove; {full_numbers}')

    # 1. What to remove: the layer-skip order and the probe, on training images (validation decides later).
    selection_started = time.time()
    subset = dataset['train'].shuffle(seed=training_args.seed).select(range(min(selection_images, len(dataset['train']))))
    train_x, train_y = image_tensors(teacher, subset)
    removal = removal_order(teacher, train_x, train_y)
    teacher_train_cls = cls_features(teacher, train_x)  # [L, M, D]
    teacher_val_cls = cls_features(teacher, val_x)  # [L, M', D]
    probe = linear_probe(teacher_train_cls, train_y, teacher_val_cls, val_y, seed=training_args.seed)
    compress['selection'] = {'removal_order': removal['order'], 'removal_kl': removal['kl'],
                             'removal_accuracy': removal['accuracy'], 'probe_accuracy': probe,
                             'num_images': int(len(train_y)), 'probe_scored_on': 'validation'}
    compress['seconds']['selection'] = time.time() - selection_started

    def candidate(depth: int) -> Tuple[List[int], str, float]:
        """The kept blocks at this depth: truncation or the layer-skip order, whichever a fresh probe reads better."""
        skip_kept = kept_after_removal(removal['order'], num_blocks, depth)
        truncation_kept = list(range(depth))
        if skip_kept == truncation_kept:
            return skip_kept, 'truncation = layer skip', probe[depth - 1]
        shortened = build_student(teacher, skip_kept)
        skip_probe = linear_probe(cls_features(shortened, train_x)[-1:], train_y, cls_features(shortened, val_x)[-1:],
                                  val_y, seed=training_args.seed)[0]
        if skip_probe > probe[depth - 1]:
            return skip_kept, 'layer skip', skip_probe
        return truncation_kept, 'truncation', probe[depth - 1]

    # 2-3. Distil each depth the search walks; keep the smallest within tolerance.
    students: Dict[int, TimmViTForImageClassification] = {}
    runtimes: Dict[int, float] = {}

    def within_tolerance(depth: int) -> bool:
        kept, source, probe_accuracy = candidate(depth)
        student = build_student(teacher, kept)
        before = share_correct(predict_labels(student, val_x), val_y)
        folder = output_dir / SEARCH_DIR / f'depth_{depth}'
        shutil.rmtree(folder, ignore_errors=True)
        candidate_args = arguments(folder)[2]
        trainer = training.build_trainer(student, _fresh(dataset), model_args, candidate_args, DistillationTrainer,
                                         teacher=teacher, temperature=temperature, alpha=alpha)
        runtimes[depth] = training.train(trainer, candidate_args)
        (folder / WEIGHTS_NAME).unlink(missing_ok=True)  # the search keeps its logs; only the kept model is saved
        predictions = predict_labels(student, val_x)
        val_accuracy = share_correct(predictions, val_y)
        entry = {'depth': depth, 'kept_blocks': kept, 'candidate': source, 'probe_accuracy': probe_accuracy,
                 'val_accuracy_before': before, 'val_accuracy': val_accuracy,
                 'val_macro_f1': macro_f1(val_y, predictions, len(class_names)),
                 'within_tolerance': val_accuracy >= compress['validation']['threshold'] - 1e-9,
                 'distill_seconds': runtimes[depth], 'speedup': None, 'gflops': None, 'parameters': None}
        compress['search'].append(entry)
        students[depth] = student
        _logger.info('depth %d (%s, blocks %s): validation accuracy %.4f before, %.4f after distillation (%s)',
                     depth, source, kept, before, val_accuracy,
                     'within tolerance' if entry['within_tolerance'] else 'outside tolerance')
        return entry['within_tolerance']

    search_started = time.time()
    depth, _ = search_depth(num_blocks, within_tolerance)
    compress['seconds']['search'] = time.time() - search_started

    # 5. Measured: every model the search made, alternately with the full model, on the CPU.
    measured = {'full': teacher, **{f'depth_{d}': s for d, s in students.items()}}
    images_per_s = inference_throughput(measured, rounds=speed_rounds)
    for entry in compress['search']:
        name = f'depth_{entry["depth"]}'
        entry.update(speedup=speedup(images_per_s, name, 'full'), images_per_s=statistics.median(images_per_s[name]),
                     gflops=gflops(students[entry['depth']]), parameters=num_parameters(students[entry['depth']]))
    full_cost = {'gflops': gflops(teacher), 'parameters': num_parameters(teacher)}
    if depth is None:
        compress['seconds']['total'] = time.time() - started
        _without_compression(compress, output_dir, 'nothing removable',
                             f'no block of {model_dir} can be removed within --max_accuracy_drop {max_accuracy_drop} '
                             f'(validation accuracy must stay >= {compress["validation"]["threshold"]:.4f}); '
                             f'{full_numbers}')
        plots.save_figure(plots.compression_figure(compress), output_dir / 'figures' / 'compression.png')
        return compress

    # The kept model as a normal run directory: weights, all_results.json (the training job's evaluation).
    student = students[depth].to(training_args.device)
    kept = next(e for e in compress['search'] if e['depth'] == depth)
    student.save_pretrained(output_dir)
    final_data = _fresh(dataset)
    trainer = training.build_trainer(student, final_data, model_args, training_args)
    trainer.save_metrics('train', read_json(output_dir / SEARCH_DIR / f'depth_{depth}' / 'train_results.json'))
    training.validate(trainer)
    # One pass over the test split, as the training job: the attention summary and the test scores.
    test = training.extract_attention(student, final_data, model_args, data_args, training_args, stage='end')
    training.save_test_metrics(trainer, test)
    name = f'depth_{depth}'
    compress.update({
        'outcome': 'compressed',
        'blocks': {'num_full': num_blocks, 'kept': kept['kept_blocks'], 'num_kept': depth,
                   'removed': [b for b in range(num_blocks) if b not in kept['kept_blocks']]},
        'parameters': {'full': full_cost['parameters'], 'compressed': kept['parameters'],
                       'ratio': full_cost['parameters'] / kept['parameters']},
        'gflops': {'full': full_cost['gflops'], 'compressed': kept['gflops'], 'ratio': full_cost['gflops'] / kept['gflops'],
                   'input_size': list(model_data_config(vit)['input_size']),
                   'counted': 'torch.utils.flop_counter, one image, a multiply-add = 2 FLOPs, attention included'},
        'throughput': {'device': 'cpu', 'threads': SPEED_THREADS, 'batch_size': SPEED_BATCH_SIZE,
                       'rounds': speed_rounds, 'images_per_s': {'full': statistics.median(images_per_s['full']),
                                                                'compressed': statistics.median(images_per_s[name])},
                       'speedup': kept['speedup'],
                       'per_round': {'full': images_per_s['full'], 'compressed': images_per_s[name]},
                       'measured': 'alternately in one process (full, candidates, ... round by round); the speed-up '
                                   'is the median of the per-round ratios'},
        'test': {'split': test['test_split'], 'full': _test_numbers(full_test), 'compressed': _test_numbers(test)},
    })
    compress['heads'].update(num_kept=depth * num_heads)
    compress['validation']['compressed_accuracy'] = kept['val_accuracy']
    compress['message'] = (
        f'compressed {model_dir} from {num_blocks} to {depth} blocks: {kept["speedup"]:.2f}x faster on CPU, '
        f'{test["test_split"]} accuracy {full_test["test_accuracy"]:.4f} -> {test["test_accuracy"]:.4f}, macro F1 '
        f'{full_test["test_macro_f1"]:.4f} -> {test["test_macro_f1"]:.4f}; wrote {output_dir}')
    compress['seconds']['total'] = time.time() - started
    write_json(output_dir / COMPRESS_FILE, compress)

    # The run's configuration, attention summary, report and card, as the training job writes them.
    model_args.model_args = json.dumps(student.config.model_args)
    start = {'checkpoint': str(model_dir), 'pretrained': True, 'weights_sha256': base['weights_sha256'],
             'compressed_from': {'path': base['path'], 'hub_id': base['hub_id'], 'num_blocks': num_blocks,
                                 'kept_blocks': kept['kept_blocks']}}
    training.save_run_config(model_args, data_args, training_args, runtimes[depth], start)
    training.analyse(student, final_data, model_args, data_args, training_args)
    _logger.info(compress['message'])
    return compress


def _without_compression(compress: Dict, output_dir: Path, outcome: str, message: str) -> Dict:
    """Ends a compression that kept every block: compress.json with the full model's numbers."""
    compress.update(outcome=outcome, message=message)
    write_json(output_dir / COMPRESS_FILE, compress)
    _logger.warning(message)
    return compress


def share_correct(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Accuracy as an exact fraction (correct / images), the same number the Trainer's metrics give."""
    return int((predictions == labels).sum()) / len(labels)


@torch.inference_mode()
def predict_labels(model: nn.Module, pixel_values: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """``[M]`` predicted classes."""
    return logits_of(model, pixel_values, batch_size).argmax(-1)


def macro_f1(labels: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> float:
    return classification_metrics(labels.numpy(), predictions.numpy(), [str(c) for c in range(num_classes)],
                                  scalars_only=True)['macro_f1']


def study_summary(compress: Mapping) -> Dict:
    """The numbers of one compression that go into a comparison table (e.g. the background study's).

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
