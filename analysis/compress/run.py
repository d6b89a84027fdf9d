"""A smaller, faster ViT from a trained one: blocks removed by importance, recovered by distillation.

``python -m analysis compress --model DIR --output_dir OUT`` (`compress_run`):

1. **What to remove** (`analysis.compress.blocks`). The importance study's layer skip ranks the
   blocks: greedily, the block whose skipping (on top of those already skipped) changes the
   full model's predictions least is removed next (KL divergence to the full model's logits on
   training images, eval transform). The linear probe (`analysis.studies.importance.linear_probe`) gives
   the other natural candidate, truncation: the first ``d`` blocks, whose CLS token the probe
   already reads. For each depth the candidate whose last CLS token a fresh linear probe
   classifies better (fit on train, scored on validation) is distilled.
2. **A real smaller model.** The candidate is a timm ``VisionTransformer`` with ``depth = d``, its
   blocks the kept blocks' weights renumbered 0..d-1, so ``timm.create_model`` rebuilds it from
   ``config.json`` (``model_args.depth``). Heads are not removed: timm's ViT has one
   ``num_heads`` for every block and ``head_dim = embed_dim / num_heads``, so fewer heads cannot be
   written into ``config.json``, and zeroed heads cost the same compute.
3. **Recovery** (`analysis.compress.distill`). A short knowledge-distillation fine-tune (Hinton et al.
   2015) with the training job's Trainer, data and seeded augmentation (`analysis.train.job.build_trainer`
   with `DistillationTrainer`): ``alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) +
   (1 - alpha) * CE(student, labels)``, the full model as the frozen teacher.
4. **Search over depth.** Binary search for the smallest depth whose validation accuracy after
   distillation is within ``max_accuracy_drop`` of the full model's (accuracy is assumed to grow
   with depth; every depth walked is recorded). The test split is used once, for the final numbers.
5. **Measured, not estimated** (`analysis.compress.speed`). Parameters, GFLOPs (``torch.utils.flop_counter``)
   and CPU inference images/s of the full and the compressed model, measured alternately in one process
   (2 threads, batch 64), and accuracy / macro F1 / per-class F1 of both on the test split.

The output directory is a normal run directory (``config.json`` + ``model.safetensors``,
``all_results.json``, ``run_config.json``, attention summary, report, card) plus ``compress.json``
(`analysis.compress.result.CompressResult`).
"""
import dataclasses
import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import datasets
import torch
from transformers import HfArgumentParser

from analysis.compress.blocks import Selection, build_student, check_compressible, choose_blocks, select_blocks
from analysis.compress.claim import CLAIM_FILE, SEARCH_DIR, claim_output_dir, published_id
from analysis.compress.distill import (
    DEFAULT_ALPHA,
    DEFAULT_DISTILL_EPOCHS,
    DEFAULT_TEMPERATURE,
    DistillationTrainer,
    distill_parser,
)
from analysis.compress.flags import DEFAULT_MAX_ACCURACY_DROP, DEFAULT_SELECTION_IMAGES, CompressFlags
from analysis.compress.result import Candidate, CompressResult, compressed_result, full_model_result
from analysis.compress.speed import DEFAULT_SPEED_ROUNDS, gflops, inference_throughput, num_parameters, speedup
from analysis.core.metrics import classification_metrics
from analysis.core.run_files import (
    COMPRESS_FILE,
    CONFIG_FILE,
    FIGURES_DIR,
    RUN_CONFIG_FILE,
    WEIGHTS_FILE,
    read_json,
    read_optional_json,
    weights_sha256,
)
from analysis.modeling.transforms import model_data_config
from analysis.modeling.vit import TimmViTForImageClassification
from analysis.render import plots
from analysis.studies.importance import accuracy, image_tensors, predict
from analysis.train import job as training  # the training job: arguments, data, Trainer, evaluation, analysis
from analysis.train.args import FlowerTrainingArguments, ModelArguments
from data_scripts import DataArguments
from data_scripts.errors import MissingFileError, UserError
from data_scripts.files import write_json

