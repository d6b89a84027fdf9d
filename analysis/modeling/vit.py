"""A timm ViT as a transformers model that can return its attention maps.

`TimmViTForImageClassification` is transformers' own `TimmWrapperForImageClassification`
(same config class, same checkpoint format) with two additions:

* ``output_attentions=True`` returns one ``[B, heads, N, N]`` map per block, equal to
  ``softmax(q k^T / sqrt(d))``. timm runs fused SDPA, which never materialises these weights, so
  `capture_attentions` switches the eager path on for that one call only and removes its
  hooks again; with ``output_attentions`` off the fused path runs untouched.
* ``save_pretrained`` writes the timm-native checkpoint (``config.json`` + ``model.safetensors``,
  keys without the ``timm_model.`` prefix, ``num_classes`` kept out of ``model_args``), which
  timm (``local-dir:`` / ``hf-hub:``), transformers (``AutoModelForImageClassification``,
  ``pipeline``) and this class all load.
"""
import json
import logging
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils.hub import convert_file_size_to_int

from analysis.core.run_files import CONFIG_FILE, WEIGHTS_FILE, weights_sha256
from analysis.modeling.timm_internals import capture_attentions, timm_config, vit_attention_modules
from analysis.modeling.tokens import TokenLayout
from data_scripts.errors import MissingFileError, UserError, one_line
from data_scripts.files import atomic_path, write_json

_logger = logging.getLogger(__name__)



def looks_like_local_path(name: str) -> bool:
    """Whether a model name is meant as a folder on this machine rather than a Hub id or timm name.

    ``./x``, ``/x``, ``~/x``, ``a/b/c`` and ``a/b`` whose ``a`` is a local folder (``outputs/typo``)
    are local paths; ``user/name`` with no folder ``user`` here is a Hub repo id.
    """
    name = str(name)
    if name.startswith(('.', '/', '~')) or '\\' in name or name.count('/') > 1:
        return True
    return '/' in name and os.path.isdir(name.split('/')[0])


# pretrained_cfg keys that name the weights a model came from (a fine-tuned or random model must not keep them)
PROVENANCE_KEYS = ('tag', 'license', 'hf_hub_id', 'hf_hub_filename', 'file', 'source', 'url')


def without_provenance(pretrained_cfg: Dict) -> Dict:
    return {k: v for k, v in dict(pretrained_cfg).items() if k not in PROVENANCE_KEYS}


def _names(keys: Sequence[str], shown: int = 6) -> str:
    keys = list(keys)
    return ', '.join(keys[:shown]) + (f' (and {len(keys) - shown} more)' if len(keys) > shown else '')


def checkpoint_dir(name: str) -> Path:
    """The local folder holding ``config.json`` + ``model.safetensors`` of an output directory or Hub repo.

    Args:
        name: an output directory, or a Hub repo id (``user/name`` or ``hf-hub:user/name``), whose two
            files are downloaded (or taken from the Hub cache).

    Raises:
        FileNotFoundError: no such folder, or the Hub has (or gives) no such model.
    """
    name = os.path.expanduser(str(name))
    repo_id = name[len('hf-hub:'):] if name.startswith('hf-hub:') else None
    if repo_id is None and (os.path.isdir(name) or looks_like_local_path(name)):
        folder = Path(name)
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
        if missing:
            raise MissingFileError(f'{name} has no {" / ".join(missing)}: give the output directory of a training run.')
        return folder
    from huggingface_hub import snapshot_download  # only for Hub ids
    try:
        return Path(snapshot_download(repo_id or name, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE]))
    except Exception as e:  # the Hub client raises many kinds (offline, not found, HTTP errors)
        raise MissingFileError(f'{name} is neither a local folder nor a model that can be downloaded from the Hub '
                                f'now ({one_line(e)[:200]}).') from e


