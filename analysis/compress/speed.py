"""What a compression buys, measured: parameters, GFLOPs and inference images/s (full and compressed alike)."""
import statistics
import time
from typing import Dict, List, Mapping, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from analysis.modeling.timm_internals import eager_attention
from analysis.modeling.transforms import model_data_config

SPEED_BATCH_SIZE = 64  # the acceptance measurement: CPU inference, batch 64, 2 threads
SPEED_THREADS = 2
DEFAULT_SPEED_ROUNDS = 5


def num_parameters(model: nn.Module) -> int:
    return int(sum(p.numel() for p in getattr(model, 'timm_model', model).parameters()))


def gflops(model: nn.Module) -> float:
    """GFLOPs of one image through the ViT (`torch.utils.flop_counter`: a multiply-add counts 2), attention included."""
    vit = getattr(model, 'timm_model', model).eval()
    parameter = next(vit.parameters())
    x = torch.zeros(1, *model_data_config(vit)['input_size'], device=parameter.device, dtype=parameter.dtype)
    with eager_attention(vit), FlopCounterMode(display=False) as counter, torch.no_grad():
        vit(x)
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def inference_throughput(models: Mapping[str, nn.Module], *, batch_size: int = SPEED_BATCH_SIZE,
                         threads: int = SPEED_THREADS, rounds: int = DEFAULT_SPEED_ROUNDS, batches_per_round: int = 2,
                         device: str = 'cpu', dtype: torch.dtype = torch.float32) -> Dict[str, List[float]]:
    """Inference images/s of several models, measured alternately in this process.

    Every round runs ``batches_per_round`` batches through each model in turn (the order reversed
    every other round), so a change in the machine's load hits all models alike; compare the
    models round by round (`speedup`). The models are moved to ``device`` / ``dtype`` and set to
    eval mode.

    Args:
        models: ``{name: model}``, all with the same input size (the first one's data config).
        batch_size: images per forward pass.
        threads: torch intra-op threads while measuring (restored after).
        rounds: measurement rounds (after one warm-up batch per model).
        batches_per_round: batches per model per round.
        device / dtype: where and in which precision to run (``cuda`` + ``torch.bfloat16`` for GPUs).

    Returns:
        ``{name: [images/s in each round]}``.
    """
    vits = {name: getattr(m, 'timm_model', m).to(device=device, dtype=dtype).eval() for name, m in models.items()}
    input_size = model_data_config(next(iter(vits.values())))['input_size']
    x = torch.randn(batch_size, *input_size, device=device, dtype=dtype)  # the content does not change the cost

    def sync() -> None:
        if torch.device(device).type == 'cuda':
            torch.cuda.synchronize()

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for vit in vits.values():  # warm-up: allocator, kernels, caches
            vit(x)
        images_per_s: Dict[str, List[float]] = {name: [] for name in vits}
        for r in range(rounds):
            for name in (list(vits) if r % 2 == 0 else list(vits)[::-1]):
                sync()
                start = time.perf_counter()
                for _ in range(batches_per_round):
                    vits[name](x)
                sync()
                images_per_s[name].append(batch_size * batches_per_round / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(previous_threads)
    return images_per_s


def speedup(images_per_s: Mapping[str, Sequence[float]], model: str, reference: str) -> float:
    """Median over rounds of ``images/s(model) / images/s(reference)`` (same rounds of `inference_throughput`)."""
    return float(statistics.median(m / r for m, r in zip(images_per_s[model], images_per_s[reference])))
