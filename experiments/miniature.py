"""
Ouroboros in miniature: the paper's claims tested on a small pretrained Qwen2, on a CPU, offline,
with seeds, controls, equally trained references and paired intervals.

    python experiments/miniature.py           # the whole study: hours on 2 CPU cores, in parts if you like
    python experiments/miniature.py --quick   # the same pipeline at a smoke budget: about a minute
    python experiments/miniature.py --report  # the report of the runs done so far, running nothing
    python experiments/miniature.py --fresh   # redo every stage instead of reusing what is done
    python experiments/miniature.py --rerun dynamic-depth-4-ours-seed1   # one run afresh, against the committed

Stages, each cached in --work and skipped once done (Ctrl-C and a rerun continue where it stopped):
  1. corpus  the Python standard library of this interpreter: real text that nobody here wrote,
             on every machine (or --corpus DIR). One file is one document.
  2. data    a byte-level BPE tokenizer trained on the training files, then train.bin, val.bin
             (whole module families held out) and prose.bin (the documentation's English prose,
             another distribution, never trained on): data/stdlib.py
  3. bases   a 12-layer Qwen2 (hidden 128, 2.9M weights) pretrained from scratch (train.py
             --pretrain, its own data stream), and a second one from another seed
  4. runs    train.py on a base cut 3 / 6 / 3 (the paper's 8 / 18 / 8 of 36 in proportion), every
             run with the same steps and batch shape, data order per seed, and one final protocol:
             non-overlapping windows over the whole held-out sets. In order:
             - a learning-rate sweep of each variant in SWEPT (first seed), extended along the
               ladder until its best rate, by training loss, lies inside the rates it tried;
             - each swept variant at its best rate with every seed, on both bases; every other
               row with a `rate` at the best rate of the variant it modifies, with every seed;
             - at one rate for all (lr 2e-3), as the study was first run: the rows with `seeds`,
               every seed for the six swept Ouroboros variants and the first for the others
  5. report  experiments/results/miniature.json (every run, every interval), miniature.md (the
             tables, and the wall time of each part), miniature.png and miniature-depth.png (need
             matplotlib)

Every comparison is paired: two rows scored on the same evaluation batches, their difference
bootstrapped over whole module families (prose: topics) and, where both rows have several seeds,
over the seeds. "Equal" needs the 90% interval inside ±MARGIN; Holm corrects each study's claims.
"Gap recovered" is stated against the frozen baseline and full model, and against the same two
given every weight trained for the same updates (train.py --pretrain --init baseline / model).
"""
import signal
import sys

if __name__ == "__main__":  # Ctrl-C before a run starts (importing, preparing data, writing the report)
    signal.signal(signal.SIGINT, lambda *_: sys.exit("interrupted: every finished stage is kept; run the "
                                                     "same command again to continue"))
import argparse  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import ClassVar  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import numpy as np  # noqa: E402
import torch  # noqa: E402

import checkpoint  # noqa: E402
import ouroboros as ob  # noqa: E402
import train  # noqa: E402
from data import prepare, stdlib  # noqa: E402


@dataclass(frozen=True)
class Budget(stdlib.Base):  # the base to pretrain (data/stdlib.py), then:
    steps: int  # of every run
    lr: float  # "one rate for all": every row's rate in the study as first designed
    warmup: int
    seeds: tuple  # of the rows run with every seed
    ranks: tuple  # the rank grid (each must fit the base's smallest projection); rank 8 is every other row's
    lrs: tuple  # the rates every learning-rate sweep tries first, besides lr (first seed, first base)
    ladder: tuple  # the rates a sweep may go on to, in order: it extends until its best rate is inside what it tried
    second_base: int  # the pretraining seed of the second base
    # Which runs the study lists, not how any is made (a run's folder names its rank and rate): not in the
    # recipe, so the study may change them on a work folder made before
    LISTING: ClassVar = ("ranks", "lrs", "ladder")

    def __post_init__(self):
        if not {self.lr, *self.lrs} <= set(self.ladder):
            raise ValueError(f"lr {self.lr} and lrs {self.lrs} must be rates of the ladder {self.ladder}")


# The demo's base recipe, pretrained longer (800 updates, not 300); final scores over 640 windows
# of 256 tokens per split: the whole of both held-out sets.
FULL = Budget(**vars(stdlib.DEMO) | dict(pretrain=(800, *stdlib.DEMO.pretrain[1:]), final_tokens=640 * 256),
              steps=200, lr=2e-3, warmup=20, seeds=(0, 1, 2), ranks=(8, 32, 64), lrs=(6e-4, 6e-3),
              ladder=(2e-5, 6e-5, 2e-4, 6e-4, 2e-3, 6e-3, 2e-2, 6e-2, 2e-1), second_base=1)
QUICK = Budget(config=ob.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     rope_theta=10000.0, tie_word_embeddings=True),
               every_nth_file=25, val_fraction=0.1, pretrain=(10, 1e-3, 1, 1), steps=4, lr=2e-3, warmup=1,
               batch=(4, 64), eval_batches=2, eval_every=2, final_tokens=2048, seeds=(0, 1), ranks=(8, 32),
               lrs=(6e-3,), ladder=(2e-3, 6e-3), second_base=1)


@dataclass(frozen=True)
class Row:
    name: str
    options: list  # train.py's; every row runs at depth 4, rank 8, causal pool, gate, norms unless it says
    seeds: str = "all"  # at one rate for all: "all" the budget's seeds, "one" the first, None: not run there
    rate: str = None  # at best rates: the swept variant whose best rate it runs at, with every seed; None: not run
    sweep: bool = False  # at one rate for all, also scored at depths 1, 2, 4, 8 and 16 (first seed): a test-time
    # depth sweep


