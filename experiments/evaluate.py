"""
Standard benchmarks for a trained Ouroboros, through lm-evaluation-harness (an optional extra:
pip install -r experiments/requirements-eval.txt).

    python experiments/evaluate.py --model BASE --trained OUT/ouroboros.safetensors --depth 4 \\
        --tasks hellaswag,arc_easy                       # needs the tasks' datasets: internet, or a cache
    python experiments/evaluate.py --demo               # the demo's models on a local task, offline

One command scores three models through the same harness: the pruned baseline (prelude, layer R
once, coda), the full model, and Ouroboros, so that "does the loop recover the benchmark score" is
one run. --tasks goes to lm-eval as it is (any of its task names, comma-separated; --include-path
adds a folder of task YAMLs). The results go to --out as results.json, and a table to the terminal.

Our model class, registered in lm-eval as "ouroboros":
- loglikelihood: the requests sorted by length, --batch-size of them padded on the right and scored
  in one forward pass (the model is causal, the Controller's pool too: padding after a sequence
  changes nothing before it);
- loglikelihood_rolling: the text in windows of --max-length tokens, each token predicted once
  (perplexity tasks);
- generate_until: ouroboros.stream, the cached decoding of the CLI, so halting works.

The local task, stdlib_next_line, is what --demo scores: multiple-choice items made from the
held-out module families of the demo's data (files never trained on). The context is a few lines of
a file, the choices are the true next line and three lines of other files; acc is how often the true
line gets the highest log-likelihood, acc_norm the highest per character (chance: 25%).
"""
import argparse
import json
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import ouroboros as ob  # noqa: E402
from data import prepare, stdlib  # noqa: E402

try:
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:  # the module still imports (for its checks and the task maker); evaluating needs lm-eval
    lm_eval, LM, register_model = None, object, lambda name: (lambda cls: cls)

MODELS = ("baseline", "full", "ours")  # the rows of the table, in its order
LOCAL_TASK = "stdlib_next_line"

# ----------------------------------------------------------------------------------------
# The model class lm-eval calls


@register_model("ouroboros")
class OuroborosLM(LM):
    """One of the three models of a base (which: "baseline", "full" or "ours") behind lm-eval's API."""

    def __init__(self, model, trained=None, which="ours", depth=4, batch_size=8, max_length=2048, device=None,
                 dtype=None):
        super().__init__()
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.which, self.depth, self.batch_size = which, int(depth), int(batch_size)
        self.tok, self.eos, _ = prepare.load_tokenizer(model)
        cfg = ob.Qwen2Config.from_pretrained(model)
        self.max_length = min(int(max_length), cfg.max_position_embeddings)
        options = ob.read_trainable_options(trained) if trained else {}
        check_pool(trained, options)
        if which == "ours":
            self.model = ob.Ouroboros.from_pretrained(model, device=device, dtype=dtype, **options)
            if trained:
                self.model.load_trainable(trained)
        elif which == "full":
            self.model = ob.Qwen2.from_pretrained(model, device=device, dtype=dtype)
        else:  # the baseline: the kept layers as they are, layer R once
            self.model = ob.Qwen2.baseline_of(model, device, dtype, *(options.get(k) for k in
                                                                       ("prelude", "recurrent", "coda")))
        self.model.eval()
        self._device = next(self.model.parameters()).device

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """lm-eval's --model_args: model=BASE,trained=FILE,depth=4,which=ours,batch_size=8."""
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv)
        return cls(**args, **{k: v for k, v in (additional_config or {}).items() if v is not None and k in
                              ("batch_size", "device")})

    @torch.no_grad()
    def logits(self, idx):
        """Logits (B, T, vocab) of this model, in float32."""
        out = self.model(idx, self.depth) if self.which == "ours" else self.model(idx)
        return out[0].float()

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    # -- the three request types

    def loglikelihood(self, requests, disable_tqdm=False):
        pairs = []
        for context, continuation in (r.args for r in requests):
            spaces = len(context) - len(context.rstrip(" "))  # trailing spaces belong to the continuation
            context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
            whole, ctx = self.encode(context + continuation), self.encode(context)
            pairs.append(([self.eos] if not context else ctx, whole[len(ctx):]))
        return self.score(pairs)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        totals = []
        for (text,) in (r.args for r in requests):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.encode(text), self.eos, self.max_length, 1)]
            totals.append(sum(logprob for logprob, _ in self.score(windows)))
        return totals

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for context, kwargs in (r.args for r in requests):
            until = kwargs.get("until") or [self.tok.decode([self.eos])]
            until = [until] if isinstance(until, str) else until
            n = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompt = self.encode(context)[-max(1, self.max_length - n):] or [self.eos]
            idx = torch.tensor([prompt], device=self._device)
            new, text = [], ""
            for x in ob.stream(self.model, idx, n, self.depth, temperature):
                new.append(x.item())
                text = self.tok.decode(new)
                if new[-1] == self.eos or any(s in text for s in until):
                    break
            out.append(min((text.split(s)[0] for s in until), key=len))
        return out

    def score(self, pairs):
        """(sum of log-probabilities of the continuation, whether it is greedy) of each (context ids,
        continuation ids): the longest first, --batch-size at a time, one forward pass each."""
        results, order = [None] * len(pairs), sorted(range(len(pairs)), key=lambda i: -len(sum(pairs[i], [])))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i in batch:
                if len(pairs[i][1]) > self.max_length:
                    raise ValueError(f"a continuation of {len(pairs[i][1])} tokens: more than --max-length "
                                     f"{self.max_length} can score")
            rows = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            idx = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long, device=self._device)
            for r, row in enumerate(rows):
                idx[r, :len(row)] = torch.tensor(row)
            logprobs = F.log_softmax(self.logits(idx), -1)  # (B, T, vocab)
            for r, i in enumerate(batch):
                cont = torch.tensor(pairs[i][1], device=self._device)
                at = logprobs[r, len(rows[r]) - len(cont):len(rows[r])]  # the positions that predict cont
                results[i] = (at.gather(1, cont[:, None]).sum().item(), bool((at.argmax(-1) == cont).all()))
        return results

    # -- what lm-eval asks of every model

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self):
        return "ouroboros"

