"""
The Python standard library as a corpus, and a small Qwen2 pretrained on it: the base of
`train.py --demo` and of the miniature study (experiments/miniature.py).

The standard library is real text that nobody here wrote, and it is on every machine with
Python. pretrained_base makes, in a work folder, each stage skipped once done:

    data/   a byte-level BPE tokenizer trained on the training files, train.bin, val.bin
            (data/prepare.py; one file is one document, files are held out whole)
    base/   a Hugging Face checkpoint of the Qwen2, pretrained by `train.py --pretrain`
            (its log in base/log.txt; an interrupted one is resumed)

train.py imports this module, so this module does not import train.py: the caller hands in
the function that runs it (train.run_logged).
"""
import shutil
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import ouroboros as ob  # noqa: E402
from data import prepare  # noqa: E402


def stdlib_files(every_nth=1):
    """This interpreter's standard library as text files: its .py files, without the test suites
    (whose data files are not prose or code a model should learn) and without installed packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
    files = sorted(f for f in root.rglob("*.py") if not skip & set(f.relative_to(root).parts))
    return files[::every_nth]


@dataclass(frozen=True)
class Base:
    config: ob.Qwen2Config  # the base to pretrain
    every_nth_file: int  # of the standard library's files; 1: all of them
    val_fraction: float
    pretrain: tuple  # (steps, lr, warmup, micro-batches per step) of train.py --pretrain
    batch: tuple  # (sequences, tokens each) of a micro-batch: pretraining, every run and evaluation
    eval_batches: int
    eval_every: int


# The demo's: 12 layers, hidden 128, 2.9M weights, 500 updates of 2,048 tokens.
DEMO = Base(config=ob.Qwen2Config(vocab_size=4096, hidden_size=128, intermediate_size=384, num_hidden_layers=12,
                                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                  rope_theta=10000.0, tie_word_embeddings=True),
            every_nth_file=1, val_fraction=0.05, pretrain=(500, 3e-3, 50, 1), batch=(8, 256), eval_batches=16,
            eval_every=40)


def batch_args(base):
    """train.py's options for the batch shape and evaluation of `base`, on the CPU."""
    return ["--device", "cpu", "--batch-size", str(base.batch[0]), "--seq-len", str(base.batch[1]),
            "--grad-accum", "1", "--eval-batches", str(base.eval_batches), "--eval-every",
            str(base.eval_every), "--save-every", str(base.eval_every)]


def pretrained_base(work, base, run, log=print, corpus=None):
    """Stages data/ and base/ in `work` (see the module docstring), from the standard library or
    from the folder `corpus`; run(out, argv) is train.run_logged. Returns (base checkpoint, data)."""
    work = Path(work)
    data, init, out = work / "data", work / "init", work / "base"
    if not (data / "meta.json").is_file():
        inputs = [corpus] if corpus else stdlib_files(base.every_nth_file)
        log(f"[data] tokenizer ({base.config.vocab_size} tokens) and token files from "
            f"{corpus or f'the Python {sys.version.split()[0]} standard library ({len(inputs)} files)'}")
        t0 = time.time()
        prepare.prepare(inputs, None, data, base.val_fraction, vocab_size=base.config.vocab_size,
                        log=lambda *a, **k: None, too_few=f"one in {round(1 / base.val_fraction)} is held out, "
                        "so give a corpus of more files")
        (data / "wall_s.txt").write_text(str(time.time() - t0))
    if not (out / "results.json").is_file():
        init.mkdir(parents=True, exist_ok=True)  # what --pretrain starts from: a config and a tokenizer
        ob.write_json(init / "config.json", base.config.to_dict())
        shutil.copyfile(data / "tokenizer.json", init / "tokenizer.json")
        steps, lr, warmup, accum = base.pretrain
        log(f"[base] pretraining {base.config.num_hidden_layers} layers x {base.config.hidden_size} "
            f"for {steps} steps of {accum * base.batch[0] * base.batch[1]:,} tokens (log: {out}/log.txt)")
        argv = ["--pretrain", "--model", str(init), "--data", str(data), "--steps", str(steps), "--lr", str(lr),
                "--warmup", str(warmup), "--weight-decay", "0.1", "--seed", "0", *batch_args(base),
                "--grad-accum", str(accum)]
        if not run(out, argv):
            if not (out / "diverged.txt").is_file():  # Ctrl-C: the step it reached is saved
                sys.exit(f"interrupted: {out} is saved; run the same command again to continue")
            sys.exit(f"error: pretraining stopped: {(out / 'diverged.txt').read_text()}")
    return out, data
