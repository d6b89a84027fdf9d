"""A multi-process launch is one distributed job, or it stops before any work.

``accelerate launch --num_processes N`` starts N processes. Where they cannot form one distributed
job (a CPU machine launched without ``ACCELERATE_USE_CPU=true``, or GPUs the process cannot see),
each of them would run the whole job alone: N copies training the same thing and racing for the
same output files. `check_launch` turns that into one clear error instead.
"""
import os

from data_scripts.errors import UserError


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``; 1 without a launcher)."""
    return int(os.environ.get('WORLD_SIZE', '1'))


def check_launch(distributed: bool) -> None:
    """Raises a `UserError` when several processes were launched but they do not form one distributed job.

    Args:
        distributed: whether this process is part of a distributed job (e.g. the Trainer's
            ``parallel_mode`` is ``DISTRIBUTED``, or accelerate's ``PartialState().num_processes > 1``).
    """
    launched = launched_processes()
    if launched > 1 and not distributed:
        raise UserError(
            f'{launched} processes were launched, but they do not form one distributed job (no GPU is visible to '
            'them and the launch is not a CPU one), so each would run the whole job alone. On CPUs, launch with '
            'ACCELERATE_USE_CPU=true (gloo); on GPUs, check that they are visible (nvidia-smi, CUDA_VISIBLE_DEVICES); '
            'or run a single process (python ..., without accelerate launch).')
