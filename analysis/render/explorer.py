"""The data of the report's attention explorer: the summary's full maps, packed small enough to embed.

The explorer (``templates/report/explorer.html.j2`` and ``explorer.js``) shows the images whose full
maps the summary holds (``full_attention [K, L, H, N, N]``, written by `analysis.maps.extract` with
``full_maps=K``): the attention row of any query (the CLS token or a clicked patch) over the patch
keys, for every layer and head, the head mean and the rollout. This module turns those maps into
what the page embeds; the page needs no server and no network.

Encoding. A row ``a`` over the ``P`` patch keys is scaled to its maximum, ``x = a / max(a)``, and
stored as ``q = round(levels * ln(1 + mu x) / ln(1 + mu))``, uint8 (``levels = 255``: 8 bits),
mu = 255: the mu-law of G.711. Linear steps of ``max / 255`` would wipe out the many small values
of a peaked map (on the demo they moved the entropy by up to 0.07); mu-law steps are about 2 %
of a large value and ``max / 12000`` near zero, and near-uniform maps compress better too. The
row's scale is not stored: everything the explorer shows is invariant to it. It shows shares of
the row's patch attention, ``x / sum(x)`` (`decoded_shares`; colours are ``x``), and from them the
numbers of `analysis.maps.attention_metrics`: ``entropy``, ``fg_ratio`` and the most attended patch.
Rows are grouped into tiers; each tier of each image is one zlib stream of the codes (inflated in
the page by ``DecompressionStream``; 4-bit codes two to a byte, high nibble first), base64-encoded:

==========  ===============================  ===================
tier        rows                             shape per image
==========  ===============================  ===================
``cls``     the CLS query, every head        ``[L, H, P]``
``rollout`` every query: CLS, then patches   ``[Q, P]``, Q = 1 + P
``mean``    every query, head mean           ``[L, Q, P]``
``heads``   patch queries, every head        ``[L, H, P, P]``
==========  ===============================  ===================

``cls`` is stored at the best precision of `LEVELS` (it is small). The other tiers, in this order,
take the highest precision of `LEVELS` that keeps the embedded data (crops included) under
``max_bytes``. ``rollout`` and ``mean`` are always stored (at 4 bits if need be, past the budget, with
a warning); ``heads`` is left out when it does not fit even at 4 bits, and the page says so: it is
what grows, 44.5 M values at ViT-B/16 224 px with K = 8, so it is the tier that gives way. The near-uniform
maps of random weights fit at 4 bits (4.3 MB); peaked trained maps compress less (the demo's rate, 0.33
characters per value at 4 bits, would give 15 MB), so a trained ViT-B/16 report leaves them out. The
``cls``, ``rollout`` and ``mean`` tiers of a trained ViT-B/16 take about 5 MB at 8 bits.

Errors. A decoded ``x`` is off by at most ``(x + 1 / mu) (exp(ln(1 + mu) / (2 levels)) - 1)``:
1.1 % of ``x`` plus ``4e-5`` at 8 bits. The page states what that does to the numbers it shows,
measured here over every stored row: the largest difference between a number computed from the
decoded row and the same number of the summary's own row (its ``cls_attention`` and ``rollout``
rows where it has them, the float16 full maps otherwise).
"""
import base64
import io
import json
import logging
import math
import zlib
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from markupsafe import Markup
from PIL import Image
from safetensors import safe_open

from analysis.core.resources import template_text
from analysis.maps.attention_metrics import attention_entropy, fg_ratio
from analysis.maps.rollout import attention_rollout
from analysis.maps.sinks import flag_high_norm
from analysis.maps.summary import EXTRACT_COMMAND, read_summary_meta
from analysis.modeling.tokens import TokenLayout
from analysis.render.plots import OVERLAY_ALPHA, attention_colour_stops

_logger = logging.getLogger(__name__)

LEVELS = (255, 63, 15)  # 8, 6 and 4 bits per stored value, tried in this order
PACKED_LEVELS = 15  # codes up to this are stored two to a byte
ZLIB_LEVEL = 6  # level 9 is 10x slower on 4-bit codes for a few % less
MU = 255  # mu-law companding (ITU-T G.711)
MAX_BYTES = 8_000_000  # characters of embedded data (base64 maps and crops), so a ViT-B/16 report stays < 15 MB
JPEG_QUALITY = 90
SCRIPT = 'report/explorer.js'
TIER_ROWS = {'cls': 'CLS query, every head', 'rollout': 'rollout, every query',
             'mean': 'head mean, every query', 'heads': 'every head, patch queries'}
