"""
The GPU check: the CUDA tests, and the figures only a GPU gives (training speed, load, decode), in under 8 minutes.

    python experiments/gpu.py                          # on one CUDA GPU: at most 7.5 minutes of stages
    python experiments/gpu.py --smoke                  # the same stages on a tiny shape, on the CPU (the suite's)
    python experiments/gpu.py --only train-eager,decode    # some of the stages (the report holds only those)
    python experiments/gpu.py --authors DIR            # also the authors' code side by side (DIR holds ouroboros/)

Stages, in this order. Each runs as a child process (`gpu.py --stage NAME`) with its own time limit,
so that a crash, a CUDA out-of-memory or a hang ends that stage alone and the next one starts. The
limits are what a stage may take, not what it is expected to: together they exceed the run's own
limit, TOTAL_S = 450 s, which shortens the limit of the stage running when it nears and skips the
stages after. With Python's start and the report, the command ends within 8 minutes, so that a
rerun still fits a 15-minute GPU lease.

  stage          limit   what
  cuda-tests      60 s   pytest -k cuda: the CUDA tests of test_ouroboros.py (marked @cuda), log kept
  sdpa-kernels    30 s   whether SDPA's flash and memory-efficient backends take the model's call
                         (grouped-query heads with enable_gqa=True, bf16): the training/prefill call
                         (2 x 2,048 causal queries, forward and backward) and a decode call (1 query);
                         and which kernel runs when torch chooses (read from the profiler's op names)
  train-eager     60 s   train.py --benchmark on the Qwen2.5-3B shape (configs/Qwen2.5-3B), random
                         bf16 frozen weights, rank 8, micro-batch 2 x 2,048, depth 4, 10 updates
  train-compile  240 s   the same with --compile (compiling the 3B shape takes the most)
  authors        240 s   only with --authors DIR: the authors' OuroborosV2 (their package, with
                         transformers) against ours on one random checkpoint of the shape, written
                         first: split 8/18/8, depth 4, rank 8, micro-batch 2 x 2,048, AdamW; theirs in
                         pure bf16 as their train_v2.py, ours as train.py; eager, then torch.compile;
                         tokens/s (median of the steps after the first, two when compiled) and peak
                         memory allocated while training, and the ratios ours / theirs
  decode          60 s   cached greedy decoding (ob.stream, temperature 0) at depth 4, batch 1: 64 new
                         tokens after a 16-token and after a 2,048-token prompt, each run twice (the
                         first pays for the kernels' first calls), and the aten ops of one decoded token
                         (a TorchDispatchMode), and of them those that are not views
  decode-compile 180 s   the same with stream(compile=True): one compiled graph per token, replayed as a
                         CUDA graph ("reduce-overhead"); the first run of each prompt compiles, the
                         second (timed) records its CUDA graph again for its new caches
  train-deep      60 s   depth 16 with --checkpointing
  load            90 s   a 3B-shaped checkpoint of random bf16 weights written to local disk (its write,
                         fsync included, is timed apart and not counted; its pages are then dropped from
                         the page cache, so the load reads the disk), then Ouroboros.from_pretrained(rank=8)
                         on the GPU: the 17 kept layers read, the removed ones streamed into the SVD bases

--smoke runs the same stages, with the same report fields, on a tiny Qwen2 shape on the CPU: there
the CUDA tests skip (their pytest summary is recorded), float32 frozen weights stand in for bf16, MFU
is taken against a nominal 1e11 FLOP/s, --compile uses torch.compile's "eager" backend (dynamo traces
the model as on the GPU; inductor's C++ build would take minutes on a CPU), and each stage runs on one
thread (on shared cores, two threads of a tiny model mostly wait for each other). The suite runs it
(test_gpu_script_smoke_mode_runs_every_stage); its time is mostly the start of eight Python processes
that import torch and build a model.

The report, in --results (default experiments/results), rewritten after every stage (a run cut
short keeps what it measured); gpu.json and gpu.md are written to .tmp, then renamed:
  gpu.json   environment (date, GPU, torch, CUDA, cuDNN, commit), the settings, and per stage: status
             (ok, failed, timed out, skipped), its limit and wall seconds, its start, its figures (a
             figure that could not be had is null) and, when not ok, the last lines of its log
  gpu.md     the same as a table the README can quote: stage | figure | value
  gpu.log    every stage's whole output, the CUDA tests' among them (written as the stages run)

How to read the figures. tokens/s is train.py's median over the updates after the first (which pays
for allocation and compilation). MFU is train.py's: model FLOPs per token (ouroboros.flops_per_token) x tokens/s
over the GPU's dense bf16 peak (H100, H200 989e12; A100 312e12; else give --peak-flops). Peak memory
is torch.cuda.max_memory_allocated and max_memory_reserved of the stage's process, model build
included (on the CPU: the peak resident set, for both). Decode tokens/s counts the tokens after the
first one; the first one's time is the prefill.
"""
import argparse
import contextlib
import datetime
import functools
import io
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ouroboros as ob  # noqa: E402
import train  # noqa: E402

