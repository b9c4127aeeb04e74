"""
Side by side: this checkout's training step against another git revision's, on one machine.

    python experiments/benchmark.py --against a0d422f                   # Qwen2.5-0.5B shape, CPU, bf16 and float32
    python experiments/benchmark.py --against HEAD~3 --rounds 5 --dtypes bfloat16 --depth 16
    python experiments/benchmark.py --profile                          # where this checkout's step goes
    python experiments/benchmark.py --profile --against a0d422f        # ... and the other's, one after the other
    python experiments/benchmark.py --against a0d422f --checkpoint /tmp/q05b   # frozen weights from a checkpoint

Each round runs `train.py --benchmark` once in each checkout, alternating A B A B, so that a
noisy machine (other jobs, turbo, thermals) weighs on both alike; one timing alone means little
on shared cores. The other revision is checked out with `git worktree` in a temporary folder.
For every run it reads what train.py prints (the median tok/s of the updates after the first)
and the peak resident memory *during training*: the largest RSS of the process, sampled every
few milliseconds from /proc, once the model is loaded (after train.py's "trainable |" line).
It prints the median over rounds of each, and the ratio this / other. Linux only (/proc).
RSS also holds the frozen weights, the runtime and what the allocator has not handed back; and
what loading leaves behind differs between random weights and a checkpoint's. --checkpoint DIR
therefore runs the same training step on weights loaded from DIR, in each checkout.

--profile instead takes one training step (after one of warm-up) as train.py takes it, and
reports three things: its CPU time by kind of op, from torch.profiler (self time, so nothing is
counted twice); the bytes autograd keeps for the backward pass; and the peak of the tensors alive
during the step, counted op by op (a TorchDispatchMode), so the step's own memory without the
weights, the runtime or the allocator. The last two leave out the weights and optimizer state
(the peak counts the trainables' gradients). The ops of the loss are counted by kind, like all
others; the loss's own row is only its Python and autograd-node time.
"""
import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def rss_bytes(pid):
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:  # the process has ended
        pass
    return 0


def training_step(model, depth, seq_len):
    """(step, optimizer): step() is one update as train.py makes it, on a fixed batch of random
    tokens: the loss alone where the checkout's model can skip the logits, backward, AdamW. Used
    in any checkout, with that checkout's model."""
    import inspect
    import torch
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    x, y = torch.randint(0, model.cfg.vocab_size, (2, 1, seq_len))
    loss_only = {"return_logits": False} if "return_logits" in inspect.signature(model.forward).parameters else {}

    def step():
        model(x, depth, y, **loss_only)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, opt


# --checkpoint: training_step on frozen weights loaded from a checkpoint (train.py --benchmark
# makes random ones), run in the checkout (the current folder, so its own ouroboros.py). It
# prints what run() reads: a "trainable |" line once loaded, then the median tok/s.
FROM_CHECKPOINT = f"""
import statistics, sys, time, torch
import ouroboros as ob
sys.path.append({str(HERE / "experiments")!r})
from benchmark import training_step
path, dtype, depth, T, steps = sys.argv[1], getattr(torch, sys.argv[2]), *map(int, sys.argv[3:6])
torch.manual_seed(0)
model = ob.Ouroboros.from_pretrained(path, device="cpu", dtype=dtype, rank=8)
print(" trainable | loaded", flush=True)
step, _ = training_step(model, depth, T)
tok_s = []
for _ in range(steps):
    t0 = time.perf_counter()
    step()
    tok_s.append(T / (time.perf_counter() - t0))
print(f"benchmark: {{statistics.median(tok_s[1:]):,.0f}} tok/s")
"""


