"""
Turn local text into the token files train.py reads.

    python data/prepare.py INPUT... --tokenizer MODEL_DIR --out data/fineweb-edu [--val-fraction 0.005]

INPUT is a .txt file (one document), a .jsonl file (one document per line, field "text"),
a .parquet file (column "text", read with pyarrow when it is installed), or a folder of them.
Writes, into --out:

    train.bin, val.bin   uint32 token ids (Qwen's vocabulary of 151,936 does not fit uint16),
                         each document followed by <|endoftext|>, documents back to back
    meta.json            token and document counts, vocabulary size, EOS id, and the sha256 of
                         tokenizer.json, so train.py can refuse data made with another tokenizer

The held-out split is by document (never a document cut in two): document i is held out when
floor((i + 1) f) > floor(i f), i.e. every (1/f)-th document, evenly spread and reproducible.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

KINDS = (".txt", ".jsonl", ".parquet", ".py")


def find_inputs(inputs):
    """The files to read, in a stable order: the given files, and every file of KINDS in a folder."""
    files = []
    for name in map(Path, inputs):
        if name.is_dir():
            files += sorted(f for f in name.rglob("*") if f.suffix in KINDS)
        elif not name.is_file():
            raise FileNotFoundError(f"{name}: not found")
        elif name.suffix not in KINDS:
            raise ValueError(f"{name}: unsupported file type (use {', '.join(KINDS)} or a folder of them)")
        else:
            files.append(name)
    if not files:
        raise ValueError(f"no {', '.join(KINDS)} file in {', '.join(map(str, inputs))}")
    return files


def documents(file):
    """Yield the documents (strings) of one input file."""
    if file.suffix in (".txt", ".py"):  # TEMPORARY .py
        yield file.read_text(encoding="utf-8")
    elif file.suffix == ".jsonl":
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
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{file}: reading .parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.ParquetFile(file)
        if "text" not in table.schema_arrow.names:
            raise ValueError(f"{file}: no 'text' column (columns: {', '.join(table.schema_arrow.names)})")
        for batch in table.iter_batches(columns=["text"]):
            yield from batch.column(0).to_pylist()


def batches(files, size):
    """The documents of all files, in lists of `size` (encode_batch tokenises a list on all cores)."""
    batch = []
    for file in files:
        try:
            for doc in documents(file):
                batch.append(doc)
                if len(batch) == size:
                    yield batch
                    batch = []
        except UnicodeDecodeError as e:
            raise ValueError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if batch:
        yield batch


def load_tokenizer(path):
    """A tokenizer.json (or a model directory holding one): the tokenizer, its EOS id, its sha256."""
    from tokenizers import Tokenizer
    path = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (give a tokenizer.json or a model directory)")
    tok = Tokenizer.from_file(str(path))
    eos = tok.token_to_id("<|endoftext|>")
    if eos is None:
        raise ValueError(f"{path}: the tokenizer has no <|endoftext|> token to separate documents")
    return tok, eos, hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(inputs, tokenizer, out, val_fraction=0.005, batch_size=1024, log=print, vocab_size=None):
    """Tokenise `inputs` into out/train.bin, out/val.bin and out/meta.json; returns the meta dict."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction {val_fraction} must be between 0 and 1")
    files = find_inputs(inputs)
    if tokenizer is None:  # TEMPORARY
        train_tokenizer([d for b in batches(files, 1024) for d in b], out, vocab_size)
        tokenizer = Path(out) / "tokenizer.json"
    tok, eos, sha = load_tokenizer(tokenizer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = ("train", "val")
    counts = {f"{s}_{what}": 0 for s in names for what in ("tokens", "documents")}
    t0, i = time.time(), 0
    # Written to .tmp files and renamed at the end: an interrupted run leaves no half-made data.
    tmp = {s: out / f"{s}.bin.tmp" for s in names}
    try:
        with open(tmp["train"], "wb") as train, open(tmp["val"], "wb") as val:
            for docs in batches(files, batch_size):
                for enc in tok.encode_batch(docs, add_special_tokens=False):
                    held_out = math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)
                    split, sink = ("val", val) if held_out else ("train", train)
                    np.array(enc.ids + [eos], dtype=np.uint32).tofile(sink)
                    counts[f"{split}_tokens"] += len(enc.ids) + 1
                    counts[f"{split}_documents"] += 1
                    i += 1
                log(f"\r{i:,} documents, {counts['train_tokens'] + counts['val_tokens']:,} tokens "
                    f"({time.time() - t0:.0f} s)", end="", flush=True)
        log()
        if counts["val_documents"] == 0 or counts["train_documents"] == 0:
            raise ValueError(f"{i} document(s) with --val-fraction {val_fraction} leave a split empty "
                             "(give more documents or another --val-fraction)")
    except BaseException:
        for file in tmp.values():
            file.unlink(missing_ok=True)
        raise
    (out / "meta.json").unlink(missing_ok=True)  # an old meta.json must not vouch for new .bin files
    for s in names:
        os.replace(tmp[s], out / f"{s}.bin")
    meta = {**counts, "vocab_size": tok.get_vocab_size(), "eos_id": eos, "dtype": "uint32",
            "tokenizer_sha256": sha, "val_fraction": val_fraction, "inputs": [str(f) for f in files]}
    (out / "meta.json.tmp").write_text(json.dumps(meta, indent=2))
    os.replace(out / "meta.json.tmp", out / "meta.json")  # last: a meta.json means the data is whole
    log(f"{out}: train {counts['train_tokens']:,} tokens in {counts['train_documents']:,} documents, "
        f"val {counts['val_tokens']:,} tokens in {counts['val_documents']:,} documents")
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(description="Tokenise text into train.bin / val.bin / meta.json.")
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help=".txt, .jsonl, .parquet files or folders")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json, or the model directory holding it")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out")
    args = ap.parse_args(argv)
    try:
        prepare(args.inputs, args.tokenizer, args.out, args.val_fraction)
    except (ValueError, FileNotFoundError) as e:  # one line naming the file, no traceback
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()


# TEMPORARY stand-ins until the robust branch lands (replaced at merge)
def check_out(path, flag="--out"):
    pass


def train_tokenizer(texts, path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    Path(path).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(path) / "tokenizer.json"))
    return tok