TOTAL_S = 450  # the whole run's stages; Python's start and the report add a few seconds
MARK = "gpu.py figures:"  # a stage's last line of output: this, then its figures as JSON
MFU_FORMULA = " ".join(ob.flops_per_token.__doc__.split())  # the formula of train.py's MFU, as its docstring states it

# ----------------------------------------------------------------------------------------
# The two plans: one CUDA GPU at the Qwen2.5-3B shape, and the CPU smoke test at a tiny one


@dataclass(frozen=True)
class Plan:
    device: str
    config_dir: str  # a folder with config.json (train.py --model); "" for `config`, written when needed
    config: ob.Qwen2Config
    dtype: str  # frozen weights
    steps: int  # updates per training benchmark
    seq_len: int
    batch: int
    deep: int  # the depth of train-deep
    prompts: tuple  # decode: the short and the long prompt's tokens
    new_tokens: int
    peak_flops: float = None  # None: train.py's table of GPUs
    compile_backend: str = None  # None: torch.compile's default (inductor)
    authors: str = None  # --authors: a folder holding the authors' package (ouroboros/), for measuring only
    scratch: str = field(default_factory=tempfile.gettempdir)  # where the load stage writes its checkpoint


QWEN25_3B = "configs/Qwen2.5-3B"
GPU = Plan(device="cuda", config_dir=QWEN25_3B, config=ob.Qwen2Config.from_pretrained(ROOT / QWEN25_3B),
           dtype="bfloat16", steps=10, seq_len=2048, batch=2, deep=16, prompts=(16, 2048), new_tokens=64)
SMOKE = Plan(device="cpu", config_dir="", dtype="float32", steps=3, seq_len=64, batch=2, deep=16, prompts=(16, 128),
             new_tokens=8, peak_flops=1e11, compile_backend="eager",
             config=ob.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rope_theta=10000.0, tie_word_embeddings=True))


@contextlib.contextmanager
def config_folder(plan):
    """A folder with the plan's config.json: the repository's, or the smoke shape's written to a temporary one."""
    if plan.config_dir:
        yield ROOT / plan.config_dir
        return
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(plan.config.to_dict(), indent=2))
        yield Path(tmp)


def smoke_compile(plan):
    """In the smoke run, torch.compile with a backend a CPU builds in seconds (as on the GPU, dynamo traces)."""
    if plan.compile_backend:
        torch.compile = functools.partial(torch.compile, backend=plan.compile_backend)


def sync(plan):
    if plan.device == "cuda":
        torch.cuda.synchronize()


def peak_memory_gb(plan):
    """(allocated, reserved) peaks of this process in GB; on the CPU the peak resident set, twice."""
    if plan.device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9, torch.cuda.max_memory_reserved() / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    return rss, rss

# ----------------------------------------------------------------------------------------
# Stage 1: the CUDA tests


def cuda_tests(plan):
    """pytest -k cuda, in this process, its whole output in the log; the counts pytest's summary
    line gives. Without a GPU the tests skip, which is what the smoke run records. (On a CPU, -k cuda
    also selects one test that --device cuda is refused there; on a GPU, exactly the @cuda tests.)"""
    import pytest

    class Counts:  # a plugin: the terminal reporter's outcome lists, once the session ends
        stats = {}

        def pytest_terminal_summary(self, terminalreporter):
            Counts.stats = {k: len(v) for k, v in terminalreporter.stats.items()}
    args = ["-q", "-rs", "-p", "no:cacheprovider", "test_ouroboros.py", "-k", "cuda"]
    with tempfile.TemporaryDirectory() as tmp:  # its own temporary folders: none of an outer pytest's touched
        exit_status = pytest.main([*args, "--basetemp", str(Path(tmp) / "pytest")], plugins=[Counts()])
    n = {k: Counts.stats.get(k, 0) for k in ("passed", "failed", "skipped", "error", "deselected")}
    figures = dict(passed=n["passed"], failed=n["failed"], skipped=n["skipped"], errors=n["error"],
                   summary=", ".join(f"{v} {k}" for k, v in n.items() if v) or "no tests ran",
                   command=" ".join(["pytest", *args]))
    if exit_status:  # the counts still go in the report
        print(f"{MARK} {json.dumps(figures)}", flush=True)
        sys.exit(f"error: pytest exited with status {int(exit_status)}: {figures['summary']}")
    return figures