LOOP, OURS, BASELINE = "loop alone, depth 4", "dynamic, depth 4 (ours)", "baseline model"
STATIC, BLIND = "static table, depth 4", "static, Controller-sized, depth 4"
CODA_ALONE, CODA = "coda adapters on the baseline (no loop)", "dynamic + coda adapters, depth 4"
FULL_TRAINED = "full model, every weight trained"  # the equally trained references: the same updates and tokens
HEALED = "baseline model, every weight trained (prune, then heal)"
NONE, D1, ST = ["--controller", "none"], ["--depth", "1"], ["--controller", "static"]
ROWS = [
    # The paper's tables, and the controls they need.
    Row("loop alone, depth 1", NONE + D1, "one", rate=LOOP),  # only the gate and norms train
    Row(LOOP, NONE, rate=LOOP),
    Row(STATIC, ST, rate=STATIC),  # the paper's static ablation: 7 x 8 per step
    Row(BLIND, ["--controller", "blind"], rate=BLIND),  # the Controller, input zeroed
    Row(OURS, [], rate=OURS, sweep=True),
    *(Row(f"{kind}, depth {d}", opts + ["--depth", str(d)], seeds, rate=rate)  # claim 2 at depths 1 to 16
      for d in (1, 8, 16) for kind, opts, rate, seeds in (("dynamic", [], OURS, "one"),
                                                            ("static table", ST, STATIC, "one" if d == 1 else None))),
    Row("dynamic, depth 2", ["--depth", "2"], "one"),
    Row("authors' protocol: depth drawn from 4, 8, 16", ["--depths", "4,8,16"], "one", sweep=True),  # one model
    Row("dynamic, mean pool (the paper's)", ["--pool", "mean"], "one", rate=OURS),
    Row("dynamic, no gate", ["--no-gate"], "one", rate=OURS),
    Row("dynamic, no per-step norm", ["--no-step-norm"], "one", rate=OURS),
    Row("dynamic, no per-step norm, depth 16", ["--no-step-norm", "--depth", "16"], "one", rate=OURS),
    Row("dynamic, no gate, no per-step norm", ["--no-gate", "--no-step-norm"], "one", rate=OURS),
    # Beyond the paper: coda adapters (rank 8: 3 layers x 8 x 2,432 = 58,368 numbers), on the
    # baseline alone and with the loop, against a Controller given about as many more (width 150
    # for 128: +57,310); and per-token adaptive depth (ACT halting, at most 8 steps).
    Row(CODA_ALONE, [*NONE, *D1, "--no-gate", "--no-step-norm", "--coda-rank", "8"], rate=CODA_ALONE),
    Row(CODA, ["--coda-rank", "8"], rate=CODA),
    Row("dynamic, wider Controller (E = 150)", ["--controller-width", "150"], "one", rate=OURS),
    *(Row(f"adaptive depth (at most 8), ponder cost {c}", ["--depth", "8", "--ponder-cost", str(c)], "one")
      for c in (0.001, 0.01, 0.1)),
    # The equally trained references: every weight of the full model, or of the baseline, trained
    Row(FULL_TRAINED, ["--pretrain", "--init", "model"], None, rate=FULL_TRAINED),
    Row(HEALED, ["--pretrain", "--init", "baseline"], None, rate=HEALED)]
SWEPT = [LOOP, STATIC, BLIND, OURS, CODA_ALONE, CODA, FULL_TRAINED, HEALED]  # each at its own best rate
SWEEP_DEPTHS = (1, 2, 4, 8, 16)
AUTHORS = "authors' protocol: depth drawn from 4, 8, 16"
FIXED = {1: "dynamic, depth 1", 2: "dynamic, depth 2", 4: OURS, 8: "dynamic, depth 8", 16: "dynamic, depth 16"}
PREFIX = ", prefix-pooled (as it generates)"  # a mean-pool row scored again with the causal pool

# The claims (and the controls' questions): A − B, what the paper expects of it ("lower": A below
# B; "equal": no difference). Each is read in both studies where both of its rows ran.
CLAIMS = [
    ("1. the loop recovers part of the gap (depth 4)", OURS, BASELINE, "lower"),
    ("1. ... and the Controller adds to the loop alone", OURS, LOOP, "lower"),
    ("1. the loop alone at depth 4 against depth 1", LOOP, "loop alone, depth 1", "lower"),
    ("1. ours against the baseline given the same updates (prune, then heal)", OURS, HEALED, "lower"),
    ("2. dynamic beats the static table (depth 4)", OURS, STATIC, "lower"),
    ("2. dynamic beats a Controller-sized static control", OURS, BLIND, "lower"),
    *((f"2. dynamic beats the static table ({at})", f"dynamic, {at2}", f"static table, {at2}", "lower")
      for at, at2 in (("depth 1", "depth 1"), ("depth 8", "depth 8"), ("depth 16", "depth 16"),
                      ("rank 32", "depth 4, rank 32"), ("rank 64", "depth 4, rank 64"))),
    ("3. the gate is needed", OURS, "dynamic, no gate", "lower"),
    ("4. the per-step norm helps (depth 4)", OURS, "dynamic, no per-step norm", "lower"),
    ("4. the per-step norm helps (depth 16)", "dynamic, depth 16", "dynamic, no per-step norm, depth 16", "lower"),
    ("4. the norm helps where there is no gate", "dynamic, no gate", "dynamic, no gate, no per-step norm", "lower"),
    ("5. depth 4 against depth 1", OURS, "dynamic, depth 1", "lower"),
    ("5. depth 8 against depth 4 (invariance: equal)", "dynamic, depth 8", OURS, "equal"),
    ("5. depth 16 against depth 8 (invariance: equal)", "dynamic, depth 16", "dynamic, depth 8", "equal"),
    ("5. authors' protocol (4, 8, 16 drawn) against depth 4", AUTHORS, OURS, "equal"),
    ("7. the mean pool's leak (as it generates, against as trained)", "dynamic, mean pool (the paper's)" + PREFIX,
     "dynamic, mean pool (the paper's)", "equal"),
    ("7. causal pool against the paper's mean pool (as it generates)", OURS, "dynamic, mean pool (the paper's)"
     + PREFIX, "equal"),
    ("rank 32 against rank 8", "dynamic, depth 4, rank 32", OURS, "equal"),
    ("rank 64 against rank 8", "dynamic, depth 4, rank 64", OURS, "equal"),
    ("coda adapters on the baseline, no loop", CODA_ALONE, BASELINE, "lower"),
    ("coda adapters: with the loop against without", CODA, CODA_ALONE, "lower"),
    ("coda adapters added to dynamic", CODA, OURS, "lower"),
    ("a wider Controller (as many more weights) added to dynamic", "dynamic, wider Controller (E = 150)", OURS,
     "lower"),
    ("second base: dynamic beats the static table", f"{OURS} [second base]", f"{STATIC} [second base]", "lower"),
    ("second base: dynamic beats a Controller-sized static control", f"{OURS} [second base]",
     f"{BLIND} [second base]", "lower"),
    ("second base: the Controller adds to the loop alone", f"{OURS} [second base]", f"{LOOP} [second base]",
     "lower"),
    ("second base: coda adapters added to dynamic", f"{CODA} [second base]", f"{OURS} [second base]", "lower"),
]


@dataclass(frozen=True)
class Run:
    row: str
    options: list
    seed: int
    base: int = 0  # the pretraining seed of the base it trains on
    part: str = ""  # of the study, for the wall time of each part

    @property
    def folder(self):
        return f"{slug(self.row)}-seed{self.seed}"


def study_rows(budget):
    """ROWS and the rank grid: dynamic and static at each rank of the budget but 8."""
    return ROWS + [Row(f"{kind}, depth 4, rank {k}", opts + ["--rank", str(k)], seeds, rate=rate) for k in budget.ranks
                   if k != 8 for kind, opts, rate, seeds in (("dynamic", [], OURS, "one"), ("static table", ST, STATIC,
                                                                                              None))]