# ----------------------------------------------------------------------------------------
# The local task: the true next line of a held-out file against lines of other files


def make_local_task(data, out, items=200, seed=0):
    """OUT/stdlib_next_line.yaml and .jsonl: `items` questions from the files of the held-out module
    families of `data` (a folder of data/stdlib.py's, whose meta.json names them)."""
    meta = ob.read_json(Path(data) / "meta.json", "make it with python train.py --demo")
    families = meta.get("held_out_families")
    if not families:
        raise ValueError(f"{data}/meta.json: no held_out_families (not the demo's data, made by data/stdlib.py)")
    files = [f for f in stdlib.stdlib_files() if stdlib.family(f) in families]
    lines = {f: f.read_text(encoding="utf-8", errors="replace").splitlines() for f in files}
    good = lambda line: 12 <= len(line.strip()) <= 60  # noqa: E731  (not a blank line, a lone bracket, a long one)
    rng, docs = random.Random(seed), []
    while len(docs) < items:
        f = rng.choice(files)
        at = [i for i in range(4, len(lines[f])) if good(lines[f][i])]
        if not at or len(files) < 2:
            continue
        i = rng.choice(at)
        others = [line for g in rng.sample([g for g in files if g != f], min(3, len(files) - 1))
                  for line in [rng.choice([x for x in lines[g] if good(x)] or ["pass  # (empty)"])]]
        choices = [lines[f][i], *others][:4]
        answer = rng.randrange(len(choices))
        choices[0], choices[answer] = choices[answer], choices[0]
        docs.append(dict(context="\n".join(lines[f][max(0, i - 8):i])[-600:] + "\n", choices=choices, answer=answer))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = "".join(f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
                      for m in ("acc", "acc_norm"))
    yaml = (f"task: {LOCAL_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {(out / f'{LOCAL_TASK}.jsonl').resolve()}\ntest_split: test\noutput_type: multiple_choice\n"
            'doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\ntarget_delimiter: ""\n'
            f"metric_list:\n{metrics}")
    jsonl = "".join(json.dumps(d) + "\n" for d in docs)
    for name, text in ((f"{LOCAL_TASK}.jsonl", jsonl), (f"{LOCAL_TASK}.yaml", yaml)):
        Path(f"{out / name}.tmp").write_text(text)  # then renamed: never a half-written file
        os.replace(f"{out / name}.tmp", out / name)
    return out

# ----------------------------------------------------------------------------------------
# The command: three models, one table


def evaluate(args, tasks, include_path):
    """{model: {task: {metric: value}}} for the three models, one at a time (one in memory)."""
    manager = TaskManager(include_path=include_path)
    table = {}
    for which in MODELS:
        lm = OuroborosLM(args.model, args.trained, which, args.depth, args.batch_size, args.max_length,
                         args.device, args.dtype)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=args.limit,
                                      num_fewshot=args.num_fewshot, bootstrap_iters=1000, log_samples=False)
        table[which] = {task: {k.split(",")[0]: v for k, v in metrics.items()
                               if isinstance(v, (int, float)) and not k.startswith("alias")}
                        for task, metrics in out["results"].items()}
        del lm
    return table