_logger = logging.getLogger(__name__)


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


@dataclass
class Job:
    """What the steps share: the two folders, the settings and the distillation's train_hf arguments."""
    model_dir: Path  # the full model's run
    output_dir: Path  # the compressed model's run
    options: CompressFlags
    flags: Sequence[str]  # train_hf flags given to the command
    parser: HfArgumentParser  # train_hf's, with the distillation's defaults (`distill_parser`)
    model_args: ModelArguments
    data_args: DataArguments
    training_args: FlowerTrainingArguments  # the kept model's (output_dir); each candidate gets its own folder
    base_model: Dict  # path, name, hub_id and weights_sha256 of the full model

    def candidate_args(self, folder: Path) -> FlowerTrainingArguments:
        """The distillation's TrainingArguments, writing into ``folder``."""
        return self.parser.parse_args_into_dataclasses(args=[*self.flags, '--output_dir', str(folder)])[2]

    def settings(self) -> Dict:
        """compress.json's ``settings``: the command's, and the distillation's learning rate and seed."""
        o = self.options
        return {'max_accuracy_drop': o.max_accuracy_drop, 'distill_epochs': o.distill_epochs,
                'temperature': o.temperature, 'alpha': o.alpha, 'selection_images': o.selection_images,
                'flags': list(self.flags), 'learning_rate': self.training_args.learning_rate,
                'seed': self.training_args.seed}


@dataclass
class FullModel:
    """The full model (the teacher) and the data every candidate is measured on."""
    model: TimmViTForImageClassification
    dataset: datasets.DatasetDict  # as loaded; every Trainer gets its own `_fresh` copy
    val_x: torch.Tensor  # [M, 3, H, W] validation images, eval transform
    val_y: torch.Tensor  # [M]

    @property
    def num_blocks(self) -> int:
        return len(self.model.timm_model.blocks)


def _fresh(dataset: datasets.DatasetDict) -> datasets.DatasetDict:
    """The splits without transforms, for another Trainer (`build_trainer` attaches its own)."""
    return datasets.DatasetDict({split: data.with_format(None) for split, data in dataset.items()})


def start_job(options: CompressFlags, flags: Sequence[str]) -> Job:
    """Checks the folders, parses the distillation's arguments and claims the output folder (before any loading)."""
    model_dir, output_dir = Path(options.model).expanduser(), Path(options.output_dir).expanduser()
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (model_dir / name).is_file()]
    if missing:
        raise MissingFileError(f'--model {model_dir} has no {" / ".join(missing)}: give the output directory of a '
                                'training run.')
    if output_dir.resolve() == model_dir.resolve():
        raise UserError('--output_dir is the full model\'s own folder; give a new folder for the compressed model.')
    run_config = read_optional_json(model_dir / RUN_CONFIG_FILE)
    parser = distill_parser(model_dir, run_config, options.distill_epochs, flags)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(
        args=[*flags, '--output_dir', str(output_dir)])
    base_model = {'path': str(model_dir.resolve()), 'name': model_dir.resolve().name,
                  'hub_id': options.base_model or published_id(model_dir, run_config),
                  'weights_sha256': weights_sha256(model_dir)}
    job = Job(model_dir, output_dir, options, flags, parser, model_args, data_args, training_args, base_model)
    claim = {'base_model': base_model, 'settings': job.settings()}
    claim_output_dir(output_dir, claim)
    write_json(output_dir / SEARCH_DIR / CLAIM_FILE, claim)
    return job


