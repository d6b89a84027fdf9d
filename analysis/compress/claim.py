"""Which compression an output folder holds: the full model it was made from and the settings.

The claim (``OUT/compress_search/run.json``) is written before any work, so a second compression
into the same folder is refused unless it is this same one, run again.
"""
import json
import logging
from pathlib import Path
from typing import Mapping, Optional

from analysis.core.run_files import CARD_FILE, COMPRESS_FILE, RESULTS_FILE, read_optional_json
from data_scripts.errors import NotAFolderError, UserError

_logger = logging.getLogger(__name__)

SEARCH_DIR = 'compress_search'  # OUT/compress_search/depth_<d>/: the candidates' Trainer output (logs, no weights)
CLAIM_FILE = 'run.json'  # OUT/compress_search/run.json: which compression OUT holds (written first)


def published_id(model_dir: Path, run_config: Optional[Mapping]) -> Optional[str]:
    """The Hub repo id the full model was published under, if its files say so.

    ``train_hf.py --push_to_hub --hub_model_id`` records it in ``run_config.json``; ``python -m
    analysis push`` renders the card (README.md) with the repo id as its model name.
    """
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    candidates = [((run_config or {}).get('training') or {}).get('hub_model_id')]
    if (model_dir / CARD_FILE).is_file():
        try:
            candidates.append(ModelCard.load(model_dir / CARD_FILE).data.to_dict().get('model_name'))
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
        NotAFolderError: ``output_dir`` is a file.
        UserError: ``output_dir`` holds another run (a training run, another model's compression, other settings).
    """
    if not output_dir.exists():
        return
    if not output_dir.is_dir():
        raise NotAFolderError(f'--output_dir {output_dir} is a file; give a new folder.')
    if not any(output_dir.iterdir()):
        return
    held = read_optional_json(output_dir / SEARCH_DIR / CLAIM_FILE)
    if held is None:
        compress = read_optional_json(output_dir / COMPRESS_FILE)
        held = None if compress is None else {k: compress.get(k) for k in claim}
    if held is None:
        what = 'a training run' if (output_dir / RESULTS_FILE).is_file() else 'other files'
        raise UserError(f'--output_dir {output_dir} already holds {what}; give a new folder (or delete it).')
    if json.loads(json.dumps(held)) != json.loads(json.dumps(claim)):
        differ = sorted(k for k in set(held) | set(claim) if held.get(k) != claim.get(k))
        raise UserError(f'--output_dir {output_dir} holds another compression (different {", ".join(differ)}); '
                         'give a new folder (or delete it).')
    _logger.info('%s holds this same compression; running it again', output_dir)