FULL_MAPS = 8  # images the explorer shows: extract(..., full_maps=FULL_MAPS), half correct, half wrong


def query_rows(attn: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The rows the explorer shows: ``[..., N, N]`` -> ``[..., 1 + P, P]``, queries CLS then the patches."""
    return torch.cat([layout.cls_to_patches(attn).unsqueeze(-2), layout.patches_to_patches(attn)], dim=-2)


def quantise(rows: torch.Tensor, levels: int) -> torch.Tensor:
    """``[..., P]`` attention rows -> uint8 mu-law codes of ``a / max(a)`` (a row of zeros stays zero)."""
    rows = rows.double()  # float32 would round some codes to the neighbour of the nearest one
    x = rows / rows.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.round(levels * torch.log1p(MU * x) / math.log1p(MU)).to(torch.uint8)


def encode(q: torch.Tensor, levels: int) -> str:
    """Codes -> the base64 zlib stream the page embeds (4-bit codes two to a byte, high nibble first)."""
    q = q.flatten()
    if levels <= PACKED_LEVELS:
        q = torch.cat([q, q.new_zeros(len(q) % 2)])  # [2n]
        q = q[0::2] * 16 + q[1::2]  # [n]
    return base64.b64encode(zlib.compress(q.contiguous().numpy().tobytes(), ZLIB_LEVEL)).decode('ascii')


def decode(blob: str, levels: int, count: int) -> torch.Tensor:
    """The inverse of `encode` (as explorer.js does it): ``count`` uint8 codes."""
    q = torch.frombuffer(bytearray(zlib.decompress(base64.b64decode(blob))), dtype=torch.uint8)
    if levels <= PACKED_LEVELS:
        q = torch.stack([q // 16, q % 16], dim=-1).flatten()
    return q[:count]


def decoded(q: torch.Tensor, levels: int) -> torch.Tensor:
    """``[..., P]`` codes -> float64 ``x = a / max(a)``, as explorer.js decodes them."""
    return torch.expm1(q.double() / levels * math.log1p(MU)) / MU


def decoded_shares(q: torch.Tensor, levels: int) -> torch.Tensor:
    """``[..., P]`` codes -> float64 shares ``x / sum(x)`` (a row of zeros stays zero), as explorer.js."""
    x = decoded(q, levels)
    total = x.sum(dim=-1, keepdim=True)
    return x / torch.where(total > 0, total, 1.0)


def row_numbers(rows: torch.Tensor, fg: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The explorer's numbers of attention rows ``[..., P]``, by `analysis.maps.attention_metrics`.

    Args:
        rows: attention rows (any scale).
        fg: ``[P]`` fraction of each patch covered by the flower, or None without a mask.

    Returns:
        ``entropy`` and ``share`` (``[..., P]``, the rows renormalised) and, with ``fg``, ``fg_ratio``.
    """
    out = {'entropy': attention_entropy(rows),
           'share': rows.double() / rows.double().sum(dim=-1, keepdim=True).clamp_min(1e-12)}
    if fg is not None:
        flat = rows.reshape(1, -1, rows.shape[-1])  # [1, rows, P]
        out['fg_ratio'] = fg_ratio(flat, fg.reshape(1, -1))[0].reshape(rows.shape[:-1])
    return out


def _max_errors(q: torch.Tensor, levels: int, reference: torch.Tensor, fg: Optional[torch.Tensor]
                ) -> Dict[str, float]:
    """Largest difference of each number between decoded rows ``q`` and the rows they came from."""
    ours, theirs = row_numbers(decoded_shares(q, levels), fg), row_numbers(reference, fg)
    return {name: float((ours[name].double() - theirs[name].double()).abs().max()) for name in ours}


def _jpeg_data_uri(image: torch.Tensor) -> str:
    """``[H, W, 3]`` uint8 -> ``data:image/jpeg;base64,...``."""
    buffer = io.BytesIO()
    Image.fromarray(image.numpy()).save(buffer, format='JPEG', quality=JPEG_QUALITY)
    return 'data:image/jpeg;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


def _read(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """The summary tensors the explorer uses: whole for the few full-map images, rows otherwise."""
    with safe_open(str(path), framework='pt') as f:
        keys = set(f.keys())
        tensors = {k: f.get_tensor(k) for k in ('full_attention', 'full_indices', 'full_images', 'labels',
                                                'predictions', 'example_indices', 'example_images') if k in keys}
        if 'full_attention' not in tensors:
            return tensors
        indices = tensors.get('full_indices', torch.arange(len(tensors['full_attention']))).tolist()
        for name in ('cls_attention', 'rollout', 'fg_fraction', 'token_norms'):  # [M, ...]: only those images' rows
            if name in keys:
                rows = f.get_slice(name)
                tensors[name] = torch.cat([rows[i:i + 1] for i in indices])
    return tensors


def _crops(tensors: Mapping[str, torch.Tensor], indices: Sequence[int]) -> List[Optional[torch.Tensor]]:
    """The input crop of every full-map image: ``full_images``, else an example crop of the same image."""
    if 'full_images' in tensors:
        return list(tensors['full_images'])
    examples = dict(zip(tensors.get('example_indices', torch.empty(0)).tolist(), tensors.get('example_images', [])))
    return [examples.get(i) for i in indices]


def _title(index: int, label: int, prediction: int, meta: Mapping) -> str:
    names = meta['class_names']
    if not meta.get('predictions_scored', True):
        predicted = (meta.get('model_class_names') or names)[prediction]
        return f'#{index}: {names[label]}, predicted {predicted} (not scored)'
    mark = '\u2713' if label == prediction else '\u2717'
    return f'#{index}: {names[label]}, predicted {names[prediction]} {mark}'


def _fit(rows_of_image, references, fgs, budget: float, required: bool) -> Optional[Dict]:
    """The tier at the highest precision of `LEVELS` whose blobs fit ``budget`` characters.

    Args:
        rows_of_image: one function per image returning its ``[..., P]`` rows to store.
        references: one function per image returning the rows to measure the error against.
        fgs: per image, ``[P]`` flower fractions or None.
        budget: characters left.
        required: when nothing fits, store the tier at the lowest precision anyway (else None).
    """
    for levels in LEVELS:
        last = levels == LEVELS[-1]
        codes, blobs = [], []
        for rows in rows_of_image:
            codes.append(quantise(rows(), levels))
            blobs.append(encode(codes[-1], levels))
            size = sum(len(b) for b in blobs)
            # the images so far do not fit, or the first one says that all of them will be far from fitting
            hopeless = size > budget or (len(blobs) == 1 and size * len(rows_of_image) > 1.5 * budget)
            if hopeless and not (last and required):
                break
        else:
            errors: Dict[str, float] = {}
            for q, reference, fg in zip(codes, references, fgs):
                for name, value in _max_errors(q, levels, reference(), fg).items():
                    errors[name] = max(errors.get(name, 0.0), value)
            return {'levels': levels, 'bits': levels.bit_length(), 'blobs': blobs, 'bytes': size, 'errors': errors}
    return None


def explorer_data(summary_path: Union[str, Path], max_bytes: Optional[int] = None) -> Optional[Dict]:
    """Packs the full maps of an attention summary for the explorer.

    Args:
        summary_path: an ``attentions.safetensors``.
        max_bytes: the most characters of embedded data (crops and maps; default `MAX_BYTES`); see the
            module docstring.

    Returns:
        None when the summary holds no full maps; else ``data`` (the JSON that explorer.js reads),
        ``images`` (an option title per image), ``layers``, ``heads``, ``tiers`` (per tier: what it
        holds, ``bits`` or None when left out, ``bytes``, largest ``errors``), ``bytes`` (all
        embedded data) and ``max_bytes``.
    """
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    meta = read_summary_meta(summary_path)
    tensors = _read(summary_path)
    if 'full_attention' not in tensors:
        return None
    layout = TokenLayout.from_dict(meta['layout'])
    full = tensors['full_attention']  # [K, L, H, N, N] float16
    K, L, H = full.shape[:3]
    indices = tensors.get('full_indices', torch.arange(K)).tolist()
    labels = tensors['labels'][indices].tolist()
    predictions = tensors['predictions'][indices].tolist()
    fgs = list(tensors['fg_fraction'].float()) if 'fg_fraction' in tensors else [None] * K  # [P] each
    crops = [_jpeg_data_uri(c) if c is not None else None for c in _crops(tensors, indices)]

    cls_rows = tensors['cls_attention']  # [K, L, H, P], the summary's own rows
    roll = [query_rows(attention_rollout(list(full[k:k + 1].unbind(1)), layout=layout)[0], layout)
            for k in range(K)]  # [Q, P] each, from the float16 maps
    summary_rollout = tensors['rollout'].float()  # [K, P]

    def mean_rows(k):  # [L, Q, P]
        return query_rows(full[k].float(), layout).mean(dim=1)

    def mean_reference(k):  # the CLS rows as the summary has them
        rows = mean_rows(k)
        rows[:, 0] = cls_rows[k].float().mean(dim=1)
        return rows

    def rollout_reference(k):
        rows = roll[k].clone()
        rows[0] = summary_rollout[k]
        return rows

    budget = max_bytes - sum(len(c or '') for c in crops)
    tiers: Dict[str, Optional[Dict]] = {}
    cls_of_image = [lambda k=k: cls_rows[k] for k in range(K)]
    candidates = {
        'cls': (cls_of_image, cls_of_image),
        'rollout': ([lambda k=k: roll[k] for k in range(K)], [lambda k=k: rollout_reference(k) for k in range(K)]),
        'mean': ([lambda k=k: mean_rows(k) for k in range(K)], [lambda k=k: mean_reference(k) for k in range(K)]),
        'heads': ([lambda k=k: layout.patches_to_patches(full[k]) for k in range(K)],
                  [lambda k=k: layout.patches_to_patches(full[k]) for k in range(K)]),
    }
    for name, (rows, references) in candidates.items():
        tiers[name] = _fit(rows, references, fgs, budget, required=name != 'heads')
        if tiers[name] is None:
            _logger.info('explorer: %s rows left out, over the %d-character budget even at %d bits',
                         name, max_bytes, LEVELS[-1].bit_length())
            continue
        budget -= tiers[name]['bytes']
        if budget < 0:
            _logger.warning('explorer: the %s rows alone take the page past its %d-character budget', name, max_bytes)

    grid, patch = layout.grid_size, layout.patch_size
    if 'token_norms' in tensors:  # per image and layer, the high-norm patch tokens (analysis.maps.sinks)
        flags = flag_high_norm(layout.patch_tokens(tensors['token_norms']))  # [K, L, P]
        flagged = [[row.nonzero().flatten().tolist() for row in image] for image in flags]
    else:
        flagged = [None] * K
    images = [{'index': index, 'title': _title(index, label, prediction, meta), 'src': crop,
               'fg': fg.tolist() if fg is not None else None, 'flagged': flagged[k],
               **{name: tier['blobs'][k] for name, tier in tiers.items() if tier is not None}}
              for k, (index, label, prediction, crop, fg) in enumerate(zip(indices, labels, predictions, crops, fgs))]
    data = {'grid': list(grid), 'patch': list(patch), 'layers': L, 'heads': H,
            'levels': {name: tier['levels'] for name, tier in tiers.items() if tier is not None},
            'mu': MU, 'packed_levels': PACKED_LEVELS, 'colours': attention_colour_stops(), 'alpha': OVERLAY_ALPHA,
            'images': images}
    summary = [{'name': name, 'rows': TIER_ROWS[name], 'bits': tier and tier['bits'],
                'bytes': tier['bytes'] if tier else 0, 'errors': tier['errors'] if tier else {}}
               for name, tier in tiers.items()]
    return {'data': data, 'images': [image['title'] for image in images], 'layers': L, 'heads': H,
            'tiers': summary, 'bytes': sum(t['bytes'] for t in summary) + sum(len(c or '') for c in crops),
            'max_bytes': max_bytes}


def explorer_script() -> Markup:
    """explorer.js, to be put inside ``<script>`` as it is (it is ours; HTML escaping would break it)."""
    script = template_text(SCRIPT)
    assert '</script' not in script.lower(), f'{SCRIPT} must not contain </script'
    return Markup(script)


def explorer_section(summary_path: Optional[Union[str, Path]], model: str, max_bytes: Optional[int] = None) -> Dict:
    """What ``explorer.html.j2`` renders: the packed data and script, or why there is no explorer.

    Args:
        summary_path: the attention summary, or None when there is none.
        model: the output directory, for the command the page suggests.
        max_bytes: see `explorer_data`.
    """
    command = EXTRACT_COMMAND.format(model=model) + f' --full_maps {FULL_MAPS}'
    packed = explorer_data(summary_path, max_bytes) if summary_path is not None else None
    if packed is None:
        why = 'no attention summary' if summary_path is None else 'the attention summary holds no full maps'
        return {'available': False, 'missing': f'The attention explorer needs full attention maps ({why}); '
                                               f'run {command}, then python -m analysis report {model}.'}
    _logger.info('explorer: %d images, %.1f MB embedded (%s)', len(packed['images']), packed['bytes'] / 1e6,
                 json.dumps({t['name']: t['bits'] for t in packed['tiers']}))
    return {'available': True, 'script': explorer_script(), **packed}