def at(row, lr, budget):
    """The name of `row` run at the learning rate lr."""
    return row if lr == budget.lr else f"{row}, lr {lr:g}"


def plan(budget, losses):
    """{swept variant: (the rates its sweep runs, its best rate or None while it is not settled)}. losses:
    {(variant, rate): the training loss of the finished run (the mean of its last 50 updates, the same
    batches at every rate; inf if it diverged)}. A sweep starts at lr and lrs, and while its best is
    the lowest (highest) rate it tried, it goes on to the next lower (higher) rate of the ladder."""
    found = {}
    for v in SWEPT:
        rates = sorted({budget.lr, *budget.lrs})
        while all((v, lr) in losses for lr in rates):
            best = min(rates, key=lambda lr: losses[v, lr])
            k = budget.ladder.index(best) + (-1 if best == rates[0] else 1 if best == rates[-1] else 0)
            if best not in (rates[0], rates[-1]) or not 0 <= k < len(budget.ladder):
                found[v] = (rates, best if losses[v, best] < math.inf else None)  # inside, or at the ladder's end;
                break  # None: every rate diverged
            rates = sorted(rates + [budget.ladder[k]])
        else:
            found[v] = (rates, None)
    return found


def runs(budget, swept):
    """Every Run of the study, in the order they run (swept: plan()'s): the learning-rate sweeps; at
    each variant's best rate, the swept variants with every seed on both bases, then every other row
    with a rate, with every seed; at one rate for all (budget.lr), the rows with `seeds`: the first seed,
    then the other seeds of the rows with all."""
    first, rows, todo = budget.seeds[0], {r.name: r for r in study_rows(budget)}, []

    def add(row, lr, seed, base=0, part=""):
        tag, depths = " [second base]" if base else "", ["--eval-depths", ",".join(map(str, SWEEP_DEPTHS))]
        options = (row.options + (["--lr", str(lr)] if lr != budget.lr else [])
                   + (depths if row.sweep and lr == budget.lr and seed == first and not base else []))
        todo.append(Run(at(row.name, lr, budget) + tag, options, seed, base, part))

    for v in SWEPT:
        for lr in swept[v][0]:
            add(rows[v], lr, first, part="learning-rate sweeps")
    best = {v: b for v, (_, b) in swept.items() if b}
    for v in SWEPT:
        if v in best:
            for seed, base in [(s, 0) for s in budget.seeds[1:]] + [(s, budget.second_base) for s in budget.seeds]:
                add(rows[v], best[v], seed, base, "the swept variants at their best rates, both bases")
    for r in study_rows(budget):
        if r.rate in best and r.name not in SWEPT:
            for seed in budget.seeds:
                add(r, best[r.rate], seed, part="every other row at its variant's best rate")
    for r in study_rows(budget):
        if r.seeds:
            add(r, budget.lr, first, part="one rate for all")
    for seed in budget.seeds[1:]:
        for r in ROWS:
            if r.seeds == "all":
                add(r, budget.lr, seed, part="one rate for all")
    unique = {}
    for run in todo:  # a run listed twice (the sweep's run at a best rate) runs once, where it comes first
        unique.setdefault(run.folder, run)
    return list(unique.values())

# ----------------------------------------------------------------------------------------
# Stage 4: the runs


def logged(out):
    """The lines of OUT/metrics.jsonl: one per update."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_loss(metrics):
    """The training loss at the end of a run (logged()): the mean of its last 50 updates."""
    return float(np.mean([m["loss"] for m in metrics[-50:]]))


def sweep_losses(work, budget):
    """plan()'s losses, from the sweeps' runs finished (or diverged) in WORK/runs."""
    losses = {}
    for v in SWEPT:
        for lr in budget.ladder:
            out = work / "runs" / Run(at(v, lr, budget), [], budget.seeds[0]).folder
            if ended(out):
                losses[v, lr] = math.inf if (out / "diverged.txt").is_file() else train_loss(logged(out))
    return losses


def todo(work, budget):
    """runs() as far as the finished sweeps in `work` settle it, and whether a sweep may add more."""
    losses = sweep_losses(work, budget)
    swept = plan(budget, losses)
    return runs(budget, swept), any((v, lr) not in losses for v, (rates, _) in swept.items() for lr in rates)


def run_all(work, budget, bases, data, log):
    """Every run of todo() not run yet, one at a time: each finished sweep run may add runs (the sweep's
    next rate, or a variant's runs at its best rate), so the list is made again after each."""
    cost = lambda run: 6 + int(dict(zip(run.options[::2], run.options[1::2])).get("--depth", 4))  # noqa: E731
    t0, spent = time.time(), 0  # the cost of the runs that ran now (not the cached ones), for the ETA
    while True:
        listed, unsettled = todo(work, budget)
        if not (left := [run for run in listed if not ended(work / "runs" / run.folder)]):
            break
        run, out = left[0], work / "runs" / left[0].folder
        eta = (time.time() - t0) / spent * sum(map(cost, left)) if spent else None
        log(f"[runs] {run.row}, seed {run.seed} ({len(left)} left{', more once the sweeps settle' * unsettled})"
            + (f" | ETA {datetime.timedelta(seconds=round(eta))} for those" if eta else ""))
        finished = stdlib.run_logged(out, run_argv(run, budget, bases, data, references(work, run)), train.main)
        if not (finished or (out / "diverged.txt").is_file()):
            sys.exit(f"interrupted: {out} is saved; run the same command again to continue")
        spent += cost(run)


def frozen_scored(work, base):
    """The folder of a finished run on `base` (0, or not: the second) that scored the frozen baseline and
    full model, listed or not (a run a sweep no longer lists scored them as well), or None. Both: a run
    started before they were scored and resumed after scores the full model alone."""
    return next((out for out in sorted((work / "runs").glob("*")) if ("-second-base-seed" in out.name) == bool(base)
                 and (out / "windows.json").is_file()
                 and {"baseline", "full"} <= json.loads((out / "windows.json").read_text()).keys()), None)


def references(work, run):
    """Which frozen models `run`'s final table scores: the baseline and the full model, until a run on
    its base has scored them (they score the same in every run), then neither."""
    if "--pretrain" in run.options:  # an equally trained reference scores itself alone
        return []
    return ["--no-eval-baseline"] if frozen_scored(work, run.base) else ["--eval-full"]


def run_argv(run, budget, bases, data, refs):
    """train.py's options for `run`; refs: which frozen models its final table scores too."""
    return ["--model", str(bases[run.base]), "--data", str(data), "--steps", str(budget.steps), "--lr",
            str(budget.lr), "--warmup", str(budget.warmup), "--seed", str(run.seed), *refs,
            *stdlib.batch_args(budget, data), *run.options]


def rerun_target(work, results, budget, folder):
    """--rerun's run and its committed row, or a one-line error before anything is trained."""
    file = results / "miniature.json"
    study = json.loads(file.read_text()) if file.is_file() else {}
    swept = {v: tuple(study.get("sweeps", {}).get(v, (sorted({budget.lr, *budget.lrs}), None))) for v in SWEPT}
    listed = {run.folder: run for run in runs(budget, swept)}  # as the committed study settled its sweeps
    if folder not in listed:
        raise ValueError(f"--rerun {folder}: not a run of this study; its runs are the folders of {work}/runs, "
                         f"e.g. {next(iter(listed))}")
    run = listed[folder]
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no results to compare with")
    row = study["rows"].get(run.row, {})
    if run.seed not in row.get("seeds", []):
        raise ValueError(f"{file}: no results for {run.row!r}, seed {run.seed}")
    return run, row


def rerun(work, budget, bases, data, run, row, log):
    """--rerun: train one run of the study afresh in WORK/rerun/ and set its held-out losses beside
    the committed ones (miniature.json): the check that a row reproduces."""
    out = work / "rerun" / run.folder
    shutil.rmtree(out, ignore_errors=True)
    log(f"[rerun] {run.row}, seed {run.seed}, afresh in {out}")
    refs = [] if "--pretrain" in run.options else ["--no-eval-baseline"]
    if not stdlib.run_logged(out, run_argv(run, budget, bases, data, refs), train.main):
        sys.exit(f"interrupted: {out} is not finished (a --rerun starts afresh)")
    scored = json.loads((out / "windows.json").read_text())
    scored = scored.get("ours", scored.get("model"))
    for split in HELD_OUT:
        now, then = float(np.mean(scored[split])), row["by seed"][split][row["seeds"].index(run.seed)]
        log(f"[rerun] {SPLITS[split]}: {now:.6f} now, {then:.6f} committed, difference {now - then:+.1e}")


def ended(out):
    """The run in `out` finished, or stopped on a diverged loss: either way, nothing left to run."""
    return (out / "results.json").is_file() or (out / "diverged.txt").is_file()


def slug(row):
    return "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-").replace("--", "-")

