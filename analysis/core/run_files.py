"""The files of a run's output directory: their names, and reading the JSON ones.

One place knows the layout that `train_hf.py` writes and the report, the card and publishing read:

    config.json, model.safetensors      the model (timm-native)
    all_results.json                    classification results (required by the report and the card)
    run_config.json                     the resolved arguments, versions and hardware
    data_report.json                    images skipped before training
    attentions.safetensors              the attention summary (`analysis.maps.summary`)
    attention_metrics.json              per-layer / per-head attention metrics
    attentions_start.safetensors,       the same, of the weights training started from (before fine-tuning)
      attention_metrics_start.json
    attention_change.json               what training changed in the attention, layer by layer
    background.json, importance.json    the optional studies
    compress.json                       what `python -m analysis compress` kept and measured (compressed runs)
    faithfulness.json                   deletion / insertion scores of every attention map
    sinks.json                          high-norm tokens, attention sinks and registers, layer by layer
    figures/*.png, report.html          the pictures and the report
    README.md                           the model card
"""
import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Union

from data_scripts.errors import MissingFileError, UserError

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
RESULTS_FILE = 'all_results.json'
RUN_CONFIG_FILE = 'run_config.json'
DATA_REPORT_FILE = 'data_report.json'
SUMMARY_FILE = 'attentions.safetensors'
METRICS_FILE = 'attention_metrics.json'
START_SUMMARY_FILE = 'attentions_start.safetensors'
START_METRICS_FILE = 'attention_metrics_start.json'
CHANGE_FILE = 'attention_change.json'
BACKGROUND_FILE = 'background.json'
IMPORTANCE_FILE = 'importance.json'
COMPRESS_FILE = 'compress.json'
FAITHFULNESS_FILE = 'faithfulness.json'
SINKS_FILE = 'sinks.json'
FIGURES_DIR = 'figures'
REPORT_FILE = 'report.html'
CARD_FILE = 'README.md'
SEEDS_FILE = 'seeds.json'  # python -m analysis seeds: what holds across the runs (the aggregate folder)
SEEDS_REPORT_FILE = 'seeds.md'
TRAIN_COMMAND = 'python train_hf.py --output_dir {output_dir} ...'


def read_json(path: Union[str, Path]) -> Dict:
    """A JSON file of a run.

    Raises:
        FileNotFoundError: it does not exist.
        ValueError: it is not valid JSON (the message says to re-create it).
    """
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise UserError(f'{path} is not valid JSON ({e}); re-create it or remove it.') from e


def read_optional_json(path: Union[str, Path]) -> Optional[Dict]:
    """`read_json`, or None when the file does not exist (the step was not run)."""
    return read_json(path) if Path(path).is_file() else None


def read_results(output_dir: Union[str, Path]) -> Dict:
    """``all_results.json`` of a finished training run."""
    path = Path(output_dir) / RESULTS_FILE
    if not path.is_file():
        raise MissingFileError(f'{path} does not exist: train first ({TRAIN_COMMAND.format(output_dir=output_dir)}) '
                                'or pass the output directory of a finished training run.')
    return read_json(path)


def weights_sha256(folder: Union[str, Path]) -> str:
    """SHA-256 of a checkpoint folder's ``model.safetensors`` (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(Path(folder) / WEIGHTS_FILE, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def run_data_args(output_dir: Union[str, Path]) -> Optional[Dict]:
    """The dataset arguments a run recorded (``run_config.json``'s ``data``, as `DataArguments` fields), or None when
    ``output_dir`` is not the output directory of a run."""
    from data_scripts import DataArguments
    path = Path(output_dir) / RUN_CONFIG_FILE
    if not path.is_file():
        return None
    return {k: v for k, v in read_json(path)['data'].items() if k in DataArguments.__dataclass_fields__}
