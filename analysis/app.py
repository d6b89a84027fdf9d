"""Look inside the model with your own photo: a Gradio app, served locally or as a Hugging Face Space.

    python -m analysis app --model outputs/synthetic_demo [--host 127.0.0.1 --port 7860]

One page for any model this project loads (an output directory, a Hub id, a timm name): drop in a photo (or
take one with the webcam, or click one of the run's test images) and see the top-5 prediction, the CLS
attention of every layer (`analysis.maps.extract.attend_images`, the maps ``python -m analysis image``
draws), attention rollout, gradient-weighted rollout for a chosen class (`analysis.studies.faithfulness`),
one layer and head in large, and per layer the numbers: entropy, the high-norm tokens
(`analysis.maps.sinks`) and, for the run's own test images, whose flower masks are known, fg_ratio and
fg_lift.

Requests go through Gradio's queue, ``MAX_CONCURRENCY`` at a time. The model is shared by every request,
and capturing its attention switches its blocks to the eager path and hooks them for the length of a
call, so its passes run one at a time (`Lens.lock`); everything a request computes lives in that
request (and in its page's ``gr.State``), never in the `Lens`. Passes run under ``torch.inference_mode``
(the gradient rollout needs gradients: it runs under ``enable_grad``), on the GPU when there is one.

Gradio is an optional extra: ``pip install -e ".[app]"``.
"""
import hashlib
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from analysis.maps.attention_metrics import attention_entropy, fg_lift, fg_ratio
from analysis.maps.extract import attention_of_pass, image_inputs
from analysis.maps.sinks import flag_high_norm
from analysis.modeling.timm_internals import capture_token_norms
from analysis.modeling.transforms import eval_geometry, eval_transform, mask_to_tensor, model_data_config
from analysis.modeling.vit import TimmViTForImageClassification
from analysis.render import plots
from analysis.studies.faithfulness import attention_gradients, gradient_rollout
from data_scripts import open_image
from data_scripts.errors import UserError

_logger = logging.getLogger(__name__)

MAX_CONCURRENCY = 2  # requests processed at once (decoding, drawing); the model passes take turns (Lens.lock)
QUEUE_SIZE = 64  # requests waiting beyond that are refused with "queue full"
NUM_EXAMPLES = 8  # test images of the run offered as examples
TOP_K = 5
MAP_PIXELS = 320  # about how wide the single maps are drawn
PREDICTED = 'the predicted class'  # the gradient rollout's default target