# ----------------------------------------------------------------------------------------
# Stage 5: the report


SPLITS = {"held-out": "held-out modules", "prose": "held-out prose", "train": "training-file windows"}
HELD_OUT = ("held-out", "prose")


def collect(work, budget, swept):
    """Every scored model of the study: {row: {"seeds": [...], "windows": {split: (seeds, batches)},
    plus the first finished seed's results (options, rate, depth, FLOPs, trainable, tok/s, curve)}}. A run
    scores several rows: the frozen baseline and full model (once per base), its own, and those of a
    depth sweep or of prefix pooling. Rows are named as they ran (at(): with their rate)."""
    rows = {}

    def add(row, seed, windows, spike=None, **info):  # spike: the seed's largest gradient norm, if it trained
        r = rows.setdefault(row, dict(seeds=[], windows={}))
        for k, v in info.items():  # the first finished seed's
            r.setdefault(k, v)
        r["seeds"].append(seed)
        if spike is not None:
            r.setdefault("largest gradient norm", []).append(spike)
        for split in HELD_OUT:  # the train column is a fit check, not a score: left out
            if split in windows:
                r["windows"].setdefault(split, []).append(windows[split])

    for run in runs(budget, swept):
        out = work / "runs" / run.folder
        tag = " [second base]" if run.base else ""
        if not ended(out):
            continue  # not run yet: the report says which (the study can be run in parts)
        if (out / "diverged.txt").is_file():  # the row is marked with each of its seeds that diverged
            r, why = rows.setdefault(run.row, dict(seeds=[], windows={})), (out / "diverged.txt").read_text()
            r["diverged"] = "; ".join(filter(None, [r.get("diverged"), f"seed {run.seed}, "
                                                    + why.split(": stopped")[0].removeprefix("error: ")]))
            continue
        res, scored = (json.loads((out / f).read_text()) for f in ("results.json", "windows.json"))
        metrics = logged(out)
        info = dict(trainable=res["run"]["trainable"], tok_s=res["run"]["tok_s"], options=run.options,
                    lr=float(run.options[run.options.index("--lr") + 1]) if "--lr" in run.options else budget.lr,
                    curve=[(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m],
                    train_loss_end=train_loss(metrics))
        spike = max((m["grad_norm"] for m in metrics[budget.warmup:]), default=math.nan)  # after warmup
        if "model" in scored:  # an equally trained reference: a plain Qwen2
            add(run.row, run.seed, scored["model"], spike, **info)
            continue
        options = checkpoint.saved_options(json.loads((out / "state.json").read_text()), train.parse_args)
        shape = ob.Ouroboros.from_config(budget.config, device="meta", **train.model_options(options))
        depth = res["mean depth"]["held-out"]  # with halting: fewer steps than --depth
        flops = lambda d, steps: ob.forward_flops(shape, steps, d) / 1e9  # noqa: E731
        add(run.row, run.seed, scored["ours"], spike, depth=depth, flops=flops(res["run"]["depth"], depth), **info)
        if "ours, prefix-pooled" in scored:
            add(run.row + PREFIX, run.seed, scored["ours, prefix-pooled"], depth=depth,
                flops=flops(res["run"]["depth"], depth), **info)
        for d in SWEEP_DEPTHS:
            if f"ours, depth {d}" in scored:
                add(f"{run.row}, evaluated at depth {d}", run.seed, scored[f"ours, depth {d}"], depth=d,
                    flops=flops(d, d), **info)
    for base, tag in ((0, ""), (budget.second_base, " [second base]")):  # frozen: the same in every run
        if found := frozen_scored(work, base):
            scored = json.loads((found / "windows.json").read_text())
            for ref in ("baseline", "full"):
                add(f"{ref} model{tag}", None, scored[ref], trainable=0)
    groups = clusters(work / "data", budget)
    for r in rows.values():  # the frozen models: one set of windows, the same for every seed
        r["mean"] = {s: float(np.mean(w)) for s, w in r["windows"].items()}
        r["by seed"] = {s: [float(np.mean(x)) for x in w] for s, w in r["windows"].items()}
        r["clusters"] = {s: groups[s] for s, w in r["windows"].items() if s in groups and len(groups[s]) == len(w[0])}
    return rows


def family(rows, budget, swept, best_rates):
    """One of the two studies in `rows` (collect's), under the names of study_rows: every row at its
    variant's best rate (best_rates=True), or at one rate for all. Both have the frozen models and the
    equally trained references, at their best rates."""
    best = {v: b for v, (_, b) in swept.items() if b}
    found = {n: rows[n] for n in (BASELINE, "full model", f"{BASELINE} [second base]", "full model [second base]")
             if n in rows}
    for r in study_rows(budget):
        lr = best.get(r.rate) if best_rates or r.name in (FULL_TRAINED, HEALED) else r.seeds and budget.lr
        for suffix in ("", " [second base]", PREFIX, *(f", evaluated at depth {d}" for d in SWEEP_DEPTHS
                                                        if not best_rates)):
            if lr and at(r.name, lr, budget) + suffix in rows:
                found[r.name + suffix] = rows[at(r.name, lr, budget) + suffix]
    return found


def clusters(data, budget):
    """{held-out set: the cluster of each batch of the final protocol}, for a bootstrap that resamples
    what the batches are not independent within: the module family (or, for another corpus, the file)
    of the held-out document a batch's middle token is in, and for the prose its topic. A set whose
    data do not record where their documents start (made before they did) is left out."""
    T, B, found = budget.batch[1], budget.batch[0], {}
    for split, tokens, documents in (("held-out", "val.bin", "val_documents.json"),
                                     ("prose", "prose.bin", "prose.json")):
        recorded = json.loads((data / documents).read_text()) if (data / documents).is_file() else {}
        if "starts" not in recorded:
            continue
        names = ([stdlib.family(f) if Path(f).is_relative_to(stdlib.ROOT) else f for f in recorded["files"]]
                 if split == "held-out" else list(range(len(recorded["starts"]))))  # the prose: a topic each
        batches = checkpoint.final_windows((data / tokens).stat().st_size // 4, T, B, budget.final_tokens)
        middle = (batches[:, 0] + batches[:, -1] + T) // 2
        found[split] = [names[i] for i in np.searchsorted(recorded["starts"], middle, side="right") - 1]
    return found


MARGIN = 0.005  # nats: "equal" means A − B is shown to lie within ±MARGIN, not merely that 0 is not excluded


def paired(a, b, resamples=2000, clusters=None):
    """Mean of A − B over the evaluation batches, its 95% bootstrap interval (lo, hi), its 90% one
    (lo90, hi90: the two one-sided tests of equivalence at 5%), and a two-sided bootstrap p of A = B.
    a, b: (seeds, batches) losses of the same batches, the seeds in the same order (a frozen model's
    single row is repeated). Resampled: the batches, or with `clusters` (a label per batch) whole
    clusters, each with all its batches; and the seeds too when there are several."""
    d = np.asarray(a) - np.asarray(b)
    S, N = d.shape
    rng = np.random.default_rng(0)  # the same resamples every time the report is written
    seeds = rng.integers(0, S, (resamples, S)) if S > 1 else np.zeros((resamples, 1), int)
    if clusters is None:
        stats = d[seeds[:, :, None], rng.integers(0, N, (resamples, N))[:, None, :]].mean((1, 2))
    else:  # each resample: K clusters drawn with replacement, the mean over all their batches
        labels = np.unique(clusters, return_inverse=True)[1]
        K = labels.max() + 1
        sums, counts = np.stack([np.bincount(labels, row, K) for row in d]), np.bincount(labels, minlength=K)
        drawn = rng.integers(0, K, (resamples, K))
        stats = (sums[seeds[:, :, None], drawn[:, None, :]].sum(2) / counts[drawn].sum(1)[:, None]).mean(1)
    lo, lo90, hi90, hi = np.percentile(stats, [2.5, 5, 95, 97.5])
    p = max(1 / resamples, min(1.0, 2 * min((stats >= 0).mean(), (stats <= 0).mean())))
    return dict(diff=float(d.mean()), lo=float(lo), hi=float(hi), lo90=float(lo90), hi90=float(hi90),
                p=float(p), seeds=S, batches=N, clusters=None if clusters is None else int(K))


def holm(ps, alpha=0.05):
    """Which of the p-values ps are rejected at family-wise level alpha (Holm, 1979): the k-th smallest
    p against alpha / (m − k), stopping at the first that is not."""
    rejected = [False] * len(ps)
    for k, i in enumerate(sorted(range(len(ps)), key=lambda i: ps[i])):
        if ps[i] > alpha / (len(ps) - k):
            break
        rejected[i] = True
    return rejected


def compare(rows, a, b, split):
    """paired() of rows a and b on split, over the seeds they share (a frozen model has them all)."""
    ra, rb = rows[a], rows[b]
    if split not in ra["windows"] or split not in rb["windows"]:
        return None
    common = [s for s in ra["seeds"] if s in rb["seeds"] or rb["seeds"] == [None]]
    if not common:
        return None
    pick = lambda r, s: r["windows"][split][r["seeds"].index(s) if r["seeds"] != [None] else 0]  # noqa: E731
    return paired([pick(ra, s) for s in common], [pick(rb, s) for s in common],
                  clusters=ra.get("clusters", {}).get(split))


def verdict(c, expect, survives=True):
    """The reading of A − B against the paper's expectation. "lower": decided by the 95% interval, and
    `survives` says whether the difference stands once the claims are corrected together (holm).
    "equal": shown only when the 90% interval lies within ±MARGIN (two one-sided tests)."""
    if c is None:
        return "-"
    held = "" if survives else ", not after Holm"
    if expect == "lower":
        return ("reproduced" + held if c["hi"] < 0 else "reversed" + held if c["lo"] > 0 else
                "not distinguishable")
    if -MARGIN < c["lo90"] and c["hi90"] < MARGIN:
        return f"equal within ±{MARGIN} (as claimed)"
    return (f"not distinguishable, not shown equal within ±{MARGIN}" if c["lo"] <= 0 <= c["hi"] else
            f"not reproduced: A {'lower' if c['hi'] < 0 else 'higher'}" + held)


def read_claims(rows, held):
    """(claim, A, B, expectation, comparison per held-out set, survives Holm per set) of every claim
    whose rows ran; Holm corrects all of them together, on each held-out set."""
    read = [(claim, a, b, expect, [compare(rows, a, b, s) for s in held]) for claim, a, b, expect in CLAIMS
            if a in rows and b in rows and "diverged" not in rows[a] and "diverged" not in rows[b]]
    read = [r for r in read if None not in r[-1]]  # rows that share no seed are not compared
    survive = list(zip(*[holm([cs[i]["p"] for *_, cs in read]) for i in range(len(held))])) if read else []
    return [(*r, ok) for r, ok in zip(read, survive)]


def p_value(c):
    return "p < 0.001" if c["p"] < 0.001 else f"p {c['p']:.3f}"  # 2,000 resamples: 0.0005 is the least


def ci(c, spec=".4f"):
    return "-" if c is None else f"{c['diff']:+{spec}} [{c['lo']:+{spec}}, {c['hi']:+{spec}}]"


def mean_sd(xs, spec=".4f"):
    return format(xs[0], spec) if len(xs) == 1 else f"{statistics.mean(xs):{spec}} ± {statistics.stdev(xs):{spec}}"


def gaps(rows, name, split):
    """Gap recovered by row `name` on split, per seed, in %: against the frozen baseline and full model,
    and against the equally trained ones (prune then heal, and the full model trained), of its base."""
    tag = " [second base]" if name.endswith("[second base]") else ""
    found = []
    for low, high in ((BASELINE, "full model"), (HEALED, FULL_TRAINED)):
        if all(ref + tag in rows and "diverged" not in rows[ref + tag] for ref in (low, high)):
            b, f = rows[low + tag]["mean"][split], rows[high + tag]["mean"][split]
            found.append([100 * (b - x) / (b - f) for x in rows[name]["by seed"][split]])
        else:
            found.append(None)
    return found


def tables(rows, depth_sweep=True):
    """Markdown: every row of a family() (mean ± sd over seeds, gap recovered, Δ against the loop alone
    with its interval, each seed's largest gradient norm: a spike), then every claim with its paired
    interval and reading, then the depth sweep."""
    held = [s for s in HELD_OUT if s in rows[BASELINE]["mean"]]
    head = (["variant", "lr", "seeds"] + [f"{SPLITS[s]} loss" for s in held]
            + [f"gap recovered %, {ref} ({SPLITS[s]})" for ref in ("frozen", "equally trained") for s in held]
            + [f"Δ {SPLITS[s]} vs loop alone, depth 4 [95% CI]" for s in held]
            + ["loop steps per token", "forward MFLOP per token", "trainable",
               "largest gradient norm after warmup (before clipping at 1), per seed"])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, r in rows.items():
        if "diverged" in r:
            lines.append(f"| {name} | {format(r['lr'], 'g') if 'lr' in r else '-'} | {len(r['seeds'])} | diverged: "
                         f"{r['diverged']} |" + " |" * (len(head) - 4))
            continue
        tag = " [second base]" if name.endswith("[second base]") else ""
        seeds = "-" if r["seeds"] == [None] else str(len(r["seeds"]))
        cells = [format(r["lr"], "g") if "lr" in r else "-", seeds] + [mean_sd(r["by seed"][s]) for s in held]
        recovered = [gaps(rows, name, s) for s in held]
        cells += ["-" if g[k] is None or (k and seeds == "-") else mean_sd(g[k], ".1f")  # frozen: its own pair
                  for k in (0, 1) for g in recovered]
        cells += ["" if seeds == "-" or name == LOOP + tag or LOOP + tag not in rows else
                  ci(compare(rows, name, LOOP + tag, s)) for s in held]
        cells += [f"{r['depth']:.2f}" if "depth" in r else "", f"{1e3 * r['flops']:.2f}" if "flops" in r else "",
                  f"{r['trainable']:,}", " / ".join(f"{g:.2g}" if g < 100 else f"{g:,.0f}"
                                                   for g in r.get("largest gradient norm", []))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    claims = ["", "| claim (A − B) | A | B | seeds | " + " | ".join(f"Δ {SPLITS[s]} [95% CI], p" for s in held)
              + " | reading (held-out modules) | reading (held-out prose) |", "|" + " --- |" * (6 + len(held))]
    read = read_claims(rows, held)
    units = [f"{c['clusters']} {'module families or files' if s == 'held-out' else 'topics'} ({SPLITS[s]})"
             if c["clusters"] else f"{c['batches']} batches ({SPLITS[s]})" for s, c in zip(held, read[0][4])
             ] if read else []
    claims[0] = (f"\nEach interval resamples whole clusters, {' and '.join(units)}, and the seeds where there are "
                 f"several; Holm corrects these {len(read)} claims together; \"equal\" needs the 90% interval "
                 f"within ±{MARGIN}.\n" if read else "")
    for claim, a, bb, expect, cs, survive in read:
        claims.append(f"| {claim} | {a} | {bb} | {cs[0]['seeds']} | " + " | ".join(
            f"{ci(c)}, {p_value(c)}" for c in cs) + " | " + " | ".join(
            verdict(c, expect, ok) for c, ok in zip(cs, survive)) + (" | -" * (2 - len(held))) + " |")
    if not depth_sweep:
        return "\n".join(lines + claims) + "\n"
    sweep = ["", "| evaluated at depth | " + " | ".join(
        f"{who}, {SPLITS[s]}" for who in ("authors' protocol", "trained at depth 4", "trained at that depth")
        for s in held) + " |", "|" + " --- |" * (1 + 3 * len(held))]
    for d in SWEEP_DEPTHS:
        cells = []
        for who in (f"{AUTHORS}, evaluated at depth {d}", f"{OURS}, evaluated at depth {d}", FIXED[d]):
            cells += [f"{rows[who]['by seed'][s][0]:.4f}" if who in rows and s in rows[who]["by seed"] else "-"
                      for s in held]
        sweep.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines + claims + sweep) + "\n"


def lr_table(rows, budget, swept, losses):
    """The learning-rate sweeps (first seed, first base): each variant's losses at each rate it tried
    (losses: sweep_losses()), its best rate by its training loss (the mean of the last 50 updates, on
    the same batches at every rate; never by a held-out set), and the variants compared at their best."""
    rates, first = sorted({lr for tried, _ in swept.values() for lr in tried}), budget.seeds[0]
    head = ["variant"] + [f"lr {lr:g}: training loss / held-out modules" for lr in rates] + [
        "best rate (by training loss)", "Δ held-out modules vs loop alone, both at best [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def held(v, lr):  # the first seed's batch losses on the held-out modules at lr, or None
        r = rows.get(at(v, lr, budget), {})
        return r["windows"]["held-out"][r["seeds"].index(first)] if first in r.get("seeds", []) else None

    for v in SWEPT:
        tried, best = swept[v]
        cells = ["" if lr not in tried else "not run yet" if (v, lr) not in losses else "diverged"
                 if losses[v, lr] == math.inf else f"{losses[v, lr]:.4f} / {np.mean(held(v, lr)):.4f}" for lr in rates]
        edge = best in (budget.ladder[0], budget.ladder[-1]) and best in (tried[0], tried[-1])
        cells.append(f"{best:g}" + " (the ladder's end)" * edge if best else "every rate diverged"
                     if all(losses.get((v, lr)) == math.inf for lr in tried) else "not settled yet")
        c = None
        if v != LOOP and best and swept[LOOP][1]:
            a, b = held(v, best), held(LOOP, swept[LOOP][1])
            c = paired([a], [b], clusters=rows[at(v, best, budget)].get("clusters", {}).get("held-out"))
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {'' if v == LOOP else ci(c)} |")
    return "\n".join(lines) + "\n"


def main_rows(rows):
    """The rows of a family() drawn in the figure: not the frozen models, the depth sweep's or the
    second base's."""
    return [n for n, r in rows.items() if r["seeds"] != [None] and "diverged" not in r and "evaluated at" not in n
            and "[second base]" not in n]


def figure(rows, file):
    """Left: held-out loss against forward FLOPs per token, every variant, numbered (mean over seeds,
    ± one sd; a hollow marker is one seed). Right: each variant minus the loop alone at depth 4,
    paired, with its 95% interval, on both held-out sets, under the same numbers."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = main_rows(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 7.5), gridspec_kw={"width_ratios": [1, 1.3]})
    for k, n in enumerate(names):
        r = rows[n]
        ys = r["by seed"]["held-out"]
        if max(ys) > rows[BASELINE]["mean"]["held-out"] + 0.5 or "flops" not in r:
            continue  # a variant far worse than the baseline (no gate) would flatten the axis; a reference is a line
        x, y = 1e3 * r["flops"], statistics.mean(ys)
        left.errorbar(x, y, yerr=statistics.stdev(ys) if len(ys) > 1 else None, fmt="o", color="C0",
                      mfc="C0" if len(ys) > 1 else "white", capsize=3)
        left.annotate(str(k + 1), (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    for ref, style in ((BASELINE, ":"), ("full model", "--"), (HEALED, "-."), (FULL_TRAINED, "-")):
        if ref in rows and "diverged" not in rows[ref]:
            left.axhline(rows[ref]["mean"]["held-out"], color="gray", linestyle=style, label=ref)
    left.set(xlabel="forward MFLOP per token", ylabel="held-out modules loss (nats)",
             title="Loss against compute, variants numbered as on the right\n"
                   "(filled: mean ± sd over seeds; hollow: 1 seed)")
    left.legend(fontsize=8, loc="lower right")  # where no variant lies
    labelled = set()
    for k, n in enumerate(names):
        for off, split, marker in ((-0.15, "held-out", "o"), (0.15, "prose", "s")):
            c = None if n == LOOP else compare(rows, n, LOOP, split)
            if c and abs(c["diff"]) < 1:
                right.errorbar(c["diff"], k + off, xerr=[[c["diff"] - c["lo"]], [c["hi"] - c["diff"]]], fmt=marker,
                               color="C0" if split == "held-out" else "C1", mfc="white" if c["seeds"] == 1 else None,
                               capsize=2, label=None if split in labelled else SPLITS[split])
                labelled.add(split)
            elif c:
                right.annotate(f"{c['diff']:+.2f} (off the axis)", (0, k + off), fontsize=7)
    right.axvline(0, color="gray")
    right.set_yticks(range(len(names)), [f"{k + 1}. {n}" + (" (the reference)" if n == LOOP else " (1 seed)"
                                         if len(rows[n]["seeds"]) == 1 else "") for k, n in enumerate(names)],
                     fontsize=7)
    right.invert_yaxis()
    right.set(xlabel="Δ loss against the loop alone at depth 4 (nats; < 0 is better), 95% paired CI",
              title="Paired differences\n(hollow: 1 seed, its interval over evaluation batches only)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def depth_figure(rows, file):
    """Held-out loss against the loop steps a token takes: the authors' protocol (trained at depths
    drawn from 4, 8, 16) and ours (trained at 4), each evaluated at depths 1-16; models trained at
    each fixed depth; adaptive depth at its mean steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, split in zip(axes, ("held-out", "prose")):
        for who, style in ((AUTHORS, "s--"), (OURS, "o--")):
            swept = [(d, rows.get(f"{who}, evaluated at depth {d}")) for d in SWEEP_DEPTHS]
            pts = [(d, r["mean"][split]) for d, r in swept if r and split in r["mean"]]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{who}: one model evaluated at each depth (first seed)")
        fixed = [(d, rows[n]) for d, n in FIXED.items() if n in rows and split in rows[n]["mean"]]
        if fixed:
            ax.errorbar([d for d, _ in fixed], [statistics.mean(r["by seed"][split]) for _, r in fixed],
                        yerr=[statistics.stdev(r["by seed"][split]) if len(r["seeds"]) > 1 else 0 for _, r in fixed],
                        fmt="k^-", capsize=3, label="trained at that depth (mean ± sd over seeds)")
        for n, r in rows.items():
            if n.startswith("adaptive depth") and "diverged" not in r and split in r["mean"]:
                ax.plot(r["depth"], r["mean"][split], "D", color="C3")
                ax.annotate(n.rsplit(" ", 1)[1], (r["depth"], r["mean"][split]), fontsize=7, xytext=(4, 4),
                            textcoords="offset points")
        ax.plot([], [], "D", color="C3", label="adaptive (at most 8), by ponder cost (1 seed)")
        ax.set_xscale("log")
        ax.set_xticks(SWEEP_DEPTHS, [str(d) for d in SWEEP_DEPTHS])
        ax.minorticks_off()
        ax.set(xlabel="loop steps per token", ylabel=f"{SPLITS[split]} loss (nats)", title=SPLITS[split])
    axes[0].legend(fontsize=7)
    fig.suptitle("The test-time depth sweep")
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def report(work, results, budget, log, meta):
    losses = sweep_losses(work, budget)
    swept = plan(budget, losses)
    rows, listed = collect(work, budget, swept), runs(budget, swept)
    best, one = (family(rows, budget, swept, b) for b in (True, False))
    base_dirs = [work / ("base" if seed == 0 else f"base-seed{seed}") for seed in (0, budget.second_base)]
    parts = {"data": stdlib.wall_s(work / "data"), "bases": sum(map(stdlib.wall_s, base_dirs))}
    for run in listed:
        parts[run.part] = parts.get(run.part, 0) + stdlib.wall_s(work / "runs" / run.folder)
    results.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    data = work / "data"
    held = [s for s in HELD_OUT if s in rows.get(BASELINE, {}).get("mean", {})]
    study = dict(date=datetime.date.today().isoformat(), command=" ".join(["python", *sys.argv]),
                 commit=head.stdout.strip() or None,  # of the report; a cached run may be older
                 machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                 cpu=cpu_name(), python=platform.python_version(), torch=torch.__version__,
                 wall_s=round(sum(parts.values())), wall_s_by_part={k: round(v) for k, v in parts.items()},
                 corpus=dict(what="Python standard library (.py, no tests)", files=meta.get("files"),
                             sha256=meta.get("inputs_sha256"), train_tokens=meta["train_tokens"],
                             val_tokens=meta["val_tokens"], train_documents=meta["train_documents"],
                             val_documents=meta["val_documents"], held_out_families=meta.get("held_out_families"),
                             prose=json.loads((data / "prose.json").read_text())
                             if (data / "prose.json").is_file() else None),
                 bases={str(seed): json.loads((d / "results.json").read_text())["model"]
                        for seed, d in zip((0, budget.second_base), base_dirs)},
                 config=budget.config.to_dict(), budget={k: v for k, v in budget.__dict__.items() if k != "config"},
                 sweeps=swept, rows={n: {k: v for k, v in r.items() if k not in ("windows", "clusters")}
                                     for n, r in rows.items()},
                 claims={name: [dict(claim=c, a=a, b=b, expect=e, **{s: dict(cmp, holm=ok, reading=verdict(cmp, e, ok))
                                                                     for s, cmp, ok in zip(held, cs, survive)})
                                for c, a, b, e, cs, survive in read_claims(fam, held)] if held else []
                         for name, fam in (("at best rates", best), ("one rate for all", one))})
    study["not run yet"] = [f"{run.row}, seed {run.seed}" for run in listed if not ended(work / "runs" / run.folder)]
    study["sweeps not settled"] = [v for v, (_, b) in swept.items() if b is None]
    md = ("### Each variant at its best learning rate\n\n" + (tables(best, depth_sweep=False) if held else "-\n")
          + "\n### The learning-rate sweeps\n\n" + lr_table(rows, budget, swept, losses)
          + f"\n### One rate for all (lr {budget.lr:g})\n\n" + (tables(one) if held else "-\n")
          + "\n### Wall time\n\n| part | runs | wall time |\n| --- | --- | --- |\n" + "".join(
              f"| {k} | {sum(run.part == k for run in listed) or '-'} | {datetime.timedelta(seconds=round(v))} |\n"
              for k, v in parts.items()) + f"| the whole study | {len(listed)} | "
          f"{datetime.timedelta(seconds=study['wall_s'])} |\n")
    if study["not run yet"] or study["sweeps not settled"]:
        md += (f"\nNot run yet ({len(study['not run yet'])} runs, and those of the sweeps not settled: "
               f"{', '.join(study['sweeps not settled']) or 'none'}): " + "; ".join(study["not run yet"]) + ".\n")
    ob.write_json(results / "miniature.json", study)
    write_table(results / "miniature.md", md)
    log("\n" + md)
    if not held:
        return log(f"wrote {results}/miniature.json and miniature.md (no run has scored the frozen models yet)")
    try:
        figure(best, results / "miniature.png")
        depth_figure(one, results / "miniature-depth.png")
        log(f"wrote {results}/miniature.json, miniature.md, miniature.png, miniature-depth.png")
    except ImportError:
        log(f"wrote {results}/miniature.json and miniature.md; the figures need matplotlib: "
            "pip install matplotlib, then run the same command again")


MARKS = ("<!-- table: written by experiments/miniature.py -->\n", "<!-- end of table -->")


def write_table(file, md):
    """The table into the report `file`, between its MARKS lines, the text around them kept as it is
    (a file without them gets the table alone)."""
    text = file.read_text() if file.is_file() else ""
    if MARKS[0] in text and MARKS[1] in text.split(MARKS[0], 1)[1]:
        head, rest = text.split(MARKS[0], 1)
        md = head + MARKS[0] + md + MARKS[1] + rest.split(MARKS[1], 1)[1]
    Path(f"{file}.tmp").write_text(md)
    Path(f"{file}.tmp").replace(file)


def cpu_name():
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke budget: the same stages in about a minute")
    ap.add_argument("--fresh", action="store_true", help="delete --work and redo every stage")
    ap.add_argument("--corpus", help="a folder of text instead of the Python standard library")
    ap.add_argument("--work", help="the cache of every stage (default out/miniature, out/miniature-quick)")
    ap.add_argument("--results", help="default experiments/results (--quick: WORK/results)")
    ap.add_argument("--rerun", metavar="RUN", help="train one run afresh (a folder name of WORK/runs, e.g. "
                    "dynamic-depth-4-ours-seed1) and compare it with the committed results")
    ap.add_argument("--report", action="store_true", help="write the report from the runs done so far, and run "
                    "nothing more (a study in parts)")
    args = ap.parse_args(argv)
    try:
        study(args)
    except (ValueError, FileNotFoundError) as e:  # one line naming the file or value, as train.py does
        sys.exit(f"error: {e}")


def study(args):
    if args.corpus and not Path(args.corpus).is_dir():
        raise FileNotFoundError(f"--corpus {args.corpus}: no such folder")
    if args.corpus:
        try:  # the files data/prepare.py will read (hidden ones left out), before any stage
            prepare.find_inputs([args.corpus])
        except ValueError:  # its message offers prepare.py's --ext, which the study has not
            raise ValueError(f"--corpus {args.corpus}: no {', '.join(prepare.TEXT + prepare.RECORDS)} file in "
                             "it") from None
    budget = QUICK if args.quick else FULL
    work = Path(args.work or ("out/miniature-quick" if args.quick else "out/miniature"))
    results = Path(args.results or (work / "results" if args.quick else HERE / "results"))
    prepare.check_out(work, "--work")
    prepare.check_out(results, "--results")
    if args.quick and results.resolve() == (HERE / "results").resolve():
        raise ValueError(f"--results {args.results}: the committed study's; --quick writes its smoke results "
                         "elsewhere (by default WORK/results)")
    if args.report and (args.rerun or args.fresh):
        raise ValueError(f"--report writes the report of what is done: not with --{'rerun' if args.rerun else 'fresh'}")
    target = args.rerun and rerun_target(work, results, budget, args.rerun)  # checked before any work
    if args.fresh and work.exists():
        if not (work / "recipe.json").is_file():  # only a folder a study or demo made (data/stdlib.py)
            raise ValueError(f"--fresh --work {work}: holds no recipe.json, so it was not made by a study; "
                             "it is left as it is")
        shutil.rmtree(work)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    run_logged = lambda out, argv: stdlib.run_logged(out, argv, train.main)  # noqa: E731
    data = work / "data"
    if args.report:  # what is done, as it is: nothing is made
        made = [work / f for f in ("data/meta.json", "base/results.json",
                                   f"base-seed{budget.second_base}/results.json")]
        if missing := [f for f in made if not f.is_file()]:
            raise FileNotFoundError(f"--report: {missing[0]} is not made yet; run the study without --report first")
        stdlib.claim(work, budget, args.corpus)  # made with this recipe (it was recorded with the data)
        return report(work, results, budget, log, json.loads((data / "meta.json").read_text()))
    bases = {seed: stdlib.pretrained_base(work, budget, run_logged, log, args.corpus, seed)[0]
             for seed in ((target[0].base,) if target else (0, budget.second_base))}  # --rerun: its own
    if target:
        return rerun(work, budget, bases, data, *target, log)
    run_all(work, budget, bases, data, log)
    report(work, results, budget, log, json.loads((data / "meta.json").read_text()))


if __name__ == "__main__":
    main()
