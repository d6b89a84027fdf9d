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
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter
from timm.models._hub import save_config_for_hf
from transformers import TimmWrapperConfig, TimmWrapperForImageClassification
from transformers.modeling_outputs import ImageClassifierOutput

from data_scripts.errors import one_line
from data_scripts.files import atomic_path, write_json
from .tokens import TokenLayout

_logger = logging.getLogger(__name__)

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'


def looks_like_local_path(name: str) -> bool:
    """Whether a model name is meant as a folder on this machine rather than a Hub id or timm name.

    ``./x``, ``/x``, ``~/x``, ``a/b/c`` and ``a/b`` whose ``a`` is a local folder (``outputs/typo``)
    are local paths; ``user/name`` with no folder ``user`` here is a Hub repo id.
    """
    name = str(name)
    if name.startswith(('.', '/', '~')) or '\\' in name or name.count('/') > 1:
        return True
    return '/' in name and os.path.isdir(name.split('/')[0])


def vit_attention_modules(vit: torch.nn.Module) -> List[Tuple[str, Attention]]:
    """The attention module of every block of a timm ViT, by exact name (``blocks.{i}.attn``).

    Raises:
        ValueError: the model has no ViT blocks with timm's standard ``Attention``.
    """
    blocks = getattr(vit, 'blocks', None)
    if not isinstance(blocks, torch.nn.Sequential) or len(blocks) == 0:
        raise ValueError(
            f'{type(vit).__name__} has no transformer blocks (model.blocks); attention capture '
            'needs a timm ViT such as vit_* or deit_*.')
    modules = []
    for i, block in enumerate(blocks):
        attn = getattr(block, 'attn', None)
        if not isinstance(attn, Attention):
            raise ValueError(
                f'blocks.{i}.attn of {type(vit).__name__} is {type(attn).__name__}, not timm '
                'Attention; only standard ViT attention (vit_*, deit_*) can be captured.')
        modules.append((f'blocks.{i}.attn', attn))
    return modules


@contextmanager
def capture_attentions(vit: torch.nn.Module) -> Iterator[List[torch.Tensor]]:
    """Records the attention probabilities of every block while the context is open.

    Turns each block's eager attention path on (``fused_attn = False``) and hooks the input of
    ``attn_drop``, which is exactly ``softmax(q k^T * scale)`` (before dropout). On exit the hooks
    are removed and the fused flags restored, whatever happened inside.

    Yields:
        a list that fills with one ``[B, H, N, N]`` tensor per block call, in call order.
    """
    modules = vit_attention_modules(vit)
    maps: List[torch.Tensor] = []
    fused_flags = [attn.fused_attn for _, attn in modules]
    handles = []

    def record(module, args):
        maps.append(args[0])  # [B, H, N, N], rows sum to 1

    try:
        for _, attn in modules:
            attn.fused_attn = False
            handles.append(attn.attn_drop.register_forward_pre_hook(record))
        yield maps
    finally:
        for handle in handles:
            handle.remove()
        for (_, attn), fused in zip(modules, fused_flags):
            attn.fused_attn = fused


def timm_config(vit: torch.nn.Module, label_names: Optional[Sequence[str]] = None) -> Dict:
    """The timm-native ``config.json`` of a model, loadable by timm and by transformers.

    timm's exporter records ``num_classes`` inside ``model_args`` as well as at the top level;
    transformers' TimmWrapper passes both to ``create_model`` and fails, so it is dropped from
    ``model_args`` (the top-level value still sets the head).
    """
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        model_config = {'label_names': list(label_names)} if label_names else None
        save_config_for_hf(vit, os.path.join(tmp, CONFIG_NAME), model_config=model_config)
        with open(os.path.join(tmp, CONFIG_NAME)) as f:
            config = json.load(f)
    config.get('model_args', {}).pop('num_classes', None)
    return config


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
        missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f'{name} has no {" / ".join(missing)}: give the output directory of a training run.')
        return folder
    from huggingface_hub import snapshot_download  # only for Hub ids
    try:
        return Path(snapshot_download(repo_id or name, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME]))
    except Exception as e:  # the Hub client raises many kinds (offline, not found, HTTP errors)
        raise FileNotFoundError(f'{name} is neither a local folder nor a model that can be downloaded from the Hub '
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
    with open(folder / CONFIG_NAME) as f:
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
    weights = folder / WEIGHTS_NAME
    start = {'checkpoint': str(folder), 'pretrained': pretrained,
             'weights_sha256': hashlib.sha256(weights.read_bytes()).hexdigest(),
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
        raise ValueError(f'{folder} does not fit the model to train ({architecture} with {model_args or "its own"} '
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
            **kwargs,
    ) -> None:
        """Writes the timm-native checkpoint: ``config.json`` + ``model.safetensors``.

        Both files are written whole or not at all (temporary name, then rename).
        """
        if not is_main_process:
            return
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = self.timm_model.state_dict()
        prefix = self.base_model_prefix + '.'
        state_dict = {k[len(prefix):] if k.startswith(prefix) else k: v.detach().contiguous().cpu()
                      for k, v in state_dict.items()}
        config = timm_config(self.timm_model, self.class_names)
        with atomic_path(save_directory / WEIGHTS_NAME) as tmp:
            save_file(state_dict, str(tmp), metadata={'format': 'pt'})
        write_json(save_directory / CONFIG_NAME, config)

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
            raise ValueError(
                f'{model_name!r} is not a timm model name, an output directory or a Hub repo id; '
                'see timm.list_models("vit_*").')
        model_args = dict(model_args or {})
        if 'num_classes' in model_args:
            raise ValueError('give the classes as label_names, not num_classes in model_args')
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
            vit = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay={'hf_hub_filename': WEIGHTS_NAME},
                                    **model_args)
        except OSError as e:  # the Hub client's errors (offline, not found) are OSErrors
            raise FileNotFoundError(
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
            if not os.path.isfile(os.path.join(name, CONFIG_NAME)):
                raise FileNotFoundError(
                    f'{name} has no {CONFIG_NAME}: pass the output directory of a training run '
                    '(it holds config.json and model.safetensors).')
            return super().from_pretrained(name, *args, **kwargs)
        if looks_like_local_path(name):
            raise FileNotFoundError(f'{name} is not a folder: pass an output directory, a Hub repo id '
                                    '(user/name) or a timm model name.')
        if '/' in name:
            try:
                return super().from_pretrained(name, *args, **kwargs)
            except OSError as e:  # transformers: repo not found, or the Hub cannot be reached
                raise FileNotFoundError(
                    f'{name} is neither a local folder nor a model on the Hub that can be loaded now '
                    f'({one_line(e)[:200]}); check the name, or pass an output directory.') from e
        kwargs.setdefault('pretrained', True)
        return cls.from_timm(name, **kwargs)
