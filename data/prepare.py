"""
Turn local text into the token files train.py reads, and check them against its model when it
reads them (load_data).

    python data/prepare.py INPUT... --tokenizer MODEL_DIR --out data/fineweb-edu [--val-fraction 0.005]
    python data/prepare.py INPUT... --train-tokenizer 8192 --out data/mine

What is read:

    a .jsonl file        one document per line, field "text"
    a .parquet file      one document per row, column "text" (read with pyarrow when installed)
    any other file       UTF-8 text, one document, when named on the command line
    a folder             every file under it (hidden ones excepted) ending in .txt, .md, .rst, .py,
                         .jsonl or .parquet, and in each extension given with --ext
                         (repeatable or comma-separated: --ext .tex,.html)

When the whole input is a single text file, it is cut into documents at blank lines: a run of
two or more line ends with only whitespace between them ends a document. If that gives fewer
than 2 documents, the file is cut instead every CHUNK = 4096 characters, after the last line
end within each 4096 (exactly at 4096 where there is none). Empty or whitespace-only documents
are skipped and counted.

Writes, into --out:

    train.bin, val.bin   uint32 token ids (Qwen's vocabulary of 151,936 does not fit uint16),
                         each document followed by <|endoftext|>, documents back to back
    tokenizer.json       with --train-tokenizer N only: a byte-level BPE of N tokens trained on
                         the training documents (never on the held-out ones)
    meta.json            token, document, file and skipped-empty counts, vocabulary size, EOS id,
                         the sha256 of tokenizer.json (so train.py can refuse data made with
                         another tokenizer), and inputs_sha256: the sha256 of the listing
                         `sha256sum` would print for the input files, "HEX  PATH\\n" each in reading
                         order, PATH relative to its INPUT ("." for a file given by name)

The held-out split is by document (never a document cut in two): document i is held out when
floor((i + 1) f) > floor(i f), i.e. every (1/f)-th document, evenly spread and reproducible.
When each file is one document, that is a split by file. A lone text file of n >= 2 documents
that this rule would leave without a held-out one (n < 1/f) has its last document held out.

Nothing is written until --out is known to be writable, the inputs are found and the tokenizer
(if given) is read. --out must be new or empty, or, with --overwrite, hold data this script made
(its meta.json); it may not lie inside an input, nor an input inside it. The files are made in a
hidden folder beside --out, which is renamed to --out when whole: a failure leaves --out as it was
(and no --out at all if it did not exist), and of two runs on one new --out, the second is refused.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: ouroboros.py is one folder up
import ouroboros as ob  # noqa: E402

RECORDS = (".jsonl", ".parquet")  # files of many documents; every other file is one text
TEXT = (".txt", ".md", ".rst", ".py")  # the text files a folder gives without --ext
CHUNK = 4096  # characters per document when a lone file has no blank lines to cut at
# What a data folder holds: this script's files, and the demo's held-out prose and timing (data/stdlib.py)
DATA = {"train.bin", "val.bin", "meta.json", "val_documents.json", "tokenizer.json", "prose.bin", "prose.json",
        "wall_s.txt"}


def check_out(path, flag="--out"):
    """Refuse, in one line and before any work, an output folder that cannot be made or written
    to: empty, under a file, or under a folder without write permission. Creates nothing."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: give a folder")
    path = Path(path)
    nearest = next(p for p in (path, *path.parents) if p.exists())  # the folder that will hold it
    if not nearest.is_dir():
        raise ValueError(f"{flag} {path}: {nearest} is a file, not a folder")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {nearest} is not writable")


def check_fresh(out, inputs, overwrite=False):
    """Refuse, before any work, an --out that holds something (unless it is data this script made and
    `overwrite` says to replace it), that lies inside an input (a second run would read its own
    output), or that holds an input (it would be replaced)."""
    out, where = Path(out), Path(out).resolve()
    for name in map(Path, inputs):
        if name.is_dir() and where.is_relative_to(name.resolve()):
            raise ValueError(f"--out {out}: inside the input {name} (a second run would read its own output)")
        if name.resolve().is_relative_to(where):
            raise ValueError(f"{name}: inside --out {out}, which this run replaces")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / "meta.json").is_file():
        raise ValueError(f"--out {out}: holds files not made by data/prepare.py (no meta.json); give a new or "
                         "empty folder")
    if not overwrite:
        raise ValueError(f"--out {out}: holds prepared data (meta.json); give another --out, or --overwrite "
                         "to replace it")
    other = sorted(f.name for f in out.iterdir() if f.name not in DATA)
    if other:  # --overwrite replaces the folder whole: never with something else of the user's in it
        raise ValueError(f"--out {out}: holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''} besides "
                         "the data, which --overwrite would delete; give another --out")


