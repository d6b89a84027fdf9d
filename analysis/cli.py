"""Command line of the analysis package: ``python -m analysis <command> ...``.

    extract     attention summary + metrics of a dataset split      (attentions.safetensors, attention_metrics.json)
    heatmaps    figures from an attention summary                   (layer grid, head maps, class maps, depth curves)
    image       layer grid and rollout of any image files
    report      the self-contained report.html of an output directory
    background  accuracy on background variants, bg_gap             (background.json + figure)
    importance  linear probes, layer skipping, head ablation         (importance.json + figure)
    faithfulness  which attention map explains the decision: deletion / insertion AUC  (faithfulness.json + figure)
    sinks       high-norm tokens, attention sinks, registers, and whether the model needs them  (sinks.json + figure)
    compress    a smaller, faster model: blocks removed by importance, distilled, measured (compress.json + run dir)
    app         a web page to look inside the model with your own photo (Gradio; pip install -e ".[app]")
    study       correlated vs random backgrounds, trained and measured end to end
    seeds       the same training job N times (seeds, bases): which findings hold across runs (seeds.json)
    push        publish an output directory to the Hugging Face Hub (or --dry_run into a folder)

Dataset flags are train_hf.py's (``--dataset_name``/``--dataset``, ``--train_dir``, ``--synthetic_*``, ...);
when none is given and ``--model`` is a run's output directory, the run's own dataset is used.
"""
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from transformers import HfArgumentParser

from analysis.core.run_files import FIGURES_DIR
from data_scripts.errors import UserError, run_main

logger = logging.getLogger('analysis')



@dataclass
class ModelFlags:
    model: str = field(metadata={'help': 'Output directory of a run, Hub repo id, or timm model name.'})
    batch_size: int = field(default=128, metadata={'help': 'Images per forward pass.'})


@dataclass
class ExtractFlags(ModelFlags):
    split: str = field(default='test', metadata={'help': 'Dataset split to stream over.'})
    output: Optional[str] = field(default=None, metadata={
        'help': 'Summary file to write (default: <model dir>/attentions.safetensors); '
                'attention_metrics.json goes next to it.'})
    full_maps: int = field(default=0, metadata={
        'help': 'Keep full N x N maps (and input crops) of K images, half correct and half wrong predictions '
                'where there are both; the report\'s attention explorer shows them.'})
    max_batches: Optional[int] = field(default=None, metadata={'help': 'Stop after this many batches.'})
    num_workers: int = field(default=0, metadata={'help': 'DataLoader worker processes (per process).'})


@dataclass
class HeatmapFlags:
    summary: str = field(metadata={'help': 'An attentions.safetensors written by extract.'})
    output: str = field(default=FIGURES_DIR, metadata={'help': 'Folder for the PNG figures.'})


@dataclass
class ImageFlags(ModelFlags):
    output: str = field(default='image_attention', metadata={'help': 'Folder for the figures.'})


@dataclass
class ReportFlags:
    output_dir: str = field(metadata={'help': 'Output directory of a run (holds all_results.json).'})


@dataclass
class StudyFlags(ModelFlags):
    split: str = field(default='test', metadata={'help': 'Split to measure on.'})
    output: Optional[str] = field(default=None, metadata={'help': 'Folder for the JSON + figure (default: model dir).'})
    seed: int = field(default=0, metadata={'help': 'Seed of the background partners.'})
    max_images: Optional[int] = field(default=None, metadata={'help': 'At most this many images per split.'})


@dataclass
class FaithfulnessFlags(ModelFlags):
    split: str = field(default='test', metadata={'help': 'Split to score on.'})
    output: Optional[str] = field(default=None, metadata={'help': 'Folder for the JSON + figure (default: model dir).'})
    max_images: int = field(default=500, metadata={'help': 'Score this many images, drawn by seed (at least 2).'})
    steps: int = field(default=8, metadata={'help': 'Perturbation steps per curve (at least 2).'})
    baseline: str = field(default='mean', metadata={
        'help': 'What a removed patch shows: mean (the per-channel mean of the images scored), black, or blur.'})
    seed: int = field(default=0, metadata={'help': 'Seed of the image sample, the random map and the tie-breaking.'})