# ----------------------------------------------------------------------------------------
# Stage 2: which SDPA kernel takes the model's attention call


def sdpa_kernels(plan):
    """Attention.forward calls F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
    with n_kv key/value heads serving n_head query heads. That call, at the plan's shape in bf16, under
    each fused backend alone (accepted, or refused with torch's reasons), and under torch's own choice
    (the kernels it ran). Training (and prefill): causal, forward and backward; decode: one query."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg, B, T = plan.config, plan.batch, plan.seq_len
    H, KV, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    figures = dict(call=f"q ({B}, {H}, T, {hd}), k and v ({B}, {KV}, {T}, {hd}), bfloat16, enable_gqa=True; "
                        f"training: T = {T}, is_causal=True, forward and backward; decode: T = 1")
    for call, queries, causal in (("training", T, True), ("decode", 1, False)):
        grad = call == "training"
        q, k, v = (torch.randn(*shape, device=plan.device, dtype=torch.bfloat16, requires_grad=grad)
                   for shape in ((B, H, queries, hd), (B, KV, T, hd), (B, KV, T, hd)))

        def attend():
            y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
            if grad:
                y.sum().backward()
            sync(plan)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            attend()
        ran = sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key}
                     - {"aten::scaled_dot_product_attention"})  # the dispatcher itself; its kernels remain
        figures[f"chosen_{call}"] = ", ".join(ran) or "math (no fused kernel op)"
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
            with warnings.catch_warnings(record=True) as caught, sdpa_kernel(backend):
                warnings.simplefilter("always")
                try:
                    attend()
                    figures[f"{name}_{call}"] = "accepted"
                except RuntimeError as e:  # torch's reasons come as warnings; the error itself is generic
                    why = [line.strip() for w in caught for line in str(w.message).splitlines() if line.strip()]
                    figures[f"{name}_{call}"] = "refused: " + "; ".join(why or [str(e).splitlines()[0]])[:300]
    return figures

# ----------------------------------------------------------------------------------------
# Stages 3-5: train.py --benchmark


class Tee(io.TextIOBase):
    """stdout into the log (as it comes) and into a string (to read the benchmark line from)."""

    def __init__(self, out):
        self.out, self.text = out, io.StringIO()

    def write(self, s):
        self.text.write(s)
        return self.out.write(s)

    def flush(self):
        self.out.flush()


def train_benchmark(plan, depth, *flags):
    """train.py --benchmark in this process, with random frozen weights of the plan's shape; its
    printed median tok/s and MFU, and this process's peak memory."""
    smoke_compile(plan)  # --compile's torch.compile(model)
    with config_folder(plan) as model, tempfile.TemporaryDirectory() as out:
        argv = ["--benchmark", "--model", str(model), "--depth", str(depth), "--rank", "8", "--seq-len",
                str(plan.seq_len), "--batch-size", str(plan.batch), "--grad-accum", "1", "--steps", str(plan.steps),
                "--device", plan.device, "--dtype", plan.dtype, "--out", out, *flags,
                *(["--peak-flops", str(plan.peak_flops)] if plan.peak_flops else [])]
        tee = Tee(sys.stdout)
        with contextlib.redirect_stdout(tee):
            train.main(argv)
    found = re.search(r"benchmark: ([\d,]+) tok/s \| MFU ([\d.]+%|-) \| peak memory", tee.text.getvalue())
    if not found:
        raise RuntimeError("train.py printed no 'benchmark: ... tok/s | MFU ... | peak memory' line")
    allocated, reserved = peak_memory_gb(plan)
    command = " ".join(["python train.py", *argv]).replace(str(model), plan.config_dir or "SMOKE_CONFIG")
    return dict(tok_per_s=float(found.group(1).replace(",", "")),
                mfu_percent=None if found.group(2) == "-" else float(found.group(2)[:-1]),
                peak_allocated_gb=allocated, peak_reserved_gb=reserved,
                command=re.sub(r"--out \S+", "--out TMP", command))

