"""
The Python standard library as a corpus, and a small Qwen2 pretrained on it: the base of
`train.py --demo` and of the miniature study (experiments/miniature.py).

The standard library is real text that nobody here wrote, and it is on every machine with
Python. pretrained_base makes, in a work folder, each stage skipped once done:

    data/   a byte-level BPE tokenizer trained on the training files, train.bin, val.bin
            (data/prepare.py; one file is one document), and prose.bin (below)
    base/   a Hugging Face checkpoint of the Qwen2, pretrained by `train.py --pretrain`
            (its log in base/log.txt; an interrupted one is resumed)

It also runs train.py for others: `train.py --demo` (demo, on the base) and the study's runs
(run_logged, in-process, logged to a file). train.py imports this module, so this module does
not import train.py: the caller hands in train.main.

The recipe (the Base, or the study's Budget, and the corpus) is recorded in work/recipe.json
by the first run; a later run with another recipe is refused, so that nothing made under one
recipe is taken for a stage of another. While a run makes its stages it holds work/lock: a
second run on the same folder waits for it, then finds the stages done.

Two held-out sets, neither ever trained on:
  val.bin    whole module families (held_out_families): cp850.py is 99% line-identical to
             cp858.py, so a file-by-file split would score near-copies of training files.
  prose.bin  another distribution: the English documentation prose of pydoc_data/topics.py
             (its `topics` dict, one document per topic; the module itself is left out of
             training). prose.json records its size and the sha256 of the text.
"""
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import re
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import ouroboros as ob  # noqa: E402
from data import prepare  # noqa: E402


ROOT = Path(sysconfig.get_paths()["stdlib"])  # this interpreter's standard library


def stdlib_files(every_nth=1):
    """This interpreter's standard library as text files: its .py files, without the test suites
    (whose data files are not prose or code a model should learn) and without installed packages."""
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(f for f in ROOT.rglob("*.py") if not skip & set(f.relative_to(ROOT).parts))
    return files[::every_nth]


def family(file):
    """The module family of a standard-library file: its package, or its module name without a
    leading underscore or "_py" and trailing digits (_pydecimal.py and decimal.py are one family)."""
    top = Path(file).relative_to(ROOT).parts[0]
    return re.sub(r"^_py|^_|\d+$", "", top.removesuffix(".py"))


def held_out_families(files, fraction):
    """Whole families held out until they hold `fraction` of the characters: families in the
    order of the sha256 of their names (reproducible, and not alphabetical), each one taken only
    if it is at most a third of what is wanted (no one package dominates the held-out set)."""
    size = {}
    for f in files:
        size[family(f)] = size.get(family(f), 0) + f.stat().st_size
    want, held = fraction * sum(size.values()), []
    for name in sorted(size, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if sum(size[n] for n in held) >= want:
            break
        if size[name] <= want / 3:
            held.append(name)
    return sorted(held)


PROSE = "pydoc_data"  # the family of pydoc_data/topics.py: the prose held-out set, never trained on


def write_prose(data):
    """data/prose.bin (uint32, each topic followed by <|endoftext|>) and prose.json, with the
    tokenizer of data/; written under .tmp names, then renamed."""
    from pydoc_data.topics import topics
    tok, eos, _ = prepare.load_tokenizer(data)
    texts = [topics[k] for k in sorted(topics)]
    encoded = [enc.ids + [eos] for enc in tok.encode_batch(texts, add_special_tokens=False)]
    ids, starts = [i for topic in encoded for i in topic], np.cumsum([0] + [len(t) for t in encoded[:-1]])
    np.array(ids, dtype=np.uint32).tofile(data / "prose.bin.tmp")
    (data / "prose.bin.tmp").replace(data / "prose.bin")
    ob.write_json(data / "prose.json", dict(what="pydoc_data.topics.topics: the documentation's prose, one "
                                            "document per topic, in sorted order", topics=len(texts),
                                            characters=sum(map(len, texts)), tokens=len(ids),
                                            starts=starts.tolist(),  # where each topic starts in prose.bin
                                            sha256=hashlib.sha256("\0".join(texts).encode()).hexdigest()))


@dataclass(frozen=True)
class Base:
    config: ob.Qwen2Config  # the base to pretrain
    every_nth_file: int  # of the standard library's files; 1: all of them
    val_fraction: float
    pretrain: tuple  # (steps, lr, warmup, micro-batches per step) of train.py --pretrain
    batch: tuple  # (sequences, tokens each) of a micro-batch: pretraining, every run and evaluation
    eval_batches: int  # random batches of each split for the curves
    eval_every: int
    final_tokens: int  # of each split for the final table, in non-overlapping windows
    LISTING: ClassVar = ()  # fields that choose which runs a work folder holds, not how one is made: not in its recipe


# The demo's: 12 layers, hidden 128, 2.9M weights, 300 updates of 2,048 tokens at a peak lr of 1e-3
# after 100 of warmup (at 3e-3 the loss spiked, and whether it did hinged on rounding).
DEMO = Base(config=ob.Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=12,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                  rope_theta=10000.0, tie_word_embeddings=True),
            every_nth_file=1, val_fraction=0.05, pretrain=(300, 1e-3, 100, 1), batch=(8, 256), eval_batches=8,
            eval_every=50, final_tokens=2 ** 15)


