"""
Train Ouroboros: only the Controller, the gate and the per-step norms learn; Qwen2 is frozen.

    python train.py --depth 4 --rank 8                      # the paper's recipe on a GPU
    python train.py --demo                                  # a real result in miniature, on a CPU (README)
    torchrun --nproc_per_node 8 train.py --depth 4          # data parallel on 8 GPUs
    python train.py --benchmark --model configs/Qwen2.5-3B  # speed from a config.json alone
    python train.py --pretrain --model DIR --data DIR       # every weight of a from-scratch Qwen2

The recipe (paper): AdamW (0.9, 0.95), lr 3e-4, weight decay 0.01, linear warmup then cosine
to 1e-6 counted in optimizer steps, gradient clipping at 1.0, 2 sequences x 16 accumulation
x 2048 tokens = 65,536 tokens per update; frozen weights bf16, trainable weights float32.
In --out: metrics.jsonl (a line per step), ouroboros.safetensors (Ouroboros.load_trainable reads it),
optimizer.safetensors + state.json (for --resume), results.json (the final table). With --pretrain, --out
is a Hugging Face checkpoint (config.json, model.safetensors, tokenizer.json) that from_pretrained loads.

Reading order: options, data, the loop and its setup, the checks. A run's files in --out are checkpoint.py's.
"""
import argparse
import datetime
import json
import math
import os
import resource
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
import ouroboros as ob
from data import prepare, stdlib

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU (SXM)

