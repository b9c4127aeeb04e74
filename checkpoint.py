"""
A run's files in --out (checkpoints, resume, the lock that keeps two runs off one folder, the final
table) are what a reader of train.py's loop skips, so they live here, as nanochat keeps its
checkpoints in checkpoint_manager.py.

    lock                   held while a train.py runs here (hold, release)
    state.json             the step, the options that fix what the run learns, and the command's (save)
    ouroboros.safetensors  the trainables (--pretrain: model.safetensors, config.json, tokenizer.json)
    optimizer.safetensors  AdamW's moments, for --resume (restore)
    metrics.jsonl          a line per step, cut back to the saved step when a run resumes (start_run)
    results.json           the final table; windows.json, the batch losses behind it (report)

Safetensors and JSON, no pickles; each file written to .tmp, then renamed. This module does not
import train.py: train.py hands in what it needs (its parse_args, for the defaults of a saved run).
"""
import contextlib
import datetime
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

import ouroboros as ob

# What a run learns depends on every option but these, so a resume may change them (and --steps
# may grow: the run goes on, the cosine stretched to the new end); any other must be as saved.
RESUME_MAY_CHANGE = {"model", "data", "out", "resume", "overwrite", "steps", "device", "dtype", "compile",
                     "checkpointing", "eval_every", "eval_batches", "save_every", "eval_full", "eval_baseline",
                     "peak_flops", "demo", "benchmark", "final_tokens", "eval_on", "eval_depths"}
SAVED = ("state.json", "optimizer.safetensors", "ouroboros.safetensors", "model.safetensors")  # a run's files
MODEL = ("config.json", "model.safetensors.index.json")  # a Hugging Face checkpoint's (--pretrain writes one)
HELD = []  # (lock, OUT, folders made) of each hold of this process, each released by the main() that took it


def trainables(model):
    """(name, tensor) of what trains: Ouroboros's additions, or every weight when pretraining."""
    return model.named_trainable() if isinstance(model, ob.Ouroboros) else list(model.named_parameters())

# ----------------------------------------------------------------------------------------
# Starting: --out held by this run alone, and the saved run (if any) checked against the command


def claim(args, run, rank, world, parse_args):
    """The state.json of the run to resume (None for a new one), once rank 0 holds --out: whatever is
    refused is refused before a weight is loaded, and a second train.py on --out is refused too."""
    out = Path(args.out)
    if not args.resume:  # a folder with a run or a model in it: refused before the lock
        saved_run(args, run, parse_args)
    if rank == 0:  # one train.py per --out, for as long as it runs
        hold(out)
        finish_save(out)  # a save that was cut short while its files moved in
    if world > 1:  # every rank reads the checkpoint once rank 0 has finished moving it in
        dist.barrier()
    return saved_run(args, run, parse_args)


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


def saved_run(args, run, parse_args):
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
    saved = saved_options(state, parse_args)
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


def saved_options(state, parse_args):
    """The options of a saved run (state.json); an option added since the save had its default, which
    parse_args (train.parse_args) gives."""
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


def start_run(args, model, opt, state, rank, log):
    """The saved run's trainables and moments restored (state: claim's), once the model is loaded; then (rank
    0) --out made ready: an overwritten run's files gone, metrics.jsonl cut to the saved steps, and
    (pretraining) the tokenizer the data was made with copied into the checkpoint."""
    out = Path(args.out)
    if state:
        restore(out, model, opt, state)
        log(f"resumed {out} at step {state['step']}" + (" (finished: its results are written now)"
                                                        if state["step"] == args.steps else ""))
    if rank != 0:
        return
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
# Saving: a checkpoint is whole or not there, whenever the process is killed


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

# ----------------------------------------------------------------------------------------
# The final table: what the run is judged by, in results.json once the last step is saved


@torch.no_grad()
def final_windows(n_tokens, T, B, budget, world=1):
    """Where evaluate_final's windows of seq_len T + 1 start in a split of n_tokens (this rank's part), a
    row per batch of B: evenly spread, never overlapping, up to `budget` tokens in all ranks."""
    n_slots = (n_tokens - 1) // T
    n = min(n_slots, max(1, budget // (T * world)))  # windows of this rank
    B = min(B, n)
    return ((np.arange(n - n % B) * n_slots // n) * T).reshape(-1, B)


def evaluate_final(loss_fn, tokens, budget, args, rank, world, device):
    """The final table's protocol: the loss of each batch of --batch-size non-overlapping windows of
    seq_len + 1 tokens, spread evenly over the whole split (up to `budget` tokens; each rank scores its
    own part, and the parts are gathered). Returns the list of batch losses, all of equal size: the
    units of a paired bootstrap (train.py's curves draw random windows instead)."""
    T, losses = args.seq_len, []
    for batch in final_windows(len(tokens), T, args.batch_size, budget, world):
        window = torch.from_numpy(np.stack([tokens[j:j + T + 1] for j in batch]).astype(np.int64)).to(device)
        losses.append(loss_fn(window[:, :-1], window[:, 1:]).item())
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, losses)
        losses = [x for part in parts for x in part]
    return losses


def report(args, model, splits, loss_of, steps_taken, log, rank, world, device):
    """The final table: every loss under evaluate_final's protocol, on every split (and --eval-on's). The
    means go to OUT/results.json, the batch losses behind them to OUT/windows.json (paired intervals)."""
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731

    def final(loss_fn):  # the training split only as a check of fit (as many tokens as the curves), the
        # held-out sets in full
        fit = args.eval_batches * args.batch_size * args.seq_len * world
        return {"held-out" if name == "val" else name: evaluate_final(
            loss_fn, tokens, fit if name == "train" else args.final_tokens, args, rank, world, device)
            for name, tokens in splits.items()}

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
    res = {row: {s: sum(v) / len(v) for s, v in losses.items()} for row, losses in scored.items()}
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
