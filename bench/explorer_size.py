"""Size of report.html with and without the attention explorer (issue budget: demo +3 MB, ViT-B/16 < 15 MB).

For each run directory (with an attention summary that holds full maps, ``extract --full_maps 8``),
the report is written twice into a scratch copy of its result files: once as it is, once from the
same summary without its ``full_*`` tensors (no explorer). Prints both sizes, the growth, and per
tier of the explorer the bits stored and the largest error they introduce in a displayed number.

``--vit_base N`` first makes such a run: timm ``vit_base_patch16_224`` with random weights
(``pretrained=False``) at 224 px (197 tokens, 12 layers, 12 heads) on N synthetic 224 px test
images, extracted with ``full_maps=8``; ``all_results.json`` scores its (random) predictions.

    python bench/explorer_size.py outputs/synthetic_demo
    python bench/explorer_size.py --vit_base 8 [--keep DIR]
"""
import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from safetensors.torch import save_file  # noqa: E402

from analysis.core.run_files import METRICS_FILE, REPORT_FILE, SUMMARY_FILE  # noqa: E402
from analysis.maps.summary import load_summary  # noqa: E402
from analysis.render.explorer import explorer_data  # noqa: E402
from analysis.render.figures import render_figures
from analysis.render.report import write_report  # noqa: E402

RESULT_FILES = ('all_results.json', 'attention_metrics.json', 'background.json', 'importance.json',
                'faithfulness.json', 'attention_change.json')


def vit_base_run(output_dir: Path, num_images: int) -> Path:
    """A random-weights ViT-B/16 224 px 'run': attention summary with 8 full maps, metrics, results."""
    from analysis.core.metrics import classification_metrics
    from analysis.maps.extract import extract_to_file
    from analysis.modeling.vit import TimmViTForImageClassification
    from data_scripts import DataArguments, load_flower_dataset
    classes = 5
    data = load_flower_dataset(DataArguments(
        synthetic_num_classes=classes, synthetic_image_size=224, synthetic_train_per_class=1,
        synthetic_validation_per_class=1, synthetic_test_per_class=-(-num_images // classes)))
    test = data['test'].select(range(num_images))
    names = test.features['label'].names
    model = TimmViTForImageClassification.from_timm('vit_base_patch16_224', pretrained=False, label_names=names).eval()
    output_dir.mkdir(parents=True, exist_ok=True)
    done = extract_to_file(model, test, output_dir / SUMMARY_FILE, metrics_path=output_dir / METRICS_FILE,
                           batch_size=8, full_maps=8, progress=False, split='test',
                           model_id='vit_base_patch16_224 (random weights)', dataset_name='synthetic 224 px')
    results = classification_metrics(done.labels.tolist(), done.predictions.tolist(), names)
    (output_dir / 'all_results.json').write_text(json.dumps({'test_' + k: v for k, v in results.items()}))
    return output_dir


def measure(run_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for name in RESULT_FILES + (SUMMARY_FILE,):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, scratch / name)
        start, cpu = time.perf_counter(), time.process_time()
        packed = explorer_data(scratch / SUMMARY_FILE)
        pack_s, pack_cpu_s = time.perf_counter() - start, time.process_time() - cpu
        if packed is None:
            raise SystemExit(f'{run_dir / SUMMARY_FILE} holds no full maps: run python -m analysis extract '
                             f'--model {run_dir} --full_maps 8 first')
        with_explorer = write_report(scratch, render_figures(scratch)).stat().st_size
        tensors, meta = load_summary(scratch / SUMMARY_FILE)
        save_file({k: v for k, v in tensors.items() if not k.startswith('full_')}, str(scratch / SUMMARY_FILE),
                  metadata={'analysis': json.dumps(meta)})  # the same summary without the full maps
        without = write_report(scratch, render_figures(scratch)).stat().st_size
        assert 'id="explorer-data"' not in (scratch / REPORT_FILE).read_text()
    return {'run': str(run_dir), 'tokens': int(tensors['full_attention'].shape[-1]),
            'full_maps': list(tensors['full_attention'].shape), 'report_mb_without': without / 1e6,
            'report_mb_with': with_explorer / 1e6, 'growth_mb': (with_explorer - without) / 1e6,
            'explorer_data_mb': packed['bytes'] / 1e6, 'pack_s': round(pack_s, 1), 'pack_cpu_s': round(pack_cpu_s, 1),
            'tiers': {t['name']: {'bits': t['bits'], 'mb': t['bytes'] / 1e6,
                                  'max_error': {k: round(v, 5) for k, v in t['errors'].items()}}
                      for t in packed['tiers']}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('runs', nargs='*', type=Path, help='run directories with full maps in their summary')
    parser.add_argument('--vit_base', type=int, default=0, metavar='N',
                        help='also measure a random-weights ViT-B/16 224 px run on N synthetic images')
    parser.add_argument('--keep', type=Path, help='where to keep the ViT-B/16 run (default: a temporary folder)')
    args = parser.parse_args()
    runs = list(args.runs)
    with tempfile.TemporaryDirectory() as scratch:
        if args.vit_base:
            runs.append(vit_base_run(args.keep or Path(scratch) / 'vit_base', args.vit_base))
        for run in runs:
            print(json.dumps(measure(run), indent=1), flush=True)


if __name__ == '__main__':
    main()