def init_from_checkpoint(
        folder: Union[str, os.PathLike],
        label_names: Sequence[str],
        *,
        pretrained: bool = True,
        model_args: Optional[Dict] = None,
) -> Tuple['TimmViTForImageClassification', Dict]:
    """The model to fine-tune from a checkpoint: its architecture and weights, a new head for new classes.

    The backbone is the checkpoint's; the classifier head is kept only when the checkpoint was trained
    for exactly ``label_names`` (same names, same order), else it is initialised anew, as timm
    initialises it. A different ``img_size`` resamples the position embeddings (timm's
    ``checkpoint_filter_fn``, as when timm loads pretrained weights); every other tensor must fit.

    Args:
        folder: a checkpoint folder (`checkpoint_dir`).
        label_names: the classes to train.
        pretrained: False keeps only the architecture (every weight random): the from-scratch baseline.
        model_args: ``timm.create_model`` arguments that override the checkpoint's (e.g. drop_path_rate).

    Returns:
        ``(model, start)``; ``start`` says where the weights came from: ``checkpoint``, ``weights_sha256``,
        ``loaded`` (tensor names), ``initialised`` (tensor names), ``checkpoint_label_names``.

    Raises:
        ValueError: a tensor other than the head does not fit (the message names the tensors).
    """
    folder = Path(folder)
    with open(folder / CONFIG_FILE) as f:
        config = json.load(f)
    args = {**config.get('model_args', {}), **(model_args or {}), 'num_classes': len(label_names)}
    args.pop('pretrained_model_args', None)
    architecture = config['architecture']
    with torch.device('meta'):  # fail early, before building anything, on a model we cannot capture
        vit_attention_modules(timm.create_model(architecture, pretrained=False, **args))
    vit = timm.create_model(architecture, pretrained=False, **args)  # timm's initialisation
    vit.pretrained_cfg = {**without_provenance(config.get('pretrained_cfg', {})),
                          'architecture': architecture, 'num_classes': len(label_names)}
    target = vit.state_dict()
    weights = folder / WEIGHTS_FILE
    start = {'checkpoint': str(folder), 'pretrained': pretrained,
             'weights_sha256': weights_sha256(folder),
             'checkpoint_label_names': config.get('label_names')}
    if not pretrained:
        start.update(loaded=[], initialised=sorted(target))
        return TimmViTForImageClassification.from_timm_model(vit, label_names), start

    state = load_file(str(weights))
    if isinstance(vit, VisionTransformer):
        # timm's own adaptation: position embeddings (and patch kernels) resampled to another image size
        state = vit_checkpoint_filter(state, vit)
    classifier = config.get('pretrained_cfg', {}).get('classifier', 'head')
    head = {f'{classifier}.weight', f'{classifier}.bias'}
    if config.get('label_names') != list(label_names):
        state = {k: v for k, v in state.items() if k not in head}
    mismatched = [f'{k} {list(state[k].shape)} vs {list(v.shape)}' for k, v in target.items()  # model order
                  if k in state and state[k].shape != v.shape]
    unexpected = [k for k in state if k not in target]
    missing = [k for k in target if k not in state and k not in head]
    if mismatched or unexpected or missing:
        problems = [f'{label}: {_names(keys)}' for label, keys in
                    (('shape differs', mismatched), ('not in the model', unexpected), ('not in the checkpoint', missing))
                    if keys]
        raise UserError(f'{folder} does not fit the model to train ({architecture} with {model_args or "its own"} '
                         f'arguments): {"; ".join(problems)}. Start from a checkpoint of this architecture, or drop '
                         'the --model_args that change it.')
    vit.load_state_dict(state, strict=False)
    start.update(loaded=sorted(state), initialised=sorted(k for k in target if k not in state))
    return TimmViTForImageClassification.from_timm_model(vit, label_names), start


