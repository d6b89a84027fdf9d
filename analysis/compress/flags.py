"""The settings of ``python -m analysis compress``: one dataclass, its flags, checked before any loading."""
from dataclasses import dataclass, field
from typing import Optional

from analysis.compress.distill import DEFAULT_ALPHA, DEFAULT_DISTILL_EPOCHS, DEFAULT_TEMPERATURE
from analysis.compress.speed import DEFAULT_SPEED_ROUNDS
from data_scripts.errors import UserError

DEFAULT_MAX_ACCURACY_DROP = 0.01
DEFAULT_SELECTION_IMAGES = 256  # training images that rank the blocks (the greedy order costs L^2 / 2 passes)


@dataclass
class CompressFlags:
    """Any other flag is a train_hf flag that overrides the full run's settings (--learning_rate, --max_steps, ...)."""
    model: str = field(metadata={'help': 'Output directory of the full model\'s training run.'})
    output_dir: str = field(metadata={'help': 'Where the compressed run goes (a new folder).'})
    max_accuracy_drop: float = field(default=DEFAULT_MAX_ACCURACY_DROP, metadata={
        'help': 'Keep the smallest model whose validation accuracy after distillation is at most this much below '
                'the full model\'s; in [0, 1), 0.01 = 1 point.'})
    distill_epochs: float = field(default=DEFAULT_DISTILL_EPOCHS, metadata={
        'help': 'Distillation epochs of each candidate depth.'})
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={'help': 'Distillation temperature T.'})
    alpha: float = field(default=DEFAULT_ALPHA, metadata={
        'help': 'Weight of the teacher (KL) term; 1 - alpha on the labels.'})
    selection_images: int = field(default=DEFAULT_SELECTION_IMAGES, metadata={
        'help': 'Training images that rank the blocks.'})
    speed_rounds: int = field(default=DEFAULT_SPEED_ROUNDS, metadata={
        'help': 'Rounds of the alternating CPU speed measurement.'})
    base_model: Optional[str] = field(default=None, metadata={
        'help': 'Hub repo id of the full model, for the card\'s base_model, when its own files do not record it.'})

    def __post_init__(self):
        if not 0.0 <= self.max_accuracy_drop < 1.0:
            raise UserError(f'--max_accuracy_drop must lie in [0, 1) (a share of accuracy, 0.01 = 1 point), '
                             f'got {self.max_accuracy_drop}')
        if not self.distill_epochs > 0:
            raise UserError(f'--distill_epochs must be > 0, got {self.distill_epochs}')
        if not self.temperature > 0 or not 0.0 <= self.alpha <= 1.0:
            raise UserError(f'--temperature must be > 0 and --alpha in [0, 1]; got {self.temperature} and {self.alpha}')
        if self.selection_images < 2 or self.speed_rounds < 1:
            raise UserError(f'--selection_images must be >= 2 and --speed_rounds >= 1; got {self.selection_images}, '
                             f'{self.speed_rounds}')
