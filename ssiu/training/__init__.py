"""Training SSIU with the released recipe (SSIU.md, "Their training recipe"), and `ssiu train`.

One job per module: `settings` (TrainConfig, RECIPE, checks), `plan` (options -> what the
run does), `loop` (train(), the Run), `validation`, `state` (checkpoint file, RNG),
`model_tools` (EMA, activation checkpointing, peak memory), `cli` (`ssiu train`).

    result = ssiu.train("DIV2K_train_HR", "DIV2K_train_LR_bicubic/X4", scale=4,
                              iterations=100_000, out_dir="runs/x4")

Recipe defaults (`RECIPE`): 64x64 LR patches (HR 64*s) with random h/v flips and
transpose, batch 40, loss L1 + 0.01 * L1 of the rfft2 spectra, AdamW lr 1e-3 betas
(0.9, 0.99) weight decay 1e-4, cosine annealing to 1e-6 over the whole run (stepped every
iteration), seed 2024, 290 epochs. An epoch here is one patch from every training image
(len(images) / batch iterations); give `iterations` to fix the length directly.

Determinism: the model is initialised from `seed`; every patch (image, position, flips)
is a function of (seed, sample number) only (`ssiu.data.PatchBatchSampler`), whatever the
number of DataLoader workers; and a checkpoint holds model, optimizer, scheduler, step and
the RNG states. So on CPU a run repeats bit for bit, and resuming from step k gives the
same weights as the uninterrupted run (GPU kernels may not be deterministic).

The training checkpoint (`checkpoint.pt`, see `ssiu.training.state`) holds model,
optimizer, scheduler, step, settings, RNG states and history, plus "params_ema" (the
exponential moving average of the weights, as BasicSR names it) when `ema` is on.
`ssiu.load` reads its "params_ema" when present, else "params"; the final weights are
also written as safetensors with `ssiu.save`: the EMA weights when `ema` is on, else the
trained ones.

Speed and scale (issue 6):
- `compile=True`: the training forward/backward runs through
  `torch.compile(model, fullgraph=True, dynamic=False)` (`ssiu.compile`); patches are a
  fixed size, so one static graph; validation runs the eager model (other sizes).
- `amp="bf16"`: bf16 autocast for the forward pass, fp32 master weights (parameters,
  gradients and the optimizer stay fp32; the loss is computed in fp32). The fused custom
  ops take the bf16 activations and cast their fp32 weights to bf16 inside the kernels,
  returning weight gradients in fp32.
- `accum=N`: gradient accumulation; a step's global batch is batch_size * N patches,
  exactly the batch one step of batch_size * N would draw, and the loss (each micro-batch
  mean divided by N) is that of the big batch.
- `ema=decay`: EMA of the weights after every optimizer step, validated instead of the
  raw weights.
- `checkpoint_steps=True`: activation checkpointing of every SS-ReM step
  (torch.utils.checkpoint, use_reentrant=False): the same gradients, less memory.
- Multi-process: under `torchrun --nproc_per_node N -m ssiu train ...` the model is
  wrapped in DistributedDataParallel and every micro-batch is split over the processes
  (`ssiu.distributed`): the global batch, the loss curve and the checkpoint do not depend
  on N, and a checkpoint resumes on any process count. Rank 0 alone logs, validates and
  writes files.
- The log (history["train"]) records throughput "img_s" (training images per second
  over the logging window, all processes) and "peak_mem_mb": torch.cuda.max_memory_allocated
  on CUDA, the process's peak resident memory (getrusage) on CPU.
"""

from ssiu.training.cli import add_cli, run
from ssiu.training.loop import Run, ShardedSteps, TrainResult, train
from ssiu.training.model_tools import EMA, peak_memory_mb, set_activation_checkpointing
from ssiu.training.plan import RunPlan, make_plan
from ssiu.training.settings import (
    AMP_MODES,
    DEFAULT_EPOCHS,
    DEFAULT_SCALE,
    DEFAULT_VAL_CROP,
    RECIPE,
    TrainConfig,
)
from ssiu.training.state import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    load_checkpoint,
    save_checkpoint,
    seed_everything,
)
from ssiu.training.validation import evaluate, format_metrics

__all__ = [
    "AMP_MODES",
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "DEFAULT_EPOCHS",
    "DEFAULT_SCALE",
    "DEFAULT_VAL_CROP",
    "EMA",
    "RECIPE",
    "Run",
    "RunPlan",
    "ShardedSteps",
    "TrainConfig",
    "TrainResult",
    "add_cli",
    "evaluate",
    "format_metrics",
    "load_checkpoint",
    "make_plan",
    "peak_memory_mb",
    "run",
    "save_checkpoint",
    "seed_everything",
    "set_activation_checkpointing",
    "train",
]