def run(checkout, argv, checkpoint=None):
    """One `train.py --benchmark ARGV` in `checkout`, or with a checkpoint the same step on its
    weights (ARGV: dtype, depth, tokens, steps): (tok/s, peak RSS in bytes after loading)."""
    cmd = ["-c", FROM_CHECKPOINT, str(checkpoint), *argv] if checkpoint else ["train.py", *argv]
    proc = subprocess.Popen([sys.executable, "-u", *cmd], cwd=checkout, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    loaded, peak, lines = threading.Event(), [0], []

    def sample():  # until the process ends
        while proc.poll() is None:
            if loaded.is_set():
                peak[0] = max(peak[0], rss_bytes(proc.pid))
            time.sleep(0.005)
    sampler = threading.Thread(target=sample)
    sampler.start()
    for line in proc.stdout:
        lines.append(line)
        if " trainable | " in line:
            loaded.set()
    proc.wait()
    sampler.join()
    found = re.search(r"benchmark: ([\d,]+) tok/s", "".join(lines))
    if proc.returncode or not found:
        sys.exit(f"error: the step in {checkout} failed:\n{''.join(lines[-5:])}")
    return float(found.group(1).replace(",", "")), peak[0]


KINDS = {  # op name fragments -> kind; the first match wins
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention"),
    "dtype casts and copies": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"),
    "LinearCrossEntropy itself (its ops are in their kinds)": ("LinearCrossEntropy",),
}


def profile(root, model_dir, dtype, depth=4, checkpointing=False, seq_len=256):
    """CPU time of one training step of the checkout at `root`, by kind of op; the bytes autograd
    saves for backward; the peak of the tensors alive during the step (weights and the optimizer's
    state left out, as they exist before it; the trainables' gradients counted). The step is the
    one train.py takes (training_step)."""
    import weakref
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    sys.path.insert(0, str(root))
    import ouroboros as ob
    torch.manual_seed(0)
    cfg = ob.Qwen2Config.from_pretrained(HERE / model_dir)
    model = ob.Ouroboros.from_config(cfg, "cpu", getattr(torch, dtype), rank=8)
    model.checkpointing = checkpointing
    step, opt = training_step(model, depth, seq_len)
    step()  # warm-up; the optimizer's state now exists
    before = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers(),
              *(v for st in opt.state.values() for v in st.values())] if torch.is_tensor(t)}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in before:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    class Live(TorchDispatchMode):  # every new storage an op makes, counted until it is freed
        now = peak = 0
        sizes = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                key = t.untyped_storage().data_ptr() if torch.is_tensor(t) else 0
                if key and key not in before and key not in self.sizes:
                    self.sizes[key] = t.untyped_storage().nbytes()
                    Live.now += self.sizes[key]
                    Live.peak = max(Live.peak, Live.now)
                    weakref.finalize(t.untyped_storage(), self.free, key)
            return out

        def free(self, key):
            Live.now -= self.sizes.pop(key)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    with Live():
        step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    by_kind, total = {}, 0
    for e in prof.key_averages():
        kind = next((k for k, frags in KINDS.items() if any(f in e.key for f in frags)), "element-wise and other")
        by_kind.setdefault(kind, []).append((e.self_cpu_time_total, e.key))
        total += e.self_cpu_time_total
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=root, capture_output=True, text=True).stdout
    print(f"{rev.strip() or root}: one training step, {dtype} frozen weights, {model_dir}, 1 x {seq_len} tokens, "
          f"depth {depth}{', checkpointing' * checkpointing}, rank 8, {torch.get_num_threads()} threads: "
          f"{total / 1e3:,.0f} ms of op self time")
    for kind, ops in sorted(by_kind.items(), key=lambda kv: -sum(t for t, _ in kv[1])):
        t = sum(t for t, _ in ops)
        top = ", ".join(f"{k.replace('aten::', '')} {v / 1e3:.0f}" for v, k in sorted(ops, reverse=True)[:4])
        print(f"  {kind:<48} {t / 1e3:>7,.0f} ms  {100 * t / total:>4.0f}%   ({top})")
    print(f"  kept for backward: {sum(saved.values()) / 1e6:,.0f} MB in {len(saved)} tensors; peak of the "
          f"tensors alive during the step: {Live.peak / 1e6:,.0f} MB (weights and optimizer state left out, "
          f"gradients in)")


@contextlib.contextmanager
def worktree(rev, tmp):
    """The checkout of git revision `rev`, in a temporary folder, removed afterwards."""
    other = Path(tmp) / "other"
    made = subprocess.run(["git", "worktree", "add", "--detach", str(other), rev], cwd=HERE,
                          capture_output=True, text=True)
    if made.returncode:
        sys.exit(f"error: --against {rev}: {made.stderr.strip().splitlines()[-1]}")
    try:
        yield other
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=HERE, capture_output=True)


