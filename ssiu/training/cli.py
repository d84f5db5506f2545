"""`ssiu train`: the command line of `ssiu.train`, the same options."""

from __future__ import annotations

import argparse

from ssiu.training.loop import train
from ssiu.training.settings import AMP_MODES, DEFAULT_EPOCHS, DEFAULT_SCALE
from ssiu.training.validation import format_metrics


def add_cli(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train SSIU (released recipe by default)",
        description=(
            "Train SSIU on HR images (LR made by bicubic downsampling) or DIV2K-style HR/LR "
            "folder pairs, with the released recipe as defaults: 64x64 LR patches, batch "
            "40, flips/transposes, L1 + 0.01 FFT-L1, AdamW 1e-3, cosine to 1e-6, seed 2024."
        ),
    )
    data = p.add_argument_group("data")
    data.add_argument("--hr", metavar="DIR", help="folder of HR training images")
    data.add_argument(
        "--lr",
        metavar="DIR",
        help="folder of matching LR images (DIV2K: 0001x4.png or same names); "
        "default: made from HR by bicubic",
    )
    data.add_argument(
        "--scale",
        type=int,
        choices=(2, 3, 4),
        default=None,
        help=f"upscaling factor (default {DEFAULT_SCALE})",
    )
    data.add_argument(
        "--patch",
        type=int,
        default=None,
        metavar="P",
        help="LR patch side (default 64; HR patch P*scale)",
    )
    data.add_argument("--no-augment", action="store_true", help="no flips/transposes")
    data.add_argument("--cache", action="store_true", help="keep decoded images in memory")
    data.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="DataLoader workers (default: 0 on CPU, up to 8 on CUDA)",
    )
    length = p.add_argument_group("length").add_mutually_exclusive_group()
    length.add_argument("--iters", type=int, default=None, metavar="N", help="training steps")
    length.add_argument(
        "--epochs",
        type=float,
        default=None,
        metavar="E",
        help=f"passes, one patch per image (default {DEFAULT_EPOCHS})",
    )
    run_group = p.add_argument_group("run")
    run_group.add_argument(
        "--stop-at",
        type=int,
        default=None,
        metavar="STEP",
        help="stop after STEP steps (same schedule); resume later",
    )
    run_group.add_argument(
        "--minutes",
        type=float,
        default=None,
        metavar="M",
        help="stop (with a checkpoint) after this many minutes",
    )
    run_group.add_argument(
        "--out", default="runs/ssiu", metavar="DIR", help="output folder (default runs/ssiu)"
    )
    run_group.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint.pt")
    run_group.add_argument(
        "--init", metavar="WEIGHTS", help="start a new run from weights (ours or the authors')"
    )
    run_group.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:1")
    run_group.add_argument(
        "--backend",
        choices=("auto", "torch", "triton"),
        default="auto",
        help="auto: Triton kernels on CUDA, reference elsewhere",
    )
    run_group.add_argument(
        "--amp",
        nargs="?",
        const="bf16",
        default="off",
        choices=AMP_MODES,
        help="bf16: bf16 autocast forward, fp32 master weights (--amp "
        "alone means bf16; default off)",
    )
    run_group.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the training step (fullgraph, one static "
        "graph; worth it for long runs)",
    )
    run_group.add_argument(
        "--checkpoint-steps",
        action="store_true",
        help="activation checkpointing per SS-ReM step: less memory, "
        "same gradients; each step's forward runs twice",
    )
    run_group.add_argument("--no-progress", action="store_true", help="no progress bar")
    run_group.add_argument(
        "--log-every",
        type=int,
        default=50,
        metavar="N",
        help="record the mean loss every N steps (default 50)",
    )
    recipe = p.add_argument_group("recipe (defaults: the released one)")
    recipe.add_argument("--batch-size", type=int, default=None, metavar="N", help="default 40")
    recipe.add_argument("--learning-rate", type=float, metavar="LR", help="default 1e-3")
    recipe.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="0.9 0.99")
    recipe.add_argument("--weight-decay", type=float, metavar="WD", help="default 1e-4")
    recipe.add_argument("--eta-min", type=float, metavar="LR", help="final lr, default 1e-6")
    recipe.add_argument(
        "--freq-weight",
        type=float,
        default=None,
        metavar="W",
        help="weight of the FFT L1 term, default 0.01",
    )
    recipe.add_argument("--seed", type=int, default=None, metavar="S", help="default 2024")
    recipe.add_argument(
        "--accum",
        type=int,
        default=None,
        metavar="N",
        help="gradient accumulation: global batch = batch size x N (default 1)",
    )
    recipe.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an EMA of the weights (e.g. 0.999): validated, saved as "
        "params_ema and as the final weights (default off)",
    )
    model = p.add_argument_group("model (defaults: the released one)")
    model.add_argument("--channels", type=int, metavar="C", help="feature channels (64)")
    model.add_argument("--unfold-steps", type=int, metavar="N", help="SS-ReM steps (9)")
    model.add_argument("--heads", type=int, metavar="H", help="ESAM heads (4)")
    model.add_argument("--attn-topk", type=int, metavar="K", help="keys kept per query")
    model.add_argument("--moe-topk", type=int, metavar="K", help="experts kept (3)")
    val = p.add_argument_group("validation")
    val.add_argument(
        "--val-hr",
        metavar="DIR",
        help="HR validation images (default: the embedded photos, 64x64 LR centre crops)",
    )
    val.add_argument("--val-lr", metavar="DIR", help="matching LR validation images")
    val.add_argument(
        "--val-crop",
        type=int,
        default=None,
        metavar="N",
        help="validate on N x N LR centre crops (default: whole images)",
    )
    val.add_argument(
        "--val-every",
        type=int,
        default=None,
        metavar="N",
        help="validate every N steps (default: 10 per run, at least 10 steps apart; 0: never)",
    )
    val.add_argument(
        "--save-every",
        type=int,
        default=None,
        metavar="N",
        help="write checkpoint.pt every N steps (default: --val-every)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.hr is None and args.resume is None:
        raise ValueError(
            "give --hr DIR (training images) or --resume CKPT; "
            "`ssiu demo` trains on embedded photos"
        )
    options = {
        key: value
        for key, value in (
            ("channels", args.channels),
            ("steps", args.unfold_steps),
            ("heads", args.heads),
            ("attn_topk", args.attn_topk),
            ("moe_topk", args.moe_topk),
        )
        if value is not None
    }
    model = None
    if args.init is not None:
        if args.resume is not None:
            raise ValueError("give --init or --resume, not both")
        if options:
            raise ValueError(
                "--init takes the model's shape from the weights; drop "
                f"{', '.join(sorted(options))}"
            )
        from ssiu import cli_checks
        from ssiu.checkpoint import load

        cli_checks.weights_file(args.init, "--init")
        model = load(args.init, map_location="cpu", backend=args.backend).train()
    result = train(
        args.hr,
        args.lr,
        scale=args.scale,
        model=model,
        out_dir=args.out,
        iterations=args.iters,
        epochs=args.epochs,
        stop_at=args.stop_at,
        time_limit=None if args.minutes is None else args.minutes * 60,
        batch_size=args.batch_size,
        patch_size=args.patch,
        lr=args.learning_rate,
        betas=tuple(args.betas) if args.betas else None,
        weight_decay=args.weight_decay,
        eta_min=args.eta_min,
        freq_weight=args.freq_weight,
        seed=args.seed,
        augment=False if args.no_augment else None,
        val_hr_dir=args.val_hr,
        val_lr_dir=args.val_lr,
        val_crop=args.val_crop,
        val_every=args.val_every,
        save_every=args.save_every,
        log_every=args.log_every,
        resume=args.resume,
        model_options=options or None,
        device=args.device,
        backend=args.backend,
        amp=args.amp,
        accum=args.accum,
        ema=args.ema,
        compile=args.compile,
        checkpoint_steps=args.checkpoint_steps,
        num_workers=args.workers,
        cache=args.cache,
        progress=not args.no_progress,
    )
    if result.weights is None:  # not rank 0 of a multi-process run
        return 0
    state = "stopped early" if result.stopped_early else "done"
    print(
        f"{state}: {result.step}/{result.total_steps} steps in {result.elapsed:.0f} s, "
        f"loss {result.first_loss:.4f} -> {result.last_loss:.4f}"
        if result.history["train"]
        else f"{state}: {result.step} steps"
    )
    if result.history["val"]:
        v = result.history["val"][-1]
        print(f"last validation (step {v['step']}): {format_metrics(v)}")
    print(f"checkpoint: {result.checkpoint}")
    print(f"weights:    {result.weights}" + (" (EMA)" if result.ema_model is not None else ""))
    e = result.history["train"][-1] if result.history["train"] else {}
    if "img_s" in e:
        print(
            f"throughput: {e['img_s']:.1f} img/s; peak memory {e['peak_mem_mb']:.0f} MB "
            + (
                "(CUDA allocator)"
                if "cuda" in str(next(result.model.parameters()).device)
                else "(CPU peak resident set)"
            )
        )
    if result.stopped_early:
        print(f"continue with: ssiu train --resume {result.checkpoint}")
    return 0
