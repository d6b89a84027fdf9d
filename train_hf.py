#!/usr/bin/env python
"""Fine-tune a timm ViT on flower images with the Hugging Face Trainer, then look inside it.

    python train_hf.py                                    # embedded default: synthetic flowers, offline
    python train_hf.py configs/synthetic_demo.json        # the same, from its config file
    accelerate launch train_hf.py configs/oxford102_vit_base.json   # pretrained ViT-B/16, one or many GPUs
    python -m train_hf ... / accelerate launch -m train_hf ...      # the same from any folder, once installed

With no arguments every flag takes its default, which is the embedded demo. Every
TrainingArguments flag works (--output_dir, --max_steps, --seed, --push_to_hub,
--resume_from_checkpoint, --report_to tensorboard, ...). A run killed mid-way and started again
with the same --output_dir resumes from its last complete checkpoint. A user error (a missing
folder, a bad flag value) ends with one ``error:`` line; FLOWER_VIT_LENS_TRACEBACK=1 shows the
traceback.
"""
import sys
from typing import Dict, List, Optional

from analysis.train.args import parse_args
from analysis.train.job import run
from data_scripts.errors import run_main


def main(argv: Optional[List[str]] = None) -> Dict:
    """The job: flags (or a config file) -> data, model, Trainer, train, evaluate, analyse, card, push.

    The steps are `analysis.train.job.run`, a package function, so that the background study and
    the base-model cache run the same job.
    """
    model_args, data_args, training_args = parse_args(argv)
    return run(model_args, data_args, training_args)


if __name__ == '__main__':
    sys.exit(run_main(main))