def load_full_model(job: Job) -> FullModel:
    """The dataset of the full run, the full model (a timm ViT, trained on its classes) and the validation images."""
    dataset = training.load_data(job.data_args, job.training_args)
    teacher = TimmViTForImageClassification.from_pretrained(str(job.model_dir)).eval()
    class_names = dataset['train'].features['label'].names
    if teacher.class_names != class_names:
        raise UserError(f'{job.model_dir} was trained for classes {teacher.class_names}, the dataset has '
                         f'{class_names}; compress a model on the dataset it was trained on.')
    check_compressible(teacher)
    return FullModel(teacher, dataset, *image_tensors(teacher, dataset['validation']))


def score_full_model(job: Job, full: FullModel) -> CompressResult:
    """The result before anything is removed: the full model's validation accuracy (the search's reference)
    and its test scores (the report's)."""
    teacher = full.model
    num_heads = teacher.num_heads
    base_model = {**job.base_model, 'architecture': teacher.config.architecture, 'num_blocks': full.num_blocks,
                  'num_heads': num_heads}
    val_accuracy = accuracy(teacher, full.val_x, full.val_y)
    data = _fresh(full.dataset)
    test = training.evaluate_test(training.build_trainer(teacher, data, job.model_args, job.training_args), data,
                                  teacher.class_names)
    return full_model_result(base_model, job.settings(), num_heads, val_accuracy, job.options.max_accuracy_drop,
                             len(full.val_y), test)


def distil_candidate(job: Job, full: FullModel, selection: Selection, depth: int,
                     threshold: float) -> Tuple[Candidate, TimmViTForImageClassification]:
    """Builds the candidate of one depth, distils it and scores it on validation.

    Its Trainer writes into ``OUT/compress_search/depth_<d>/`` (logs only: the weights are deleted).
    """
    teacher = full.model
    kept, source, probe_accuracy = choose_blocks(teacher, selection, depth, full.val_x, full.val_y,
                                                 seed=job.training_args.seed)
    student = build_student(teacher, kept)
    before = accuracy(student, full.val_x, full.val_y)
    folder = job.output_dir / SEARCH_DIR / f'depth_{depth}'
    shutil.rmtree(folder, ignore_errors=True)
    candidate_args = job.candidate_args(folder)
    trainer = training.build_trainer(student, _fresh(full.dataset), job.model_args, candidate_args, DistillationTrainer,
                                     teacher=teacher, temperature=job.options.temperature, alpha=job.options.alpha)
    seconds = training.train(trainer, candidate_args)
    (folder / WEIGHTS_FILE).unlink(missing_ok=True)  # the search keeps its logs; only the kept model is saved
    scores = classification_metrics(full.val_y.numpy(), predict(student, full.val_x).numpy(), teacher.class_names,
                                    scalars_only=True)
    candidate = Candidate(depth=depth, kept_blocks=kept, candidate=source, probe_accuracy=probe_accuracy,
                          val_accuracy_before=before, val_accuracy=scores['accuracy'], val_macro_f1=scores['macro_f1'],
                          within_tolerance=scores['accuracy'] >= threshold - 1e-9, distill_seconds=seconds)
    _logger.info('depth %d (%s, blocks %s): validation accuracy %.4f before, %.4f after distillation (%s)',
                 depth, source, kept, before, candidate.val_accuracy,
                 'within tolerance' if candidate.within_tolerance else 'outside tolerance')
    return candidate, student


def search(job: Job, full: FullModel, selection: Selection, threshold: float
           ) -> Tuple[Optional[int], List[Candidate], Dict[int, TimmViTForImageClassification]]:
    """`search_depth` over distilled candidates.

    Returns:
        ``(the smallest depth within tolerance or None, every candidate walked in order, {depth: its student})``.
    """
    candidates: List[Candidate] = []
    students: Dict[int, TimmViTForImageClassification] = {}

    def within_tolerance(depth: int) -> bool:  # what the search asks; the answers are kept for measuring
        candidate, student = distil_candidate(job, full, selection, depth, threshold)
        candidates.append(candidate)
        students[depth] = student
        return candidate.within_tolerance

    depth, _ = search_depth(full.num_blocks, within_tolerance)
    return depth, candidates, students