def device_for_app() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Lens:
    """A loaded model and what one request computes from it. Nothing of a request is stored here.

    Args:
        model_name: an output directory, a Hub id or a timm name (as everywhere in this project).
        device: where the model runs (default: the GPU when there is one).
        examples: ``[(image path, mask image)]``: test images offered in the page, their masks known
            (matched to an upload by the file's SHA-256, so a re-upload of the same file gets its mask too).
    """

    def __init__(self, model_name: str, device: Optional[torch.device] = None,
                 examples: Sequence[Tuple[str, Image.Image]] = ()):
        self.name = model_name
        self.model = TimmViTForImageClassification.from_pretrained(model_name).eval().to(device or device_for_app())
        self.layout = self.model.token_layout
        self.data_config = model_data_config(self.model.timm_model)
        self.transform = eval_transform(self.data_config)
        self.class_names = self.model.class_names
        self.lock = threading.Lock()  # the model's passes, one at a time: capture hooks and flags are per model
        geometry = eval_geometry(self.data_config)
        self.example_paths = [path for path, _ in examples]
        self.example_fg = {_sha256(path): self.layout.patch_fraction(mask_to_tensor(mask, geometry))
                           for path, mask in examples}  # sha256 -> [P]

    @property
    def num_layers(self) -> int:
        return self.model.num_blocks

    @property
    def num_heads(self) -> int:
        return self.model.num_heads

    def analyse(self, path: str, target: Optional[int] = None) -> Dict:
        """Everything the page shows of one image, as plain arrays (the page keeps it in its own state), the file
        read once and passed through the model once: the maps `attend_images` gives (`attention_of_pass`) and the
        gradient rollout for class ``target`` (None: the predicted), from the same pass.

        Raises:
            UserError: the file is not a readable image.
        """
        began = time.perf_counter()
        image = open_image(path)  # upright (EXIF), 8-bit RGB whatever the mode; any size (resized by the transform)
        pixel_values = image_inputs([image], self.transform, self.layout)
        with self.lock, capture_token_norms(self.model.timm_model) as norms:  # one pass: the maps and their gradients
            logits, attentions, gradients, _ = attention_gradients(
                self.model.timm_model, pixel_values.to(self.model.device, self.model.dtype), self._target(target))
        result = attention_of_pass(self.layout, pixel_values, logits, attentions, norms, self.data_config)
        gradient = gradient_rollout(attentions, gradients, self.layout)[0].cpu().numpy()
        _logger.info('analysed %s (%d x %d) in %.2f s', Path(path).name, *image.size, time.perf_counter() - began)
        cls_attention = result['cls_attention'][0]  # [L, H, P]
        flags = flag_high_norm(self.layout.patch_tokens(result['token_norms'][0]))  # [L, P]
        fg = self.example_fg.get(_sha256(path)) if self.example_fg else None  # [P] or None
        return {'crop': result['images'][0].numpy(), 'probs': result['probs'][0].numpy(),
                'cls_attention': cls_attention.numpy(), 'rollout': result['rollout'][0].numpy(),
                'flagged': flags.numpy(), 'fg': None if fg is None else fg.numpy(), 'gradient': gradient}

    def gradient_map(self, path: str, target: Optional[int]) -> np.ndarray:
        """Gradient-weighted rollout ``[P]`` of an image file for class ``target`` (None: the predicted class)."""
        return self._gradient(open_image(path), target)

    def _gradient(self, image: Image.Image, target: Optional[int]) -> np.ndarray:
        pixel_values = image_inputs([image], self.transform, self.layout).to(self.model.device, self.model.dtype)
        with self.lock:
            _, attentions, gradients, _ = attention_gradients(self.model.timm_model, pixel_values, self._target(target))
        return gradient_rollout(attentions, gradients, self.layout)[0].cpu().numpy()

    @staticmethod
    def _target(target: Optional[int]) -> Optional[torch.Tensor]:
        return None if target is None else torch.tensor([target])

    # Pictures and numbers, from a request's own result.

    def top_k(self, analysis: Dict) -> Dict[str, float]:
        order = np.argsort(-analysis['probs'])[:TOP_K]
        return {self.class_names[i]: float(analysis['probs'][i]) for i in order}

    def single_map(self, analysis: Dict, layer: int, head) -> np.ndarray:
        """One layer's CLS map over the crop, enlarged: head ``head`` (0-based) or ``"mean"``."""
        rows = analysis['cls_attention'][int(layer)]  # [H, P]
        values = rows.mean(axis=0) if head == 'mean' else rows[int(head)]
        return self.picture(analysis['crop'], values)

    def picture(self, crop: np.ndarray, values: np.ndarray) -> np.ndarray:
        return plots.upscaled(plots.panel(crop, values, self.layout), MAP_PIXELS)

    def grid(self, analysis: Dict) -> np.ndarray:
        """The layer grid of ``python -m analysis image``: the crop, every layer's CLS map (head mean), the rollout."""
        cls_maps = analysis['cls_attention'].mean(axis=1)[None]  # [1, L, P]
        top = int(np.argmax(analysis['probs']))
        fig = plots.layer_grid(analysis['crop'][None], cls_maps, analysis['rollout'][None], self.layout,
                               [f'pred: {self.class_names[top]} ({analysis["probs"][top]:.0%})'])
        return plots.figure_pixels(fig)

    def numbers(self, analysis: Dict) -> str:
        """Per layer (head mean): entropy, the high-norm tokens and, with a mask, fg_ratio and fg_lift (Markdown)."""
        maps = torch.from_numpy(analysis['cls_attention']).mean(dim=1)  # [L, P]
        entropy = attention_entropy(maps)
        flagged = analysis['flagged'].sum(axis=1)
        has_mask = analysis['fg'] is not None
        header = '| layer | entropy | high-norm tokens |' + (' fg_ratio | fg_lift |' if has_mask else '')
        rows = [header, '|---' * (header.count('|') - 1) + '|']
        if has_mask:
            fg = torch.from_numpy(analysis['fg'])[None]  # [1, P]
            ratio, lift = fg_ratio(maps[None], fg)[0], fg_lift(maps[None], fg)[0]  # [L]
        for layer in range(len(maps)):
            cells = [str(layer + 1), f'{entropy[layer]:.3f}', str(int(flagged[layer]))]
            if has_mask:
                cells += [f'{ratio[layer]:.3f}', f'{lift[layer]:.2f}']
            rows.append('| ' + ' | '.join(cells) + ' |')
        note = ('The flower mask of this test image is known: fg_ratio is the share of the CLS attention on the flower, '
                'fg_lift that share over the flower\'s area (1: no preference).' if has_mask else
                'fg_ratio and fg_lift need a flower mask: click one of the examples (the run\'s test images) to see them.')
        return '\n'.join(rows) + '\n\n' + note


def run_examples(model_dir: str, folder: Path, count: int = NUM_EXAMPLES) -> List[Tuple[str, Image.Image]]:
    """The first ``count`` test images of a run's own dataset, written as PNG into ``folder``, with their masks.

    Nothing for a model that is not a run's output directory, or whose dataset has no masks.
    """
    from analysis.core.run_files import run_data_args
    from data_scripts import DataArguments, load_flower_dataset
    data = run_data_args(model_dir)
    if data is None:
        return []
    split = load_flower_dataset(DataArguments(**data)).get('test')
    if split is None or 'mask' not in split.column_names:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    names = split.features['label'].names
    examples = []
    for i in range(min(count, len(split))):
        row = split[i]
        path = folder / f'test_{i}_{names[row["label"]]}.png'
        row['image'].convert('RGB').save(path)
        examples.append((str(path), row['mask']))
    return examples


