"""Which blocks go, and the smaller model made of the others.

The importance study's layer skip (`analysis.modeling.timm_internals.skip_blocks`) ranks the blocks
greedily (`removal_order`); its linear probe (`analysis.studies.importance.linear_probe`) gives the
other natural candidate, truncation. `choose_blocks` takes, for one depth, whichever of the two a
fresh probe reads better; `build_student` turns the kept blocks into a real ``depth = d`` timm ViT.
"""
import copy
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence, Tuple

import datasets
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from analysis.modeling.timm_internals import skip_blocks, vit_attention_modules
from analysis.modeling.vit import TimmViTForImageClassification
from analysis.studies.importance import cls_features, image_tensors, linear_probe
from data_scripts.errors import UserError


def check_compressible(model: nn.Module) -> VisionTransformer:
    """The timm ``VisionTransformer`` inside the model; anything else cannot lose blocks through config.json."""
    vit = getattr(model, 'timm_model', model)
    if not isinstance(vit, VisionTransformer):
        raise UserError(f'{type(vit).__name__} is not a timm VisionTransformer (vit_*, deit_*); only those can be '
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
    logits equal the teacher's with the other blocks skipped (`analysis.modeling.timm_internals.skip_blocks`).
    """
    vit = check_compressible(teacher)
    num_blocks = len(vit.blocks)
    kept = [int(b) for b in kept]
    if not kept or sorted(set(kept)) != kept or not 0 <= kept[0] <= kept[-1] < num_blocks:
        raise UserError(f'kept blocks must be increasing block indices in 0..{num_blocks - 1}, got {kept}')
    config = copy.deepcopy(teacher.config)
    config.model_args = {**(config.model_args or {}), 'depth': len(kept)}
    student = TimmViTForImageClassification(config)
    student.timm_model.load_state_dict(kept_blocks_state_dict(vit.state_dict(), kept))
    return student.to(next(vit.parameters()).device)


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


@dataclass
class Selection:
    """What ranks the blocks, measured on training images (validation scores the probes)."""
    train_x: torch.Tensor  # [M, 3, H, W] training images, eval transform
    train_y: torch.Tensor  # [M]
    removal: Dict  # `removal_order` of the full model on them
    probe: List[float]  # [L] validation accuracy of a linear probe on the CLS token after each block

    def to_json(self) -> Dict:
        """The ``selection`` entry of compress.json."""
        return {'removal_order': self.removal['order'], 'removal_kl': self.removal['kl'],
                'removal_accuracy': self.removal['accuracy'], 'probe_accuracy': self.probe,
                'num_images': len(self.train_y), 'probe_scored_on': 'validation'}


def select_blocks(teacher: TimmViTForImageClassification, train: datasets.Dataset, val_x: torch.Tensor,
                  val_y: torch.Tensor, *, num_images: int, seed: int) -> Selection:
    """The layer-skip order and the per-block probe of the full model, on ``num_images`` shuffled training images."""
    subset = train.shuffle(seed=seed).select(range(min(num_images, len(train))))
    train_x, train_y = image_tensors(teacher, subset)
    removal = removal_order(teacher, train_x, train_y)
    teacher_train_cls = cls_features(teacher, train_x)  # [L, M, D]
    teacher_val_cls = cls_features(teacher, val_x)  # [L, M', D]
    probe = linear_probe(teacher_train_cls, train_y, teacher_val_cls, val_y, seed=seed)
    return Selection(train_x, train_y, removal, probe)


def choose_blocks(teacher: TimmViTForImageClassification, selection: Selection, depth: int, val_x: torch.Tensor,
                  val_y: torch.Tensor, *, seed: int) -> Tuple[List[int], str, float]:
    """The kept blocks at this depth: truncation or the layer-skip order, whichever a fresh probe reads better.

    Returns:
        ``(kept blocks, which candidate they are, validation accuracy of the probe on the last one's CLS token)``.
    """
    num_blocks = len(check_compressible(teacher).blocks)
    skip_kept = kept_after_removal(selection.removal['order'], num_blocks, depth)
    truncation_kept = list(range(depth))
    truncation_probe = selection.probe[depth - 1]
    if skip_kept == truncation_kept:
        return skip_kept, 'truncation = layer skip', truncation_probe
    shortened = build_student(teacher, skip_kept)
    skip_probe = linear_probe(cls_features(shortened, selection.train_x)[-1:], selection.train_y,
                              cls_features(shortened, val_x)[-1:], val_y, seed=seed)[0]
    if skip_probe > truncation_probe:
        return skip_kept, 'layer skip', skip_probe
    return truncation_kept, 'truncation', truncation_probe