@dataclass
class SinksFlags(ModelFlags):
    split: str = field(default='test', metadata={'help': 'Split to measure on.'})
    output: Optional[str] = field(default=None, metadata={'help': 'Folder for the JSON + figure (default: model dir).'})
    max_images: int = field(default=500, metadata={'help': 'Measure this many images, drawn by seed.'})
    causal_images: int = field(default=100, metadata={
        'help': 'Images of the causal check (flagged tokens replaced by the mean of the others, against as many '
                'random background tokens); 0: none.'})
    layer: Optional[int] = field(default=None, metadata={
        'help': 'Layer (1-based) of the causal check (default: the first whose sink share reaches half its maximum).'})
    seed: int = field(default=0, metadata={'help': 'Seed of the image sample and of the random background tokens.'})


@dataclass
class AppFlags:
    model: str = field(metadata={'help': 'Output directory of a run, Hub repo id, or timm model name.'})
    host: str = field(default='127.0.0.1', metadata={'help': 'Address to serve on (0.0.0.0: every interface).'})
    port: int = field(default=7860, metadata={'help': 'Port to serve on.'})
    examples: int = field(default=8, metadata={
        'help': 'Test images of the run offered as examples (their flower masks are known); 0: none.'})


@dataclass
class RunStudyFlags:
    output_dir: str = field(default='outputs/study', metadata={'help': 'Where both runs and the table go.'})
    quick: bool = field(default=False, metadata={'help': 'Tiny budget (smoke test), not the real study.'})
    seeds: int = field(default=1, metadata={
        'help': 'Train the fine-tuned pair with this many training seeds and say what holds across them (the '
                'scratch pair stays single-seed).'})


@dataclass
class PushFlags:
    output_dir: str = field(metadata={'help': 'Output directory of a run.'})
    repo_id: Optional[str] = field(default=None, metadata={
        'help': 'Hub model repo, user/name (default: the run\'s --hub_model_id, when it had one).'})
    space: Optional[str] = field(default=None, metadata={
        'help': 'Also publish a Gradio Space, user/name, that runs the app (python -m analysis app) on the model; '
                'the model card links to it.'})
    private: bool = field(default=False, metadata={'help': 'Create the repo (and the Space) private.'})
    dry_run: Optional[str] = field(default=None, metadata={
        'help': 'Write exactly what would be uploaded into this (new or empty) folder instead of pushing (with '
                '--space: the model into DRY_RUN/model, the Space into DRY_RUN/space).'})


def _parse(flags, argv: List[str], with_data: bool = False):
    """Positional ``summary`` / ``output_dir`` become flags, then HfArgumentParser does the rest.

    With dataset flags and ``--model`` a run's output directory, the run's own dataset arguments
    (run_config.json) are the defaults, and flags given here override them. For ``image`` the
    strings left over are the image files.
    """
    from data_scripts import DataArguments
    first = [f for f in flags.__dataclass_fields__.values()][0]
    if argv and not argv[0].startswith('-') and first.name in ('summary', 'output_dir'):
        argv = [f'--{first.name}', argv[0]] + argv[1:]
    parser = HfArgumentParser((flags, DataArguments) if with_data else (flags,))
    if with_data:
        parser.set_defaults(**_run_data_defaults(argv))
    if flags is ImageFlags:
        *parsed, files = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
        unknown = [f for f in files if f.startswith('-')]
        if unknown:
            raise UserError(f'unknown flags: {unknown}')
        return (*parsed, files)
    return parser.parse_args_into_dataclasses(args=argv)


def _run_data_defaults(argv: List[str]) -> dict:
    """The dataset arguments of the run named by --model, if it is an output directory with run_config.json."""
    model = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == '--model'),
                 next((a.split('=', 1)[1] for a in argv if a.startswith('--model=')), None))
    from analysis.core.run_files import run_data_args
    data = run_data_args(Path(model).expanduser()) if model else None
    if data is None:
        from analysis.train.args import DATASET_FLAGS
        if not any(a.split('=')[0] in DATASET_FLAGS for a in argv):
            raise UserError('name the dataset (--dataset_name synthetic|oxford102|<hub id>, --train_dir DIR, ...): '
                             '--model is not the output directory of a run, so there is no dataset to default to')
        return {}
    logger.info(f'dataset defaults from {model}: {data.get("dataset_name")}')
    return data


def _load_model(name: str):
    from analysis.modeling.vit import TimmViTForImageClassification
    return TimmViTForImageClassification.from_pretrained(name).eval()