# ----------------------------------------------------------------------------------------
# Stage 6: load and SVD initialisation of a checkpoint on local disk


def mount_of(path):
    """'TYPE at MOUNTPOINT' of the filesystem that holds path (tmpfs would be memory, not disk)."""
    best = ("", "unknown")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, point, kind, *_ = line.split()
            if str(Path(path).resolve()).startswith(point.rstrip("/") + "/") and len(point) > len(best[0]):
                best = (point, kind)
    return f"{best[1]} at {best[0] or '?'}"


def load(plan):
    """Random bf16 weights of the shape, saved as a Hugging Face checkpoint in plan.scratch (timed, not
    counted), flushed to disk and dropped from the page cache; then Ouroboros.from_pretrained, timed to
    the last SVD basis on the device. The folder is deleted afterwards."""
    with tempfile.TemporaryDirectory(dir=plan.scratch, prefix="gpu-check-") as tmp:
        torch.manual_seed(0)
        qwen = ob.Qwen2.from_config(plan.config, device=plan.device, dtype=torch.bfloat16)
        size = sum(p.numel() * p.element_size() for p in qwen.parameters())
        if shutil.disk_usage(tmp).free < 1.1 * size:
            raise RuntimeError(f"{tmp}: {shutil.disk_usage(tmp).free / 1e9:.1f} GB free, the checkpoint needs "
                               f"{size / 1e9:.1f} GB (give --scratch)")
        t0 = time.perf_counter()
        qwen.save_pretrained(tmp)
        for f in Path(tmp).iterdir():  # on the disk, and out of the page cache: the load reads the disk
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        write_s = time.perf_counter() - t0
        del qwen
        if plan.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model = ob.Ouroboros.from_pretrained(tmp, device=plan.device, dtype=getattr(torch, plan.dtype), rank=8)
        sync(plan)
        load_s = time.perf_counter() - t0
        allocated, reserved = peak_memory_gb(plan)
        del model
        return dict(checkpoint_gb=sum(f.stat().st_size for f in Path(tmp).iterdir()) / 1e9, write_s=write_s,
                    load_svd_s=load_s, peak_allocated_gb=allocated, peak_reserved_gb=reserved,
                    disk=f"{mount_of(tmp)}; page cache dropped (posix_fadvise) before the load")

# ----------------------------------------------------------------------------------------
# Stages 7 and 8: cached decoding, eager and compiled


def decode(plan, compile=False):
    """Greedy decoding from random weights: the prefill (prompt in, first token out), then tokens/s
    over the new tokens after the first. Each prompt is decoded twice and the second is timed: the
    first pays for the kernels' first calls and, with compile, for compiling (the graph is made for
    the caches' length, prompt + new tokens). Eager, also the aten ops of one decoded token."""
    if compile:
        smoke_compile(plan)
    torch.manual_seed(0)
    model = ob.Ouroboros.from_config(plan.config, device=plan.device, dtype=getattr(torch, plan.dtype), rank=8)
    figures = dict(new_tokens=plan.new_tokens)
    for name, T in zip(("short", "long"), plan.prompts):
        idx = torch.randint(0, plan.config.vocab_size, (1, T), device=plan.device)
        for _ in range(2):
            sync(plan)
            t0 = time.perf_counter()
            tokens = ob.stream(model, idx, plan.new_tokens, depth=4, temperature=0, compile=compile)
            next(tokens)
            sync(plan)
            t1 = time.perf_counter()
            for _ in tokens:
                pass
            sync(plan)
        figures |= {f"{name}_prompt_tokens": T, f"{name}_prefill_s": t1 - t0,
                    f"{name}_decode_tok_per_s": (plan.new_tokens - 1) / (time.perf_counter() - t1)}
    if not compile:
        figures |= ops_per_token(model, idx)
    return figures


