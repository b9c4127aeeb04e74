"""
Ouroboros in miniature: the paper's tables on a small pretrained Qwen2, on a CPU, offline.

    python experiments/miniature.py           # the whole study: under an hour on 2 CPU cores
    python experiments/miniature.py --quick   # the same pipeline at a smoke budget: about a minute
    python experiments/miniature.py --fresh   # redo every stage instead of reusing what is done

Stages, each cached in --work and skipped once done (Ctrl-C and a rerun continue where it stopped):
  1. corpus  the Python standard library of this interpreter: real text that nobody here wrote,
             on every machine (or --corpus DIR). One file is one document; files are held out
             whole, deterministically (data/prepare.py's every-(1/f)-th rule).
  2. data    a byte-level BPE tokenizer trained on the training files, then train.bin / val.bin
  3. base    a 12-layer Qwen2 (hidden 128, 2.9M weights) pretrained from scratch: train.py --pretrain
             (stages 1-3 are data/stdlib.py's, shared with train.py --demo)
  4. runs    every variant of the paper's tables: train.py on the base cut 3 / 6 / 3 (the paper's
             8 / 18 / 8 of 36 in proportion), all with the same steps, data order (per seed) and
             evaluation batches; the headline rows with 3 seeds. Then beyond the paper: coda
             adapters against a wider Controller (3 seeds), and adaptive depth against fixed depths
  5. report  experiments/results/miniature.json (every run), miniature.md (the table),
             miniature.png and miniature-depth.png (need matplotlib: pip install matplotlib)
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
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import torch  # noqa: E402

import ouroboros as ob  # noqa: E402
import train  # noqa: E402
from data import stdlib  # noqa: E402


@dataclass(frozen=True)
class Budget(stdlib.Base):  # the base to pretrain (data/stdlib.py), then:
    steps: int  # of every Ouroboros run
    lr: float
    warmup: int
    seeds: tuple  # of the headline rows
    ranks: tuple  # the rank ablation (each must fit the base's smallest projection)


# The demo's base, pretrained longer (800 updates, not 500).
FULL = Budget(**vars(stdlib.DEMO) | dict(pretrain=(800, 3e-3, 80, 1)), steps=200, lr=2e-3, warmup=20,
              seeds=(0, 1, 2), ranks=(8, 32))
QUICK = Budget(config=ob.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                     rope_theta=10000.0, tie_word_embeddings=True),
               every_nth_file=25, val_fraction=0.1, pretrain=(10, 3e-3, 1, 1), steps=4, lr=2e-3, warmup=1,
               batch=(4, 64), eval_batches=2, eval_every=2, seeds=(0, 1), ranks=(8, 32))

# The table's rows: (name, train.py options). The headline rows run once per seed; the rank rows
# come from the budget. Every row not named here runs at depth 4, rank 8, causal pool, gate, norms.
HEADLINE = [("loop alone (no modulation)", ["--controller", "none"]),
            ("static per-step LoRA, depth 4", ["--controller", "static"]),
            ("dynamic, depth 4 (ours)", []),
            ("dynamic, depth 1", ["--depth", "1"])]
ONCE = [("dynamic, mean pool (the paper's)", ["--pool", "mean"]),
        ("dynamic, no gate", ["--no-gate"]),
        ("dynamic, no per-step norm", ["--no-step-norm"]),
        ("dynamic, depth 8", ["--depth", "8"]),
        ("dynamic, depth 16", ["--depth", "16"]),
        ("static per-step LoRA, depth 1", ["--controller", "static", "--depth", "1"])]


# Beyond the paper, its two open problems. Coda adapters (rank 8: 3 layers x 8 x 2,432 = 58,368
# numbers) against a Controller given about as many more instead (width 150 for 128: +57,310), so
# that a gain can be told from capacity; and per-token adaptive depth (ACT halting, at most 8
# steps) at a few ponder costs, against the fixed depths 1, 2, 4 and 8.
CODA = [("dynamic + coda adapters (rank 8), depth 4", ["--coda-rank", "8"]),
        ("dynamic, wider Controller (E = 150), depth 4", ["--controller-width", "150"])]
ADAPTIVE = [(f"adaptive depth (at most 8), ponder cost {c}", ["--depth", "8", "--ponder-cost", str(c)])
            for c in (0.001, 0.01, 0.1)] + [("dynamic, depth 2", ["--depth", "2"])]


def runs(budget):
    """Every (row, options, seed) of the study, in the order they run."""
    ranks = [(f"dynamic, depth 4, rank {r}", ["--rank", str(r)]) for r in budget.ranks if r != 8]
    return ([(row, opts, s) for s in budget.seeds for row, opts in HEADLINE] +
            [(row, opts, budget.seeds[0]) for row, opts in ONCE + ranks] +
            [(row, opts, s) for s in budget.seeds for row, opts in CODA] +
            [(row, opts, budget.seeds[0]) for row, opts in ADAPTIVE])

# ----------------------------------------------------------------------------------------
# Stage 4: the runs


def run_all(work, budget, base_dir, data, log):
    todo = runs(budget)
    cost = lambda opts: 6 + int(dict(zip(opts[::2], opts[1::2])).get("--depth", 4))  # noqa: E731  ~ calls per token
    total, done, t0 = sum(cost(o) for _, o, _ in todo), 0, time.time()
    spent = 0  # the cost of the runs that ran now (not the cached ones), for the ETA
    for i, (row, opts, seed) in enumerate(todo, 1):
        full = ["--eval-full"] if i == 1 else []  # the full model's losses are the same for every run
        out = work / "runs" / f"{slug(row)}-seed{seed}"
        if not ((out / "results.json").is_file() or (out / "diverged.txt").is_file()):
            eta = (time.time() - t0) / spent * (total - done) if spent else None
            log(f"[runs] {i}/{len(todo)} {row}, seed {seed}"
                + (f" | ETA {datetime.timedelta(seconds=round(eta))}" if eta else ""))
            finished = train.run_logged(out, ["--model", str(base_dir), "--data", str(data),
                                              "--steps", str(budget.steps), "--lr", str(budget.lr),
                                              "--warmup", str(budget.warmup), "--seed", str(seed),
                                              *full, *stdlib.batch_args(budget), *opts])
            if not (finished or (out / "diverged.txt").is_file()):
                sys.exit(f"interrupted: {out} is saved; run the same command again to continue")
            spent += cost(opts)
        done += cost(opts)


def slug(row):
    return "".join(c if c.isalnum() else "-" for c in row.lower()).strip("-").replace("--", "-")

# ----------------------------------------------------------------------------------------
# Stage 5: the report


def collect(work, budget):
    """One record per run: options, seed, losses, reduction and gap, trainable count, tok/s, loop steps
    per token and their forward FLOPs (ob.forward_flops, from the run's saved options), curve."""
    records, todo = [], runs(budget)
    first = json.loads((work / "runs" / f"{slug(todo[0][0])}-seed{todo[0][2]}" / "results.json").read_text())
    for row, opts, seed in todo:
        out = work / "runs" / f"{slug(row)}-seed{seed}"
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rec = dict(row=row, options=opts, seed=seed, curve=[(m["step"], m["val_loss"]) for m in metrics
                                                            if "val_loss" in m])
        if (out / "diverged.txt").is_file():
            records.append({**rec, "diverged": (out / "diverged.txt").read_text()})
            continue
        res = json.loads((out / "results.json").read_text())
        options = train.saved_options(json.loads((out / "state.json").read_text()))
        shape = ob.Ouroboros.from_config(budget.config, device="meta", **train.model_options(options))
        depth = res.get("mean depth", {}).get("held-out", res["run"]["depth"])  # with halting: fewer steps
        for name, key in (("ours", row), ("ours, prefix-pooled", row + ", prefix-pooled (as it generates)")):
            if name in res:
                b, f, o = res["baseline"], first["full"], res[name]
                records.append({**rec, "row": key, "train": o["train"], "held-out": o["held-out"],
                                "reduction %": {s: 100 * (b[s] - o[s]) / b[s] for s in b},
                                "gap recovered %": {s: 100 * (b[s] - o[s]) / (b[s] - f[s]) for s in b},
                                "trainable": res["run"]["trainable"], "tok_s": res["run"]["tok_s"],
                                "mean depth": depth,
                                "forward GFLOP per token": ob.forward_flops(shape, depth, res["run"]["depth"]) / 1e9,
                                "reference": {"full": f, "baseline": b}})
    return records


def table(records, config):
    """Markdown: one line per row, mean ± standard deviation over seeds where there are several."""
    def cell(xs, spec):  # one value where the seeds cannot differ (a count, a fixed depth)
        same = len(set(xs)) == 1
        return format(xs[0], spec) if same else f"{statistics.mean(xs):{spec}} ± {statistics.stdev(xs):{spec}}"
    ref = next(r["reference"] for r in records if "reference" in r)
    lines = ["| variant | seeds | train loss | held-out loss | loss reduction % (train) | gap recovered % (train)"
             " | gap recovered % (held-out) | loop steps per token | forward MFLOP per token | trainable |",
             "|" + " --- |" * 10]
    P, _, C, _ = ob.split_layers(config.num_hidden_layers)
    for name, layers in (("full", config.num_hidden_layers), ("baseline", f"pruned, {P + 1 + C}")):
        lines.append(f"| {name} model ({layers} layers) | - | "
                     f"{ref[name]['train']:.4f} | {ref[name]['held-out']:.4f} | | | | | | 0 |")
    for row in dict.fromkeys(r["row"] for r in records):
        rs = [r for r in records if r["row"] == row]
        if "diverged" in rs[0]:
            lines.append(f"| {row} | {len(rs)} | diverged: {rs[0]['diverged'].split(':')[1].strip()} | | | | | | | |")
            continue
        lines.append(f"| {row} | {len(rs)} | " + " | ".join([
            cell([r["train"] for r in rs], ".4f"), cell([r["held-out"] for r in rs], ".4f"),
            cell([r["reduction %"]["train"] for r in rs], ".1f"),
            cell([r["gap recovered %"]["train"] for r in rs], ".1f"),
            cell([r["gap recovered %"]["held-out"] for r in rs], ".1f"), cell([r["mean depth"] for r in rs], ".2f"),
            cell([r["forward GFLOP per token"] * 1e3 for r in rs], ".2f"), f"{rs[0]['trainable']:,}"]) + " |")
    return "\n".join(lines) + "\n"


def figure(records, file):
    """Held-out loss curves of the headline rows (mean over seeds), and gap recovered per variant
    (bars: held-out, mean over seeds, with ± one standard deviation; dots: train)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    ref = next(r["reference"] for r in records if "reference" in r)
    for row, _ in HEADLINE:
        curves = [r["curve"] for r in records if r["row"] == row]
        steps = [s for s, _ in curves[0]]
        left.plot(steps, [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))], marker="o", label=row)
    for name, style in (("baseline", ":"), ("full", "--")):
        left.axhline(ref[name]["held-out"], color="gray", linestyle=style, label=f"{name} model")
    left.set(xlabel="optimizer step", ylabel="held-out loss (nats)", title="Held-out loss while training")
    left.legend(fontsize=8)
    rows = [r for r in dict.fromkeys(r["row"] for r in records if "diverged" not in r)]
    low = -25  # a bar below this (a run that made things worse) is cut, its value written beside it
    for i, row in enumerate(rows):
        rs = [r for r in records if r["row"] == row]
        held = statistics.mean(r["gap recovered %"]["held-out"] for r in rs)
        sd = statistics.stdev(r["gap recovered %"]["held-out"] for r in rs) if len(rs) > 1 else 0
        right.barh(i, max(held, low), xerr=sd if held >= low else 0, color="C0" if held >= low else "C3")
        for r in rs:  # a train dot below the axis is drawn at its edge as "<"
            train = r["gap recovered %"]["train"]
            right.plot(max(train, low), i, "k." if train >= low else "k<")
        if held < low:
            right.annotate(f"{held:.0f}% (bar cut)", (0, i), xytext=(4, -3), textcoords="offset points", fontsize=8)
    right.set_xlim(left=low)
    right.set_yticks(range(len(rows)), rows, fontsize=8)
    right.invert_yaxis()
    right.set(xlabel="gap recovered % (bars: held-out, ± 1 sd over seeds; dots: train)",
              title="Gap recovered: (baseline − ours) / (baseline − full)")
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def depth_figure(records, file):
    """Held-out loss against the loop steps a token takes: fixed depths (dynamic Controller) as a
    line, adaptive depth (one point per ponder cost) as labelled points; one seed each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    seed = min(r["seed"] for r in records)
    fixed = sorted((r["mean depth"], r["held-out"]) for r in records if r["seed"] == seed and "diverged" not in r
                   and r["row"] in ("dynamic, depth 1", "dynamic, depth 2", "dynamic, depth 4 (ours)",
                                    "dynamic, depth 8"))
    if fixed:
        ax.plot(*zip(*fixed), "o-", label="fixed depth 1, 2, 4, 8")
    for r in records:
        if r["row"].startswith("adaptive depth") and "diverged" not in r:
            ax.plot(r["mean depth"], r["held-out"], "s", color="C3")
            ax.annotate(r["row"].rsplit(" ", 1)[1], (r["mean depth"], r["held-out"]), fontsize=8,
                        xytext=(4, 4), textcoords="offset points")
    ax.plot([], [], "s", color="C3", label="adaptive (at most 8), labelled by ponder cost")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
    ax.minorticks_off()
    ax.set(xlabel="loop steps per token (mean over held-out tokens)", ylabel="held-out loss (nats)",
           title=f"Adaptive depth against fixed depths (seed {seed}, same training budget)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)


def report(work, results, budget, log, meta):
    records = collect(work, budget)
    parts = [work / "data", work / "base", *(work / "runs" / f"{slug(r)}-seed{s}" for r, _, s in runs(budget))]
    seconds = sum(train.wall_s(part) for part in parts)
    results.mkdir(parents=True, exist_ok=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True)
    study = dict(date=datetime.date.today().isoformat(), command=" ".join(["python", *sys.argv]),
                 commit=head.stdout.strip() or None,  # of the report; a cached run may be older
                 machine=f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                 cpu=cpu_name(), python=platform.python_version(), torch=torch.__version__, wall_s=round(seconds),
                 corpus=dict(what="Python standard library (.py, no tests)", files=meta.get("files"),
                             sha256=meta.get("inputs_sha256"), train_tokens=meta["train_tokens"],
                             val_tokens=meta["val_tokens"], train_documents=meta["train_documents"],
                             val_documents=meta["val_documents"]),
                 base=budget.config.to_dict(), budget={k: v for k, v in budget.__dict__.items() if k != "config"},
                 runs=records)
    ob.write_json(results / "miniature.json", study)
    md = table(records, budget.config)
    write_table(results / "miniature.md", md)
    log("\n" + md)
    try:
        figure(records, results / "miniature.png")
        depth_figure(records, results / "miniature-depth.png")
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
    args = ap.parse_args(argv)
    try:
        study(args)
    except (ValueError, FileNotFoundError) as e:  # one line naming the file or value, as train.py does
        sys.exit(f"error: {e}")


def study(args):
    if args.corpus and not Path(args.corpus).is_dir():
        raise FileNotFoundError(f"--corpus {args.corpus}: no such folder")
    budget = QUICK if args.quick else FULL
    work = Path(args.work or ("out/miniature-quick" if args.quick else "out/miniature"))
    results = Path(args.results or (work / "results" if args.quick else HERE / "results"))
    if args.fresh and work.exists():
        shutil.rmtree(work)
    log = lambda *a: print(*a, flush=True)  # noqa: E731
    base_dir, data = stdlib.pretrained_base(work, budget, train.run_logged, log, args.corpus)
    run_all(work, budget, base_dir, data, log)
    report(work, results, budget, log, json.loads((data / "meta.json").read_text()))


if __name__ == "__main__":
    main()