def _dataset_for(data_args, rank: int = 0, world_size: int = 1):
    """The dataset the arguments name, with unreadable images dropped (as train_hf.py does).

    In a distributed run (``rank`` of ``world_size``) process 0 generates / prepares the dataset
    first and the others then read its cache; the images are checked by every process at once.
    """
    import torch

    from data_scripts import check_images, load_flower_dataset
    if rank > 0:
        torch.distributed.barrier()
    dataset = load_flower_dataset(data_args)
    if rank == 0 and world_size > 1:
        torch.distributed.barrier()
    dataset, _ = check_images(dataset, strict=data_args.strict_images)
    return dataset


def _split(dataset, split: str):
    if split not in dataset:
        raise UserError(f'--split {split}: the dataset has splits {list(dataset)}')
    return dataset[split]


def cmd_extract(argv: List[str]) -> None:
    """Under ``accelerate launch --num_processes N`` every process streams a share of the split; rank 0 merges."""
    from accelerate import PartialState

    from analysis.core.launch import check_launch
    from analysis.core.run_files import METRICS_FILE, SUMMARY_FILE
    from analysis.maps.extract import distributed_rank, extract_to_file
    device = PartialState().device  # starts the process group under accelerate launch; this process's device
    check_launch(distributed_rank()[1] > 1)  # the shards follow torch.distributed; before any data is loaded
    flags, data_args = _parse(ExtractFlags, argv, with_data=True)
    output = Path(flags.output) if flags.output else Path(flags.model) / SUMMARY_FILE
    if not flags.output and not Path(flags.model).is_dir():
        raise UserError('--output is required when --model is not an output directory')
    rank, world_size = distributed_rank()  # (accelerate's own index reads 0 on every CPU process)
    model = _load_model(flags.model).to(device)
    dataset = _dataset_for(data_args, rank, world_size)
    result = extract_to_file(
        model, _split(dataset, flags.split), output, metrics_path=output.parent / METRICS_FILE, sharded=True,
        batch_size=flags.batch_size, full_maps=flags.full_maps, max_batches=flags.max_batches, model_id=flags.model,
        dataset_name=data_args.dataset_name, split=flags.split, num_workers=flags.num_workers)
    if rank == 0:
        print(f'wrote {output} and {output.parent / METRICS_FILE} ({result.metadata["num_images"]} images, '
              f'{world_size} process{"es" if world_size > 1 else ""}, {result.runtime_s:.1f} s)')


def cmd_heatmaps(argv: List[str]) -> None:
    from analysis.render.figures import summary_figures
    (flags,) = _parse(HeatmapFlags, argv)
    paths = summary_figures(flags.summary, flags.output)
    print('\n'.join(f'wrote {p}' for p in paths.values()))


def cmd_image(argv: List[str]) -> None:
    from analysis.maps.extract import attend_images
    from analysis.render import plots
    from data_scripts import open_image
    flags, files = _parse(ImageFlags, argv)
    if not files:
        raise UserError('give one or more image files: python -m analysis image --model <m> a.jpg b.png')
    images = [open_image(f) for f in files]  # upright (EXIF orientation applied), RGB
    model = _load_model(flags.model)
    result = attend_images(model, images)
    names = model.class_names
    titles = [f'{Path(f).name}\npred: {names[int(p.argmax())]} ({float(p.max()):.0%})'
              for f, p in zip(files, result['probs'])]
    out = Path(flags.output)
    fig = plots.layer_grid(result['images'], result['cls_maps'], result['rollout'], model.token_layout, titles)
    print(f'wrote {plots.save_figure(fig, out / "layer_grid.png")}')
    for i, f in enumerate(files):
        for layer in (1, model.num_blocks):
            fig = plots.head_maps(result['images'][i], result['cls_attention'][i, layer - 1], model.token_layout, layer)
            print(f'wrote {plots.save_figure(fig, out / f"{Path(f).stem}_heads_layer{layer}.png")}')


def cmd_report(argv: List[str]) -> None:
    from analysis.core.run_files import CONFIG_FILE, SUMMARY_FILE
    from analysis.maps.summary import check_summary_matches, read_summary_meta
    from analysis.render.figures import render_figures
    from analysis.render.report import write_report
    (flags,) = _parse(ReportFlags, argv)
    run = Path(flags.output_dir)
    if (run / SUMMARY_FILE).is_file() and (run / CONFIG_FILE).is_file():
        check_summary_matches(read_summary_meta(run / SUMMARY_FILE), _load_model(str(run)))
    print(f'wrote {write_report(run, render_figures(run))}')


