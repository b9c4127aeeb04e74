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
In --out: metrics.jsonl (a line per step), ouroboros.safetensors (Ouroboros.load_trainable
reads it), optimizer.safetensors + state.json (for --resume), results.json (the final table).
With --pretrain, --out is a Hugging Face checkpoint instead: config.json, model.safetensors
and tokenizer.json, which Qwen2.from_pretrained and Ouroboros.from_pretrained load.

Reading order: options → data → the schedule, setup and the loop → the final table; then the
checks, checkpoints and resume, and the demo's base.
"""
import argparse
import contextlib
import datetime
import fcntl
import json
import math
import os
import resource
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

import ouroboros as ob
from data import prepare, stdlib

PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU (SXM)
# What a run learns depends on every option but these; a resume may change them freely (and
# --steps may grow: the run goes on, the cosine stretched to the new end).
FREE = {"model", "data", "out", "resume", "overwrite", "steps", "device", "dtype", "compile", "checkpointing",
        "eval_every", "eval_batches", "save_every", "eval_full", "eval_baseline", "peak_flops", "demo", "benchmark",
        "final_tokens", "eval_on", "eval_depths"}

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


# --demo: a small Qwen2 pretrained on local text (data/stdlib.py), then 100 updates of
# Ouroboros on it, scored on 32,768 tokens of each held-out set (the study scores them whole);
# each --demo replaces the previous one's run (the base is kept).
DEMO = dict(out="out/demo", device="cpu", steps=100, batch_size=4, grad_accum=1, seq_len=256, lr=2e-3,
            warmup=10, eval_every=25, eval_batches=8, eval_full=True, final_tokens=stdlib.DEMO.final_tokens,
            overwrite=True)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", default="models/Qwen2.5-3B", help="Hugging Face checkpoint directory")
    a("--data", default="data/fineweb-edu", help="directory made by data/prepare.py")
    a("--out", default="out/ouroboros", help="checkpoints, metrics.jsonl, results.json")
    a("--depth", type=int, default=4, help="recurrence steps (1..64)")
    a("--depths", type=depth_list, help="e.g. 4,8,16: one drawn per update (evaluation uses --depth)")
    a("--rank", type=positive, default=8)
    a("--alpha", type=float, default=16.0)
    a("--prelude", type=int, help="P (default 8 of 36 layers)")
    a("--recurrent", type=int, help="R (default 18 of 36)")
    a("--coda", type=int, help="C (default 8 of 36)")
    a("--controller", choices=["dynamic", "static", "none", "blind"], default="dynamic",
      help="static: a learned table per step; none: the loop alone (gate and norms train); blind: the "
      "Controller with its input zeroed (a static control of the Controller's size)")
    a("--pool", choices=["causal", "mean"], default="causal", help="mean: the paper's, sees the future")
    a("--no-gate", action="store_true")
    a("--no-step-norm", action="store_true")
    a("--controller-width", type=positive, default=128, help="E, the Controller's width (paper: 128)")
    # Beyond the paper: the two open problems it names, each off by default.
    a("--ponder-cost", type=float, help="adaptive depth: each token learns when to stop (ACT), paying this "
      "many nats per loop step it takes; --depth is then the most steps (e.g. 0.01)")
    a("--coda-rank", type=int, default=0, help="LoRA adapters of this rank on the coda's projections "
      "(B = 0: a fresh model is unchanged); 0: none")
    # 18,750 updates x 65,536 tokens = 1.2B tokens: the reference's 300,000 micro-batches of 2 x 2048.
    a("--steps", type=positive, default=18750, help="optimizer steps (with --resume: more to go further)")
    a("--batch-size", type=positive, default=2, help="sequences per micro-batch")
    a("--grad-accum", type=positive, default=16, help="micro-batches per optimizer step")
    a("--seq-len", type=positive, default=2048)
    a("--lr", type=float, default=3e-4)
    a("--min-lr", type=float, default=1e-6)
    a("--warmup", type=int, default=500, help="optimizer steps (not stated in the paper)")
    a("--weight-decay", type=float, default=0.01)
    a("--eval-every", type=positive, default=500)
    a("--eval-batches", type=positive, default=20, help="random windows of each split for the curves")
    a("--final-tokens", type=positive, default=2 ** 20, help="the final table scores each held-out split on up "
      "to this many tokens, in non-overlapping windows (the whole split if it is smaller); the training split "
      "on as many as the curves use (--eval-batches batches)")
    a("--eval-on", action="append", default=[], metavar="FILE.bin", help="another token file (same tokenizer) "
      "to score in the final table, named by its stem; repeatable")
    a("--eval-depths", type=depth_list, default=[], help="also score ours at these depths in the final table "
      "(a test-time depth sweep), e.g. 1,2,4,8,16")
    a("--save-every", type=positive, default=1000)
    a("--device", help="default: cuda if there is one, else cpu")
    a("--dtype", choices=["float32", "bfloat16"], help="frozen weights: default bf16 on CUDA, float32 on CPU")
    a("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model (default: on with "
      "CUDA, as in nanoGPT; --no-compile: eager). On a CPU the compilation takes minutes and pays off only in "
      "long runs")
    a("--checkpointing", action="store_true", help="recompute each loop step in backward (deep loops)")
    a("--seed", type=int, default=1337, help="trainables' initialisation and data order")
    a("--resume", action="store_true", help="continue the run saved in --out")
    a("--overwrite", action="store_true", help="start afresh on an --out that holds a run (it is lost)")
    a("--eval-full", action="store_true", help="also evaluate the unpruned model, for gap recovered")
    a("--no-eval-baseline", dest="eval_baseline", action="store_false",
      help="leave the frozen baseline out of the final table (a study that scored it once already)")
    a("--peak-flops", type=float, help="peak FLOP/s of one device for MFU (known: H100, H200, A100)")
    a("--demo", action="store_true", help="a small Qwen2 pretrained on local text (cached), then Ouroboros")
    a("--benchmark", action="store_true", help="time --steps updates on random tokens and weights")
    a("--pretrain", action="store_true", help="train every weight of a Qwen2 made from --model's config.json "
      "(and its tokenizer.json); --out becomes a Hugging Face checkpoint")
    args = ap.parse_args(argv)
    if args.demo or args.benchmark:  # other defaults (what the command line gives still wins)
        ap.set_defaults(**DEMO if args.demo else dict(out="out/benchmark", steps=10, warmup=0))
        args = ap.parse_args(argv)
    if args.resume:  # what the command line does not give is the saved run's, not these defaults
        check_flags(args)
        saved = saved_state(Path(args.out))
        ap.set_defaults(**{k: v for k, v in saved.get("args", saved["options"]).items() if k in vars(args)})
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


@torch.no_grad()
def evaluate_final(loss_fn, tokens, budget, args, rank, world, device):
    """The final table's protocol: the loss of each batch of --batch-size non-overlapping windows of
    seq_len + 1 tokens, spread evenly over the whole split (up to `budget` tokens; each rank scores its
    own part, and the parts are gathered). Returns the list of batch losses, all of equal size: the
    units of a paired bootstrap."""
    T, n_slots = args.seq_len, (len(tokens) - 1) // args.seq_len
    n = min(n_slots, max(1, budget // (T * world)))  # windows of this rank
    B = min(args.batch_size, n)
    starts = (np.arange(n - n % B) * n_slots // n) * T  # evenly spread, never overlapping
    losses = []
    for batch in starts.reshape(-1, B):
        window = torch.from_numpy(np.stack([tokens[j:j + T + 1] for j in batch]).astype(np.int64)).to(device)
        losses.append(loss_fn(window[:, :-1], window[:, 1:]).item())
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, losses)
        losses = [x for part in parts for x in part]
    return losses

# ----------------------------------------------------------------------------------------
# Training: the schedule, setup, the loop, the final table


def get_lr(step, args):
    """Linear warmup to --lr over --warmup optimizer steps, then cosine down to --min-lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def setup(args, log, device, world, rank):
    """Checks, data, model and optimizer, in that order: a bad option fails in a second, not after
    loading. Returns what the loop needs."""
    check_options(args)
    if args.demo:
        log("demo: a small Qwen2 pretrained on this Python's standard library (cached after the first run), "
            "cut 3 / 6 / 3, then Ouroboros trained on it; baseline and ours scored on held-out files")
        args.model, args.data = map(str, stdlib.pretrained_base(Path(args.out), stdlib.DEMO, run_logged, log))
        if (Path(args.data) / "prose.bin").is_file():  # the held-out set of another distribution
            args.eval_on = [*args.eval_on, str(Path(args.data) / "prose.bin")]
        args.out = str(Path(args.out) / "ouroboros")
    cfg = check_model(args)
    run = {k: v for k, v in vars(args).items() if k not in FREE} | {"world_size": world}
    if not (args.benchmark or args.resume):  # a folder with a run or a model in it: refused before the lock
        saved_run(args, run)
    if rank == 0 and not args.benchmark:  # one train.py per --out, for as long as it runs
        hold(Path(args.out))
        finish_save(Path(args.out))  # a save that was cut short while its files moved in
    if world > 1:  # every rank reads the checkpoint once rank 0 has finished moving it in
        dist.barrier()
    state = None if args.benchmark else saved_run(args, run)
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    splits = ({"train": np.random.default_rng(args.seed).integers(0, cfg.vocab_size, 2 * tokens_per_step + 1)}
              if args.benchmark else load_data(args, cfg, rank, world))

    # Model: frozen weights bf16 on CUDA (float32 on CPU); the trainables are float32 master
    # weights, initialised from the seed, so identical on every rank. The model autocasts inside.
    torch.manual_seed(args.seed)
    dtype = args.dtype and getattr(torch, args.dtype)
    out = Path(args.out)
    if args.pretrain:  # every weight trains, in float32: N(0, 0.02) matrices, norms near 1
        model = (ob.Qwen2.from_pretrained(out, device=device, dtype=torch.float32) if state
                 else ob.Qwen2.from_config(cfg, device=device, dtype=torch.float32)).requires_grad_(True)
    else:
        options = model_options(vars(args))
        model = (ob.Ouroboros.from_config(cfg, device, dtype, **options) if args.benchmark
                 else ob.Ouroboros.from_pretrained(args.model, device, dtype, **options))
        model.checkpointing = args.checkpointing
    params = [p for _, p in trainables(model)]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if state:
        restore(out, model, opt, state)
        log(f"resumed {out} at step {state['step']}" + (" (finished: its results are written now)"
                                                        if state["step"] == args.steps else ""))
    if rank == 0 and not args.benchmark:
        start_run(args, out, state)
    log(f"{sum(p.numel() for p in params):,} trainable | {tokens_per_step:,} tokens per step "
        f"({args.batch_size} x {args.seq_len} x {args.grad_accum} accumulation x {world} ranks) | {device}")
    return model, opt, splits, run, (state or {"step": 0})["step"], tokens_per_step


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
    out, params = Path(args.out), [p for _, p in trainables(model)]
    compiled = device.type == "cuda" if args.compile is None else args.compile  # by default where it pays
    if compiled:
        log("--compile: the first steps compile the model" + (" (on a CPU: minutes, paid back only in long runs)"
                                                              if device.type == "cpu" else ""))
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.pretrain and device.type == "cuda")

    def loss_of(x, depth, y):  # Ouroboros autocasts inside; a pretrained Qwen2 computes in bf16 on CUDA
        with autocast:
            return (forward(x, y, return_logits=False) if args.pretrain else
                    forward(x, depth, y, return_logits=False))[1]

    def losses(loss_fn):  # the curves' protocol: a few random windows of each split
        return {"train": evaluate(loss_fn, splits["train"], args, TRAIN_EVAL, rank, world, device),
                "held-out": evaluate(loss_fn, splits["val"], args, VAL, rank, world, device)}

    def final(loss_fn):  # the final table's: every split (and --eval-on's) in non-overlapping windows; the
        # training split only as a check of fit (as many tokens as the curves), the held-out sets in full
        fit = args.eval_batches * args.batch_size * args.seq_len * world
        return {"held-out" if name == "val" else name: evaluate_final(
            loss_fn, tokens, fit if name == "train" else args.final_tokens, args, rank, world, device)
            for name, tokens in splits.items()}

    def steps_taken():  # loop steps per token in the last forward pass: --depth, or fewer with halting
        halting = getattr(model, "last_halting", None)
        return halting.steps.mean() if halting else torch.tensor(float(args.depth))

    ref = {}
    if not (args.benchmark or args.pretrain):  # the baseline's curve point, for "vs base" in the log
        ref["baseline"] = losses(lambda x, y: model.baseline(x, y, return_logits=False)[1])
        log(" | ".join(f"{k}: train {v['train']:.4f} held-out {v['held-out']:.4f}" for k, v in ref.items()))

    # The loop: one optimizer step per iteration. Ctrl-C (or a scheduler's SIGTERM) lets the step
    # finish, saves it, and exits. Repeated signals change nothing (torchrun forwards its own
    # SIGINT to workers that already had the terminal's): Ctrl-\ quits at once, without saving.
    stop, history, saved = [], [], start or None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    peak = args.peak_flops or next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda"
                                    and k in torch.cuda.get_device_name(device)), None)
    t_start = time.perf_counter()
    for step in range(start, args.steps):
        t0, lr = time.perf_counter(), get_lr(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        depth = args.depths[np.random.default_rng((args.seed, DEPTH, step)).integers(len(args.depths))]
        loss_sum, steps_sum = torch.zeros((), device=device), torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = get_batch(splits["train"], args, (args.seed, PRETRAIN if args.pretrain else TRAIN, step, rank),
                             micro, device)
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
                save(out, model, opt, dict(step=step + 1, tokens_seen=(step + 1) * tokens_per_step, options=run,
                                           args=vars(args) | dict(resume=False, overwrite=False, demo=False)))
            saved = step + 1
        if stopping:
            log(f"interrupted: saved step {step + 1} in {out}; continue with the same command and --resume")
            return model
    for sig in (signal.SIGINT, signal.SIGTERM):  # the final evaluation stops at Ctrl-C; --resume redoes it
        signal.signal(sig, signal.default_int_handler)
    try:
        report(args, model, history, final, loss_of, steps_taken, log, rank)
    except KeyboardInterrupt:
        sys.exit(f"interrupted in the final evaluation: the run is saved in {out}; the same command with "
                 "--resume writes its results")
    if world > 1:  # no rank tears down its connections while rank 0 still writes the results
        dist.barrier()
    return model


def show(value, spec):
    return "-" if value is None else format(value, spec)


def log_line(m, args):
    """step | loss | vs base | lr | grad | depth | tok/s | MFU | mem | ETA (| held-out)"""
    return (f"step {m['step']}/{args.steps} | loss {m['loss']:.4f} | vs base {show(m['vs_baseline'], '+.4f')} | "
            f"lr {m['lr']:.2e} | grad {m['grad_norm']:.3f}" + ("" if args.pretrain else f" | depth {m['depth']}")
            + (f" (took {m['steps']:.2f})" if args.ponder_cost is not None else "")
            + f" | {m['tok_s']:,.0f} tok/s | MFU {show(m['mfu'], '.1%')} | mem {m['mem_gb']:.2f} GB | "
            f"ETA {datetime.timedelta(seconds=round(m['eta_s']))}"
            + (f" | held-out {m['val_loss']:.4f}" if "val_loss" in m else ""))


def report(args, model, history, final, loss_of, steps_taken, log, rank):
    """The benchmark's medians, or the final table: every loss under evaluate_final's protocol. The
    means go to OUT/results.json, the batch losses behind them to OUT/windows.json (paired intervals)."""
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    if args.benchmark:  # the first step pays for warm-up (allocation, compilation): left out
        timed = history[1:] or history
        mfu = median([m["mfu"] or 0 for m in timed]) if timed[0]["mfu"] else None
        log(f"benchmark: {median([m['tok_s'] for m in timed]):,.0f} tok/s | MFU {show(mfu, '.1%')} | peak memory "
            f"{history[-1]['mem_gb']:.2f} GB (median of {len(timed)} steps, depth {args.depths})")
        return
    name, scored = ("model" if args.pretrain else "ours"), {}  # row: {split: batch losses}
    if not args.pretrain:
        if args.eval_baseline:
            scored["baseline"] = final(lambda x, y: model.baseline(x, y, return_logits=False)[1])
        if args.eval_full:
            full = ob.Qwen2.from_pretrained(args.model, device=model.base.model.norm.weight.device,
                                            dtype=args.dtype and getattr(torch, args.dtype))
            scored["full"] = final(lambda x, y: full(x, y, return_logits=False)[1])
            del full
    scored[name] = final(lambda x, y: loss_of(x, args.depth, y))
    for d in args.eval_depths:  # a test-time depth sweep: the same weights, looped d times
        scored[f"ours, depth {d}"] = final(lambda x, y, d=d: loss_of(x, d, y))
    if args.pool == "mean" and not args.pretrain:  # the same weights, pooled over the prefix only
        model.pool = "causal"  # what generation sees: the gain that is left without the future
        scored["ours, prefix-pooled"] = final(lambda x, y: loss_of(x, args.depth, y))
        model.pool = "mean"
    res = {row: {s: sum(v) / len(v) for s, v in splits.items()} for row, splits in scored.items()}
    if not args.pretrain:  # the loop steps a token took (with halting: one more pass), and their cost
        res["mean depth"] = ({s: sum(v) / len(v) for s, v in final(
            lambda x, y: (loss_of(x, args.depth, y), steps_taken())[1]).items()}
            if args.ponder_cost is not None else dict.fromkeys(res[name], float(args.depth)))
        res["forward GFLOP per token"] = {s: ob.forward_flops(model, d, args.depth) / 1e9
                                          for s, d in res["mean depth"].items()}
        b, f, o = res.get("baseline"), res.get("full"), res["ours"]
        if b:
            res["loss reduction %"] = {s: 100 * (b[s] - o[s]) / b[s] for s in b}
        if b and f:
            res["gap recovered %"] = {s: 100 * (b[s] - o[s]) / (b[s] - f[s]) for s in b}
    what = f"{name}: {'' if args.pretrain else f'depth {args.depth}, '}{args.steps} steps"
    log(f"{'':<22}" + "".join(f"{s:>10}" for s in res[name]) + f"   ({what})")
    for row, v in res.items():
        log(f"{row:<22}" + "".join(f"{v[s]:>10.4f}" for s in res[name]))
    if rank == 0:
        logged = [json.loads(line) for line in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
        trained = logged[1:] or logged  # every step of the run, those before a --resume too
        res["run"] = dict(steps=args.steps, depth=args.depth, trainable=sum(p.numel() for _, p in trainables(model)),
                          tok_s=median([m["tok_s"] for m in trained]) if trained else None,
                          final_batches={s: len(v) for s, v in scored[name].items()})
        ob.write_json(Path(args.out) / "windows.json", scored)
        ob.write_json(Path(args.out) / "results.json", res)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: peak resident set (KiB on Linux)

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
                           ("coda_rank", args.coda_rank >= 0, ">= 0")):
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


def load_data(args, cfg, rank, world):
    """This rank's share of train.bin, val.bin and the --eval-on files, once they are known to fit this model."""
    data = Path(args.data)
    meta = ob.read_json(data / "meta.json", f"make it: python data/prepare.py INPUT... --tokenizer {args.model} "
                        f"--out {data}; see the README's Data section")
    for key in ("vocab_size", "train_tokens", "val_tokens"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            raise ValueError(f"{data}/meta.json: {key} is {meta.get(key, 'missing')!r}, not a count (prepare the "
                             "data again)")
    sha = prepare.load_tokenizer(args.model)[2]
    if meta.get("tokenizer_sha256") != sha:
        raise ValueError(f"{data}/meta.json: made with another tokenizer (sha256 {meta.get('tokenizer_sha256')}, "
                         f"{args.model}/tokenizer.json is {sha}): prepare the data again")
    if meta["vocab_size"] > cfg.vocab_size:
        raise ValueError(f"{data}/meta.json: vocab_size {meta.get('vocab_size')} exceeds the model's "
                         f"{cfg.vocab_size}")
    splits, files = {}, {"train": data / "train.bin", "val": data / "val.bin"}
    for f in map(Path, args.eval_on):  # scored in the final table only, under the stem of its name
        why = ("the name of a split already scored" if f.stem in files else "not found" if not f.exists() else
               "a folder, not a token file" if f.is_dir() else
               f"{f.stat().st_size:,} bytes: not a file of uint32 tokens" if f.stat().st_size % 4 else None)
        if why:
            raise ValueError(f"--eval-on {f}: {why}")
        files[f.stem] = f
    for split, file in files.items():
        n = meta.get(f"{split}_tokens", 0) if split in ("train", "val") else file.stat().st_size // 4
        if file.stat().st_size != 4 * n:
            raise ValueError(f"{file}: {file.stat().st_size:,} bytes, but meta.json says {n:,} uint32 tokens "
                             "(truncated? prepare the data again)")
        lo, hi = rank * n // world, (rank + 1) * n // world  # each rank its own part
        if hi - lo <= args.seq_len:
            raise ValueError(f"{file}: {hi - lo:,} tokens{' per rank' * (world > 1)} are too "
                             f"few for --seq-len {args.seq_len} (+1 for the shifted targets)")
        part = np.memmap(file, dtype=np.uint32, mode="r")[lo:hi]
        if (top := int(part.max())) >= cfg.vocab_size:  # one pass over the file, before the model loads
            raise ValueError(f"{file}: token id {top} is outside the model's vocabulary 0..{cfg.vocab_size - 1} "
                             "(made for another model? prepare the data again)")
        splits[split] = part
    return splits

# ----------------------------------------------------------------------------------------
# Checkpoints: safetensors and JSON, no pickles; each file written to .tmp, then renamed


def trainables(model):
    """(name, tensor) of what trains: Ouroboros's additions, or every weight when pretraining."""
    return model.named_trainable() if isinstance(model, ob.Ouroboros) else list(model.named_parameters())


def save(out, model, opt, state):
    """Optimizer state, weights, then state.json last, all made whole in OUT/save.tmp first, then moved
    into OUT (finish_save). A kill while they are written leaves the previous checkpoint as it was."""
    stage = out / "save.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    names = [n for n, _ in trainables(model)]
    moments = {f"{names[i]}.{k}": v.cpu() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    ob.save_atomic(moments, stage / "optimizer.safetensors", {"step": str(state["step"])})
    if isinstance(model, ob.Ouroboros):
        model.save_trainable(stage / "ouroboros.safetensors")
    else:  # pretraining: --out is a Hugging Face checkpoint (its tokenizer.json was copied at the start)
        model.save_pretrained(stage)
    ob.write_json(stage / "state.json", state)
    finish_save(out)


def finish_save(out):
    """Move a whole OUT/save.tmp (its state.json, written last, is there) into OUT, state.json last; drop
    one that is not whole. A kill while the files move leaves a whole save.tmp: the next start moves
    the rest."""
    stage = out / "save.tmp"
    if (stage / "state.json").is_file():
        for f in sorted(stage.iterdir(), key=lambda f: f.name == "state.json"):
            os.replace(f, out / f.name)
    shutil.rmtree(stage, ignore_errors=True)


def hold(out):
    """Hold OUT/lock (an OS lock, released when the process ends, even by kill -9) while this run
    writes OUT: a second train.py on the same --out is refused, naming the first. Released by release()."""
    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    while True:
        out.mkdir(parents=True, exist_ok=True)
        lock = open(out / "lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ValueError(f"{out}/lock: {out} is in use by {holder}; wait for it to end, or give another --out")
        with contextlib.suppress(FileNotFoundError):
            if os.stat(out / "lock").st_ino == os.fstat(lock.fileno()).st_ino:
                break  # the lock is the file in OUT, not one a run that ended meanwhile removed (release)
        lock.close()
    lock.truncate(0)
    lock.write(f"train.py (pid {os.getpid()} on {socket.gethostname()}, since "
               f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S})\n")
    lock.flush()
    HELD.append((lock, out, made))


def release():
    """Let go of the newest lock; a run refused or stopped before it wrote anything leaves no trace: not
    the lock file, nor the folders hold made."""
    lock, out, made = HELD.pop()
    if [f.name for f in out.iterdir()] == ["lock"]:
        (out / "lock").unlink()
        for folder in made:
            with contextlib.suppress(OSError):  # only an empty one
                folder.rmdir()
    lock.close()


HELD = []  # (lock, OUT, folders made) of each hold of this process, each released by the main() that took it


SAVED = ("state.json", "optimizer.safetensors", "ouroboros.safetensors", "model.safetensors")  # a run's files
MODEL = ("config.json", "model.safetensors.index.json")  # a Hugging Face checkpoint's (--pretrain writes one)


def saved_run(args, run):
    """The state.json of the run in --out, checked against this command before anything is loaded.
    Without --resume, files of a run are refused (rerunning a command must not erase a run, nor
    --out point at a model); with it, the options must be the same, and --steps may only grow."""
    out, file = Path(args.out), Path(args.out) / "state.json"
    if not args.resume:
        found = next((out / f for f in (*SAVED, *MODEL) if (out / f).is_file()), None)
        if found and not (file.is_file() or (out / "save.tmp" / "state.json").is_file()):  # a model, not a run:
            # --overwrite would delete what no run of ours made
            raise ValueError(f"{found}: {out} holds a model, not a run of train.py; give another --out")
        if found and not args.overwrite:
            raise ValueError(f"{found}: a run is saved in {out}; continue it with --resume (and a larger "
                             "--steps to go further), or give another --out, or --overwrite to start afresh")
        return None
    state = saved_state(out)
    for f in ("optimizer.safetensors", "model.safetensors" if args.pretrain else "ouroboros.safetensors"):
        if not (out / f).is_file():
            raise FileNotFoundError(f"{out / f}: not found, so the checkpoint in {out} cannot be resumed (start "
                                    "afresh with --overwrite)")
    saved = saved_options(state)
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {v!r}" for k, v in run.items() if saved.get(k) != v]
    if diff:
        raise ValueError(f"{file}: --resume with other options ({'; '.join(diff)})")
    if args.steps < state["step"] or (args.steps == state["step"] and (out / "results.json").is_file()):
        raise ValueError(f"{file}: the run is at step {state['step']}, and --steps is {args.steps}: "
                         "give a larger --steps to continue it")
    return state


def saved_state(out):
    """OUT/state.json, or that of OUT/save.tmp when a save was cut short while its files moved in (the
    next start moves them), or one line: no checkpoint to resume."""
    file = out / "state.json"
    if not file.is_file() and (out / "save.tmp" / "state.json").is_file():
        file = out / "save.tmp" / "state.json"
    state = ob.read_json(file, "no checkpoint to resume: run without --resume")
    for key, ok in (("step", type(state.get("step")) is int and state["step"] >= 0),
                    ("options", isinstance(state.get("options"), dict)),
                    ("args", isinstance(state.get("args", {}), dict))):
        if not ok:
            raise ValueError(f"{file}: {key} is {state.get(key, 'missing')!r}: not what train.py saves (a damaged "
                             "checkpoint: start afresh with --overwrite)")
    return state


def saved_options(state):
    """The options of a saved run (state.json); an option added since the save had its default."""
    return {**vars(parse_args([])), **state["options"]}


def restore(out, model, opt, state):
    """Trainables and AdamW moments of the saved run (pretraining: the weights were loaded from --out)."""
    if isinstance(model, ob.Ouroboros):
        model.load_trainable(out / "ouroboros.safetensors")
    try:
        with safe_open(out / "optimizer.safetensors", framework="pt", device="cpu") as f:
            if f.metadata().get("step") != str(state["step"]):
                raise ValueError(f"{out}/optimizer.safetensors: step {f.metadata().get('step')}, state.json "
                                 f"says {state['step']} (interrupted while saving)")
            sd = opt.state_dict()  # AdamW per tensor: step, exp_avg, exp_avg_sq
            sd["state"] = {i: {k: f.get_tensor(f"{n}.{k}") for k in ("step", "exp_avg", "exp_avg_sq")}
                           for i, (n, _) in enumerate(trainables(model))}
    except SafetensorError as e:
        raise ValueError(f"{out}/optimizer.safetensors: unreadable ({e})") from None
    opt.load_state_dict(sd)


def start_run(args, out, state):
    """--out made ready: an overwritten run's files gone, metrics.jsonl cut to the saved steps, and
    (pretraining) the tokenizer the data was made with copied into the checkpoint."""
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:  # state.json first: what is left of the old run is never taken for a whole one
        for f in SAVED:
            (out / f).unlink(missing_ok=True)
    # metrics.jsonl keeps the lines of steps 1..start (line k is step k: those of the saved run) and
    # is appended to. Lines logged after the last save (a half-written one too, if the process was
    # killed) are dropped: the resumed run logs those steps again.
    file, lines, start = out / "metrics.jsonl", [], state and state["step"]
    if start and file.is_file():
        lines = file.read_text().splitlines(keepends=True)[:start]
    Path(f"{file}.tmp").write_text("".join(lines))
    os.replace(f"{file}.tmp", file)
    if args.pretrain:
        shutil.copyfile(Path(args.model) / "tokenizer.json", out / "tokenizer.json.tmp")
        os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")

# ----------------------------------------------------------------------------------------
# Running train.py from another script: the demo's base, and the miniature study's runs


def run_logged(out, argv):
    """train.py in this process, its log in out/log.txt. It resumes a run that was interrupted.
    True when the run finished; False when it stopped (Ctrl-C, or a diverged loss: see the log)."""
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--out", str(out), *argv, *(["--resume"] if (out / "state.json").is_file() else [])]
    t0 = time.time()
    with open(out / "log.txt", "a", buffering=1) as f, contextlib.redirect_stdout(f):  # a line at a time
        try:
            main(argv)
        except SystemExit as e:  # train.py's one-line error (a diverged loss is one)
            print(e.code)
            if "stopped; the last good checkpoint" not in str(e.code):  # anything but a diverged loss
                raise
            (out / "diverged.txt").write_text(str(e.code))
        finally:  # a study's wall time is the sum of these, over every invocation that ran a part
            (out / "wall_s.txt").write_text(str(wall_s(out) + time.time() - t0))
    return (out / "results.json").is_file()


def wall_s(out):
    return float((out / "wall_s.txt").read_text()) if (out / "wall_s.txt").is_file() else 0.0


def main(argv=None):
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    held = len(HELD)
    try:
        return train(parse_args(argv))
    except (ValueError, FileNotFoundError) as e:  # ouroboros.py's and ours: one line naming the cause
        sys.exit(f"error: {e}")
    finally:
        while len(HELD) > held:
            release()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