# ----------------------------------------------------------------------------------------
# Options: the paper's recipe as defaults, every range checked before anything is loaded


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def depth_list(text):
    if not all(d.strip().isdigit() for d in text.split(",")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of depths, e.g. 4,8,16")
    return [int(d) for d in text.split(",")]


class Help(argparse.RawDescriptionHelpFormatter):  # the docstring as written, and each option's default
    def _get_help_string(self, action):
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        return action.help + f" (default: {action.default})" * shown


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    a = ap.add_argument
    a("--model", default="models/Qwen2.5-3B", help="Hugging Face checkpoint directory")
    a("--data", default="data/fineweb-edu", help="directory made by data/prepare.py")
    a("--out", default="out/ouroboros", help="checkpoints, metrics.jsonl, results.json")
    a("--depth", type=int, default=4, help="recurrence steps (1..64)")
    a("--depths", type=depth_list, help="e.g. 4,8,16: one drawn per update (evaluation uses --depth)")
    a("--rank", type=positive, default=8, help="r of the LoRA bases")
    a("--alpha", type=float, default=16.0, help="the scale of ΔW = (α/r) B diag(c) A")
    a("--prelude", type=int, help="P (default 8 of 36 layers)")
    a("--recurrent", type=int, help="R (default 18 of 36)")
    a("--coda", type=int, help="C (default 8 of 36)")
    a("--controller", choices=["dynamic", "static", "none", "blind"], default="dynamic",
      help="static: a learned table per step; none: the loop alone (gate and norms train); blind: the "
      "Controller with its input zeroed (a static control of the Controller's size)")
    a("--pool", choices=["causal", "mean"], default="causal", help="mean: the paper's, sees the future")
    a("--no-gate", action="store_true", help="ablation: no gate, h ← h_new")
    a("--no-step-norm", action="store_true", help="ablation: no per-step RMSNorm")
    a("--controller-width", type=positive, default=128, help="E, the Controller's width (paper: 128)")
    # Beyond the paper: the two open problems it names, each off by default.
    a("--ponder-cost", type=float, help="adaptive depth: each token learns when to stop (ACT), paying this "
      "many nats per loop step it takes; --depth is then the most steps (e.g. 0.01)")
    a("--coda-rank", type=int, default=0, help="LoRA adapters of this rank on the coda's projections "
      "(B = 0: a fresh model is unchanged); 0: none")
    a("--steps", type=positive, default=18750, help="optimizer steps (with --resume: more to go further); "
      "18,750 x 65,536 tokens = 1.2B, the reference's 300,000 micro-batches of 2 x 2048")
    a("--batch-size", type=positive, default=2, help="sequences per micro-batch")
    a("--grad-accum", type=positive, default=16, help="micro-batches per optimizer step")
    a("--seq-len", type=positive, default=2048, help="tokens per sequence")
    a("--lr", type=float, default=3e-4, help="peak learning rate")
    a("--min-lr", type=float, default=1e-6, help="where the cosine ends")
    a("--warmup", type=int, default=500, help="optimizer steps (not stated in the paper)")
    a("--weight-decay", type=float, default=0.01, help="AdamW's")
    a("--eval-every", type=positive, default=500, help="optimizer steps between held-out evaluations")
    a("--eval-batches", type=positive, default=20, help="random windows of each split for the curves")
    a("--final-tokens", type=positive, default=2 ** 20, help="the final table scores each held-out split on up "
      "to this many tokens, in non-overlapping windows (the whole split if it is smaller); the training split "
      "on as many as the curves use (--eval-batches batches)")
    a("--eval-on", action="append", default=[], metavar="FILE.bin", help="another token file (same tokenizer) "
      "to score in the final table, named by its stem; repeatable")
    a("--eval-depths", type=depth_list, default=[], help="also score ours at these depths in the final table "
      "(a test-time depth sweep), e.g. 1,2,4,8,16")
    a("--save-every", type=positive, default=1000, help="optimizer steps between checkpoints")
    a("--device", help="default: cuda if there is one, else cpu")
    a("--dtype", choices=["float32", "bfloat16"], help="frozen weights: default bf16 on CUDA, float32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on with "
      "CUDA, as in nanoGPT; --no-compile: eager). On a CPU the compilation takes minutes and pays off only in "
      "long runs")
    a("--checkpointing", action="store_true", help="recompute each loop step in backward: the memory of one step")
    a("--seed", type=int, default=1337, help="trainables' initialisation and data order")
    a("--resume", action="store_true", help="continue the run saved in --out")
    a("--overwrite", action="store_true", help="start afresh on an --out that holds a run (it is lost)")
    a("--eval-full", action="store_true", help="also evaluate the unpruned model, for gap recovered")
    a("--no-eval-baseline", dest="eval_baseline", action="store_false",
      help="leave the frozen baseline out of the final table (a study that scored it once already)")
    a("--peak-flops", type=float, help="peak FLOP/s of one device for MFU (known: H100, H200, A100)")
    a("--demo", action="store_true", help="a small Qwen2 pretrained on local text (cached), then Ouroboros")
    a("--benchmark", action="store_true", help="time --steps updates on random tokens and weights")
    a("--pretrain", action="store_true", help="train every weight of a Qwen2; --out becomes a Hugging Face checkpoint")
    a("--init", choices=["random", "model", "baseline"], default="random", help="--pretrain's weights: random (by "
      "--model's config.json), --model's, or the baseline cut from them (prune, then heal); the last two see "
      "a run's batches")
    args = ap.parse_args(argv)
    if args.demo or args.benchmark:  # other defaults (what the command line gives still wins)
        ap.set_defaults(**stdlib.DEMO_OPTIONS if args.demo else dict(out="out/benchmark", steps=10, warmup=0))
        args = ap.parse_args(argv)
    if args.resume:  # what the command line does not give is the saved run's, not these defaults; a list it
        check_flags(args)  # gives replaces the saved one (argparse would append --eval-on to it)
        saved = checkpoint.saved_state(Path(args.out))
        ap.set_defaults(**{k: v for k, v in saved.get("args", saved["options"]).items() if k in vars(args)
                           and not (ap.get_default(k) == [] and getattr(args, k))})
        args = ap.parse_args(argv)
    args.depths = args.depths or [args.depth]
    return args


def model_options(a):
    """Ouroboros's options from train.py's: vars(args), or the options saved in state.json."""
    return dict(rank=a["rank"], alpha=a["alpha"], prelude=a["prelude"], recurrent=a["recurrent"], coda=a["coda"],
                controller=a["controller"], pool=a["pool"], gate=not a["no_gate"], step_norm=not a["no_step_norm"],
                max_steps=ob.MAX_STEPS, controller_width=a["controller_width"],
                halting=a["ponder_cost"] is not None, coda_rank=a["coda_rank"])

# ----------------------------------------------------------------------------------------
# Data: random windows of the token files, each batch a pure function of its key


def get_batch(tokens, args, key, micro, device):
    """Micro-batch `micro` of the batch drawn with key (seed, split, step, rank): a pure function of
    its arguments, so a resumed run needs no data-loader state. Each row is a random window of
    seq_len + 1 tokens; y is x shifted by one, here and only here: y[t] = x[t+1], the next token."""
    B, T = args.batch_size, args.seq_len
    # All accum x B windows of the step are drawn at once and micro-batch m takes B of them, so that
    # 2 sequences x 1 micro-batch and 1 x 2 read the same tokens.
    starts = np.random.default_rng(key).integers(0, len(tokens) - T, args.grad_accum * B)[micro * B:(micro + 1) * B]
    window = torch.from_numpy(np.stack([tokens[i:i + T + 1] for i in starts]).astype(np.int64))  # (B, T+1)
    return window[:, :-1].to(device), window[:, 1:].to(device)  # x, y: (B, T)


# Independent random streams: training, evaluation, depth draws, and pretraining's own, so that
# a run on a base pretrained with the same seed never replays the base's batches.
TRAIN, VAL, TRAIN_EVAL, DEPTH, PRETRAIN = range(5)
EVAL_SEED = 0  # evaluation batches do not depend on --seed: every seed is scored on the same tokens


def mean_over_ranks(x, world):
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


@torch.no_grad()
def evaluate(loss_fn, tokens, args, stream, rank, world, device):
    """Mean next-token loss of loss_fn(x, y) over --eval-batches random batches that are the same at
    every call and for every seed: the curves while training (and the baseline's line in the log)."""
    losses = [loss_fn(*get_batch(tokens, args, (EVAL_SEED, stream, i, rank), 0, device))
              for i in range(args.eval_batches)]
    return mean_over_ranks(torch.stack(losses).float().mean(), world).item()

# ----------------------------------------------------------------------------------------
# Training: the schedule, the loop, and its setup


def get_lr(step, args):
    """Linear warmup to --lr over --warmup optimizer steps, then cosine down to --min-lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def train(args):
    # Processes: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain run is a world of one.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    log, device = (print if rank == 0 else lambda *a, **k: None), ob.placement(args.device, None)[0]
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    model, opt, splits, run, start, tokens_per_step = setup(args, log, device, world, rank)
    out, params = Path(args.out), [p for _, p in checkpoint.trainables(model)]
    compiled = device.type == "cuda" if args.compile is None else args.compile  # by default where it pays
    if compiled:
        log("--compile: the first steps compile the model" + " (on a CPU: minutes, paid back only in long runs)"
            * (device.type == "cpu"))
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.pretrain and device.type == "cuda")

    def loss_of(x, depth, y):  # Ouroboros autocasts inside; a pretrained Qwen2 computes in bf16 on CUDA
        with autocast:
            return (forward(x, y, return_logits=False) if args.pretrain else
                    forward(x, depth, y, return_logits=False))[1]

    def steps_taken():  # loop steps per token in the last forward pass: --depth, or fewer with halting
        halting = getattr(model, "last_halting", None)
        return halting.steps.mean() if halting else torch.tensor(float(args.depth))

    ref = {}
    if not (args.benchmark or args.pretrain):  # the baseline's curve point, for "vs base" in the log
        baseline = lambda x, y: model.baseline(x, y, return_logits=False)[1]  # noqa: E731
        ref["baseline"] = {"train": evaluate(baseline, splits["train"], args, TRAIN_EVAL, rank, world, device),
                           "held-out": evaluate(baseline, splits["val"], args, VAL, rank, world, device)}
        log(" | ".join(f"{k}: train {v['train']:.4f} held-out {v['held-out']:.4f}" for k, v in ref.items()))

    # The loop: one optimizer step per iteration. Ctrl-C (or a scheduler's SIGTERM) lets the step
    # finish, saves it, and exits. Repeated signals change nothing (torchrun forwards its own
    # SIGINT to workers that already had the terminal's): Ctrl-\ quits at once, without saving.
    stop, history, saved = [], [], start or None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    peak = args.peak_flops or next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda"
                                    and k in torch.cuda.get_device_name(device)), None)
    t_start, stream = time.perf_counter(), PRETRAIN if args.pretrain and args.init == "random" else TRAIN
    for step in range(start, args.steps):
        t0, lr = time.perf_counter(), get_lr(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        depth = args.depths[np.random.default_rng((args.seed, DEPTH, step)).integers(len(args.depths))]
        loss_sum, steps_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = get_batch(splits["train"], args, (args.seed, stream, step, rank), micro, device)
            loss = loss_of(x, depth, y)
            loss_sum += loss.detach()
            if args.ponder_cost is not None:  # ACT: the loss plus the cost of the steps each token took
                steps_sum += steps_taken().detach()
                loss = loss + args.ponder_cost * model.last_halting.ponder.mean()
            (loss / args.grad_accum).backward()  # gradients add up over the micro-batches
        # One exchange per update: the trainables' gradients (nothing else is synchronised), the
        # loss and the Ctrl-C flag, so every rank takes the same step and stops at the same one.
        if world > 1:
            for p in params:
                mean_over_ranks(p.grad, world)
        stats = torch.stack([loss_sum, steps_sum, torch.tensor(float(bool(stop)), device=device)])
        loss, steps, stopping = mean_over_ranks(stats, world).tolist()
        loss, steps = loss / args.grad_accum, steps / args.grad_accum
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        if not (math.isfinite(loss) and math.isfinite(norm)):  # before the update: no bad weights saved
            raise ValueError(f"step {step + 1}: loss {loss}, grad norm {norm}: stopped; the last good "
                             f"checkpoint ({'step ' + str(saved) if saved else 'none yet'}) is kept in {out}")
        opt.step()
        opt.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        m = dict(step=step + 1, loss=loss, vs_baseline=loss - ref["baseline"]["train"] if ref else None, lr=lr,
                 grad_norm=norm, tok_s=tokens_per_step / dt, depth=depth,
                 steps=depth if args.ponder_cost is None else steps, mem_gb=peak_memory(device) / 1e9,
                 mfu=peak and ob.flops_per_token(model, depth, args.seq_len) * tokens_per_step / dt / (peak * world),
                 eta_s=(time.perf_counter() - t_start) / (step + 1 - start) * (args.steps - step - 1))
        if not args.benchmark and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            m["val_loss"] = evaluate(lambda x, y: loss_of(x, args.depth, y), splits["val"], args, VAL, rank, world,
                                     device)
        log(log_line(m, args))
        if rank == 0 and not args.benchmark:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
        history.append(m)
        if not args.benchmark and ((step + 1) % args.save_every == 0 or step + 1 == args.steps or stopping):
            if rank == 0:  # data position and RNG are the step and the seed: get_batch draws from them
                state = dict(step=step + 1, tokens_seen=(step + 1) * tokens_per_step, options=run,
                             args=vars(args) | dict(resume=False, overwrite=False, demo=False))
                checkpoint.save(out, model, opt, state)
            saved = step + 1
        if stopping:
            log(f"interrupted: saved step {step + 1} in {out}; continue with the same command and --resume")
            return model
    for sig in (signal.SIGINT, signal.SIGTERM):  # the final evaluation stops at Ctrl-C; --resume redoes it
        signal.signal(sig, signal.default_int_handler)
    try:
        if args.benchmark:
            log(benchmark_line(history, args))
        else:
            checkpoint.report(args, model, splits, loss_of, steps_taken, log, rank, world, device)
    except KeyboardInterrupt:
        sys.exit(f"interrupted in the final evaluation: the run is saved in {out}; the same command with "
                 "--resume writes its results")
    if world > 1:  # no rank tears down its connections while rank 0 still writes the results
        dist.barrier()
    return model


def setup(args, log, device, world, rank):
    """Checks, data, model and optimizer, in that order: a bad option fails in a second, not after
    loading. Returns what the loop needs."""
    check_options(args)
    if args.demo:  # --model and --data become the demo's base, made in --out (or found there)
        stdlib.demo(args, main, log)
    cfg = check_model(args)
    run = {k: v for k, v in vars(args).items() if k not in checkpoint.RESUME_MAY_CHANGE} | {"world_size": world}
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    if args.benchmark:  # random tokens (and weights, below): nothing is read from --data or --out, nor written
        state, rng = None, np.random.default_rng(args.seed)
        splits = {"train": rng.integers(0, cfg.vocab_size, 2 * tokens_per_step + 1)}
    else:  # --out held by this run alone, and the run saved there (if any) checked against this command
        state = checkpoint.claim(args, run, rank, world, parse_args)
        splits = prepare.load_data(args, cfg, rank, world)

    # Model: frozen weights bf16 on CUDA (float32 on CPU); the trainables are float32 master
    # weights, initialised from the seed, so identical on every rank. The model autocasts inside.
    torch.manual_seed(args.seed)
    dtype = args.dtype and getattr(torch, args.dtype)
    if args.pretrain:  # every weight trains, in float32: the saved run's, or by --init (random: N(0, 0.02))
        f32 = dict(device=device, dtype=torch.float32)
        model = (ob.Qwen2.from_pretrained(args.out if state else args.model, **f32) if state or args.init == "model"
                 else ob.Qwen2.baseline_of(args.model, **f32, prelude=args.prelude, recurrent=args.recurrent,
                                           coda=args.coda) if args.init == "baseline"
                 else ob.Qwen2.from_config(cfg, **f32)).requires_grad_(True)
    else:
        options = model_options(vars(args))
        model = (ob.Ouroboros.from_config(cfg, device, dtype, **options) if args.benchmark
                 else ob.Ouroboros.from_pretrained(args.model, device, dtype, **options))
        model.checkpointing = args.checkpointing
    params = [p for _, p in checkpoint.trainables(model)]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if not args.benchmark:  # the saved run's trainables and moments (if any) restored, and --out made ready
        checkpoint.start_run(args, model, opt, state, rank, log)
    log(f"{sum(p.numel() for p in params):,} trainable | {tokens_per_step:,} tokens per step "
        f"({args.batch_size} x {args.seq_len} x {args.grad_accum} accumulation x {world} ranks) | {device}")
    return model, opt, splits, run, (state or {"step": 0})["step"], tokens_per_step


def show(value, spec): return "-" if value is None else format(value, spec)  # noqa: E704


def log_line(m, args):
    """step | loss | vs base | lr | grad | depth | tok/s | MFU | mem | ETA (| held-out)"""
    return (f"step {m['step']}/{args.steps} | loss {m['loss']:.4f} | vs base {show(m['vs_baseline'], '+.4f')} | "
            f"lr {m['lr']:.2e} | grad {m['grad_norm']:.3f}" + ("" if args.pretrain else f" | depth {m['depth']}")
            + (f" (took {m['steps']:.2f})" if args.ponder_cost is not None else "")
            + f" | {m['tok_s']:,.0f} tok/s | MFU {show(m['mfu'], '.1%')} | mem {m['mem_gb']:.2f} GB | "
            f"ETA {datetime.timedelta(seconds=round(m['eta_s']))}"
            + (f" | held-out {m['val_loss']:.4f}" if "val_loss" in m else ""))


def benchmark_line(history, args):
    """Medians over the steps after the first, which pays for warm-up (allocation, compilation); experiments/
    gpu.py and benchmark.py parse this line."""
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    timed = history[1:] or history
    mfu = median([m["mfu"] or 0 for m in timed]) if timed[0]["mfu"] else None
    return (f"benchmark: {median([m['tok_s'] for m in timed]):,.0f} tok/s | MFU {show(mfu, '.1%')} | peak memory "
            f"{history[-1]['mem_gb']:.2f} GB (median of {len(timed)} steps, depth {args.depths})")


def peak_memory(device):  # on a CPU, the peak resident set (in KiB on Linux)
    return (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

# ----------------------------------------------------------------------------------------
# Checks: everything that can be refused without weights, in one line naming the flag and value


def check_flags(args):
    for a, b in (("demo", "benchmark"), ("demo", "pretrain"), ("benchmark", "pretrain"), ("demo", "resume"),
                 ("resume", "overwrite"), ("pretrain", "eval_full")):
        if getattr(args, a) and getattr(args, b):
            raise ValueError(f"--{a} and --{b.replace('_', '-')} do not go together")


POSITIVE = ("rank", "controller_width", "steps", "batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches",
            "final_tokens", "save_every")  # integers of at least 1, given or read from a saved run's state.json


def check_options(args):
    check_flags(args)
    for flag in POSITIVE:
        value = getattr(args, flag)
        if type(value) is not int or value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {value!r} must be a positive integer")
    if type(args.seed) is not int or not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed {args.seed!r} must be an integer in 0..2**63-1")
    if args.peak_flops is not None and not 0 < args.peak_flops < math.inf:
        raise ValueError(f"--peak-flops {args.peak_flops} must be > 0 and finite, e.g. 989e12")
    if args.demo:
        defaults = parse_args([])
        if (args.model, args.data) != (defaults.model, defaults.data):
            raise ValueError("--demo makes its own model and data (in --out): drop --model and --data")
    if args.pretrain and (args.ponder_cost is not None or args.coda_rank or args.controller_width != 128):
        raise ValueError("--pretrain trains a plain Qwen2: --ponder-cost, --coda-rank and --controller-width "
                         "are Ouroboros options")
    for depth in (args.depth, *args.depths, *args.eval_depths):  # --depth is also the evaluation's
        if not 1 <= depth <= ob.MAX_STEPS:
            raise ValueError(f"depth {depth} is outside 1..{ob.MAX_STEPS} (the Controller's step table)")
    for flag, ok, need in (("seq_len", args.seq_len >= 2, ">= 2 (one token has no context to learn from)"),
                           ("lr", 0 < args.lr < math.inf, "> 0 and finite"),
                           ("min_lr", 0 <= args.min_lr <= args.lr, "in 0..--lr"),
                           ("warmup", 0 <= args.warmup <= args.steps, "in 0..--steps"),
                           ("weight_decay", args.weight_decay >= 0, ">= 0"), ("alpha", args.alpha > 0, "> 0"),
                           ("ponder_cost", args.ponder_cost is None or 0 <= args.ponder_cost < math.inf,
                            ">= 0 and finite"),
                           ("coda_rank", args.coda_rank >= 0, ">= 0"),
                           ("init", args.pretrain or args.init == "random", "random without --pretrain")):
        if not ok:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be {need}")
    prepare.check_out(args.out, "--out")
    out, data = Path(args.out).resolve(), Path(args.data).resolve()
    if not args.benchmark and out.is_relative_to(data):
        raise ValueError(f"--out {args.out}: inside --data {args.data}, a folder of data/prepare.py's; give another "
                         "--out")


def check_model(args):
    """--model's config.json, and a --seq-len its positions hold."""
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model}/config.json: not found (download the model: huggingface-cli "
                                f"download Qwen/Qwen2.5-3B --local-dir {args.model}; or try --demo)")
    cfg = ob.Qwen2Config.from_pretrained(args.model)
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings} of {args.model}/config.json")
    return cfg


def main(argv=None):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    held = len(checkpoint.HELD)
    try:
        return train(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:  # ouroboros.py's and ours: one line naming the cause
        sys.exit(f"error: {e}")
    finally:
        while len(checkpoint.HELD) > held:
            checkpoint.release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