def _study_output(flags) -> Path:
    if flags.output:
        return Path(flags.output)
    if Path(flags.model).is_dir():
        return Path(flags.model)
    raise UserError('--output is required when --model is not an output directory')


def _write_study(output: Path, name: str, result: dict, figure) -> None:
    from analysis.core.run_files import FIGURES_DIR
    from analysis.render import plots
    from data_scripts.files import write_json
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / f'{name}.json', result)
    figure_path = output / FIGURES_DIR / f'{name}.png'
    plots.save_figure(figure(result), figure_path)
    print(f'wrote {output / f"{name}.json"} and {figure_path}')


def _one_process(command: str) -> None:
    """The studies run in one process (README, "Large splits and many processes"): refuse a multi-process launch."""
    import os
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UserError(f'{command} runs in one process (each of the {os.environ["WORLD_SIZE"]} launched would repeat '
                         f'the whole study); run it with python -m analysis {command} ... (it uses the GPU if there is one)')


def _study_device():
    import torch
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def cmd_background(argv: List[str]) -> None:
    from analysis.render import plots
    from analysis.studies.background import background_study
    flags, data_args = _parse(StudyFlags, argv, with_data=True)
    _one_process('background')
    model = _load_model(flags.model).to(_study_device())
    dataset = _dataset_for(data_args)
    synthetic = data_args.synthetic_config() if data_args.dataset_name == 'synthetic' else None
    result = background_study(model, _split(dataset, flags.split), seed=flags.seed, batch_size=flags.batch_size,
                              synthetic_config=synthetic, split=flags.split, max_images=flags.max_images,
                              model_id=flags.model)
    _write_study(_study_output(flags), 'background', result, plots.background_figure)


def cmd_importance(argv: List[str]) -> None:
    from analysis.render import plots
    from analysis.studies.importance import importance_study
    flags, data_args = _parse(StudyFlags, argv, with_data=True)
    _one_process('importance')
    model = _load_model(flags.model).to(_study_device())
    dataset = _dataset_for(data_args)
    _split(dataset, flags.split)
    result = importance_study(model, dataset, batch_size=flags.batch_size, max_train=flags.max_images,
                              max_test=flags.max_images, seed=flags.seed, test_split=flags.split)
    _write_study(_study_output(flags), 'importance', result, plots.importance_figure)


def cmd_faithfulness(argv: List[str]) -> None:
    from analysis.render import plots
    from analysis.studies.faithfulness import check_options, faithfulness_study
    flags, data_args = _parse(FaithfulnessFlags, argv, with_data=True)
    check_options(steps=flags.steps, baseline=flags.baseline, max_images=flags.max_images)  # before any loading
    _one_process('faithfulness')
    output = _study_output(flags)
    model = _load_model(flags.model).to(_study_device())
    dataset = _dataset_for(data_args)
    result = faithfulness_study(model, _split(dataset, flags.split), max_images=flags.max_images, steps=flags.steps,
                                baseline=flags.baseline, batch_size=flags.batch_size, seed=flags.seed,
                                split=flags.split, model_id=flags.model)
    _write_study(output, 'faithfulness', result, plots.faithfulness_figure)


def cmd_sinks(argv: List[str]) -> None:
    from analysis.render import plots
    from analysis.studies.sinks import sinks_of_split
    flags, data_args = _parse(SinksFlags, argv, with_data=True)
    if flags.max_images < 1 or flags.causal_images < 0:
        raise UserError(f'--max_images must be >= 1 and --causal_images >= 0, got {flags.max_images}, '
                        f'{flags.causal_images}')
    _one_process('sinks')
    output = _study_output(flags)
    model = _load_model(flags.model).to(_study_device())
    if flags.layer is not None and not 1 <= flags.layer <= model.num_blocks:
        raise UserError(f'--layer {flags.layer}: the model has layers 1..{model.num_blocks}')
    dataset = _dataset_for(data_args)
    result = sinks_of_split(model, _split(dataset, flags.split), max_images=flags.max_images, seed=flags.seed,
                            batch_size=flags.batch_size, model_id=flags.model, split=flags.split,
                            causal_images=flags.causal_images, layer=None if flags.layer is None else flags.layer - 1)
    _write_study(output, 'sinks', result, plots.sinks_figure)