def check(args):
    """Every option, before any work: a user's folder is read, never written over."""
    sys.path.insert(0, str(HERE))
    import ouroboros as ob
    ob.Qwen2Config.from_pretrained(HERE / args.model)  # a folder with a readable config.json
    if args.rounds < 1:
        raise ValueError(f"--rounds {args.rounds}: must be at least 1")
    if not 1 <= args.depth <= ob.MAX_STEPS:
        raise ValueError(f"--depth {args.depth}: must be in 1..{ob.MAX_STEPS}")
    for dtype in args.dtypes.split(","):
        if dtype not in ("bfloat16", "float32"):
            raise ValueError(f"--dtypes {args.dtypes}: {dtype!r} is not bfloat16 or float32")
    folder = args.checkpoint
    if folder and folder.exists() and not (folder / "config.json").is_file() and (
            not folder.is_dir() or any(folder.iterdir())):
        raise ValueError(f"--checkpoint {folder}: neither a checkpoint (no config.json) nor a new or empty folder "
                         "to write one in")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", help="the other git revision (a commit, tag or branch)")
    ap.add_argument("--profile", action="store_true", help="profile one step (of each checkout) instead")
    ap.add_argument("--root", type=Path, default=HERE, help=argparse.SUPPRESS)  # --profile: whose step
    ap.add_argument("--model", default="configs/Qwen2.5-0.5B", help="a folder with a config.json (random weights)")
    ap.add_argument("--rounds", type=int, default=3, help="A B rounds (at least 1)")
    ap.add_argument("--depth", type=int, default=4, help="loop steps (1..64)")
    ap.add_argument("--checkpointing", action="store_true", help="--profile: recompute each loop step in backward")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="frozen weights' dtypes to measure")
    ap.add_argument("--checkpoint", type=Path, help="load the frozen weights from this Hugging Face folder "
                    "(written first, random bf16 weights of --model's shape, if it is new or empty) instead of "
                    "random ones")
    ap.add_argument("--this", default="", help="train.py options for this checkout alone (e.g. --this=--compile)")
    ap.add_argument("extra", nargs="*", help="after --: more train.py options for both (e.g. -- --compile)")
    args = ap.parse_args(argv)
    try:
        check(args)
    except (ValueError, FileNotFoundError) as e:  # one line, before a worktree or a model is made
        sys.exit(f"error: {e}")
    if args.profile and not args.against:
        return [profile(args.root, args.model, dtype, args.depth, args.checkpointing)
                for dtype in args.dtypes.split(",")]
    if not args.against:
        ap.error("give --against REV (or --profile)")
    if args.checkpoint and (args.this or args.extra):
        ap.error("--checkpoint runs the training step itself: train.py options do not apply")
    if args.checkpoint and not (args.checkpoint / "config.json").is_file():  # new or empty (check): write one
        import torch
        sys.path.insert(0, str(HERE))
        import ouroboros as ob
        torch.manual_seed(0)
        cfg = ob.Qwen2Config.from_pretrained(HERE / args.model)
        ob.Qwen2.from_config(cfg, device="cpu", dtype=torch.bfloat16).save_pretrained(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp, worktree(args.against, tmp) as other:
        if args.profile:  # each checkout in a process of its own, so each imports its own ouroboros
            for root in (HERE, other):
                subprocess.run([sys.executable, __file__, "--profile", "--root", str(root), "--model", args.model,
                                "--dtypes", args.dtypes, "--depth", str(args.depth),
                                *["--checkpointing"] * args.checkpointing], check=True)
            return
        common = ["--benchmark", "--model", str(HERE / args.model), "--device", "cpu", "--depth", str(args.depth),
                  "--rank", "8", "--batch-size", "1", "--grad-accum", "1", "--seq-len", "256", "--steps", "6",
                  *args.extra]
        results = {}  # (dtype, side) -> [(tok/s, peak)]
        for r in range(args.rounds):
            for dtype in args.dtypes.split(","):
                for side, checkout in (("this", HERE), ("other", other)):  # A B A B
                    out = Path(tmp) / f"out-{side}"
                    argv = ([dtype, str(args.depth), "256", "6"] if args.checkpoint else
                            [*common, *(args.this.split() if side == "this" else []), "--dtype", dtype,
                             "--out", str(out)])
                    results.setdefault((dtype, side), []).append(run(checkout, argv, args.checkpoint))
                    tok_s, peak = results[(dtype, side)][-1]
                    print(f"round {r + 1}/{args.rounds} {dtype:>8} {side:>5}: {tok_s:,.0f} tok/s, "
                          f"train peak {peak / 1e9:.2f} GB", flush=True)
    setup = (f"weights from {args.checkpoint}, depth {args.depth}, rank 8, 1 x 256 tokens, 6 steps" if args.checkpoint
             else " ".join(common[1:]))
    print(f"\nmedians over {args.rounds} rounds (this checkout{' ' + args.this if args.this else ''} vs "
          f"{args.against}; {setup}):")
    print(f"{'dtype':>9} | {'this tok/s':>10} | {'other tok/s':>11} | speed ratio | {'this peak':>9} | "
          f"{'other peak':>10} | memory ratio")
    for dtype in args.dtypes.split(","):
        (a_s, a_m), (b_s, b_m) = [[statistics.median(x) for x in zip(*results[(dtype, side)])]
                                  for side in ("this", "other")]
        print(f"{dtype:>9} | {a_s:>10,.0f} | {b_s:>11,.0f} | {a_s / b_s:>10.2f}x | {a_m / 1e9:>7.2f} GB | "
              f"{b_m / 1e9:>8.2f} GB | {a_m / b_m:>11.2f}x")


if __name__ == "__main__":
    main()