def find_inputs(inputs, extensions=()):
    """(file, path relative to its INPUT) of every file to read, in a stable order."""
    kinds = TEXT + RECORDS + tuple(extensions)
    files = []
    for name in map(Path, inputs):
        if name.is_dir():
            for f in sorted(name.rglob("*")):
                rel = f.relative_to(name)
                if f.suffix in kinds and f.is_file() and not any(p.startswith(".") for p in rel.parts):
                    files.append((f, rel))  # hidden ones skipped: a .git or .venv is not a corpus
        elif name.is_file():
            files.append((name, Path(".")))
        else:
            raise FileNotFoundError(f"{name}: not found")
    if not files:
        raise ValueError(f"no {', '.join(kinds)} file in {', '.join(map(str, inputs))} (add others with --ext)")
    return files


def file_sha256(file):
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):  # 1 MiB at a time: a 2 GB shard is not held
            h.update(block)
    return h.hexdigest()


def split_text(text):
    """A lone text file's documents: its paragraphs, or else pieces of about CHUNK characters."""
    parts = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(parts) >= 2:
        return parts
    pieces, start = [], 0
    while start < len(text):
        end = start + CHUNK
        if end < len(text):  # cut after the window's last line end, if it has one
            end = text.rfind("\n", start, end) + 1 or end
        pieces.append(text[start:end])
        start = end
    return [p for p in pieces if p.strip()] or [text]  # an empty file stays one (empty) document


