"""Faithfulness scores: their perturbation forwards against plain inference, and the main job's bounded call.

Side by side in one process, on the same images and batch size (timings on a shared machine are
noisy; the ratios measured next to each other are what carries over to another machine):

* alternated ``--repeats`` times: plain inference ``vit(pixel_values)`` over pre-transformed images
  (images/s), then `analysis.studies.faithfulness.perturbation_curves` for the maps of the model (17 for the
  demo: 12 layers, rollout, gradient rollout, random, centre, mask) on ``--images`` images, building
  every masked copy and running it through the fused model (forwards/s); the median ratio is printed;
* the main job's bounded call, exactly as the training job makes it
  (`faithfulness_to_dir` with its defaults: ``JOB_MAX_IMAGES`` images, ``JOB_STEPS`` steps; data
  loading, the eager forward + backward for the maps, the curves, the JSON), between two plain
  measurements: its seconds, the same in plain-inference images, and, with
  ``--reference_images_per_s`` (e.g. the run's ``test_samples_per_second``), on a machine that does
  that many images/s;
* ``--full N``: the command's default (N images, ``DEFAULT_STEPS`` steps), the same way; ``--save``
  keeps its ``faithfulness.json``.

    python bench/faithfulness_throughput.py --model outputs/synthetic_demo [--images 8] [--repeats 3]
        [--no_job | --job_output DIR] [--full 500 --save /tmp/faithfulness.json] [--reference_images_per_s 245]
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from analysis.modeling.transforms import eval_transform, model_data_config  # noqa: E402
from analysis.modeling.vit import TimmViTForImageClassification  # noqa: E402
from analysis.studies import faithfulness as fa  # noqa: E402
from bench.attention_throughput import load as load_demo  # noqa: E402
from data_scripts import DataArguments, load_flower_dataset, to_rgb  # noqa: E402
from data_scripts.files import write_json  # noqa: E402


def load(model_name, num_images):
    """The model and its own run's test split (a run directory), else the demo ViT on synthetic flowers."""
    run_config = Path(model_name or '') / 'run_config.json'
    if not model_name or not run_config.is_file():
        return load_demo(model_name, num_images)
    data = {k: v for k, v in json.loads(run_config.read_text())['data'].items()
            if k in DataArguments.__dataclass_fields__}
    if data.get('dataset_name') == 'synthetic':  # the test split does not depend on the other splits' sizes
        data.update(synthetic_train_per_class=1, synthetic_validation_per_class=1)
    split = load_flower_dataset(DataArguments(**data))['test']
    return TimmViTForImageClassification.from_pretrained(model_name).eval(), split


