"""
Train Ouroboros: only the Controller, the gate and the per-step norms learn; Qwen2 is frozen.

    python train.py --depth 4 --rank 8                      # the paper's recipe on a GPU
    python train.py --demo                                  # a one-minute CPU smoke run on random weights
    torchrun --nproc_per_node 8 train.py --depth 4          # data parallel on 8 GPUs
    python train.py --benchmark --model configs/Qwen2.5-3B  # speed from a config.json alone

The recipe (paper): AdamW (0.9, 0.95), lr 3e-4, weight decay 0.01, linear warmup then cosine
to 1e-6 counted in optimizer steps, gradient clipping at 1.0, 2 sequences x 16 accumulation
x 2048 tokens = 65,536 tokens per update; frozen weights bf16, trainable weights float32.
In --out: metrics.jsonl (a line per step), ouroboros.safetensors (Ouroboros.load_trainable
reads it), optimizer.safetensors + state.json (for --resume), results.json (the final table).
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import ouroboros as ob
from data import prepare

MAX_STEPS = 64  # the Controller's step table: --depth can be 1..64
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 per GPU (SXM)
# What a run learns depends on every option but these; a resume may change them freely.
FREE = {"model", "data", "out", "resume", "device", "dtype", "compile", "checkpointing", "eval_every",
        "eval_batches", "save_every", "eval_full", "peak_flops", "demo", "benchmark"}

# ----------------------------------------------------------------------------------------
# Options: the paper's recipe as defaults


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument
    a("--model", default="models/Qwen2.5-3B", help="Hugging Face checkpoint directory")
    a("--data", default="data/fineweb-edu", help="directory made by data/prepare.py")
    a("--out", default="out/ouroboros", help="checkpoints, metrics.jsonl, results.json")
    a("--depth", type=int, default=4, help="recurrence steps (1..64)")
    a("--depths", type=lambda s: [int(d) for d in s.split(",")],
      help="e.g. 4,8,16: one drawn per update (evaluation uses --depth)")
    a("--rank", type=int, default=8)
    a("--alpha", type=float, default=16.0)
    a("--prelude", type=int, help="P (default 8 of 36 layers)")
    a("--recurrent", type=int, help="R (default 18 of 36)")
    a("--coda", type=int, help="C (default 8 of 36)")
    a("--controller", choices=["dynamic", "static"], default="dynamic")
    a("--pool", choices=["causal", "mean"], default="causal", help="mean: the paper's, sees the future")
    a("--no-gate", action="store_true")
    a("--no-step-norm", action="store_true")
    # 18,750 updates x 65,536 tokens = 1.2B tokens: the reference's 300,000 micro-batches of 2 x 2048.
    a("--steps", type=positive, default=18750, help="optimizer steps")
    a("--batch-size", type=positive, default=2, help="sequences per micro-batch")
    a("--grad-accum", type=positive, default=16, help="micro-batches per optimizer step")
    a("--seq-len", type=positive, default=2048)
    a("--lr", type=float, default=3e-4)
    a("--min-lr", type=float, default=1e-6)
    a("--warmup", type=int, default=500, help="optimizer steps (not stated in the paper)")
    a("--weight-decay", type=float, default=0.01)
    a("--eval-every", type=positive, default=500)
    a("--eval-batches", type=positive, default=20)
    a("--save-every", type=positive, default=1000)
    a("--device", help="default: cuda if there is one, else cpu")
    a("--dtype", choices=["float32", "bfloat16"], help="frozen weights: default bf16 on CUDA, float32 on CPU")
    a("--compile", action="store_true")
    a("--checkpointing", action="store_true", help="recompute each loop step in backward (deep loops)")
    a("--seed", type=int, default=1337)
    a("--resume", action="store_true", help="continue from the checkpoint in --out")
    a("--eval-full", action="store_true", help="also evaluate the unpruned model, for gap recovered")
    a("--peak-flops", type=float, help="peak FLOP/s of one device for MFU (known: H100, H200, A100)")
    a("--demo", action="store_true", help="tiny random model and data, CPU, under a minute")
    a("--benchmark", action="store_true", help="time --steps updates on random tokens and weights")
    args = ap.parse_args(argv)
    if args.demo or args.benchmark:  # other defaults (what the command line gives still wins)
        ap.set_defaults(**DEMO if args.demo else dict(out="out/benchmark", steps=10, warmup=0))
        args = ap.parse_args(argv)
    args.depths = args.depths or [args.depth]
    return args

# ----------------------------------------------------------------------------------------
# Data: random windows of the token files, each batch a pure function of its key


def write_json(file, obj):
    Path(f"{file}.tmp").write_text(json.dumps(obj, indent=2))
    os.replace(f"{file}.tmp", file)  # atomic: never a half-written file


def load_data(args, cfg, rank, world):
    """This rank's share of train.bin and val.bin, once they are known to fit this model."""
    data = Path(args.data)
    meta = ob.read_json(data / "meta.json", f"make it: python data/prepare.py INPUT... --tokenizer {args.model} "
                     f"--out {data}; see the README's Data section")
    sha = prepare.load_tokenizer(args.model)[2]
    if meta.get("tokenizer_sha256") != sha:
        raise ValueError(f"{data}/meta.json: made with another tokenizer (sha256 {meta.get('tokenizer_sha256')}, "
                         f"{args.model}/tokenizer.json is {sha}): prepare the data again")
    if meta.get("vocab_size", math.inf) > cfg.vocab_size:
        raise ValueError(f"{data}/meta.json: vocab_size {meta.get('vocab_size')} exceeds the model's "
                         f"{cfg.vocab_size}")
    splits = {}
    for split in ("train", "val"):
        file, n = data / f"{split}.bin", meta.get(f"{split}_tokens", 0)
        if file.stat().st_size != 4 * n:
            raise ValueError(f"{file}: {file.stat().st_size:,} bytes, but meta.json says {n:,} uint32 tokens "
                             "(truncated? prepare the data again)")
        tokens = np.memmap(file, dtype=np.uint32, mode="r")
        part = tokens[rank * len(tokens) // world:(rank + 1) * len(tokens) // world]  # each rank its own part
        if len(part) <= args.seq_len:
            raise ValueError(f"{data}/{split}.bin: {len(part):,} tokens{' per rank' * (world > 1)} are too "
                             f"few for --seq-len {args.seq_len} (+1 for the shifted targets)")
        splits[split] = part
    return splits


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


TRAIN, VAL, TRAIN_EVAL, DEPTH = range(4)  # independent random streams: training, evaluation, depth draws


def mean_over_ranks(x, world):
    if world > 1:
        dist.all_reduce(x)
        x /= world
    return x


@torch.no_grad()
def evaluate(loss_fn, tokens, args, stream, rank, world, device):
    """Mean next-token loss of loss_fn(x, y) over --eval-batches batches that are the same at every
    call: one protocol for the full model, the baseline and ours."""
    losses = [loss_fn(*get_batch(tokens, args, (args.seed, stream, i, rank), 0, device))
              for i in range(args.eval_batches)]
    return mean_over_ranks(torch.stack(losses).float().mean(), world).item()

# ----------------------------------------------------------------------------------------
# Cost: FLOPs per token for MFU, peak memory


def flops_per_token(model, depth, T):
    """Model FLOPs per trained token, for MFU. As in PaLM, recomputation is not counted:
    --checkpointing costs time but no model FLOPs. A matmul with N weights costs 2N per token
    forward; backward, 2N for its input's gradient and 2N for its weights'. Frozen weights get
    no weight gradient:
        prelude (no autograd)                      2 N_layer P
        loop, coda, lm_head (frozen)               4 (N_layer + N_lora) depth + 4 N_layer C + 4 d V
        Controller and gate (trained)              6 N_train depth
        attention QKᵀ and AV (no causal halving)   4 T d per call forward, twice that backward
    N_layer: a layer's weight matrices; N_lora: the frozen A and B; biases and norms are neglected."""
    cfg, P, C = model.cfg, len(model.prelude), len(model.coda)
    attn = 4 * T * cfg.hidden_size
    layer = sum(p.numel() for p in model.layer.parameters() if p.dim() == 2)
    lora = sum(b.numel() for b in model.layer.buffers())
    train = sum(m.weight.numel() for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)
    return (P * (2 * layer + attn) + depth * (4 * (layer + lora) + 6 * train + 3 * attn)
            + C * (4 * layer + 3 * attn) + 4 * cfg.hidden_size * cfg.vocab_size)


def peak_memory(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # CPU: peak resident set (KiB on Linux)

# ----------------------------------------------------------------------------------------
# Checkpoints: safetensors and JSON, no pickles; each file written to .tmp, then renamed


def save(out, model, opt, state):
    """Optimizer state, trainables, then state.json last: a resume checks the three agree."""
    names = [n for n, _ in model.named_trainable()]
    moments = {f"{names[i]}.{k}": v.cpu() for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
    ob.save_atomic(moments, out / "optimizer.safetensors", {"step": str(state["step"])})
    model.save_trainable(out / "ouroboros.safetensors")
    write_json(out / "state.json", state)


def resume(out, model, opt, options):
    state = ob.read_json(out / "state.json", "no checkpoint to resume: run without --resume")
    diff = [f"{k}: checkpoint {state['options'].get(k)!r}, now {v!r}" for k, v in options.items()
            if state["options"].get(k) != v]
    if diff:
        raise ValueError(f"{out}/state.json: --resume with other options ({'; '.join(diff)})")
    model.load_trainable(out / "ouroboros.safetensors")
    try:
        with safe_open(out / "optimizer.safetensors", framework="pt", device="cpu") as f:
            if f.metadata().get("step") != str(state["step"]):
                raise ValueError(f"{out}/optimizer.safetensors: step {f.metadata().get('step')}, state.json "
                                 f"says {state['step']} (interrupted while saving)")
            sd = opt.state_dict()  # AdamW per tensor: step, exp_avg, exp_avg_sq
            sd["state"] = {i: {k: f.get_tensor(f"{n}.{k}") for k in ("step", "exp_avg", "exp_avg_sq")}
                           for i, (n, _) in enumerate(model.named_trainable())}
    except SafetensorError as e:
        raise ValueError(f"{out}/optimizer.safetensors: unreadable ({e})") from None
    opt.load_state_dict(sd)
    return state

# ----------------------------------------------------------------------------------------
# Demo: a tiny random checkpoint in the Hugging Face layout, so nothing has to be downloaded

DEMO_CONFIG = ob.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rope_theta=10000.0, tie_word_embeddings=True)
DEMO = dict(out="out/demo", device="cpu", steps=60, batch_size=8, grad_accum=1, seq_len=64, lr=1e-2,
            warmup=5, eval_every=20, eval_batches=4)


def write_checkpoint(path, config, tensors, shards=1):
    """Write config.json and the tensors as model.safetensors, or as `shards` files + index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if shards == 1:
        return save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    weight_map = {}
    names, per = list(tensors), -(-len(tensors) // shards)  # ceil: every shard gets some
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k * per:(k + 1) * per]
        save_file({n: tensors[n] for n in part}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tokenizer(path, texts, vocab_size):
    """A byte-level BPE tokenizer.json (Qwen's kind) trained on `texts`, EOS <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(Path(path) / "tokenizer.json"))
    return tok


def make_demo(out, seed=0):
    """Random Qwen2 weights, a tokenizer trained on this repository's own .py and .md files, and
    data made from the same text by data/prepare.py. Returns the model and data directories."""
    out, texts = Path(out), [f.read_text() for f in sorted(Path(__file__).parent.glob("*.[pm][yd]"))]
    torch.manual_seed(seed)
    tensors = ob.Qwen2.from_config(DEMO_CONFIG, device="cpu").state_dict()  # N(0, 0.02) weights
    write_checkpoint(out / "model", DEMO_CONFIG.to_dict(), tensors)
    write_tokenizer(out / "model", texts, DEMO_CONFIG.vocab_size)
    docs = [p for t in texts for p in t.split("\n\n") if p.strip()]  # a paragraph is a document
    (out / "demo.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare.prepare([out / "demo.jsonl"], out / "model", out / "data", val_fraction=0.1, log=lambda *a, **k: None)
    return out / "model", out / "data"

# ----------------------------------------------------------------------------------------
# Training


def get_lr(step, args):
    """Linear warmup to --lr over --warmup optimizer steps, then cosine down to --min-lr at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def show(value, spec):
    return "-" if value is None else format(value, spec)


def train(args):
    # Processes: torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; a plain run is a world of one.
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = ob.placement(args.device, None)[0]
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    log, out = (print if rank == 0 else lambda *a, **k: None), Path(args.out)
    if args.demo:
        log("demo: a smoke run of the real code on a tiny model with RANDOM weights, nothing downloaded; "
            "the loss falls as the trainables fit this repository's own text: no result")
        if rank == 0:
            make_demo(out, args.seed)
        args.model, args.data = str(out / "model"), str(out / "data")
        if world > 1:
            dist.barrier()

    # Checks that need no weights come first: a bad option fails in a second, not after loading.
    for depth in (args.depth, *args.depths):  # --depth is also the evaluation's
        if not 1 <= depth <= MAX_STEPS:
            raise ValueError(f"depth {depth} is outside 1..{MAX_STEPS} (the Controller's step table)")
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"{args.model}/config.json: not found (download the model: huggingface-cli "
                                f"download Qwen/Qwen2.5-3B --local-dir {args.model}; or try --demo)")
    cfg = ob.Qwen2Config.from_pretrained(args.model)
    if args.seq_len > cfg.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings "
                         f"{cfg.max_position_embeddings} of {args.model}/config.json")
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * world
    splits = ({"train": np.random.default_rng(args.seed).integers(0, cfg.vocab_size, 2 * tokens_per_step + 1)}
              if args.benchmark else load_data(args, cfg, rank, world))

    # Model: frozen weights bf16 on CUDA (float32 on CPU); the trainables are float32 master
    # weights, initialised from the seed, so identical on every rank. The model autocasts inside.
    torch.manual_seed(args.seed)
    options = dict(rank=args.rank, alpha=args.alpha, prelude=args.prelude, recurrent=args.recurrent,
                   coda=args.coda, controller=args.controller, pool=args.pool, gate=not args.no_gate,
                   step_norm=not args.no_step_norm, max_steps=MAX_STEPS)
    dtype = args.dtype and getattr(torch, args.dtype)
    model = (ob.Ouroboros.from_config(cfg, device, dtype, **options) if args.benchmark
             else ob.Ouroboros.from_pretrained(args.model, device, dtype, **options))
    model.checkpointing = args.checkpointing
    forward = torch.compile(model) if args.compile else model
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    run = {k: v for k, v in vars(args).items() if k not in FREE} | {"world_size": world}
    start = resume(out, model, opt, run)["step"] if args.resume else 0
    out.mkdir(parents=True, exist_ok=True)
    log(f"{sum(p.numel() for p in params):,} trainable | {tokens_per_step:,} tokens per step "
        f"({args.batch_size} x {args.seq_len} x {args.grad_accum} accumulation x {world} ranks) | {device}")

    # Reference losses before training, all under evaluate's one protocol.
    def losses(loss_fn):
        return {"train": evaluate(loss_fn, splits["train"], args, TRAIN_EVAL, rank, world, device),
                "held-out": evaluate(loss_fn, splits["val"], args, VAL, rank, world, device)}

    def ours(x, y):
        return model(x, args.depth, y)[1]
    ref = {}
    if not args.benchmark:
        ref["baseline"] = losses(lambda x, y: model.baseline(x, y)[1])
        if args.eval_full:
            full = ob.Qwen2.from_pretrained(args.model, device=device, dtype=dtype)
            ref["full"] = losses(lambda x, y: full(x, y)[1])
            del full
        log(" | ".join(f"{k}: train {v['train']:.4f} held-out {v['held-out']:.4f}" for k, v in ref.items()))

    # The loop: one optimizer step per iteration. Ctrl-C (or a scheduler's SIGTERM) lets the step
    # finish, saves it, and exits. Repeated signals change nothing (torchrun forwards its own
    # SIGINT to workers that already had the terminal's): Ctrl-\ quits at once, without saving.
    stop, history, saved = [], [], start if args.resume else None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(True))
    peak = args.peak_flops or next((v for k, v in PEAK_FLOPS.items() if device.type == "cuda"
                                    and k in torch.cuda.get_device_name(device)), None)
    if rank == 0 and not args.resume:
        (out / "metrics.jsonl").write_text("")
    t_start = time.perf_counter()
    for step in range(start, args.steps):
        t0, lr = time.perf_counter(), get_lr(step, args)
        for group in opt.param_groups:
            group["lr"] = lr
        depth = args.depths[np.random.default_rng((args.seed, DEPTH, step)).integers(len(args.depths))]
        loss_sum = torch.zeros((), device=device)
        for micro in range(args.grad_accum):
            x, y = get_batch(splits["train"], args, (args.seed, TRAIN, step, rank), micro, device)
            loss = forward(x, depth, y)[1]
            (loss / args.grad_accum).backward()  # gradients add up over the micro-batches
            loss_sum += loss.detach()
        # One exchange per update: the trainables' gradients (nothing else is synchronised), the
        # loss and the Ctrl-C flag, so every rank takes the same step and stops at the same one.
        if world > 1:
            for p in params:
                mean_over_ranks(p.grad, world)
        stats = torch.stack([loss_sum / args.grad_accum, torch.tensor(float(bool(stop)), device=device)])
        loss, stopping = mean_over_ranks(stats, world).tolist()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
        if not (math.isfinite(loss) and math.isfinite(norm)):  # before the update: no bad weights saved
            raise ValueError(f"step {step + 1}: loss {loss}, grad norm {norm}: stopped; the last good "
                             f"checkpoint ({'step ' + str(saved) if saved else 'none yet'}) is kept in {out}")
        opt.step()
        opt.zero_grad(set_to_none=True)

        dt = time.perf_counter() - t0
        m = dict(step=step + 1, loss=loss, vs_baseline=loss - ref["baseline"]["train"] if ref else None, lr=lr,
                 grad_norm=norm, tok_s=tokens_per_step / dt, depth=depth, mem_gb=peak_memory(device) / 1e9,
                 mfu=peak and flops_per_token(model, depth, args.seq_len) * tokens_per_step / dt / (peak * world),
                 eta_s=(time.perf_counter() - t_start) / (step + 1 - start) * (args.steps - step - 1))
        if not args.benchmark and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            m["val_loss"] = losses(ours)["held-out"]
        log(f"step {step + 1}/{args.steps} | loss {loss:.4f} | vs base {show(m['vs_baseline'], '+.4f')} | "
            f"lr {lr:.2e} | grad {norm:.3f} | {m['tok_s']:,.0f} tok/s | MFU {show(m['mfu'], '.1%')} | "
            f"mem {m['mem_gb']:.2f} GB | ETA {datetime.timedelta(seconds=round(m['eta_s']))}"
            + (f" | held-out {m['val_loss']:.4f}" if "val_loss" in m else ""))
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(m) + "\n")
        history.append(m)
        if not args.benchmark and ((step + 1) % args.save_every == 0 or step + 1 == args.steps or stopping):
            if rank == 0:  # data position and RNG are the step and the seed: get_batch draws from them
                save(out, model, opt, dict(step=step + 1, tokens_seen=(step + 1) * tokens_per_step, options=run))
            saved = step + 1
        if stopping:
            log(f"interrupted: saved step {step + 1} in {out}; continue with the same command and --resume")
            return model

    if args.benchmark:  # the first step pays for warm-up (allocation, compilation): left out
        timed = history[1:] or history
        tok_s = sorted(m["tok_s"] for m in timed)[len(timed) // 2]
        mfu = sorted(m["mfu"] or 0 for m in timed)[len(timed) // 2]
        log(f"benchmark: {tok_s:,.0f} tok/s | MFU {show(peak and mfu, '.1%')} | peak memory "
            f"{history[-1]['mem_gb']:.2f} GB (median of {len(timed)} steps, depth {args.depths}, {device})")
    else:  # the final table: every figure a loss of evaluate's protocol, reduction and gap per column
        res = {**ref, "ours": losses(ours)}
        b, f, o = res["baseline"], res.get("full"), res["ours"]
        res["loss reduction %"] = {s: 100 * (b[s] - o[s]) / b[s] for s in b}
        if f:
            res["gap recovered %"] = {s: 100 * (b[s] - o[s]) / (b[s] - f[s]) for s in b}
        log(f"{'':<20}{'train':>10}{'held-out':>10}   (ours: depth {args.depth}, {start + len(history)} steps)")
        for name, row in res.items():
            log(f"{name:<20}" + "".join(f"{row[s]:>10.4f}" for s in ("train", "held-out")))
        if rank == 0:
            write_json(out / "results.json", res)
    return model


def main(argv=None):
    args = parse_args(argv)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return train(args)
    except (ValueError, FileNotFoundError) as e:  # ouroboros.py's and ours: one line naming the cause
        sys.exit(f"error: {e}")
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
