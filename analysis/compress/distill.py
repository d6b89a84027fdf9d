"""Recovery by knowledge distillation (Hinton et al. 2015): the loss, its Trainer, and its train_hf arguments."""
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import HfArgumentParser, Trainer

from analysis.core.run_files import RUN_CONFIG_FILE
from analysis.train import args as train_args
from analysis.train.args import DATASET_FLAGS
from data_scripts import DataArguments
from data_scripts.errors import UserError

DEFAULT_TEMPERATURE = 2.0
DEFAULT_ALPHA = 0.5
DEFAULT_DISTILL_EPOCHS = 3.0
# TrainingArguments of the full model's run that its compression keeps: the same batches, seed and precision.
KEPT_TRAINING_KEYS = ('per_device_train_batch_size', 'per_device_eval_batch_size', 'seed', 'data_seed', 'weight_decay',
                      'bf16', 'fp16', 'tf32', 'gradient_accumulation_steps', 'max_grad_norm', 'optim',
                      'dataloader_num_workers')
# A short fine-tune from trained weights, scored once at its end (the search scores it itself).
DISTILL_DEFAULTS = {'learning_rate': 5e-4, 'warmup_steps': 0.1, 'lr_scheduler_type': 'cosine', 'eval_strategy': 'no',
                    'save_strategy': 'no', 'report_to': 'none', 'logging_steps': 10}
# train_hf flags the command decides itself.
OWN_FLAGS = {'--model_name_or_path': '--model', '--model_args': 'the search', '--output_dir': '--output_dir',
             '--num_train_epochs': '--distill_epochs', '--push_to_hub': 'python -m analysis push OUT',
             '--resume_from_checkpoint': 'nothing (candidates are short and start over)'}


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


def _flag_names(flags: Sequence[str]) -> List[str]:
    return [f.split('=', 1)[0] for f in flags if f.startswith('--')]


def distill_parser(model_dir: Path, run_config: Optional[Mapping], distill_epochs: float,
                   flags: Sequence[str]) -> HfArgumentParser:
    """train_hf's argument parser with the distillation's defaults: the full run's data, batches, seed and
    precision (its ``run_config.json``), then `DISTILL_DEFAULTS`; ``flags`` (train_hf flags) override them."""
    given = _flag_names(flags)
    taken = [f'{f} (set by {OWN_FLAGS[f]})' for f in given if f in OWN_FLAGS]
    if taken:
        raise UserError(f'compress sets {", ".join(taken)} itself; leave them out.')
    defaults: Dict = {}
    if run_config is not None:
        data_fields = DataArguments.__dataclass_fields__
        defaults.update({k: v for k, v in (run_config.get('data') or {}).items() if k in data_fields and v is not None})
        full_training = run_config.get('training') or {}
        defaults.update({k: full_training[k] for k in KEPT_TRAINING_KEYS if full_training.get(k) is not None})
        if (run_config.get('model') or {}).get('min_crop_scale') is not None:
            defaults['min_crop_scale'] = run_config['model']['min_crop_scale']
    elif not any(f in DATASET_FLAGS for f in given):
        raise UserError(f'{model_dir} has no {RUN_CONFIG_FILE}, so its dataset is unknown: name it '
                         '(--dataset_name synthetic|oxford102|<hub id>, --train_dir DIR, ...).')
    defaults.update(DISTILL_DEFAULTS, num_train_epochs=distill_epochs, model_name_or_path=str(model_dir))
    parser = HfArgumentParser((train_args.ModelArguments, DataArguments, train_args.FlowerTrainingArguments))
    parser.set_defaults(**defaults)
    return parser