# train.py --demo's options: 100 updates of Ouroboros on the DEMO base, scored on 32,768 tokens of
# each held-out set (the study scores them whole); each --demo replaces the previous one's run (the
# base is kept). What the command line gives still wins.
DEMO_OPTIONS = dict(out="out/demo", device="cpu", steps=100, batch_size=4, grad_accum=1, seq_len=256, lr=2e-3,
                    warmup=10, eval_every=25, eval_batches=8, eval_full=True, final_tokens=DEMO.final_tokens,
                    overwrite=True)


def batch_args(base, data):
    """train.py's options for the batch shape and evaluation of `base` on the CPU, and the prose
    held-out set of `data` when it has one."""
    prose = data / "prose.bin"
    return ["--device", "cpu", "--batch-size", str(base.batch[0]), "--seq-len", str(base.batch[1]),
            "--grad-accum", "1", "--eval-batches", str(base.eval_batches), "--eval-every",
            str(base.eval_every), "--save-every", str(base.eval_every), "--final-tokens", str(base.final_tokens),
            *(["--eval-on", str(prose)] if prose.is_file() else [])]


def recipe(base, corpus=None):
    """What the stages of a work folder are made from, as flat JSON: {"config.hidden_size": 128, ...}."""
    fields = {k: v for k, v in dataclasses.asdict(base).items() if k != "config" and k not in base.LISTING}
    flat = {**{f"config.{k}": v for k, v in base.config.to_dict().items()}, **fields,
            "corpus": corpus and str(Path(corpus).resolve())}
    return json.loads(json.dumps(flat))  # tuples as lists, as they are read back


def claim(work, base, corpus=None):
    """Record the recipe of `work` in work/recipe.json, or refuse a folder made with another one (or
    one that holds other files), naming what differs."""
    file, now = work / "recipe.json", recipe(base, corpus)
    if file.is_file():
        # (a recipe recorded before base.LISTING was left out of recipes holds those fields too)
        was = {k: v for k, v in ob.read_json(file, "").items() if k not in base.LISTING}
        diff = [f"{k} {was.get(k, 'unset')} there, {v} now" for k, v in now.items() if was.get(k) != v]
        diff += [f"{k} {v} there, unset now" for k, v in was.items() if k not in now]
        if diff:
            raise ValueError(f"{file}: {work} was made with another recipe ({'; '.join(diff[:4])}"
                             f"{f'; and {len(diff) - 4} more' if len(diff) > 4 else ''}): give another folder")
    elif any(f.name != "lock" for f in work.iterdir()):
        raise ValueError(f"{work}: holds files but no recipe.json (made by something else, or before recipes were "
                         "recorded): give another folder, or delete it")
    else:
        ob.write_json(file, now)


@contextlib.contextmanager
def holding(work, log=print):
    """work/lock for as long as this process makes stages in `work`; a second process waits."""
    work.mkdir(parents=True, exist_ok=True)
    with open(work / "lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process to finish preparing {work}")
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when its holder ends, however it ends
        yield