def documents(file, alone=False):
    """Yield the documents (strings) of one input file; `alone`: it is the whole input."""
    if file.suffix == ".jsonl":
        with open(file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        text = json.loads(line)["text"]
                    except (json.JSONDecodeError, KeyError, TypeError):
                        text = None
                    if not isinstance(text, str):
                        raise ValueError(f"{file}:{n}: not a JSON object with a 'text' field")
                    yield text
    elif file.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{file}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.ParquetFile(file)
        if "text" not in table.schema_arrow.names:
            raise ValueError(f"{file}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=["text"]):
            yield from batch.column(0).to_pylist()
    else:
        text = file.read_text(encoding="utf-8")
        yield from split_text(text) if alone else [text]


def read(files, val_fraction, held_out=None):
    """(document, "train" | "val" | "empty", its file) of every document, in reading order. Empty ones take
    no number, so the held-out rule counts only documents that have text. `held_out`: the files
    whose documents are the held-out ones, instead of the rule."""
    i, alone, last = 0, len(files) == 1, None
    for file, _ in files:
        try:
            docs = documents(file, alone)
            if alone and file.suffix not in RECORDS:  # one text, already in memory: if the rule would
                docs = list(docs)  # hold out none of its n documents, its last one is held out
                n = sum(1 for doc in docs if doc.strip())
                last = n - 1 if n >= 2 and math.floor(n * val_fraction) == 0 else None
            for doc in docs:
                if not doc or not doc.strip():  # None: a null in a parquet column
                    yield doc, "empty", file
                    continue
                val = (file in held_out if held_out is not None else
                       math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction) or i == last)
                i += 1
                yield doc, "val" if val else "train", file
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def batches(items, size):
    """Lists of `size` items (encode_batch tokenises a list on all cores)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def train_tokenizer(texts, path, vocab_size):
    """A byte-level BPE tokenizer (Qwen's kind) of vocab_size tokens trained on `texts`, EOS
    <|endoftext|>; written to path/tokenizer.json and returned. Every byte is in the initial
    alphabet, so any text can be encoded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(Path(path) / "tokenizer.json"))
    return tok


def load_tokenizer(path):
    """A tokenizer.json (or a model directory holding one): the tokenizer, its EOS id, its sha256."""
    path = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    tok = ob.read_tokenizer(path)
    eos = tok.token_to_id("<|endoftext|>")
    if eos is None:
        raise ValueError(f"{path}: the tokenizer has no <|endoftext|> token to separate documents")
    return tok, eos, file_sha256(path)


def prepare(inputs, tokenizer, out, val_fraction=0.005, batch_size=1024, vocab_size=None, extensions=(),
            log=print, too_few=None, held_out=None, overwrite=False):
    """Tokenise `inputs` into out/train.bin, out/val.bin and out/meta.json; returns the meta dict.
    tokenizer=None with vocab_size=N: train one on the training documents, save it as out/tokenizer.json.
    `too_few`: what the error says when a split would be empty, for a caller without --val-fraction.
    `held_out`: input files to hold out whole, instead of every (1/val_fraction)-th document.
    `overwrite`: replace the data already in out (see check_fresh)."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be between 0 and 1")
    if (tokenizer is None) == (vocab_size is None):
        raise ValueError("give either --tokenizer or --train-tokenizer N (one of the two)")
    if vocab_size is not None and vocab_size < 257:
        raise ValueError(f"--train-tokenizer {vocab_size}: must be at least 257 (256 bytes and <|endoftext|>)")
    check_out(out)
    files = find_inputs(inputs, extensions)
    check_fresh(out, inputs, overwrite)
    if tokenizer is not None:
        tok, eos, sha = load_tokenizer(tokenizer)
    out = Path(out)
    made = [p for p in out.parents if not p.exists()]  # folders this run creates, deepest first
    names = ("train", "val")
    counts = {f"{s}_{what}": 0 for s in names for what in ("tokens", "documents")}
    counts.update(files=len(files), empty_skipped=0)
    stage = ob.staging_folder(out)  # hidden: never an input
    try:
        if tokenizer is None:
            log(f"training a byte-level BPE tokenizer of {vocab_size:,} tokens on the training documents")
            train_docs = (doc for doc, split, _ in read(files, val_fraction, held_out) if split == "train")
            train_tokenizer(train_docs, stage, vocab_size)  # a first pass: the held-out text is never seen
            tok, eos, sha = load_tokenizer(stage)
        t0, i, held = time.time(), 0, {"starts": [], "files": []}
        with open(stage / "train.bin", "wb") as train, open(stage / "val.bin", "wb") as val:
            sinks = {"train": train, "val": val}
            for batch in batches(read(files, val_fraction, held_out), batch_size):
                kept = [(doc, split, file) for doc, split, file in batch if split != "empty"]
                counts["empty_skipped"] += len(batch) - len(kept)
                encoded = tok.encode_batch([doc for doc, *_ in kept], add_special_tokens=False)
                for (_, split, file), enc in zip(kept, encoded):
                    if split == "val":  # where each held-out document starts: the clusters of a bootstrap
                        held["starts"].append(counts["val_tokens"])
                        held["files"].append(str(file))
                    np.array(enc.ids + [eos], dtype=np.uint32).tofile(sinks[split])
                    counts[f"{split}_tokens"] += len(enc.ids) + 1
                    counts[f"{split}_documents"] += 1
                i += len(kept)
                log(f"\r{i:,} documents, {counts['train_tokens'] + counts['val_tokens']:,} tokens "
                    f"({time.time() - t0:.0f} s)", end="", flush=True)
        log()
        if counts["val_documents"] == 0 or counts["train_documents"] == 0:
            raise ValueError(f"{i} document(s) leave a split empty: {too_few}" if too_few else
                             f"{i} document(s) with --val-fraction {val_fraction} leave a split empty "
                             "(give more documents or another --val-fraction)")
        listing = "".join(f"{file_sha256(f)}  {rel.as_posix()}\n" for f, rel in files)  # as sha256sum prints it
        meta = {**counts, "vocab_size": tok.get_vocab_size(), "eos_id": eos, "dtype": "uint32",
                "tokenizer_sha256": sha, "val_fraction": val_fraction, "inputs": [str(f) for f, _ in files],
                "inputs_sha256": hashlib.sha256(listing.encode()).hexdigest()}
        (stage / "meta.json").write_text(json.dumps(meta, indent=2))
        (stage / "val_documents.json").write_text(json.dumps(held))
        check_fresh(out, inputs, overwrite)  # again: another run may have filled --out meanwhile
        old = out.parent / f"{stage.name}.old"
        if out.is_dir() and any(out.iterdir()):  # --overwrite: the old data set aside, the new renamed in
            os.rename(out, old)
        try:
            os.rename(stage, out)  # whole, at once (an empty --out is replaced)
        except OSError:
            if old.exists() and not out.exists():
                os.rename(old, out)  # the old data back where it was
            raise ValueError(f"--out {out}: filled by another run while this one worked; it is left as that "
                             "run made it") from None
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in made:  # deepest first, each only if nothing else was put in it
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    log(f"{out}: train {counts['train_tokens']:,} tokens in {counts['train_documents']:,} documents, "
        f"val {counts['val_tokens']:,} tokens in {counts['val_documents']:,} documents, from "
        f"{len(files):,} file(s); {counts['empty_skipped']:,} empty document(s) skipped")
    return meta


def load_data(args, cfg, rank, world):
    """This rank's share of train.bin, val.bin and the --eval-on files (train.py's options `args`), once they
    are known to fit the model of config `cfg`: checked here, where the data enters, so that data made for
    another model, or cut short, is refused in one line before the model loads."""
    data = Path(args.data)
    meta = ob.read_json(data / "meta.json", f"make it: python data/prepare.py INPUT... --tokenizer {args.model} "
                        f"--out {data}; see the README's Data section")
    for key in ("vocab_size", "train_tokens", "val_tokens"):
        if type(meta.get(key)) is not int or meta[key] < 0:
            raise ValueError(f"{data}/meta.json: {key} is {meta.get(key, 'missing')!r}, not a count (prepare the "
                             "data again)")
    sha = load_tokenizer(args.model)[2]
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


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tokenise text into train.bin / val.bin / meta.json.")
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="text, .jsonl or .parquet files, or folders")
    ap.add_argument("--tokenizer", help="tokenizer.json, or the model directory holding it")
    ap.add_argument("--train-tokenizer", type=int, metavar="N", help="train a byte-level BPE of N tokens instead")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out")
    ap.add_argument("--ext", action="append", default=[], help="more extensions to read in folders (.tex,.html)")
    ap.add_argument("--overwrite", action="store_true", help="replace the data already in --out")
    args = ap.parse_args(argv)
    extensions = ["." + e.strip().lstrip(".") for arg in args.ext for e in arg.split(",") if e.strip()]
    try:
        prepare(args.inputs, args.tokenizer, args.out, args.val_fraction, vocab_size=args.train_tokenizer,
                extensions=extensions, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError) as e:  # one line naming the file, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
