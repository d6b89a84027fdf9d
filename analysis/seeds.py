"""``python -m analysis seeds``: the same training job N times, and which of its findings hold across the runs.

    python -m analysis seeds --output_dir outputs/seeds                 # the demo, seeds 42, 0, 1, 2, 3
    python -m analysis seeds --base_seeds 2 --output_dir outputs/seeds  # the same on two bases (10 runs)
    python -m analysis seeds configs/oxford102_vit_base.json --seeds 0,1,2 --output_dir outputs/oxford_seeds

Every other flag is a ``train_hf.py`` flag (or a config file first), given to every run. The runs
train one after another in this process (two torch processes on the same cores slow each other
down), each into ``OUT/seed_<s>/`` (``OUT/base_seed_<b>/seed_<s>/`` with several bases), with every
output a single run writes; a run that already finished there is read, not trained again. Then
``OUT/seeds.json`` (`analysis.studies.stability.aggregate`), ``OUT/seeds.md`` and ``OUT/README.md``
(the section "How stable are these findings across training runs").
"""
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from analysis.core.run_files import (
    CARD_FILE,
    RESULTS_FILE,
    RUN_CONFIG_FILE,
    SEEDS_FILE,
    SEEDS_REPORT_FILE,
    read_optional_json,
)
from analysis.render.card import render_model_card
from analysis.render.figures import rendered_figures
from analysis.render.report import write_report
from analysis.render.stability import stability_markdown
from analysis.studies.stability import aggregate, run_findings
from analysis.train.args import parse_args
from analysis.train.job import run
from data_scripts.errors import UserError
from data_scripts.files import write_json, write_text

_logger = logging.getLogger(__name__)

DEFAULT_SEEDS = (42, 0, 1, 2, 3)


def run_dir(output_dir: Path, seed: int, base_seed: Optional[int]) -> Path:
    return output_dir / (f'base_seed_{base_seed}' if base_seed is not None else '') / f'seed_{seed}'


def train_once(train_argv: Sequence[str], folder: Path, seed: int, base_seed: Optional[int]) -> float:
    """Trains one run into ``folder`` (unless it finished there before); its wall time in seconds (0 if read)."""
    if read_optional_json(folder / RESULTS_FILE) is not None and (folder / CARD_FILE).is_file():
        _logger.info(f'seeds: {folder} is finished; reading it')
        return 0.0
    start = time.time()
    flags = ['--seed', str(seed), '--output_dir', str(folder), '--run_name', f'{folder.parent.name}/{folder.name}']
    if base_seed is not None:
        flags += ['--base_seed', str(base_seed)]
    run(*parse_args([*train_argv, *flags]))
    return time.time() - start


def run_seeds(train_argv: Sequence[str], output_dir, *, seeds: Sequence[int] = DEFAULT_SEEDS,
              base_seeds: Sequence[Optional[int]] = (None,)) -> Dict:
    """Trains one run per (base seed, seed), then writes ``seeds.json``, ``seeds.md`` and ``README.md``.

    Args:
        train_argv: ``train_hf.py`` flags (a config file first, if any) shared by every run.
        seeds: the training seeds.
        base_seeds: the seeds of the bases (``--base_seed``; None: the base's own config seed).

    Returns:
        The contents of ``seeds.json``.
    """
    if len(seeds) * len(base_seeds) < 2:
        raise UserError('give at least two runs (--seeds 0,1 or more) to see what holds across them')
    output_dir = Path(output_dir)
    runs, seconds = [], {}
    for base_seed in base_seeds:
        for seed in seeds:
            folder = run_dir(output_dir, seed, base_seed)
            seconds[str(folder.relative_to(output_dir))] = train_once(train_argv, folder, seed, base_seed)
            runs.append(run_findings(folder) | {'base_seed': base_seed, 'path': str(folder.relative_to(output_dir))})
    start = time.time()
    seeds_json = aggregate(runs) | {'train_argv': list(train_argv), 'seeds': list(seeds),
                                    'base_seeds': list(base_seeds), 'train_seconds': seconds}
    markdown = stability_markdown(seeds_json)
    write_json(output_dir / SEEDS_FILE, seeds_json | {'aggregate_seconds': time.time() - start})
    write_text(output_dir / SEEDS_REPORT_FILE, markdown)
    write_text(output_dir / CARD_FILE, f'# {len(runs)} training runs of one job\n\n' + markdown)
    for entry in runs:  # each run's report and card now say which of its findings hold across the runs
        folder = output_dir / entry['path']
        write_report(folder, rendered_figures(folder))
        hub_id = ((read_optional_json(folder / RUN_CONFIG_FILE) or {}).get('training') or {}).get('hub_model_id')
        render_model_card(folder, repo_id=hub_id)
    return seeds_json


def parse_seeds(text: str) -> List[int]:
    try:
        return [int(s) for s in text.split(',') if s.strip()]
    except ValueError as e:
        raise UserError(f'--seeds takes comma-separated integers (e.g. 42,0,1,2,3), got {text!r}') from e