@torch.inference_mode()
def plain_images_per_s(vit, pixels, batch_size) -> float:
    """Full batches only, as the perturbation forwards run them: the images are tiled to two batches at least."""
    pixels = pixels.repeat(max(1, -(-2 * batch_size // len(pixels))), 1, 1, 1)
    pixels = pixels[:len(pixels) // batch_size * batch_size]
    start = time.perf_counter()
    for i in range(0, len(pixels), batch_size):
        vit(pixels[i:i + batch_size]).argmax(-1)
    return len(pixels) / (time.perf_counter() - start)


def perturbation_forwards_per_s(vit, layout, pixels, num_maps, steps, batch_size) -> float:
    order = fa.perturbation_order(torch.rand(len(pixels), num_maps, layout.num_patches,
                                             generator=torch.Generator().manual_seed(0)))
    baseline = pixels.mean(dim=(0, 2, 3))[None, :, None, None].expand_as(pixels)
    target = torch.zeros(len(pixels), dtype=torch.long)
    start = time.perf_counter()
    fa.perturbation_curves(vit, pixels, baseline, order, target, layout, steps, batch_size)
    forwards = len(pixels) * (2 * num_maps * (steps - 1) + 2)
    return forwards / (time.perf_counter() - start)


def timed_call(label, call, vit, pixels, batch_size, forwards, reference):
    """Runs ``call`` between two plain-inference measurements; prints its time in seconds and in plain images."""
    before = plain_images_per_s(vit, pixels, batch_size)
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    after = plain_images_per_s(vit, pixels, batch_size)
    plain = (before + after) / 2
    print(f'{label}: {seconds:.1f} s here (plain inference {before:.1f} img/s before, {after:.1f} after) = the time of '
          f'{seconds * plain:.0f} plain-inference images for {forwards} perturbation forwards '
          f'({forwards / seconds / plain:.3f} x plain inference overall)'
          + (f'; about {seconds * plain / reference:.1f} s at {reference:.0f} img/s' if reference else ''), flush=True)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default=None, help='output dir / Hub id (default: the demo ViT, random weights)')
    parser.add_argument('--images', type=int, default=8, help='images for the forwards/s comparison')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--no_job', action='store_true', help='skip the bounded main-job call')
    parser.add_argument('--job_output', default=None,
                        help='folder for the bounded call\'s faithfulness.json (default: a temporary one)')
    parser.add_argument('--full', type=int, default=0, help='also time the command on this many images')
    parser.add_argument('--save', default=None, help='write the --full result here (a faithfulness.json)')
    parser.add_argument('--reference_images_per_s', type=float, default=None,
                        help='plain-inference images/s of an idle machine, to convert the times')
    args = parser.parse_args()

    model, split = load(args.model, max(args.images, fa.JOB_MAX_IMAGES, args.full))
    vit, layout = model.timm_model, model.token_layout
    transform = eval_transform(model_data_config(vit))
    pixels = torch.stack([transform(to_rgb(image)) for image in split.select(range(args.images))['image']])
    num_maps = len(fa.method_names(len(vit.blocks), has_masks='mask' in split.column_names))
    plain_images_per_s(vit, pixels, args.batch_size)  # warm-up

    plain, perturbed = [], []
    for r in range(args.repeats):
        plain.append(plain_images_per_s(vit, pixels, args.batch_size))
        perturbed.append(perturbation_forwards_per_s(vit, layout, pixels, num_maps, fa.JOB_STEPS, args.batch_size))
        print(f'repeat {r + 1}: plain {plain[-1]:.1f} img/s, perturbation {perturbed[-1]:.1f} forwards/s, '
              f'ratio {perturbed[-1] / plain[-1]:.3f}', flush=True)
    p, q = statistics.median(plain), statistics.median(perturbed)
    print(f'median: plain inference {p:.1f} img/s, perturbation forwards {q:.1f} img/s; ratio perturbation/plain = '
          f'{statistics.median(a / b for a, b in zip(perturbed, plain)):.3f} ({args.images} images, {num_maps} maps, '
          f'{fa.JOB_STEPS} steps, batch {args.batch_size})', flush=True)

    def per_image(steps):
        return 2 * num_maps * (steps - 1) + 2

    if not args.no_job:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = args.job_output or tmp
            timed_call(f'bounded main-job call fa.faithfulness_to_dir(model, split, dir, batch_size={args.batch_size}) '
                       f'({fa.JOB_MAX_IMAGES} images, {fa.JOB_STEPS} steps)',
                       lambda: fa.faithfulness_to_dir(model, split, tmp, batch_size=args.batch_size, progress=False),
                       vit, pixels, args.batch_size, fa.JOB_MAX_IMAGES * per_image(fa.JOB_STEPS),
                       args.reference_images_per_s)
    if args.full:
        num_images = min(args.full, len(split))
        result = timed_call(
            f'command default ({num_images} images, {fa.DEFAULT_STEPS} steps)',
            lambda: fa.faithfulness_study(model, split, max_images=num_images, steps=fa.DEFAULT_STEPS,
                                          batch_size=args.batch_size, progress=False, model_id=args.model or ''),
            vit, pixels, args.batch_size, num_images * per_image(fa.DEFAULT_STEPS), args.reference_images_per_s)
        if args.save:
            write_json(args.save, result)
            print(f'wrote {args.save}')


if __name__ == '__main__':
    main()