def _in_words(error: UserError, path: str) -> str:
    """The error for the page: the uploaded file by its name, not by the server's copy of it."""
    return str(error).replace(str(Path(path).parent) + '/', '')


def _target(lens: Lens, choice: Optional[str]) -> Optional[int]:
    return None if choice in (None, PREDICTED) else lens.class_names.index(choice)


def build_app(lens: Lens):
    """The Gradio Blocks page of a `Lens` (queued, ``MAX_CONCURRENCY`` requests at a time)."""
    import gradio as gr

    def photo_file(payload):
        """The uploaded file untouched (gr.Image would open it first): `open_image` applies its EXIF orientation,
        converts its mode, and says in the page what is wrong with a file that is not an image."""
        if payload is not None and payload.path is not None:
            return payload.path
        return gr.Image.preprocess(photo, payload)

    def analyse_event(path, target, layer, head):
        if not path:
            return None, None, None, None, None, '', None
        try:
            analysis = lens.analyse(path, _target(lens, target))
        except UserError as e:
            raise gr.Error(_in_words(e, path)) from e
        return (lens.top_k(analysis), lens.grid(analysis), lens.picture(analysis['crop'], analysis['rollout']),
                lens.picture(analysis['crop'], analysis['gradient']), lens.single_map(analysis, layer, head),
                lens.numbers(analysis), analysis)

    def target_event(path, target, analysis):
        if not path or analysis is None:
            return None
        try:
            return lens.picture(analysis['crop'], lens.gradient_map(path, _target(lens, target)))
        except UserError as e:
            raise gr.Error(_in_words(e, path)) from e

    def map_event(analysis, layer, head):
        return None if analysis is None else lens.single_map(analysis, layer, head)

    layers = [(str(i + 1), i) for i in range(lens.num_layers)]
    heads = [('mean', 'mean')] + [(str(h + 1), h) for h in range(lens.num_heads)]
    with gr.Blocks(title=f'{Path(lens.name).name}: what the ViT looks at') as demo:
        gr.Markdown(f'## What does `{lens.name}` look at?\n\nA Vision Transformer with {lens.num_layers} layers and '
                    f'{lens.num_heads} heads, {len(lens.class_names)} classes. Drop in a photo of a flower, take one '
                    'with the webcam, or click a test image below.')
        with gr.Row():
            with gr.Column():
                photo = gr.Image(label='Your photo', sources=['upload', 'webcam', 'clipboard'], type='filepath',
                                 elem_id='photo')
                photo.preprocess = photo_file  # one instance, not a subclass: gradio writes a .pyi beside a subclass
                target = gr.Dropdown([PREDICTED] + lens.class_names, value=PREDICTED, elem_id='target',
                                     label='Class for the gradient-weighted rollout')
                if lens.example_paths:
                    gr.Examples(lens.example_paths, inputs=photo, label='Test images of the run (flower masks known)')
            with gr.Column():
                label = gr.Label(num_top_classes=TOP_K, label='Prediction (top 5)', elem_id='prediction')
                numbers = gr.Markdown(elem_id='numbers')
        grid = gr.Image(label='CLS attention of every layer (mean over heads) and rollout', show_label=False,
                        format='png', interactive=False, elem_id='grid')  # the picture has its own title
        with gr.Row():
            with gr.Column():
                layer = gr.Dropdown(layers, value=layers[-1][1], label='Layer', elem_id='layer')
                head = gr.Dropdown(heads, value='mean', label='Head', elem_id='head')
                single = gr.Image(label='One layer and head: CLS attention', format='png', interactive=False,
                                  elem_id='single')
            rollout = gr.Image(label='Attention rollout', format='png', interactive=False, elem_id='rollout')
            gradient = gr.Image(label='Gradient-weighted rollout (Chefer et al. 2021)', format='png',
                                interactive=False, elem_id='gradient')
        state = gr.State()
        photo.change(analyse_event, [photo, target, layer, head],
                     [label, grid, rollout, gradient, single, numbers, state], api_name='analyse')
        target.change(target_event, [photo, target, state], gradient, api_name=False)
        layer.change(map_event, [state, layer, head], single, api_name=False)
        head.change(map_event, [state, layer, head], single, api_name=False)
    demo.queue(default_concurrency_limit=MAX_CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def serve(model_name: str, host: str = '127.0.0.1', port: int = 7860, examples: int = NUM_EXAMPLES) -> None:
    """Builds the app of a model and serves it until interrupted (the run's test images as examples)."""
    with tempfile.TemporaryDirectory(prefix='flower-vit-lens-examples-') as folder:
        lens = Lens(model_name, examples=run_examples(model_name, Path(folder), examples) if examples else ())
        _logger.info('serving %s on http://%s:%d (%s)', model_name, host, port, lens.model.device)
        build_app(lens).launch(server_name=host, server_port=port, show_error=True, allowed_paths=[folder])