def measure_candidates(teacher: TimmViTForImageClassification, candidates: Sequence[Candidate],
                       students: Dict[int, TimmViTForImageClassification], rounds: int
                       ) -> Tuple[List[Candidate], Dict[str, List[float]]]:
    """Every model the search made, alternately with the full model, on the CPU; and their parameters and GFLOPs.

    Returns:
        ``(the candidates with their measured fields, images/s per round of "full" and each "depth_<d>")``.
    """
    images_per_s = inference_throughput({'full': teacher, **{f'depth_{d}': s for d, s in students.items()}},
                                        rounds=rounds)
    measured = []
    for candidate in candidates:
        name, student = f'depth_{candidate.depth}', students[candidate.depth]
        measured.append(dataclasses.replace(
            candidate, speedup=speedup(images_per_s, name, 'full'), images_per_s=statistics.median(images_per_s[name]),
            gflops=gflops(student), parameters=num_parameters(student)))
    return measured, images_per_s


def end_without_compression(job: Job, result: CompressResult, outcome: str, message: str) -> CompressResult:
    """Ends a compression that kept every block: compress.json with the full model's numbers."""
    result = dataclasses.replace(result, outcome=outcome, message=message)
    write_json(job.output_dir / COMPRESS_FILE, result.to_json())
    _logger.warning(message)
    return result


def save_compressed(job: Job, full: FullModel, student: TimmViTForImageClassification, depth: int
                    ) -> Tuple[Dict, datasets.DatasetDict]:
    """The kept model as a normal run directory: weights, all_results.json (the training job's evaluation).

    Returns:
        ``(its test metrics, as `analysis.train.job.evaluate_test` gives them; the splits it was scored on)``.
    """
    student = student.to(job.training_args.device)
    student.save_pretrained(job.output_dir)
    data = _fresh(full.dataset)
    trainer = training.build_trainer(student, data, job.model_args, job.training_args)
    trainer.save_metrics('train', read_json(job.output_dir / SEARCH_DIR / f'depth_{depth}' / 'train_results.json'))
    training.validate(trainer)
    # One pass over the test split, as the training job: the attention summary and the test scores.
    test = training.extract_attention(student, data, job.model_args, job.data_args, job.training_args, stage='end')
    training.save_test_metrics(trainer, test)
    return test, data


def record_compression(job: Job, full: FullModel, result: CompressResult, kept: Candidate,
                       images_per_s: Dict[str, List[float]], test: Dict) -> CompressResult:
    """``result`` with the kept candidate, its cost against the full model's, and the line that ends the command."""
    teacher = full.model
    full_test = result.test['full']
    message = (f'compressed {job.model_dir} from {full.num_blocks} to {kept.depth} blocks: {kept.speedup:.2f}x '
               f'faster on CPU, {test["test_split"]} accuracy {full_test["accuracy"]:.4f} -> '
               f'{test["test_accuracy"]:.4f}, macro F1 {full_test["macro_f1"]:.4f} -> {test["test_macro_f1"]:.4f}; '
               f'wrote {job.output_dir}')
    return compressed_result(
        result, kept, full_cost={'gflops': gflops(teacher), 'parameters': num_parameters(teacher)},
        input_size=model_data_config(teacher.timm_model)['input_size'],
        images_per_s={'full': images_per_s['full'], 'compressed': images_per_s[f'depth_{kept.depth}']},
        test_metrics=test, message=message)


def write_run_files(job: Job, full: FullModel, student: TimmViTForImageClassification, kept: Candidate,
                    data: datasets.DatasetDict) -> None:
    """The run's configuration, attention summary, report and card, as the training job writes them."""
    # The arguments of a run that built the student: the full model's with the student's depth.
    student_args = dataclasses.replace(job.model_args, model_args=json.dumps(student.config.model_args))
    base = job.base_model
    start = {'checkpoint': str(job.model_dir), 'pretrained': True, 'weights_sha256': base['weights_sha256'],
             'compressed_from': {'path': base['path'], 'hub_id': base['hub_id'], 'num_blocks': full.num_blocks,
                                 'kept_blocks': kept.kept_blocks}}
    training.save_run_config(student_args, job.data_args, job.training_args, start=start,
                             train_runtime=kept.distill_seconds)
    training.analyse(student, data, student_args, job.data_args, job.training_args)