def cmd_app(argv: List[str]) -> None:
    (flags,) = _parse(AppFlags, argv)
    if flags.examples < 0:
        raise UserError(f'--examples must be >= 0, got {flags.examples}')
    try:
        import gradio  # noqa: F401

        from analysis.app import serve
    except ImportError as e:
        raise UserError(f'the app needs Gradio ({e.name} is not installed): pip install -e ".[app]"') from e
    serve(flags.model, host=flags.host, port=flags.port, examples=flags.examples)


def cmd_compress(argv: List[str]) -> None:
    """The flags of CompressFlags; every other flag goes to the distillation runs as a train_hf flag."""
    from analysis.compress.flags import CompressFlags
    from analysis.compress.run import compress_run
    flags, train_flags = HfArgumentParser((CompressFlags,)).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True)
    result = compress_run(flags.model, flags.output_dir, max_accuracy_drop=flags.max_accuracy_drop,
                          distill_epochs=flags.distill_epochs, temperature=flags.temperature, alpha=flags.alpha,
                          selection_images=flags.selection_images, speed_rounds=flags.speed_rounds,
                          base_model=flags.base_model, flags=train_flags)
    print(result['message'])


def cmd_study(argv: List[str]) -> None:
    from analysis.study import run_study
    (flags,) = _parse(RunStudyFlags, argv)
    if flags.seeds < 1:
        raise UserError(f'--seeds must be >= 1, got {flags.seeds}')
    run_study(flags.output_dir, quick=flags.quick, seeds=flags.seeds)


@dataclass
class SeedsFlags:
    """Any other flag (or a config file first) is a train_hf flag, given to every run."""
    output_dir: str = field(default='outputs/seeds', metadata={'help': 'Where the runs and seeds.json go.'})
    seeds: str = field(default='42,0,1,2,3', metadata={'help': 'Training seeds, comma-separated: one run each.'})
    base_seeds: int = field(default=1, metadata={
        'help': 'Bases to fine-tune from (with base:<config>): 1 is the base of the config; K > 1 also rebuilds it '
                'with seeds 1..K-1 (--base_seed), so that base-to-base variation is measured too.'})


def cmd_seeds(argv: List[str]) -> None:
    from analysis.seeds import parse_seeds, run_seeds
    config = argv[:1] if argv and argv[0].endswith('.json') else []
    flags, train_flags = HfArgumentParser((SeedsFlags,)).parse_args_into_dataclasses(
        args=argv[len(config):], return_remaining_strings=True)
    if flags.base_seeds < 1:
        raise UserError(f'--base_seeds must be >= 1, got {flags.base_seeds}')
    base_seeds = [None] + list(range(1, flags.base_seeds))
    result = run_seeds([*config, *train_flags], flags.output_dir, seeds=parse_seeds(flags.seeds), base_seeds=base_seeds)
    from analysis.core.run_files import SEEDS_FILE
    print(f'wrote {Path(flags.output_dir) / SEEDS_FILE} ({result["num_runs"]} runs)')


def cmd_push(argv: List[str]) -> None:
    from analysis.core.run_files import RUN_CONFIG_FILE, read_optional_json
    from analysis.publish.hub import push_output_dir
    (flags,) = _parse(PushFlags, argv)
    repo_id = flags.repo_id or ((read_optional_json(Path(flags.output_dir) / RUN_CONFIG_FILE) or {})
                                .get('training') or {}).get('hub_model_id')
    if not repo_id:
        raise UserError('--repo_id user/name is required: the run has no --hub_model_id to default to')
    print(push_output_dir(flags.output_dir, repo_id, private=flags.private, dry_run_dir=flags.dry_run,
                          space_id=flags.space))


COMMANDS = {
    'extract': cmd_extract, 'heatmaps': cmd_heatmaps, 'image': cmd_image, 'report': cmd_report,
    'background': cmd_background, 'importance': cmd_importance, 'faithfulness': cmd_faithfulness,
    'sinks': cmd_sinks, 'app': cmd_app, 'compress': cmd_compress, 'study': cmd_study, 'seeds': cmd_seeds, 'push': cmd_push,
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip())
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
    return run_main(COMMANDS[argv[0]], argv[1:])