def check_pool(trained, options):
    if options.get("pool") == "mean":
        raise ValueError(f"{trained}: pool='mean' lets every position see the future; lm-eval scores "
                         "continuations as they are generated, so use a model trained with the causal pool")


def check(args, tasks):
    """Everything that can be refused before a model loads or a file is written, in one line."""
    if lm_eval is None:
        raise ValueError("lm-eval is not installed: pip install -r experiments/requirements-eval.txt")
    if not (Path(args.model) / "config.json").is_file():
        raise FileNotFoundError(f"--model {args.model}: no config.json (a Hugging Face checkpoint directory)")
    options = (ob.trained_options(args.trained, ob.Qwen2Config.from_pretrained(args.model)) if args.trained
               else ob.option_defaults())
    check_pool(args.trained, options)
    ob.check_depth(args.depth, options["max_steps"], "--depth")
    for flag in ("batch_size", "max_length"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least 1")
    prepare.check_out(args.out, "--out")
    if Path(args.out).is_dir() and {f.name for f in Path(args.out).iterdir()} - {"results.json", "tasks"}:
        raise ValueError(f"--out {args.out}: holds files that are not an evaluation's; give another --out")
    known = set(TaskManager(include_path=args.include_path).all_tasks) | {LOCAL_TASK}
    unknown = [t for t in tasks if t not in known]
    if not tasks or unknown:
        raise ValueError(f"--tasks: unknown task {(unknown or [''])[0]!r} (lm-eval's names, e.g. hellaswag, "
                         f"arc_easy, or {LOCAL_TASK}; --include-path adds a folder of YAMLs)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the base: a Hugging Face Qwen2 checkpoint directory with tokenizer.json")
    ap.add_argument("--trained", help="Ouroboros's trainables (OUT/ouroboros.safetensors of train.py)")
    ap.add_argument("--depth", type=int, default=4, help="loop steps of ours")
    ap.add_argument("--tasks", default=LOCAL_TASK, help="lm-eval task names, comma-separated")
    ap.add_argument("--include-path", help="a folder of lm-eval task YAMLs, for tasks of your own")
    ap.add_argument("--demo", action="store_true", help="the demo's models (python train.py --demo) on the "
                    "local task")
    ap.add_argument("--out", default="out/evaluate", help="results.json and the local task's files")
    ap.add_argument("--batch-size", type=int, default=8, help="requests per forward pass")
    ap.add_argument("--max-length", type=int, default=2048, help="tokens of context at most")
    ap.add_argument("--limit", type=float, help="at most this many documents per task (a fraction if < 1)")
    ap.add_argument("--num-fewshot", type=int)
    ap.add_argument("--device")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], help="frozen weights: default bf16 on CUDA, "
                    "float32 on CPU (lm-eval's scores are float32 log-softmaxes either way)")
    args = ap.parse_args(argv)
    try:
        if args.demo:  # the demo's base and run, where train.py --demo puts them
            demo = Path(stdlib.DEMO_OPTIONS["out"])
            args.model = args.model or str(demo / "base")
            args.trained = args.trained or str(demo / "ouroboros" / "ouroboros.safetensors")
        if not args.model:
            raise ValueError("give --model BASE (and --trained FILE), or --demo")
        tasks = [t for t in args.tasks.split(",") if t]
        check(args, tasks)
        include = [args.include_path] if args.include_path else []
        if LOCAL_TASK in tasks:  # made from the held-out files of the data the base was trained on
            data = Path(args.model).parent / "data"
            include.append(str(make_local_task(data, Path(args.out) / "tasks")))
        table = evaluate(args, tasks, include or None)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    ob.write_json(Path(args.out) / "results.json", dict(model=args.model, trained=args.trained, depth=args.depth,
                                                       tasks=tasks, results=table))
    for task in tasks:
        metrics = sorted(k for k in table["ours"].get(task, {}) if not k.endswith("_stderr") and k != "sample_len")
        for metric in metrics:
            row = {m: table[m][task][metric] for m in MODELS}
            gap = row["full"] - row["baseline"]
            recovered = f"{100 * (row['ours'] - row['baseline']) / gap:.1f}%" if gap > 0 else "-"
            print(f"{task} {metric}: " + " | ".join(f"{m} {row[m]:.4f}" for m in MODELS)
                  + f" | gap recovered {recovered}")
    return table


if __name__ == "__main__":
    main()