def compress_run(
        model_dir,
        output_dir,
        *,
        max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
        distill_epochs: float = DEFAULT_DISTILL_EPOCHS,
        temperature: float = DEFAULT_TEMPERATURE,
        alpha: float = DEFAULT_ALPHA,
        selection_images: int = DEFAULT_SELECTION_IMAGES,
        speed_rounds: int = DEFAULT_SPEED_ROUNDS,
        base_model: Optional[str] = None,
        flags: Sequence[str] = (),
) -> Dict:
    """Compresses the model of a training run into ``output_dir``: the whole command (see the module doc).

    Args:
        model_dir: the full model's output directory (config.json, model.safetensors; run_config.json
            gives the dataset and the training settings kept).
        output_dir: where the compressed run goes (new, empty, or an earlier run of this same compression).
        max_accuracy_drop / ... / base_model: see `CompressFlags`.
        flags: train_hf flags that override the full run's settings (``--learning_rate``, ``--max_steps``,
            ``--cache_dir``, ...).

    Returns:
        what ``compress.json`` holds (`CompressResult.to_json`). Without a compressed model the entries about
        it are None and ``output_dir`` holds compress.json, its figure and the search logs.
    """
    options = CompressFlags(  # checks the settings
        model=str(model_dir), output_dir=str(output_dir), max_accuracy_drop=max_accuracy_drop,
        distill_epochs=distill_epochs, temperature=temperature, alpha=alpha, selection_images=selection_images,
        speed_rounds=speed_rounds, base_model=base_model)
    started = time.time()
    job = start_job(options, flags)
    full = load_full_model(job)
    result = score_full_model(job, full)
    if full.num_blocks == 1:
        return end_without_compression(job, result, 'single block', f'{job.model_dir} has a single block, so there '
                                       f'is no block to remove; {result.full_numbers()}').to_json()

    # 1. What to remove: the layer-skip order and the probe, on training images (validation decides later).
    step_started = time.time()
    selection = select_blocks(full.model, full.dataset['train'], full.val_x, full.val_y,
                              num_images=options.selection_images, seed=job.training_args.seed)
    result.selection = selection.to_json()
    result.seconds['selection'] = time.time() - step_started

    # 2-4. Distil each depth the search walks; keep the smallest within tolerance.
    step_started = time.time()
    depth, candidates, students = search(job, full, selection, result.validation['threshold'])
    result.seconds['search'] = time.time() - step_started

    # 5. Measured: every model the search made, alternately with the full model, on the CPU.
    result.search, images_per_s = measure_candidates(full.model, candidates, students, options.speed_rounds)
    if depth is None:
        result.seconds['total'] = time.time() - started
        result = end_without_compression(
            job, result, 'nothing removable', f'no block of {job.model_dir} can be removed within --max_accuracy_drop '
            f'{max_accuracy_drop} (validation accuracy must stay >= {result.validation["threshold"]:.4f}); '
            f'{result.full_numbers()}')
        plots.save_figure(plots.compression_figure(result.to_json()), job.output_dir / FIGURES_DIR / 'compression.png')
        return result.to_json()

    kept = next(c for c in result.search if c.depth == depth)
    test, data = save_compressed(job, full, students[depth], depth)
    result = record_compression(job, full, result, kept, images_per_s, test)
    result.seconds['total'] = time.time() - started
    write_json(job.output_dir / COMPRESS_FILE, result.to_json())
    write_run_files(job, full, students[depth], kept, data)
    _logger.info(result.message)
    return result.to_json()