class TimmViTForImageClassification(TimmWrapperForImageClassification):
    """transformers' TimmWrapper for a timm ViT, with ``output_attentions`` and a timm-native checkpoint."""

    def __init__(self, config: TimmWrapperConfig):
        super().__init__(config)
        # TimmWrapper builds the timm model from its architecture name, which brings the default
        # pretrained_cfg (224 px, ...); the checkpoint's own one says how its inputs are prepared.
        pretrained_cfg = getattr(config, 'pretrained_cfg', None)
        if pretrained_cfg:  # authoritative: no tag or license of weights this checkpoint did not come from
            architecture = self.timm_model.pretrained_cfg.get('architecture', config.architecture)
            self.timm_model.pretrained_cfg = {'architecture': architecture, **pretrained_cfg}

    @property
    def token_layout(self) -> TokenLayout:
        return TokenLayout.from_timm(self.timm_model)

    @property
    def num_blocks(self) -> int:
        return len(self.timm_model.blocks)

    @property
    def num_heads(self) -> int:
        """Attention heads per block (those of the first block: a timm ViT has the same in all)."""
        return self.timm_model.blocks[0].attn.num_heads

    @property
    def class_names(self) -> List[str]:
        return [self.config.id2label[i] for i in range(self.config.num_labels)]

    def forward(
            self,
            pixel_values: torch.Tensor,
            labels: Optional[torch.LongTensor] = None,
            output_attentions: Optional[bool] = None,
            output_hidden_states: Optional[Union[bool, List[int]]] = None,
            return_dict: Optional[bool] = None,
            **kwargs,
    ) -> ImageClassifierOutput:
        """Classifies ``pixel_values`` ``[B, 3, H, W]``; see TimmWrapperForImageClassification.

        Args:
            output_attentions: also return ``attentions``, a tuple with one ``[B, heads, N, N]``
                tensor per block (N = prefix tokens + patches).
        """
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        if not output_attentions:
            return super().forward(
                pixel_values, labels=labels, output_attentions=False,
                output_hidden_states=output_hidden_states, return_dict=return_dict, **kwargs)

        with capture_attentions(self.timm_model) as maps:
            out = super().forward(
                pixel_values, labels=labels, output_attentions=False,
                output_hidden_states=output_hidden_states, return_dict=True, **kwargs)
        if len(maps) != self.num_blocks:
            raise RuntimeError(f'captured {len(maps)} attention maps from {self.num_blocks} blocks')
        out.attentions = tuple(maps)
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return out if return_dict else out.to_tuple()

    def save_pretrained(
            self,
            save_directory: Union[str, os.PathLike],
            is_main_process: bool = True,
            state_dict: Optional[Dict[str, torch.Tensor]] = None,
            safe_serialization: bool = True,
            max_shard_size: Optional[Union[int, str]] = None,
            **kwargs,
    ) -> None:
        """Writes the timm-native checkpoint: ``config.json`` + ``model.safetensors``.

        Both files are written whole or not at all (temporary name, then rename). The format is one
        safetensors file, the one timm's ``hf-hub:`` / ``local-dir:`` loaders read: pickled weights
        (``safe_serialization=False``) and shards (a model above ``max_shard_size``) are refused, not
        silently written otherwise. Other arguments of transformers' ``save_pretrained`` (``push_to_hub``:
        use ``python -m analysis push``) do not apply and are logged when given.
        """
        if not safe_serialization:
            raise UserError('this model is saved as safetensors only (timm-native model.safetensors); '
                            'safe_serialization=False would write pickled weights.')
        ignored = sorted(k for k, v in kwargs.items() if v not in (None, False))
        if ignored:
            _logger.warning(f'save_pretrained ignores {ignored}: a timm-native checkpoint is config.json + one '
                            'model.safetensors')
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.timm_model.state_dict()
        prefix = self.base_model_prefix + '.'
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v.detach().contiguous().cpu()
                      for k, v in state_dict.items()}
        size = sum(v.numel() * v.element_size() for v in state_dict.values())
        if max_shard_size is not None and size > convert_file_size_to_int(max_shard_size):
            raise UserError(f'the weights take {size / 1e9:.2f} GB, more than max_shard_size={max_shard_size}; this '
                            'format is one file (timm reads model.safetensors): raise max_shard_size or leave it out.')
        config = timm_config(self.timm_model, self.class_names)
        with atomic_path(save_directory / WEIGHTS_FILE) as tmp:
            save_file(state_dict, str(tmp), metadata={'format': 'pt'})
        write_json(save_directory / CONFIG_FILE, config)

    @classmethod
    def from_timm(
            cls,
            model_name: str,
            *,
            pretrained: bool = False,
            label_names: Optional[Sequence[str]] = None,
            model_args: Optional[Dict] = None,
    ) -> 'TimmViTForImageClassification':
        """Builds the model from a timm model name, with a new head for ``label_names``.

        Args:
            model_name: timm name, e.g. ``vit_base_patch16_224.augreg2_in21k_ft_in1k``.
            pretrained: load timm's pretrained weights (from the Hub) for everything but the head.
            label_names: class names; the head gets one output per name. None keeps timm's head.
            model_args: extra ``timm.create_model`` arguments (depth, img_size, patch_size, ...).
        """
        if not timm.is_model(model_name):
            raise UserError(
                f'{model_name!r} is not a timm model name, an output directory or a Hub repo id; '
                'see timm.list_models("vit_*").')
        model_args = dict(model_args or {})
        if 'num_classes' in model_args:
            raise UserError('give the classes as label_names, not num_classes in model_args')
        if label_names is not None:
            model_args['num_classes'] = len(label_names)
        with torch.device('meta'):  # no weights, no download: fail early on a model we cannot capture
            vit_attention_modules(timm.create_model(model_name, pretrained=False, **model_args))
        if not pretrained:
            vit = timm.create_model(model_name, pretrained=False, **model_args)
            # the default pretrained_cfg names weights these parameters do not come from
            vit.pretrained_cfg = without_provenance(vit.pretrained_cfg)
            return cls.from_timm_model(vit, label_names)
        try:  # safetensors only: never a pickled checkpoint
            vit = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={'hf_hub_filename': WEIGHTS_FILE},
                                    **model_args)
        except OSError as e:  # the Hub client's errors (offline, not found) are OSErrors
            raise MissingFileError(
                f'could not get the pretrained weights of {model_name} ({one_line(e)[:200]}); check the network, '
                'put them in the Hub cache and set HF_HUB_OFFLINE=1, or use --pretrained false') from e
        timm_cfg = timm.models.get_pretrained_cfg(model_name)
        if label_names is not None and timm_cfg is not None and timm_cfg.num_classes == len(label_names):
            # timm keeps a pretrained head whose class count matches; its classes are not ours
            classifier = vit.get_submodule(vit.pretrained_cfg.get('classifier', 'head'))
            timm.models.vision_transformer.init_weights_vit_timm(classifier)
        return cls.from_timm_model(vit, label_names)

    @classmethod
    def from_timm_model(cls, vit: torch.nn.Module, label_names: Optional[Sequence[str]] = None
                        ) -> 'TimmViTForImageClassification':
        """Wraps a timm ViT (its weights are copied)."""
        config = TimmWrapperConfig.from_dict(timm_config(vit, label_names))
        model = cls(config)
        model.timm_model.load_state_dict(vit.state_dict())
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *args, **kwargs):
        """Loads from an output directory, a Hub repo id (``user/name`` or ``hf-hub:user/name``),
        or a timm model name (``pretrained=True`` by default; ``label_names`` / ``model_args``
        as in `from_timm`)."""
        name = os.path.expanduser(str(pretrained_model_name_or_path))
        if name.startswith('hf-hub:'):
            name = name[len('hf-hub:'):]
        if os.path.isdir(name):
            if not os.path.isfile(os.path.join(name, CONFIG_FILE)):
                raise MissingFileError(
                    f'{name} has no {CONFIG_FILE}: pass the output directory of a training run '
                    '(it holds config.json and model.safetensors).')
            return super().from_pretrained(name, *args, **kwargs)
        if looks_like_local_path(name):
            raise MissingFileError(f'{name} is not a folder: pass an output directory, a Hub repo id '
                                    '(user/name) or a timm model name.')
        if '/' in name:
            try:
                return super().from_pretrained(name, *args, **kwargs)
            except OSError as e:  # transformers: repo not found, or the Hub cannot be reached
                raise MissingFileError(
                    f'{name} is neither a local folder nor a model on the Hub that can be loaded now '
                    f'({one_line(e)[:200]}); check the name, or pass an output directory.') from e
        kwargs.setdefault('pretrained', True)
        return cls.from_timm(name, **kwargs)