def ops_per_token(model, idx):
    """The aten ops that one eager decoded token (depth 4) runs, counted as they are dispatched, and of
    them those that are not views (each of which launches work: a kernel on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    ops = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(func)
            return func(*args, **(kwargs or {}))
    tokens = ob.stream(model, idx, 2, depth=4, temperature=0)
    next(tokens)  # the prefill
    with Count():
        next(tokens)
    views = sum(func.is_view or func is torch.ops.aten._unsafe_view.default for func in ops)
    return dict(ops_per_token=len(ops), work_ops_per_token=len(ops) - views)

# ----------------------------------------------------------------------------------------
# Stage 9: the authors' code side by side (--authors DIR; for measuring only)


def authors(plan):
    """One random checkpoint of the plan's shape (our save_pretrained, which transformers reads), then
    the same training step, side by side in this process: their OuroborosV2 as their train_v2.py runs
    it (pure bf16, depth 4 of their variable depths, labels shifted inside), and ours as train.py runs
    it (bf16 frozen weights, float32 trainables, the loss alone); each eager, then compiled."""
    import gc
    smoke_compile(plan)
    ours = sys.modules.pop("ouroboros")  # their package has our file's name: imported under it, then ours put back
    sys.path.insert(0, str(Path(plan.authors).resolve()))
    try:
        from ouroboros.ouroboros_v2 import OuroborosV2
    finally:
        sys.path.pop(0)
        sys.modules["ouroboros"] = ours
    B, T, L = plan.batch, plan.seq_len, plan.config.num_hidden_layers
    split, middle = round(8 * L / 36), L // 2  # 8 / 18 / 8 of 36 layers, as ours by default
    figures = {}
    with tempfile.TemporaryDirectory(dir=plan.scratch, prefix="gpu-authors-") as tmp:
        torch.manual_seed(0)
        ob.Qwen2.from_config(plan.config, device=plan.device, dtype=torch.bfloat16).save_pretrained(tmp)
        for side in ("authors", "ours"):
            for compiled in (False, True):
                if side == "authors":
                    model = OuroborosV2(n_prelude=split, n_coda=split, recurrent_layer_idx=middle, lora_rank=8,
                                        variable_depths=(4,))
                    model.load_base_model(tmp)
                    model = model.to(plan.device)
                    model.set_phase(2)
                    params = [p for p in model.parameters() if p.requires_grad]
                    f = torch.compile(model) if compiled else model
                    x = torch.randint(0, plan.config.vocab_size, (B, T), device=plan.device)
                    loss_of = lambda: f(x, labels=x)["loss"]  # noqa: E731
                else:
                    model = ob.Ouroboros.from_pretrained(tmp, device=plan.device, dtype=torch.bfloat16, rank=8)
                    params = model.trainable_parameters()
                    f = torch.compile(model) if compiled else model
                    x = torch.randint(0, plan.config.vocab_size, (B, T + 1), device=plan.device)
                    loss_of = lambda: f(x[:, :-1], 4, x[:, 1:], return_logits=False)[1]  # noqa: E731
                opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01)
                if plan.device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                times = []
                for _ in range(plan.steps):
                    sync(plan)
                    t0 = time.perf_counter()
                    loss_of().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    sync(plan)
                    times.append(time.perf_counter() - t0)
                timed = sorted(times[2 if compiled else 1:])
                key = f"{side}_{'compiled' if compiled else 'eager'}"
                figures[f"{key}_tok_per_s"] = B * T / timed[len(timed) // 2]
                figures[f"{key}_peak_gb"] = peak_memory_gb(plan)[0]
                figures[f"{key}_trainable"] = sum(p.numel() for p in params)
                del model, params, opt, f, loss_of
                gc.collect()
                if plan.device == "cuda":
                    torch.cuda.empty_cache()
    for mode in ("eager", "compiled"):
        figures[f"{mode}_speed_ours_over_authors"] = figures[f"ours_{mode}_tok_per_s"] / figures[
            f"authors_{mode}_tok_per_s"]
        figures[f"{mode}_memory_ours_over_authors"] = (figures[f"ours_{mode}_peak_gb"]
                                                       / figures[f"authors_{mode}_peak_gb"])
    return figures

# ----------------------------------------------------------------------------------------
# The stages, their limits and their figures (key, label in gpu.md, format)


TRAINING = (("tok_per_s", "tokens/s", ",.0f"), ("mfu_percent", "MFU %", ".1f"),
            ("peak_allocated_gb", "peak memory allocated, GB", ".2f"),
            ("peak_reserved_gb", "peak memory reserved, GB", ".2f"), ("command", "command", ""))


def decoding(speed):
    """The figures of a decoding stage: new tokens, and for each prompt its length, prefill and speed."""
    return (("new_tokens", "new tokens", "d"),
            *((f"{name}_{key}", f"{name} prompt: {label}", spec) for name in ("short", "long")
              for key, label, spec in (("prompt_tokens", "tokens", ",d"), ("prefill_s", "prefill, s", ".3f"),
                                       ("decode_tok_per_s", speed, ",.1f"))))


@dataclass(frozen=True)
class Stage:
    name: str
    limit_s: int
    run: object  # run(plan) -> figures
    figures: tuple


STAGES = [
    Stage("cuda-tests", 60, cuda_tests, (("passed", "passed", "d"), ("failed", "failed", "d"),
                                         ("skipped", "skipped", "d"), ("errors", "errors", "d"),
                                         ("summary", "pytest summary", ""), ("command", "command", ""))),
    Stage("sdpa-kernels", 30, sdpa_kernels, (("call", "the call", ""),
                                             *((f"{what}_{call}", f"{label}, {call}", "")
                                               for call in ("training", "decode")
                                               for what, label in (("flash", "flash alone"),
                                                                   ("efficient", "memory-efficient alone"),
                                                                   ("chosen", "kernels torch picks"))))),
    Stage("train-eager", 60, lambda plan: train_benchmark(plan, 4, "--no-compile"), TRAINING),
    Stage("train-compile", 240, lambda plan: train_benchmark(plan, 4, "--compile"), TRAINING),
    Stage("authors", 240, authors, (*((f"{side}_{mode}_{key}", f"{who}, {mode}: {label}", spec)
                                       for mode in ("eager", "compiled")
                                       for side, who in (("authors", "authors' V2"), ("ours", "ours"))
                                       for key, label, spec in (("tok_per_s", "tokens/s", ",.0f"),
                                                                ("peak_gb", "peak allocated while training, GB",
                                                                 ".2f"),
                                                                ("trainable", "trainable", ",d"))),
                                    *((f"{mode}_{what}_ours_over_authors", f"{mode}: {what}, ours / authors'", ".2f")
                                      for mode in ("eager", "compiled") for what in ("speed", "memory")))),
    Stage("decode", 60, decode, (*decoding("decode tokens/s"),
                                 ("ops_per_token", "aten ops per decoded token (eager)", ",d"),
                                 ("work_ops_per_token", "of them not views", ",d"))),
    Stage("decode-compile", 180, lambda plan: decode(plan, compile=True), decoding("decode tokens/s (compiled)")),
    Stage("train-deep", 60, lambda plan: train_benchmark(plan, plan.deep, "--checkpointing", "--no-compile"),
          TRAINING),
    Stage("load", 90, load, (("checkpoint_gb", "checkpoint size, GB", ".3g"),
                             ("write_s", "write + fsync, s (not counted)", ".1f"),
                             ("load_svd_s", "load + SVD bases, s", ".1f"),
                             ("peak_allocated_gb", "peak memory allocated, GB", ".2f"),
                             ("peak_reserved_gb", "peak memory reserved, GB", ".2f"), ("disk", "disk", ""))),
]
BY_NAME = {s.name: s for s in STAGES}

# ----------------------------------------------------------------------------------------
# The parent: each stage in a child process, then the report


def environment(plan):
    cuda = plan.device == "cuda"
    git = ["git", "--no-optional-locks", "describe", "--always", "--dirty", "--abbrev=12"]
    try:
        commit = subprocess.run(git, cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = ""
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                gpu=torch.cuda.get_device_name(0) if cuda else f"none: CPU smoke run ({os.cpu_count()} cores)",
                torch=torch.__version__, cuda=torch.version.cuda or "none",
                cudnn=str(torch.backends.cudnn.version()) if cuda else "none",
                python=platform.python_version(), commit=commit or "unknown (not a git checkout)")


def run_stage(stage, limit, args, log):
    """The stage in a child process of its own (a process group: a timeout ends what it started too),
    its output appended to the log. Returns the stage's record for the report."""
    cmd = [sys.executable, "-u", __file__, "--stage", stage.name, *(["--smoke"] if args.smoke else []),
           *(["--peak-flops", str(args.peak_flops)] if args.peak_flops else []),
           *(["--scratch", args.scratch] if args.scratch else []),
           *(["--authors", args.authors] if args.authors else [])]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    log.write(f"\n===== {stage.name}: {' '.join(cmd[2:])} (limit {limit:.0f} s, {started}) =====\n")
    log.flush()
    start, t0 = os.path.getsize(log.name), time.monotonic()
    env = {**os.environ, **({"OMP_NUM_THREADS": "1"} if args.smoke else {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        proc.wait(timeout=limit)
        status, detail = ("ok", "") if proc.returncode == 0 else ("failed", f"exit status {proc.returncode}")
    except subprocess.TimeoutExpired:
        status, detail = "timed out", f"killed at its limit of {limit:.0f} s"
    finally:  # a timeout, or Ctrl-C: the stage and whatever it started end now
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wall = time.monotonic() - t0
    with open(log.name, "rb") as f:  # what the stage wrote
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    found = [line for line in lines if line.startswith(MARK)]
    figures = json.loads(found[-1][len(MARK):]) if found else None
    if status == "ok" and figures is None:
        status, detail = "failed", "no figures printed"
    tail = [line for line in lines if not line.startswith(MARK)][-12:] if status != "ok" else []
    return dict(stage=stage.name, status=status, detail=detail, started=started, limit_s=round(limit),
                wall_s=round(wall, 1), figures=figures, log_tail=tail)


def show(value, spec):
    if value is None:
        return "n/a"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec).replace("|", "\\|")


def markdown(report):
    env = report["environment"]
    lines = [f"# GPU check: `{report['command']}`", "",
             f"{env['date']} · GPU: {env['gpu']} · torch {env['torch']} · CUDA {env['cuda']} · "
             f"cuDNN {env['cudnn']} · Python {env['python']} · commit {env['commit']}", "",
             f"Settings: {report['settings']}", "",
             "| stage | figure | value |", "| --- | --- | --- |"]
    for s in report["stages"]:
        status = s["status"] + (f" ({s['detail']})" if s["detail"] else "") + (
            f", {s['wall_s']:.0f} s of its {s['limit_s']} s" if s["wall_s"] is not None else "")
        lines.append(f"| {s['stage']} | status | {show(status, '')} |")
        for key, label, spec in BY_NAME[s["stage"]].figures:
            lines.append(f"| {s['stage']} | {label} | {show((s['figures'] or {}).get(key), spec)} |")
        if s["log_tail"]:
            lines.append(f"| {s['stage']} | last log line | {show(s['log_tail'][-1], '')} |")
    lines += ["", f"MFU: {report['mfu_formula']}. Peak FLOP/s: {report['peak_flops']}.", "",
              "Memory: torch.cuda.max_memory_allocated and max_memory_reserved of the stage's process, "
              "model build included (on the CPU: the peak resident set, for both).", ""]
    return "\n".join(lines)


def write_atomic(file, text):
    Path(f"{file}.tmp").write_text(text)
    os.replace(f"{file}.tmp", file)


def settings(plan):
    cfg = plan.config
    shape = (f"{plan.config_dir}/config.json" if plan.config_dir else
             f"tiny Qwen2 ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} "
             f"heads, {cfg.num_key_value_heads} KV heads, vocabulary {cfg.vocab_size})")
    return (f"{shape}, random weights, frozen {plan.dtype}, rank 8, on {plan.device}; training: micro-batch "
            f"{plan.batch} x {plan.seq_len}, {plan.steps} updates (median of the last {plan.steps - 1}), depth 4 "
            f"eager, depth 4 --compile{f' (backend {plan.compile_backend})' if plan.compile_backend else ''}, "
            f"depth {plan.deep} --checkpointing; decode: depth 4, batch 1, {plan.new_tokens} new tokens after "
            f"{plan.prompts[0]}- and {plan.prompts[1]}-token prompts")


def check_results(folder):
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        sys.exit(f"error: --results {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --results {folder}: cannot make that folder ({e.strerror})")
    if not os.access(folder, os.W_OK | os.X_OK):
        sys.exit(f"error: --results {folder}: not writable")
    for name in ("gpu.json", "gpu.md", "gpu.log"):
        if (folder / name).exists() and not (folder / name).is_file():
            sys.exit(f"error: --results {folder}: {name} there is not a file")
    return folder


def main(argv=None):
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the same stages on a tiny shape, on the CPU (seconds)")
    ap.add_argument("--results", default=str(ROOT / "experiments" / "results"), help="where the report goes")
    ap.add_argument("--only", help=f"comma-separated stages, of: {', '.join(BY_NAME)}")
    ap.add_argument("--peak-flops", type=float, help="peak FLOP/s of the GPU for MFU (known: H100, H200, A100)")
    ap.add_argument("--scratch", help=f"a folder on local disk for the load stage's checkpoint (default: "
                    f"{tempfile.gettempdir()}; the 3B shape needs 6.2 GB)")
    ap.add_argument("--authors", help="a folder holding the authors' package (ouroboros/ of RightNow-AI/ouroboros) "
                    "and transformers installed: adds the side-by-side stage")
    ap.add_argument("--stage", choices=list(BY_NAME), help=argparse.SUPPRESS)  # a child: run one stage, print figures
    args = ap.parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    if args.peak_flops is not None:
        if not 0 < args.peak_flops < math.inf:
            sys.exit(f"error: --peak-flops {args.peak_flops}: must be a positive FLOP/s figure, e.g. 989e12")
        plan = replace(plan, peak_flops=args.peak_flops)
    if args.authors:
        if not (Path(args.authors) / "ouroboros" / "ouroboros_v2.py").is_file():
            sys.exit(f"error: --authors {args.authors}: no ouroboros/ouroboros_v2.py there (the authors' package)")
        plan = replace(plan, authors=args.authors)
    if args.scratch:
        if not Path(args.scratch).is_dir():
            sys.exit(f"error: --scratch {args.scratch}: no such folder")
        plan = replace(plan, scratch=args.scratch)
    if args.stage:  # the child
        print(f"{MARK} {json.dumps(BY_NAME[args.stage].run(plan))}", flush=True)
        return
    asked = ([n.strip() for n in args.only.split(",")] if args.only is not None else
             [n for n in BY_NAME if n != "authors" or args.authors])
    if "authors" in asked and not args.authors:
        sys.exit("error: --only authors: give --authors DIR (the authors' package)")
    unknown = [n for n in asked if n not in BY_NAME]
    if unknown:
        sys.exit(f"error: --only {args.only}: no stage {unknown[0]!r} (stages: {', '.join(BY_NAME)})")
    names = [n for n in BY_NAME if n in asked]  # in the stages' order
    if not args.smoke and not torch.cuda.is_available():
        sys.exit(f"error: torch {torch.__version__} sees no CUDA GPU here; on a CPU, run the smoke check of the "
                 "same stages: python experiments/gpu.py --smoke")
    results = check_results(args.results)
    report = dict(command=" ".join(["python experiments/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
                  environment=environment(plan), settings=settings(plan), mfu_formula=MFU_FORMULA,
                  peak_flops=(f"{plan.peak_flops:g} (given{', nominal: a smoke run' if args.smoke else ''})"
                              if plan.peak_flops else "train.py's table (dense bf16): H100, H200 989e12, A100 312e12"),
                  total_limit_s=TOTAL_S, stages=[])
    print(f"{report['environment']['gpu']} | torch {torch.__version__} | CUDA {report['environment']['cuda']} | "
          f"report: {results}/gpu.md", flush=True)
    write_atomic(results / "gpu.log", f"{report['command']}\n{json.dumps(report['environment'])}\n")
    with open(results / "gpu.log", "a", encoding="utf-8") as log:  # appended to by the stages as they run
        for stage in (BY_NAME[n] for n in names):
            left = TOTAL_S - (time.monotonic() - t_start)
            try:
                done = (run_stage(stage, min(stage.limit_s, left), args, log) if left >= 10 else
                        dict(stage=stage.name, status="skipped", detail=f"the run's {TOTAL_S} s were spent",
                             started=None, limit_s=0, wall_s=None, figures=None, log_tail=[]))
            except KeyboardInterrupt:  # the stage's processes are ended; the report keeps the stages before it
                sys.exit(f"interrupted in {stage.name}: {results}/gpu.json holds the stages before it")
            report["stages"].append(done)
            write_atomic(results / "gpu.json", json.dumps(report, indent=2) + "\n")
            write_atomic(results / "gpu.md", markdown(report))
            print(f"[{stage.name}] {done['status']}" + (f" ({done['detail']})" if done["detail"] else "")
                  + (f", {done['wall_s']:.0f} s" if done["wall_s"] is not None else "")
                  + (f": {done['log_tail'][-1]}" if done["log_tail"] else ""), flush=True)
    failed = [s["stage"] for s in report["stages"] if s["status"] != "ok"]
    print(f"wrote {results}/gpu.json, gpu.md, gpu.log in {time.monotonic() - t_start:.0f} s"
          + (f"; not ok: {', '.join(failed)}" if failed else ""))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