def pretrained_base(work, base, run, log=print, corpus=None, seed=0):
    """Stages data/ and base/ in `work` (see the module docstring), from the standard library or
    from the folder `corpus`; run(out, argv) runs train.py (run_logged). A `seed` other than 0 pretrains
    in base-seedN/ instead. Returns (base checkpoint, data)."""
    work = Path(work)
    with holding(work, log):
        fresh = not (work / "recipe.json").is_file()
        claim(work, base, corpus)
        try:
            return make_base(work, base, run, log, corpus, seed)
        except BaseException:
            if fresh and not (work / "data" / "meta.json").is_file():  # nothing made: the folder stays unclaimed
                (work / "recipe.json").unlink(missing_ok=True)
            raise


def make_base(work, base, run, log, corpus, seed):
    data, init, out = work / "data", work / "init", work / ("base" if seed == 0 else f"base-seed{seed}")
    if not (data / "meta.json").is_file():
        inputs = [corpus] if corpus else [f for f in stdlib_files(base.every_nth_file) if family(f) != PROSE]
        held = None if corpus else held_out_families(inputs, base.val_fraction)
        log(f"[data] tokenizer ({base.config.vocab_size} tokens) and token files from "
            f"{corpus or f'the Python {sys.version.split()[0]} standard library ({len(inputs)} files)'}"
            + (f"; held out: the families {', '.join(held)}" if held else ""))
        t0 = time.time()
        prepare.prepare(inputs, None, data, base.val_fraction, vocab_size=base.config.vocab_size,
                        log=lambda *a, **k: None, too_few=f"one in {round(1 / base.val_fraction)} is held out, "
                        "so give a corpus of more files",
                        held_out=held and {f for f in inputs if family(f) in held})
        if held:
            meta = json.loads((data / "meta.json").read_text())
            ob.write_json(data / "meta.json", meta | {"held_out_families": held})
        (data / "wall_s.txt").write_text(str(time.time() - t0))
    if not corpus and not (data / "prose.json").is_file():
        write_prose(data)
    if not (out / "results.json").is_file():
        init.mkdir(parents=True, exist_ok=True)  # what --pretrain starts from: a config and a tokenizer
        ob.write_json(init / "config.json", base.config.to_dict())
        shutil.copyfile(data / "tokenizer.json", init / "tokenizer.json")
        steps, lr, warmup, accum = base.pretrain
        log(f"[base] pretraining {base.config.num_hidden_layers} layers x {base.config.hidden_size} "
            f"for {steps} steps of {accum * base.batch[0] * base.batch[1]:,} tokens (log: {out}/log.txt)")
        argv = ["--pretrain", "--model", str(init), "--data", str(data), "--steps", str(steps), "--lr", str(lr),
                "--warmup", str(warmup), "--weight-decay", "0.1", "--seed", str(seed), *batch_args(base, data),
                "--grad-accum", str(accum)]
        if not run(out, argv):
            if not (out / "diverged.txt").is_file():  # Ctrl-C: the step it reached is saved
                sys.exit(f"interrupted: {out} is saved; run the same command again to continue")
            sys.exit(f"error: pretraining stopped: {(out / 'diverged.txt').read_text()}")
    return out, data

# ----------------------------------------------------------------------------------------
# Running train.py from here: the demo, and the study's runs


def demo(args, main, log=print):
    """train.py --demo's base, pretrained in --out (or found there), as --model and --data: its options
    (`args`) changed in place, and its run put in OUT/ouroboros, beside the base it must not overwrite.
    main is train.main."""
    log("demo: a small Qwen2 pretrained on this Python's standard library (cached after the first run), "
        "cut 3 / 6 / 3, then Ouroboros trained on it; baseline and ours scored on held-out files")
    run = lambda out, argv: run_logged(out, argv, main)  # noqa: E731
    args.model, args.data = map(str, pretrained_base(Path(args.out), DEMO, run, log))
    if (Path(args.data) / "prose.bin").is_file():  # the held-out set of another distribution
        args.eval_on = [*args.eval_on, str(Path(args.data) / "prose.bin")]
    args.out = str(Path(args.out) / "ouroboros")


def run_logged(out, argv, main):
    """train.py (main: train.main) in this process, its log in out/log.txt. It resumes a run that was
    interrupted. True when the run finished; False when it stopped (Ctrl-C, or a diverged loss: see the log)."""
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
    """Seconds run_logged (or the data stage) has spent on `out` so far, over every invocation."""
    return float((out / "wall_s.txt").read_text()) if (out / "wall_s.txt").is_file() else 0.0
