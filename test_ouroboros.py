"""Tests that read like the specification. CPU, offline, seconds each.

Tiny random Qwen2 checkpoints are written to tmp_path in the exact Hugging Face layout
(config.json, model.safetensors or an index + shards, tokenizer.json) and read back
through the real loader.
"""
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import checkpoint
import ouroboros as ob
import train
from data import prepare, stdlib
from experiments import miniature

HERE = Path(__file__).parent

TINY = ob.Qwen2Config(vocab_size=288, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=5e4, tie_word_embeddings=True)
# Default split of 6 layers: prelude [0, 1), recurrent 3, coda [5, 6); removed 1, 2, 4.

QWEN25_3B = ob.Qwen2Config.from_pretrained(HERE / "configs" / "Qwen2.5-3B")  # the official config.json


def random_tensors(cfg, std=0.2):
    read = ob.random_weights(cfg, "cpu", std)
    return {name: read(name) for name in ob.Qwen2.on_meta(cfg).state_dict()}


def write_checkpoint(path, config, tensors, shards=1):
    """Write config.json and the tensors as model.safetensors, or as `shards` files + index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if shards == 1:
        return save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    weight_map = {}
    names, per = list(tensors), -(-len(tensors) // shards)  # ceil: every shard gets some
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k * per:(k + 1) * per]
        save_file({n: tensors[n] for n in part}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def write_tiny(path, cfg=TINY, shards=1, tensors=None, edit=None):
    """A tiny random checkpoint + tokenizer; edit(config_dict) may change config.json."""
    config = cfg.to_dict()
    if edit:
        edit(config)
    write_checkpoint(path, config, tensors or random_tensors(cfg), shards)
    prepare.train_tokenizer([open(ob.__file__).read()], path, vocab_size=cfg.vocab_size - 16)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    return write_tiny(tmp_path_factory.mktemp("tiny"), shards=2)


def randomize_trainables(model, std=0.3):
    """A fresh model's Controller heads are zero; give every trainable a random value."""
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def ids(B=2, T=12, vocab=TINY.vocab_size, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))

# ----------------------------------------------------------------------------------------
# Qwen2 from scratch


def reference_logits(sd, cfg, idx):
    """Qwen2 written out naively in float64 from the tensors: explicit repeated K/V heads,
    explicit mask and softmax, RoPE as the rotation of pairs (i, i + hd/2)."""
    sd = {k: v.double() for k, v in sd.items()}
    nh, nkv, hd, T = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, idx.size(1)

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    angle = torch.arange(T).double()[:, None] * cfg.rope_theta ** (-torch.arange(0, hd, 2).double() / hd)

    def rotate(x):  # x: (B, heads, T, hd)
        a, b = x[..., :hd // 2], x[..., hd // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], -1)

    h = sd["model.embed_tokens.weight"][idx]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        x = norm(h, sd[p + "input_layernorm.weight"])
        q, k, v = (x @ sd[p + f"self_attn.{n}_proj.weight"].T + sd[p + f"self_attn.{n}_proj.bias"]
                   for n in "qkv")
        q = rotate(q.unflatten(-1, (nh, hd)).transpose(1, 2))
        k = rotate(k.unflatten(-1, (nkv, hd)).transpose(1, 2)).repeat_interleave(nh // nkv, 1)
        v = v.unflatten(-1, (nkv, hd)).transpose(1, 2).repeat_interleave(nh // nkv, 1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
        h = h + y @ sd[p + "self_attn.o_proj.weight"].T
        x = norm(h, sd[p + "post_attention_layernorm.weight"])
        gate, up = x @ sd[p + "mlp.gate_proj.weight"].T, x @ sd[p + "mlp.up_proj.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return norm(h, sd["model.norm.weight"]) @ head.T


def rope_in_rope_parameters(config):  # how transformers 5.x writes config.json
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shards", [1, 3])
@pytest.mark.parametrize("spelling", ["4.x", "5.x"])
def test_qwen2_logits_match_naive_reference(tmp_path, tied, shards, spelling):
    cfg = ob.Qwen2Config(**{**vars(TINY), "tie_word_embeddings": tied})
    tensors = random_tensors(cfg)
    write_tiny(tmp_path, cfg, shards, tensors, rope_in_rope_parameters if spelling == "5.x" else None)
    assert ob.Qwen2Config.from_pretrained(tmp_path) == cfg  # both rope_theta spellings read alike
    model = ob.Qwen2.from_pretrained(tmp_path, device="cpu", dtype=torch.float32)
    assert ("lm_head.weight" in model.state_dict()) == (not tied)
    idx = ids(T=20)
    logits, loss = model(idx, targets=idx.roll(-1, 1))
    expected = reference_logits(tensors, cfg, idx)
    torch.testing.assert_close(logits.double(), expected, rtol=1e-4, atol=1e-4)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(
        expected.flatten(0, 1), idx.roll(-1, 1).flatten()).item(), rel=1e-4)


def test_loss_ignores_targets_of_minus_100(tiny):
    model = ob.Qwen2.from_pretrained(tiny, device="cpu")
    idx = ids()
    targets = idx.roll(-1, 1)
    targets[:, -1] = -100
    logits, loss = model(idx, targets)
    kept = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, :-1].flatten())
    torch.testing.assert_close(loss, kept)


@pytest.mark.parametrize("block", [1, 7, 1024])  # vocabulary blocks: one column, 8 uneven ones, all
def test_fused_loss_equals_cross_entropy_in_value_and_gradients(block):
    x = torch.randn(3, 11, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (3, 11))
    targets[0, :4] = -100
    logits, loss = ob.linear_cross_entropy(x, w, targets, block)
    expected = F.cross_entropy((x @ w.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(logits, (x @ w.T).detach())
    torch.testing.assert_close(loss, expected)
    want = torch.autograd.grad(expected * 3, (x, w))
    for got, wanted in zip(torch.autograd.grad(loss * 3, (x, w)), want):
        torch.testing.assert_close(got, wanted)
    # W frozen (as in Ouroboros): only x's gradient, made in the forward pass
    got = torch.autograd.grad(ob.linear_cross_entropy(x, w.detach(), targets, block)[1] * 3, x)[0]
    torch.testing.assert_close(got, want[0])


def test_fused_loss_under_autocast_computes_in_bf16_with_float32_gradients():
    """As autocast treats x Wᵀ (the pretraining of the demo base autocasts on CUDA)."""
    x, w = torch.randn(2, 5, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 5))
    with torch.autocast("cpu", torch.bfloat16):
        logits, loss = ob.linear_cross_entropy(x, w, targets, block=7)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))
    loss.backward()
    assert x.grad.dtype == w.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_keeps_two_tensors_and_gives_autograds_values_and_gradients(dtype):
    a, b = (torch.randn(2, 5, 40, dtype=dtype, requires_grad=True) for _ in range(2))
    grad = torch.randn(2, 5, 40, dtype=dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = ob.SwiGLU.apply(a, b)
    assert len(saved) == 2  # a and b; F.silu(a) * b keeps silu(a) too
    assert torch.equal(y, F.silu(a) * b)
    for got, want in zip(torch.autograd.grad(y, (a, b), grad), torch.autograd.grad(F.silu(a) * b, (a, b), grad)):
        assert torch.equal(got, want)


def test_loss_backward_leaves_the_returned_logits_alone():
    """In float32, a block of the logits .float() is that block itself: an in-place softmax in
    backward would overwrite what the forward returned."""
    x, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(20, 8, requires_grad=True)
    logits, loss = ob.linear_cross_entropy(x, w, torch.randint(0, 20, (2, 5)), block=7)
    before = logits.clone()
    loss.backward()
    assert torch.equal(logits, before)


def test_loss_keeps_nothing_vocabulary_sized_for_backward(tiny):
    """F.cross_entropy on float32 logits would keep (tokens × vocab) float32 log-probabilities,
    2.5 GB for Qwen2.5-3B at 2 × 2048 tokens. With the embedding frozen, the loss keeps only
    the gradient of its input, (tokens × d), made in the forward pass."""
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu", dtype=torch.bfloat16))
    idx, saved = ids(), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits, loss = model(idx, depth=2, targets=idx.roll(-1, 1))
    assert saved and not [t for t in saved if TINY.vocab_size in t.shape and t.shape[-1] != TINY.hidden_size]
    assert logits.shape == (*idx.shape, TINY.vocab_size)
    with torch.no_grad():  # no gradient is made where none is asked for; the loss is the same
        assert torch.equal(model(idx, depth=2, targets=idx.roll(-1, 1))[1], loss.detach())
    # Training asks for the loss alone: no logits at all, the same loss and gradients
    grads = torch.autograd.grad(loss, model.trainable_parameters())
    none, alone = model(idx, depth=2, targets=idx.roll(-1, 1), return_logits=False)
    assert none is None and torch.equal(alone, loss)
    for got, want in zip(torch.autograd.grad(alone, model.trainable_parameters()), grads):
        assert torch.equal(got, want)


def test_qwen25_3b_has_3_09b_parameters():
    """36 layers × 77,076,992 (q 2048² + 2048, k and v 256·2048 + 256 each, o 2048², MLP
    3 · 11008 · 2048, two norms 2 · 2048) + tied embedding 151936 · 2048 + final norm 2048."""
    model = ob.Qwen2.from_config(QWEN25_3B, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 3_085_938_688

# ----------------------------------------------------------------------------------------
# Surgery and SVD bases


@pytest.mark.parametrize("L, split", [(36, (8, 18, 8)), (24, (5, 12, 5)), (28, (6, 14, 6)), (6, (1, 3, 1))])
def test_default_split_keeps_the_papers_proportions(L, split):
    assert ob.split_layers(L)[:3] == split


def test_only_needed_tensors_are_read_each_once(tiny, monkeypatch):
    reads = []
    original = ob.Checkpoint.read
    monkeypatch.setattr(ob.Checkpoint, "read", lambda self, name: reads.append(name) or original(self, name))
    ob.Ouroboros.from_pretrained(tiny, device="cpu")
    assert len(reads) == len(set(reads))
    layers_read = {int(n.split(".")[2]) for n in reads if n.startswith("model.layers.")}
    assert layers_read == {0, 1, 2, 3, 4, 5}
    for i in (1, 2, 4):  # removed layers: only the 7 target weights, for the residual mean
        assert sorted(n for n in reads if n.startswith(f"model.layers.{i}.")) == \
            sorted(f"model.layers.{i}.{t}.weight" for t in ob.TARGETS)


def test_svd_bases_recover_an_exactly_low_rank_mean_residual(tmp_path):
    """If every removed layer is layer R plus its own M_i, Δ = mean(M_i); with M_i of rank
    ≤ 2 summing to rank ≤ 8, B A must equal Δ itself."""
    tensors = random_tensors(TINY)
    deltas = {}
    for t in ob.TARGETS:
        w = tensors[f"model.layers.3.{t}.weight"]
        low = [torch.randn(w.size(0), 2) @ torch.randn(2, w.size(1)) for _ in range(3)]
        for i, m in zip((1, 2, 4), low):
            tensors[f"model.layers.{i}.{t}.weight"] = w + m
        deltas[t] = sum(low) / 3
    model = ob.Ouroboros.from_pretrained(write_tiny(tmp_path, tensors=tensors), device="cpu")
    for t in ob.TARGETS:
        lin = model.layer.get_submodule(t)
        torch.testing.assert_close(lin.lora_B @ lin.lora_A, deltas[t], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_svd_bases_are_the_best_rank_r_approximation(tiny, rank):
    """Eckart–Young: ‖Δ − B A‖²_F equals the sum of Δ's squared singular values beyond r,
    and A has orthonormal rows (the top right-singular vectors)."""
    model = ob.Ouroboros.from_pretrained(tiny, rank=rank, device="cpu")
    full = ob.Qwen2.from_pretrained(tiny, device="cpu").state_dict()
    for t in ob.TARGETS:
        w = [full[f"model.layers.{i}.{t}.weight"] for i in range(6)]
        delta = (w[1] + w[2] + w[4]) / 3 - w[3]
        lin = model.layer.get_submodule(t)
        assert lin.lora_A.shape == (rank, delta.size(1)) and lin.lora_B.shape == (delta.size(0), rank)
        tail = torch.linalg.svdvals(delta)[rank:].pow(2).sum()
        assert (delta - lin.lora_B @ lin.lora_A).pow(2).sum().item() == pytest.approx(tail.item(), rel=1e-3, abs=1e-6)
        torch.testing.assert_close(lin.lora_A @ lin.lora_A.T, torch.eye(rank), atol=1e-5, rtol=0)

# ----------------------------------------------------------------------------------------
# Controller, gate, per-step norms, the recurrence


def test_fresh_model_step_is_the_plain_layer(tiny):
    """Zero heads: c = 0, so ΔW = 0. Without gate and step norm, depth 1 is the baseline."""
    model = ob.Ouroboros.from_pretrained(tiny, gate=False, step_norm=False, device="cpu")
    idx = ids()
    torch.testing.assert_close(model(idx, depth=1)[0], model.baseline(idx)[0])
    assert not torch.allclose(randomize_trainables(model)(idx, depth=1)[0], model.baseline(idx)[0])


def test_gate_keeps_88_percent_at_init(tiny):
    """b_g = -2, W_g = 0: g = σ(-2) = 1 / (1 + e²) = 0.1192, so h ← 0.1192 h_new + 0.8808 h."""
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    h = torch.randn(2, 5, TINY.hidden_size)
    cos_sin = ob.rope(TINY, torch.arange(5))
    h_new = ob.rms_norm(model.layer(h, cos_sin), torch.ones(TINY.hidden_size), TINY.rms_norm_eps)
    keep = 1 - 1 / (1 + math.e ** 2)
    assert keep == pytest.approx(0.8808, abs=1e-4)
    torch.testing.assert_close(model.step(h, 0, cos_sin), keep * h + (1 - keep) * h_new)


def test_step_norm_gives_each_step_its_own_unit_rms(tiny):
    model = ob.Ouroboros.from_pretrained(tiny, gate=False, device="cpu")
    h = torch.randn(2, 5, TINY.hidden_size) * 7
    out = model.step(h, 0, ob.rope(TINY, torch.arange(5)))
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(2, 5), atol=1e-4, rtol=0)
    assert model.step_norms.shape == (64, TINY.hidden_size)


def part_one():
    """ouroboros.py cut at the PART 2 banner, run as a module of its own: what a student cuts out."""
    source = (HERE / "ouroboros.py").read_text()
    source = source[:source.index("# " + "=" * 88 + "\n# PART 2")]
    module = type(sys)("part_one")
    exec(compile(source, "part_one", "exec"), module.__dict__)
    return module, source


def test_part_one_names_nothing_of_part_two():
    """Every global name Part 1's code reads is defined in Part 1 (or is a builtin), and it is plain
    PyTorch: no autograd.Function, compiler, autocast or checkpointing."""
    import builtins
    import dis
    module, source = part_one()
    codes, names = [compile(source, "part_one", "exec")], set()
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if hasattr(c, "co_code")]
        names |= {i.argval for i in dis.get_instructions(code) if i.opname in ("LOAD_GLOBAL", "LOAD_NAME")}
    assert names - set(module.__dict__) - set(dir(builtins)) == {"__annotations__"}
    for name in ("autograd.Function", "torch.compile", "autocast", "checkpoint(", "sdpa_kernel"):
        assert name not in source


@pytest.mark.parametrize("options", [{}, dict(controller="static"), dict(controller="none"), dict(pool="mean")])
def test_part_one_alone_loads_trains_and_generates_as_the_whole_file(tiny, tmp_path, options):
    """Part 1 alone loads the checkpoint and the whole file's trainables, and gives the same logits,
    loss, training steps and greedy tokens, to float32 round-off (Part 2's kernels sum in other orders)."""
    part, _ = part_one()
    whole = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu", **options), std=0.05)
    whole.save_trainable(tmp_path / "t.safetensors")
    alone = part.Ouroboros.from_pretrained(tiny, device="cpu", **options)
    alone.load_trainable(tmp_path / "t.safetensors")
    assert type(alone).__module__ == "part_one" and not isinstance(alone, ob.Ouroboros)
    idx = ids()
    for model in (whole, alone):  # three steps on the same batches (SGD: Adam would magnify round-off
        # in the gradients that are near zero into whole steps)
        model.curve, opt = [], torch.optim.SGD(model.trainable_parameters(), lr=0.1)
        for step in range(3):
            logits, loss = model(idx, 3, idx.roll(-step - 1, 1))
            model.curve.append((logits.detach(), loss.detach()))
            loss.backward()
            opt.step()
            opt.zero_grad()
    for (a_logits, a_loss), (b_logits, b_loss) in zip(whole.curve, alone.curve):
        torch.testing.assert_close(b_logits, a_logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(b_loss, a_loss, rtol=1e-5, atol=1e-6)
    assert not torch.equal(whole.curve[0][1], whole.curve[-1][1])  # the steps trained something
    torch.testing.assert_close(alone.baseline(idx)[0], whole.baseline(idx)[0], rtol=1e-5, atol=1e-5)
    if whole.pool == "causal":
        prompt = ids(B=1, T=5)
        assert torch.equal(part.generate(alone, prompt, 6, 3, 0), ob.generate(whole, prompt, 6, 3, 0))


@pytest.mark.parametrize("T", [1, 63, 64, 65, 300])
def test_prefix_sums_are_cumsum_to_float32_round_off(T):
    """The causal pool's running sums, as blocked triangular matmuls: cumsum's values, to the round-off
    of float32 sums of T terms (checked against float64), for T below, at and across a block."""
    x = torch.randn(2, T, 48, dtype=torch.float64) + 3  # a mean far from 0, as hidden states have
    exact = x.cumsum(1)
    ours, scan = ob.prefix_sums(x.float()).double(), x.float().cumsum(1).double()
    bound = 4 * T * torch.finfo(torch.float32).eps * x.abs().cumsum(1)  # |error| of a float32 sum of T terms
    assert ((ours - exact).abs() <= bound).all() and ((scan - exact).abs() <= bound).all()
    torch.testing.assert_close(ours, scan, rtol=1e-5, atol=1e-4)
    with torch.autocast("cpu", torch.bfloat16):  # inside a bf16 model's forward: the same float32 sums
        assert torch.equal(ob.prefix_sums(x.float()), ours.float())


def test_decoding_a_bf16_model_keeps_the_pools_running_sum_in_float32(tiny, monkeypatch):
    """In bf16, a sum of hundreds of hidden states stops growing: a new token's share rounds away."""
    made = []

    class Spy(ob.KVCache):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(ob, "KVCache", Spy)
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu", dtype=torch.bfloat16))
    ob.generate(model, ids(B=1, T=9), 3, depth=2)
    sums = [c.h_sum for c in made if c.h_sum is not None]
    assert len(sums) == 2 and all(h.dtype == torch.float32 for h in sums)


@pytest.mark.parametrize("pool, causal", [("causal", True), ("mean", False)])
def test_controller_causality(tiny, pool, causal):
    """Changing the last token must leave earlier logits alone, unless the Controller
    mean-pools the whole sequence (the paper's code: the future leaks into the past)."""
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, pool=pool, device="cpu"))
    a = ids()
    b = a.clone()
    b[:, -1] = (b[:, -1] + 1) % TINY.vocab_size
    same = torch.allclose(model(a, depth=3)[0][:, :-1], model(b, depth=3)[0][:, :-1], atol=1e-6)
    assert same == causal


def test_prefix_pooled_mean_pool_model_is_the_causal_model_with_its_weights(tiny):
    """The miniature scores a mean-pool model twice: as trained, and pooled over the prefix as it
    must generate. The second is exactly a causal-pool model carrying the same trainables."""
    mean = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, pool="mean", device="cpu"))
    causal = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    causal.load_state_dict(mean.state_dict())
    idx = ids()
    assert not torch.equal(mean(idx, depth=3)[0], causal(idx, depth=3)[0])  # the leak changes the logits
    mean.pool = "causal"
    assert torch.equal(mean(idx, depth=3)[0], causal(idx, depth=3)[0])


def test_loop_alone_trains_only_gate_and_norms(tiny):
    """controller="none": layer R looped as it is; the LoRA bases are never used."""
    model = ob.Ouroboros.from_pretrained(tiny, controller="none", device="cpu")
    assert [n for n, _ in model.named_trainable()] == ["step_norms", "gate.weight", "gate.bias"]
    assert model.modulation(torch.zeros(1, 2, TINY.hidden_size), 0) is None


def test_static_controller_ignores_the_input(tiny):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, controller="static", device="cpu"))
    h = torch.randn(2, 5, TINY.hidden_size)
    torch.testing.assert_close(model.modulation(h, 2), model.modulation(h * 3 + 1, 2))
    assert not torch.allclose(model.modulation(h, 1), model.modulation(h, 2))


def test_depth_is_honoured(tiny):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu"))
    idx = ids()
    assert not torch.allclose(model(idx, depth=2)[0], model(idx, depth=3)[0])


@pytest.mark.parametrize("rank", [8, 32, 64])
def test_trainable_counts_of_qwen25_3b(rank):
    """gate 2·2048·2048 + 2048 = 8,390,656; norms 64 · 2048 = 131,072; Controller
    2048·256+256 + 64·128 + 384·256+256 + 256·128+128 = 664,192; heads 7 · 128 · r."""
    model = ob.Ouroboros.from_config(QWEN25_3B, rank=rank, device="meta")
    expected = {8: 9_193_088, 32: 9_214_592, 64: 9_243_264}[rank]
    assert sum(p.numel() for p in model.trainable_parameters()) == expected
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


@pytest.mark.parametrize("options, count", [
    (dict(controller="static"), 8_390_656 + 131_072 + 64 * 7 * 8),
    (dict(controller="none"), 8_390_656 + 131_072),
    (dict(gate=False), 9_193_088 - 8_390_656),
    (dict(step_norm=False), 9_193_088 - 131_072)])
def test_ablations_train_only_their_parts(options, count):
    model = ob.Ouroboros.from_config(QWEN25_3B, device="meta", **options)
    assert sum(p.numel() for p in model.trainable_parameters()) == count


def test_gradients_reach_only_the_trainables(tiny):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu"))
    idx = ids()
    model(idx, depth=3, targets=idx.roll(-1, 1))[1].backward()
    trainable = {id(p) for p in model.trainable_parameters()}
    for name, p in model.named_parameters():
        if id(p) in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_prelude_runs_without_autograd(tiny):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu"))
    seen = {}
    model.base.model.layers["0"].register_forward_hook(lambda m, i, out: seen.update(prelude=out.requires_grad))
    model.base.model.layers["5"].register_forward_hook(lambda m, i, out: seen.update(coda=out.requires_grad))
    model(ids(), depth=2)
    assert seen == {"prelude": False, "coda": True}


def test_bf16_frozen_weights_with_float32_trainables(tiny):
    """An AdamW step of 3e-4 on the gate bias (-2) survives: in bf16 it would round away
    (the spacing of bf16 numbers near 2 is 2^-6 = 0.0156)."""
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.base.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.trainable_parameters()} == {torch.float32}
    assert torch.tensor(-2.0, dtype=torch.bfloat16) - 3e-4 == -2.0
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-4)
    idx = ids()
    logits, loss = model(idx, depth=2, targets=idx.roll(-1, 1))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    opt.step()
    assert (model.gate.bias != -2.0).all()


def test_compiled_model_gives_the_eager_loss_and_gradients(tiny):
    """--compile (inductor, on the CPU here) fuses the element-wise ops; the numbers stay those of
    eager up to rounding. Trainables of std 0.05: at the std of 0.3 used elsewhere, the model is so
    ill-conditioned that changing the trainables by 1e-7 moves the gradients by 3e-3, eager alone."""
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu"), std=0.05)
    idx = ids()
    results = []
    for forward in (model, torch.compile(model)):
        _, loss = forward(idx, 2, idx.roll(-1, 1), return_logits=False)
        results.append((loss, torch.autograd.grad(loss, model.trainable_parameters())))
    (got, got_grads), (want, want_grads) = results[1], results[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu"))
    idx = ids()
    grads = []
    for flag in (False, True):
        model.checkpointing = flag
        model.zero_grad()
        model(idx, depth=3, targets=idx.roll(-1, 1))[1].backward()
        grads.append([p.grad.clone() for p in model.trainable_parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_save_and_load_trainables_round_trip(tiny, tmp_path):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, rank=4, device="cpu"))
    model.save_trainable(tmp_path / "t.safetensors")
    assert not list(tmp_path.glob("*.tmp"))
    fresh = ob.Ouroboros.from_pretrained(tiny, rank=4, device="cpu")
    fresh.load_trainable(tmp_path / "t.safetensors")
    idx = ids()
    torch.testing.assert_close(fresh(idx, depth=3)[0], model(idx, depth=3)[0])
    assert ob.read_trainable_options(tmp_path / "t.safetensors") == model.options


@pytest.mark.parametrize("options, named", [(dict(rank=8), "rank: file 4, model 8"),
                                            (dict(rank=4, pool="mean"), "pool: file 'causal', model 'mean'")])
def test_load_trainable_refuses_other_options(tiny, tmp_path, options, named):
    ob.Ouroboros.from_pretrained(tiny, rank=4, device="cpu").save_trainable(tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=named):
        ob.Ouroboros.from_pretrained(tiny, device="cpu", **options).load_trainable(tmp_path / "t.safetensors")


def test_failed_save_leaves_the_old_file_intact(tiny, tmp_path, monkeypatch):
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    file = tmp_path / "t.safetensors"
    model.save_trainable(file)
    before = file.read_bytes()

    def crash(tensors, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(ob, "save_file", crash)
    with pytest.raises(OSError):
        randomize_trainables(model).save_trainable(file)
    assert file.read_bytes() == before

# ----------------------------------------------------------------------------------------
# Bad input: one clear error naming the file, key or value


def drop(name):
    def edit(path):
        tensors = random_tensors(TINY)
        del tensors[name]
        write_checkpoint(path, TINY.to_dict(), tensors)
    return edit


def reshape(path):
    tensors = random_tensors(TINY)
    tensors["model.layers.2.mlp.up_proj.weight"] = torch.zeros(47, 32)
    write_checkpoint(path, TINY.to_dict(), tensors)


def extra(path):
    write_checkpoint(path, TINY.to_dict(),
                     {**random_tensors(TINY), "model.layers.6.mlp.up_proj.weight": torch.zeros(1)})


def config_edit(**changes):
    return lambda path: (path / "config.json").write_text(json.dumps({**TINY.to_dict(), **changes}))


BAD_CHECKPOINTS = {
    "missing config.json": (lambda p: (p / "config.json").unlink(), "config.json: not found"),
    "missing shard": (lambda p: (p / "model-00002-of-00003.safetensors").unlink(),
                      "model-00002-of-00003.safetensors: shard not found"),
    "corrupt index": (lambda p: (p / "model.safetensors.index.json").write_text("{"),
                      "model.safetensors.index.json: not valid JSON"),
    "no weights": (lambda p: [f.unlink() for f in p.glob("model*")], "no model.safetensors"),
    "missing tensor": (drop("model.layers.4.self_attn.k_proj.bias"),
                       "'model.layers.4.self_attn.k_proj.bias' is missing"),
    "unexpected tensor": (extra, "unexpected tensor 'model.layers.6.mlp.up_proj.weight'"),
    "wrong shape": (reshape,
                    r"'model.layers.2.mlp.up_proj.weight' has shape \(47, 32\), config.json implies \(48, 32\)"),
    "truncated file": (lambda p: p.joinpath("model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                       "model.safetensors: not a readable safetensors file"),
    "model_type": (config_edit(model_type="llama"), "model_type 'llama' is not supported"),
    "sliding window": (config_edit(use_sliding_window=True), "sliding-window attention is not supported"),
    "rope scaling": (config_edit(rope_scaling={"type": "yarn", "factor": 4.0}), "rope scaling .* is not supported"),
    "missing key": (lambda p: (p / "config.json").write_text(json.dumps(
        {k: v for k, v in TINY.to_dict().items() if k != "hidden_size"})), "key 'hidden_size' is missing"),
    "integer tensor": (lambda p: write_checkpoint(p, TINY.to_dict(), {
        **random_tensors(TINY), "model.layers.0.self_attn.q_proj.weight": torch.ones(32, 32, dtype=torch.int8)}),
        "tensor 'model.layers.0.self_attn.q_proj.weight' is I8, not floating point"),
    "a word for a number": (config_edit(vocab_size="abc"), "key 'vocab_size' is 'abc': must be an integer above 0"),
    "no layers": (config_edit(num_hidden_layers=0), "key 'num_hidden_layers' is 0: must be an integer above 0"),
    "a float for an integer": (config_edit(hidden_size=32.5), "key 'hidden_size' is 32.5: must be an integer"),
    "a word for a flag": (config_edit(tie_word_embeddings="yes"),
                          "key 'tie_word_embeddings' is 'yes': must be true or"),
    "negative eps": (config_edit(rms_norm_eps=-1e-6), "key 'rms_norm_eps' is -1e-06: must be a number above 0"),
    "a number too large for a float": (config_edit(rope_theta=10 ** 400),
                                       "key 'rope_theta' is 1000.*: must be a number"),
    "null for a required key": (config_edit(hidden_size=None),
                                "key 'hidden_size' is null: must be an integer above 0$"),
    "null theta": (config_edit(rope_theta=None), r"key 'rope_theta' is null: must be a number above 0 \(leave the key "
                   r"out for the default 10000.0\)"),
    "null eps": (config_edit(rms_norm_eps=None), "key 'rms_norm_eps' is null: must be a number above 0 "),
    "null flag": (config_edit(tie_word_embeddings=None), "key 'tie_word_embeddings' is null: must be true or false "),
}


def test_config_nulls_that_transformers_reads_as_defaults_are_read_so(tmp_path):
    """A null (or absent) num_key_value_heads is one key/value head per query head, and transformers 5.x's
    theta in rope_parameters stands when the top-level key is absent. Any other null is refused (above): it
    would silently describe another model."""
    write_tiny(tmp_path)
    config_edit(num_key_value_heads=None)(tmp_path)
    assert ob.Qwen2Config.from_pretrained(tmp_path).num_key_value_heads == TINY.num_attention_heads
    raw = TINY.to_dict()
    rope_in_rope_parameters(raw)
    assert ob.Qwen2Config.from_dict(raw).rope_theta == TINY.rope_theta


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_clearly(tmp_path, case):
    break_it, message = BAD_CHECKPOINTS[case]
    write_tiny(tmp_path, shards=3 if case in ("missing shard", "corrupt index") else 1)
    break_it(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        ob.Ouroboros.from_pretrained(tmp_path, device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options, message", [
    (dict(prelude=4, recurrent=2), "split prelude=4, recurrent=2, coda=1 is out of range for 6 layers"),
    (dict(recurrent=5), "out of range"),
    (dict(prelude=3, recurrent=3, coda=2), "removes no layer"),
    (dict(rank=17), r"rank 17 is out of range for self_attn.k_proj \(16 x 32\)"),
    (dict(coda_rank=17), r"coda_rank 17 is out of range: use 0 \(no adapters\) to 16"),
    (dict(coda=0, coda_rank=4), "coda_rank 4 with coda=0: there is no coda layer to adapt"),
    (dict(controller="lstm"), "controller='lstm'"),
    (dict(pool="max"), "pool='max'"),
])
def test_bad_options_are_refused_clearly(tiny, options, message):
    with pytest.raises(ValueError, match=message):
        ob.Ouroboros.from_pretrained(tiny, device="cpu", **options)


@pytest.mark.parametrize("depth", [0, 65])
def test_depth_outside_1_to_max_steps_is_refused(tiny, depth):
    with pytest.raises(ValueError, match=rf"depth {depth} is outside 1..64"):
        ob.Ouroboros.from_pretrained(tiny, device="cpu")(ids(), depth=depth)


@pytest.mark.parametrize("bad", [-1, TINY.vocab_size])
def test_a_prompt_token_outside_the_vocabulary_is_refused_in_one_line(tiny, bad):
    """Ids are checked where they enter: a prompt here (train.py checks its token files)."""
    idx = ids()
    idx[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary 0..{TINY.vocab_size - 1}"):
        ob.generate(ob.Ouroboros.from_pretrained(tiny, device="cpu"), idx, 2)


def test_forward_and_backward_never_wait_for_the_device(tiny, monkeypatch):
    """No host sync in a training step (it would stall the GPU and break a compiled graph): every way a
    tensor's value reaches Python raises while the model runs forward and backward."""
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    idx = ids()

    def sync(*args):
        raise AssertionError("a host sync in the training step")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    with pytest.raises(AssertionError, match="host sync"):  # the trap works
        bool(torch.ones(()) > 0)
    model(idx, 3, idx.roll(-1, 1), return_logits=False)[1].backward()
    model.baseline(idx, idx.roll(-1, 1))
    monkeypatch.undo()
    assert model.gate.weight.grad.abs().sum() > 0

# ----------------------------------------------------------------------------------------
# Generation with a KV cache


def greedy_by_recomputation(forward, idx, n):
    for _ in range(n):
        idx = torch.cat([idx, forward(idx)[0][:, -1].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize("which, depth", [("qwen2", None), ("ouroboros", 1), ("ouroboros", 3), ("static", 3)])
def test_cached_greedy_equals_recomputation(tiny, which, depth):
    if which == "qwen2":
        model, forward = ob.Qwen2.from_pretrained(tiny, device="cpu"), None
        forward = model
    else:
        model = randomize_trainables(ob.Ouroboros.from_pretrained(
            tiny, controller="static" if which == "static" else "dynamic", device="cpu"))
        forward = lambda x: model(x, depth=depth)  # noqa: E731
    prompt = ids(B=3, T=7)
    with torch.no_grad():
        expected = greedy_by_recomputation(forward, prompt, 12)
    assert torch.equal(ob.generate(model, prompt, 12, depth=depth or 4, top_k=1), expected)
    assert torch.equal(ob.generate(model, prompt, 12, depth=depth or 4, temperature=0), expected)


def test_each_trainable_is_cast_once_per_forward_and_backward(tiny):
    """bf16 frozen weights, float32 trainables: every trainable is cast to bf16 once per forward pass,
    whatever the depth (autocast's cache), not at each loop step; the rotary table once, not per layer."""
    from torch.utils._python_dispatch import TorchDispatchMode
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu", dtype=torch.bfloat16)
    casts = []

    class Casts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and (kwargs or {}).get("dtype") == torch.bfloat16:
                casts.append(args[0])
            return func(*args, **(kwargs or {}))

    idx = ids()
    with Casts():
        model(idx, 6, idx.roll(-1, 1), return_logits=False)[1].backward()
    for name, p in model.named_trainable():  # elements cast from its storage: each at most once
        start, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
        cast = sum(c.numel() for c in casts if c.dtype == torch.float32 and start <= c.data_ptr() < end)
        assert cast <= p.numel(), (name, cast, p.numel())
        if name in ("gate.weight", "controller.w1.weight", "controller.heads.weight"):  # used at every step
            assert cast == p.numel(), (name, cast)
    rotary = [c for c in casts if c.shape == (idx.size(1), TINY.head_dim)]
    assert len(rotary) == 2  # cos and sin


def test_a_decoded_token_takes_fewer_ops_than_before_the_static_caches():
    """Decoding is launch-bound on a GPU: every aten op that is not a view is a kernel. One decoded token
    of a Qwen2.5-3B-deep model (36 layers: 8 + 4 steps + 8 = 20 attention calls at depth 4, bf16) took
    1,161 such ops at eef21d1 (counted the same way); the static caches must not take more."""
    from experiments import gpu
    cfg = ob.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=36,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = ob.Ouroboros.from_config(cfg, device="cpu", dtype=torch.bfloat16)
    assert gpu.ops_per_token(model, torch.randint(0, 512, (1, 16)))["work_ops_per_token"] < 1161


def test_decoding_never_asks_cudnn_for_attention(tiny, monkeypatch):
    """cuDNN's attention builds a plan for each new key length: every decoding call runs with it
    switched off (the flags sdpa_kernel sets are global, so they are seen here on a CPU too), and
    training keeps torch's own choice."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.append((q.size(2), torch.backends.cuda.cudnn_sdp_enabled()))
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    ob.generate(model, ids(B=1, T=5), 3, depth=2)
    assert seen and all(not cudnn for _, cudnn in seen) and {T for T, _ in seen} == {5, 1}
    seen.clear()
    model(ids(), depth=2)
    assert all(cudnn for _, cudnn in seen)


def test_sampling_stays_within_top_k():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9, -1.0]]).repeat(500, 1)
    torch.manual_seed(0)
    drawn = set(ob.sample(logits, temperature=1.0, top_k=2).flatten().tolist())
    assert drawn == {1, 3}


@pytest.mark.parametrize("prompt, kwargs, message", [
    (torch.zeros(1, 0, dtype=torch.long), {}, "the prompt is empty"),
    (ids(T=60), dict(max_new_tokens=5), "exceeds the model's 64 positions"),
    (ids(), dict(top_k=0), "top_k=0"),
    (ids(), dict(temperature=-1.0), "temperature=-1.0"),
])
def test_generate_refuses_bad_input(tiny, prompt, kwargs, message):
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    with pytest.raises(ValueError, match=message):
        ob.generate(model, prompt, **{"max_new_tokens": 3, **kwargs})


def test_mean_pool_cannot_generate(tiny):
    with pytest.raises(ValueError, match="pool='mean' cannot generate"):
        ob.generate(ob.Ouroboros.from_pretrained(tiny, pool="mean", device="cpu"), ids(), 3)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """Non-zero trainables of `tiny` saved at rank 4 with a step table of 8 (max_steps=8)."""
    file = tmp_path_factory.mktemp("trained") / "ouroboros.safetensors"
    model = ob.Ouroboros.from_pretrained(tiny, rank=4, max_steps=8, device="cpu")
    randomize_trainables(model).save_trainable(file)
    return file


@pytest.mark.parametrize("flag", [[], ["--baseline"], ["--full"], ["--trained"]])
def test_command_line_prints_a_continuation(tiny, trained, capsys, flag):
    flag = ["--trained", str(trained)] if flag == ["--trained"] else flag
    ob.main(["--model", str(tiny), "--prompt", "class Ouroboros", "--depth", "2",
             "--max-new-tokens", "8", "--top-k", "5", *flag])
    out, err = capsys.readouterr()
    assert out.startswith("class Ouroboros") and len(out) > len("class Ouroboros\n")
    assert "decode:" in err and "tokens/s" in err


@pytest.fixture(scope="module")
def other_trained(tmp_path_factory):
    """Trainables saved for another base (hidden 48, not 32)."""
    path = tmp_path_factory.mktemp("other")
    other = write_tiny(path / "model", ob.Qwen2Config(**{**vars(TINY), "hidden_size": 48}))
    ob.Ouroboros.from_pretrained(other, device="cpu").save_trainable(path / "t.safetensors")
    return path / "t.safetensors"


def test_trainables_of_another_model_are_refused(tiny, other_trained):
    with pytest.raises(ValueError, match="saved with other options .*config hidden_size: file 48, model 32"):
        ob.Ouroboros.from_pretrained(tiny, device="cpu").load_trainable(other_trained)


@pytest.mark.parametrize("change, message", [
    (dict(foo=1), "unknown option 'foo' in its metadata"),
    (dict(rank="eight"), "option 'rank' is 'eight' in its metadata: must be an integer"),
    (dict(gate=1), "option 'gate' is 1 in its metadata: must be true or false"),
    (dict(prelude="2"), "option 'prelude' is '2' in its metadata: must be an integer"),
])
def test_a_trained_file_with_unknown_or_ill_typed_options_is_one_line(tiny, trained, tmp_path, change, message):
    """Its metadata is read before anything loads: an option this version does not know, or one of
    the wrong type, is named, rather than a TypeError from Ouroboros.__init__."""
    with safe_open(trained, framework="pt", device="cpu") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta["ouroboros"] = json.dumps({**json.loads(meta["ouroboros"]), **change})
    save_file(tensors, tmp_path / "t.safetensors", metadata=meta)
    with pytest.raises(SystemExit) as e:
        ob.main(["--model", str(tiny), "--prompt", "hi", "--trained", str(tmp_path / "t.safetensors")])
    line = str(e.value.code)
    assert line.startswith(f"error: {tmp_path / 't.safetensors'}: {message}") and "\n" not in line, line


# Each case: extra arguments after "--model {tiny} --prompt hi" (a later flag wins), and what
# the error line says. {trained} was saved with max_steps=8; {tmp} is an empty folder.
BAD_GENERATIONS = {
    "empty prompt": (["--prompt", ""], "the prompt is empty"),
    "no new token": (["--max-new-tokens", "0"], "max_new_tokens=0: must be at least 1"),
    "top-k 0": (["--max-new-tokens", "4", "--top-k", "0"], "top_k=0: must be at least 1"),
    "negative temperature": (["--max-new-tokens", "4", "--temperature", "-0.5"],
                             "temperature=-0.5: must be at least 0"),
    "past the positions": (["--max-new-tokens", "100"], "+ max_new_tokens (100) exceeds the model's 64 positions"),
    "depth 0": (["--depth", "0"], "--depth 0 is outside 1..64"),
    "depth 65": (["--depth", "65"], "--depth 65 is outside 1..64"),
    "depth past the trained table": (["--trained", "{trained}", "--depth", "9"], "--depth 9 is outside 1..8"),
    "trained with full": (["--trained", "{trained}", "--full"], "--trained with --full"),
    "trained with baseline": (["--trained", "{trained}", "--baseline"], "--trained with --baseline"),
    "trained not found": (["--trained", "{tmp}/none.safetensors"], "none.safetensors: not found"),
    "trained is a folder": (["--trained", "{tmp}"], "{tmp}: a folder: give the file (OUT/ouroboros.safetensors)"),
    "trained is empty": (["--trained", ""], "--trained is empty: give the file train.py saved"),
    "metadata not its tensors": (["--trained", "{tmp}/rank8.safetensors"], "its tensors are not those of its "
                                 "options (controller.heads.weight: file (28, 128), model (56, 128)"),
    "a width of 0": (["--trained", "{tmp}/width0.safetensors"], "option 'controller_width' is 0 in its metadata: "
                     "must be above 0"),
    "trained is not ours": (["--trained", "{tiny}/model-00001-of-00002.safetensors"],
                            "not an Ouroboros trainable file"),
    "no model folder": (["--model", "{tmp}/none"], "--model {tmp}/none: no such folder"),
    "no config.json": (["--model", "{tmp}"], "{tmp}/config.json: not found"),
    "unknown device": (["--device", "tpu9"], "device 'tpu9': not a device torch knows"),
    "negative max-new-tokens": (["--max-new-tokens", "-1"], "max_new_tokens=-1: must be at least 1"),
    "temperature nan": (["--max-new-tokens", "4", "--temperature", "nan"],
                        "temperature=nan: must be at least 0 and finite"),
    "trained for another base": (["--trained", "{other}"],
                                 "saved with other options (config hidden_size: file 48, model 32"),
}


@pytest.mark.parametrize("case", list(BAD_GENERATIONS))
def test_command_line_refuses_bad_input_before_loading_weights(tiny, trained, other_trained, tmp_path, monkeypatch,
                                                               case):
    def load(*args):
        raise AssertionError("weights were loaded before the input was checked")
    monkeypatch.setattr(ob.Checkpoint, "__init__", load)
    args, message = BAD_GENERATIONS[case]

    def fill(text):
        return text.format(tiny=tiny, trained=trained, other=other_trained, tmp=tmp_path)

    with safe_open(trained, framework="pt", device="cpu") as f:  # rank-4 tensors under edited metadata
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    for name, change in (("rank8", dict(rank=8)), ("width0", dict(controller_width=0))):
        save_file(tensors, tmp_path / f"{name}.safetensors",
                  metadata={**meta, "ouroboros": json.dumps({**json.loads(meta["ouroboros"]), **change})})
    with pytest.raises(SystemExit) as e:
        ob.main(["--model", str(tiny), "--prompt", "hi", *map(fill, args)])
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line and fill(message) in line, line


@pytest.mark.parametrize("tokenizer, message", [
    (lambda text: text[:len(text) // 2], "tokenizer.json: not a readable tokenizer.json (EOF while parsing"),
    (lambda text: "garbage", "tokenizer.json: not a readable tokenizer.json (expected value"),
    (lambda text: re.sub(r'"z": \d+', '"z": 9999', text, count=1), None),  # the byte "z" is now id 9999
])
def test_generation_refuses_a_bad_tokenizer_json_in_one_line(tiny, tmp_path, monkeypatch, tokenizer, message):
    """A truncated or garbage tokenizer.json, or one whose ids do not fit the model, before any weight loads."""
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    text = (model / "tokenizer.json").read_text()
    (model / "tokenizer.json").write_text(tokenizer(text))
    monkeypatch.setattr(ob.Checkpoint, "__init__", lambda *a: pytest.fail("weights loaded before the check"))
    with pytest.raises(SystemExit) as e:
        ob.main(["--model", str(model), "--prompt", "z", "--max-new-tokens", "4"])
    line = str(e.value.code)
    assert line.startswith(f"error: {model}") and "\n" not in line, line
    assert (message or f"gives the prompt token id 9999, outside the vocabulary 0..{TINY.vocab_size - 1}") in line


@pytest.mark.parametrize("args, status, message", [
    (["--depth", "0"], 1, "error: --depth 0 is outside 1..64 (max_steps)\n"),
    (["--prompt", ""], 1, "error: the prompt is empty: give at least one token\n"),
    (["--depth", "four"], 2, "argument --depth: invalid int value: 'four'\n"),  # argparse: usage, then this
])
def test_generation_command_exit_status(tiny, args, status, message):
    """The real command: 1 and one line for refused input, 2 for a usage error (argparse)."""
    run = subprocess.run([sys.executable, "ouroboros.py", "--model", str(tiny), "--prompt", "hi", *args],
                         cwd=HERE, capture_output=True, text=True)
    assert run.returncode == status and run.stderr.endswith(message), run.stderr
    assert status == 2 or run.stderr == message


# ----------------------------------------------------------------------------------------
# Beyond the paper: per-token adaptive depth (ACT halting) and coda adapters


def halting_model(tiny, bias=None, **options):
    """A halting model with random trainables; `bias` sets the halting head's (λ = σ(bias))."""
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, halting=True, device="cpu", **options))
    if bias is not None:
        with torch.no_grad():
            model.halt.weight.zero_()
            model.halt.bias.fill_(bias)
    return model


def test_fresh_halting_runs_every_step_with_the_remainder_on_the_last():
    """λ = σ(-3) = 0.0474 at init: after 3 of 4 steps the halting weights sum to 0.142 < 0.99, so
    every position takes all 4 steps and the last gets the remainder R = 1 - 3 σ(-3) = 0.858;
    the ponder cost is 4 + R."""
    torch.manual_seed(0)
    model = ob.Ouroboros.from_config(TINY, halting=True, device="cpu")
    model(ids(), depth=4)
    lam = torch.sigmoid(torch.tensor(-3.0))
    assert (model.last_halting.steps == 4).all()
    torch.testing.assert_close(model.last_halting.remainder, (1 - 3 * lam).expand(2, 12))
    torch.testing.assert_close(model.last_halting.ponder, (5 - 3 * lam).expand(2, 12))


def test_a_token_that_halts_at_once_is_the_depth_1_model(tiny):
    """λ_0 = σ(6) = 0.9975 >= 1 - ε: every position stops after step 0 with weight R = 1, so the coda
    reads h_0: the logits of the plain model at depth 1, whatever the most steps allowed."""
    model = halting_model(tiny, bias=6.0)
    plain = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    plain.load_state_dict(model.state_dict(), strict=False)
    idx = ids()
    torch.testing.assert_close(model(idx, depth=8)[0], plain(idx, depth=1)[0])
    assert (model.last_halting.steps == 1).all()


def test_halting_is_causal_and_tokens_take_different_depths(tiny):
    model = halting_model(tiny)
    with torch.no_grad():
        model.halt.bias.fill_(-0.3)  # λ near 0.4, moved by the state: 2 or 3 steps each, mostly
    idx = ids(B=2, T=16)
    logits, _ = model(idx, depth=6)
    steps = model.last_halting.steps.clone()
    assert len(steps.unique()) > 1  # the depth is per token
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % TINY.vocab_size
    torch.testing.assert_close(model(changed, depth=6)[0][:, :10], logits[:, :10])
    assert torch.equal(model.last_halting.steps[:, :10], steps[:, :10])


@pytest.mark.parametrize("B", [1, 3])
def test_cached_greedy_with_halting_equals_recomputation(tiny, B, monkeypatch):
    """A halted token's state is carried, and its K/V at the steps it skips are recomputed from it;
    decoding one token at a time takes the skip path (K/V only) once every row has halted."""
    model = halting_model(tiny)
    with torch.no_grad():
        model.halt.bias.fill_(-0.3)
    prompt = ids(B=B, T=7)
    with torch.no_grad():
        expected = greedy_by_recomputation(lambda x: model(x, depth=6), prompt, 12)
        model(expected, depth=6)
    assert len(model.last_halting.steps.unique()) > 1
    skipped = []
    original = ob.Halting.skip
    monkeypatch.setattr(ob.Halting, "skip", staticmethod(lambda *a: (skipped.append(1), original(*a))))
    assert torch.equal(ob.generate(model, prompt, 12, depth=6, top_k=1), expected)
    assert skipped  # the K/V-only path ran and agreed


@pytest.mark.parametrize("which", ["qwen2", "dynamic", "static", "halting"])
def test_compiled_decoding_equals_eager_decoding_in_one_graph(tiny, which, monkeypatch):
    """generate(compile=True): after the prefill, each token runs a compiled step. The caches keep their
    shapes and positions are tensors, so dynamo traces one graph for every token: no recompilation and
    no graph break (halting excepted: its "have all rows halted?" is a host decision). The tokens are
    the eager ones. Dynamo's "eager" backend here (inductor's C++ build would take minutes on a CPU):
    what is tested is the tracing, which the GPU's CUDA graphs need too."""
    import functools
    from torch._dynamo.utils import counters
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    model = (ob.Qwen2.from_pretrained(tiny, device="cpu") if which == "qwen2" else halting_model(tiny, -0.3)
             if which == "halting" else randomize_trainables(ob.Ouroboros.from_pretrained(
                 tiny, controller=which, device="cpu")))
    prompt = ids(B=2, T=7)
    eager = ob.generate(model, prompt, 10, depth=3, top_k=1)
    torch._dynamo.reset()
    counters.clear()
    assert torch.equal(ob.generate(model, prompt, 10, depth=3, top_k=1, compile=True), eager)
    if which != "halting":
        assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters)


def test_forward_flops_is_what_a_decoded_token_that_halts_costs(tiny):
    """A token that halts at once (λ = σ(6)) with at most 4 steps runs step 0 and, at steps 1-3,
    only its K/V and the Controller: torch's count of that decode call's matmuls is
    ob.forward_flops(model, 1, 4), give or take the attention scores over the 8 cached positions
    (which the formula leaves out). A token that ran all 4 steps would cost more."""
    from torch.utils.flop_counter import FlopCounterMode
    model = halting_model(tiny, bias=6.0)
    prompt = ids(B=1, T=7)
    position = ob.Position(8, "cpu")
    caches = ob.Caches(position)
    with torch.no_grad():
        model(prompt, 4, caches=caches)
        position.advance(prompt.size(1))
        with FlopCounterMode(display=False) as counter:
            model(prompt[:, :1], 4, caches=caches)
    scores = 4 * TINY.hidden_size * 8 * (len(model.prelude) + 1 + len(model.coda))
    assert 0 <= counter.get_total_flops() - ob.forward_flops(model, 1, 4) <= scores
    assert ob.forward_flops(model, 4, 4) > ob.forward_flops(model, 1, 4) + scores


def test_coda_adapters_leave_a_fresh_model_unchanged_and_the_baseline_alone(tiny):
    plain = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    adapted = ob.Ouroboros.from_pretrained(tiny, coda_rank=4, device="cpu")
    idx = ids()
    assert torch.equal(adapted(idx, depth=2)[0], plain(idx, depth=2)[0])  # B = 0
    randomize_trainables(adapted)
    assert not torch.allclose(adapted(idx, depth=2)[0], plain(idx, depth=2)[0])
    assert torch.equal(adapted.baseline(idx)[0], plain.baseline(idx)[0])  # the trunk has no adapters


@pytest.mark.parametrize("options", [dict(halting=True), dict(coda_rank=3), dict(controller_width=40)])
def test_beyond_the_paper_options_train_save_and_load(tiny, tmp_path, options):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu", **options))
    idx = ids()
    model(idx, depth=3, targets=idx.roll(-1, 1))[1].backward()
    for name, p in model.named_trainable():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.save_trainable(tmp_path / "t.safetensors")
    fresh = ob.Ouroboros.from_pretrained(tiny, device="cpu", **options)
    fresh.load_trainable(tmp_path / "t.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx, depth=3)[0], model(idx, depth=3)[0])
    with pytest.raises(ValueError, match="saved with other options"):
        ob.Ouroboros.from_pretrained(tiny, device="cpu").load_trainable(tmp_path / "t.safetensors")


@pytest.mark.parametrize("options, extra", [
    (dict(coda_rank=8), 8 * 8 * (4096 + 2304 + 2304 + 4096 + 3 * 13056)),
    (dict(halting=True), 2048 + 1),
    (dict(controller_width=256), 1_590_528 - 664_192 + 7 * 8 * (256 - 128))])
def test_beyond_the_paper_trainable_counts_of_qwen25_3b(options, extra):
    """Coda adapters: r (in + out) per projection: q, o 2048 + 2048; k, v 2048 + 256; gate, up, down
    2048 + 11008; 8 coda layers. Halting: w (2048) and b. Controller of width E = 256:
    2048·512+512 + 64·256 + 768·512+512 + 512·256+256 = 1,590,528 (664,192 at E = 128),
    and heads 7·E·r."""
    model = ob.Ouroboros.from_config(QWEN25_3B, device="meta", **options)
    assert sum(p.numel() for p in model.trainable_parameters()) == 9_193_088 + extra


# ----------------------------------------------------------------------------------------
# train.py and data/prepare.py, on a small random model: a 6-layer Qwen2 in the Hugging Face
# layout, a tokenizer trained on this repository's text, and data made by the real data/prepare.py.

SMALL = ob.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       rope_theta=10000.0, tie_word_embeddings=True)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(model dir, data dir): made once, read by every test (never written to). A paragraph of
    this repository's .py and .md files is a document."""
    out, texts = tmp_path_factory.mktemp("demo"), [f.read_text() for f in sorted(HERE.glob("*.[pm][yd]"))]
    torch.manual_seed(0)
    write_checkpoint(out / "model", SMALL.to_dict(), ob.Qwen2.from_config(SMALL, device="cpu").state_dict())
    prepare.train_tokenizer(texts, out / "model", SMALL.vocab_size)
    docs = [p for t in texts for p in t.split("\n\n") if p.strip()]
    (out / "demo.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare.prepare([out / "demo.jsonl"], out / "model", out / "data", val_fraction=0.1, log=lambda *a, **k: None)
    return out / "model", out / "data"


def run_args(demo, out, *extra):
    """A tiny but complete run: 4 updates of 2 x 2 sequences of 16 tokens."""
    model, data = demo
    return ["--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu", "--steps", "4",
            "--batch-size", "2", "--grad-accum", "2", "--seq-len", "16", "--warmup", "1", "--lr", "1e-2",
            "--eval-every", "2", "--eval-batches", "2", "--save-every", "2", "--depth", "2", "--final-tokens", "512",
            *extra]


def metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def error_line(argv):
    """Run train.main and return its error line; it must be one line and say 'error:'."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message

# ----------------------------------------------------------------------------------------
# data/prepare.py


def write_docs(folder, docs, kind):
    """The documents as one .jsonl, or as one .txt per document."""
    folder.mkdir(parents=True)
    if kind == "jsonl":
        (folder / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    else:
        for i, d in enumerate(docs):
            (folder / f"{i:03d}.txt").write_text(d)


def quiet(*args, **kwargs):
    pass


def read_back(out, split, tokenizer):
    """The documents of out/{split}.bin: its ids cut at each EOS, decoded."""
    tok, eos, _ = prepare.load_tokenizer(tokenizer)
    ids = np.fromfile(Path(out) / f"{split}.bin", dtype=np.uint32)
    assert ids[-1] == eos
    cuts = np.flatnonzero(ids == eos)
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip([-1, *cuts[:-1]], cuts)]


@pytest.mark.parametrize("kind", ["jsonl", "txt"])
@pytest.mark.parametrize("as_folder", [True, False])
def test_prepare_round_trip(tmp_path, demo, kind, as_folder):
    """Decoding train.bin and val.bin, cut at EOS, gives back every document exactly once, the
    held-out ones being every 4th (val fraction 0.25: documents 3, 7, 11, ...)."""
    docs = [f"Document {i}: the quick brown fox jumps over {i} lazy dogs.\nÜnïcödé ✓" for i in range(12)]
    write_docs(tmp_path / "in", docs, kind)
    inputs = [tmp_path / "in"] if as_folder else sorted((tmp_path / "in").iterdir())
    meta = prepare.prepare(inputs, demo[0], tmp_path / "out", val_fraction=0.25, log=quiet)
    tok, eos, sha = prepare.load_tokenizer(demo[0])
    assert read_back(tmp_path / "out", "val", demo[0]) == [docs[i] for i in (3, 7, 11)]
    assert read_back(tmp_path / "out", "train", demo[0]) == [d for i, d in enumerate(docs) if i not in (3, 7, 11)]
    for split in ("train", "val"):
        assert (tmp_path / "out" / f"{split}.bin").stat().st_size == 4 * meta[f"{split}_tokens"]
    assert meta["tokenizer_sha256"] == sha and meta["eos_id"] == eos and meta["vocab_size"] == tok.get_vocab_size()
    assert (meta["train_documents"], meta["val_documents"]) == (9, 3)
    assert (meta["files"], meta["empty_skipped"]) == (12 if kind == "txt" else 1, 0)
    assert json.loads((tmp_path / "out" / "meta.json").read_text()) == meta
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin",
                                                                "val_documents.json"]


def test_lone_text_file_is_cut_at_blank_lines(tmp_path, demo):
    """A file given alone is cut where two or more line ends have only whitespace between them;
    single line ends and indentation stay. 8 paragraphs at val fraction 0.25: 3 and 7 held out."""
    paragraphs = [f"Paragraph {i}:\n    line two of {i}." for i in range(8)]
    separators = ["\n\n", "\n\n\n", "\n \t\n", "\n\n  \n\n"]
    text = "\n\n" + "".join(p + separators[i % 4] for i, p in enumerate(paragraphs[:-1])) + paragraphs[-1]
    (tmp_path / "notes").write_text(text)  # any name: a file named on the command line is text
    meta = prepare.prepare([tmp_path / "notes"], demo[0], tmp_path / "out", val_fraction=0.25, log=quiet)
    assert read_back(tmp_path / "out", "val", demo[0]) == [paragraphs[3], paragraphs[7]]
    assert read_back(tmp_path / "out", "train", demo[0]) == [p for i, p in enumerate(paragraphs) if i % 4 != 3]
    assert meta["empty_skipped"] == 0  # the leading blank lines are a separator, not a document


def test_lone_text_file_of_few_paragraphs_holds_out_its_last_at_the_default_fraction(tmp_path, demo):
    """5 paragraphs at the default fraction 0.005: every-200th would hold out none, so the last
    one is held out (a user's first notes.md must not be refused)."""
    paragraphs = [f"Paragraph {i}." for i in range(5)]
    (tmp_path / "notes.md").write_text("\n\n".join(paragraphs))
    meta = prepare.prepare([tmp_path / "notes.md"], demo[0], tmp_path / "out", log=quiet)
    assert read_back(tmp_path / "out", "val", demo[0]) == paragraphs[4:]
    assert read_back(tmp_path / "out", "train", demo[0]) == paragraphs[:4]
    assert (meta["train_documents"], meta["val_documents"]) == (4, 1)


def test_lone_text_file_without_blank_lines_is_cut_every_4096_characters_at_a_line_end():
    """100 lines of 101 characters: 40 lines (4,040 characters) is the most that fits in 4,096,
    so the pieces are 40, 40 and 20 lines. A 5,000-character line with no line end is cut at 4,096."""
    lines = [f"line {i:04d} " + "x" * 90 + "\n" for i in range(100)]
    assert prepare.split_text("".join(lines)) == ["".join(lines[:40]), "".join(lines[40:80]), "".join(lines[80:])]
    assert prepare.split_text("a" * 5000) == ["a" * 4096, "a" * 904]
    assert prepare.split_text("one paragraph\n\n") == ["one paragraph\n\n"]  # 1 paragraph: by size


def test_named_files_are_text_and_folders_take_known_extensions_and_ext(tmp_path, demo):
    for name in ["a.md", "b.py", "c.rst", "d.txt", "e.foo", "f.csv", "sub/g.txt", ".git/h.txt", "README"]:
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_text(f"text of {name}")

    def inputs(*argv):
        prepare.main([*map(str, argv), "--tokenizer", str(demo[0]), "--out", str(tmp_path / "out"),
                      "--val-fraction", "0.5", "--overwrite"])
        return [Path(f).relative_to(tmp_path / "in").as_posix()
                for f in json.loads((tmp_path / "out" / "meta.json").read_text())["inputs"]]
    assert inputs(tmp_path / "in") == ["a.md", "b.py", "c.rst", "d.txt", "sub/g.txt"]  # not hidden .git
    more = ["a.md", "b.py", "c.rst", "d.txt", "e.foo", "f.csv", "sub/g.txt"]
    assert inputs(tmp_path / "in", "--ext", "foo,.csv") == more
    assert inputs(tmp_path / "in", "--ext", ".foo", "--ext", "csv") == more
    assert inputs(*(tmp_path / "in" / n for n in ("f.csv", "README", "b.py"))) == ["f.csv", "README", "b.py"]


def test_empty_documents_are_skipped_and_counted(tmp_path, demo, capsys):
    """Empty and whitespace-only documents take no number: of the 2 with text, the second is
    held out at val fraction 0.5."""
    write_docs(tmp_path / "in", ["", "first", " \n\t", "second"], "txt")
    (tmp_path / "in" / "more.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    prepare.main([str(tmp_path / "in"), "--tokenizer", str(demo[0]), "--out", str(tmp_path / "out"),
                  "--val-fraction", "0.5"])
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert (meta["files"], meta["empty_skipped"], meta["train_documents"], meta["val_documents"]) == (5, 4, 1, 1)
    assert read_back(tmp_path / "out", "val", demo[0]) == ["second"]
    assert "from 5 file(s); 4 empty document(s) skipped" in capsys.readouterr().out


def test_inputs_sha256_is_the_sha256_of_what_sha256sum_prints(tmp_path, demo):
    """`cd in && sha256sum 000.txt sub/001.txt | sha256sum`: each file's hash and its path relative
    to the INPUT, in reading order. Moving the folder keeps it; changing a byte changes it."""
    write_docs(tmp_path / "in", ["alpha beta", "gamma delta"], "txt")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "001.txt").rename(tmp_path / "in" / "sub" / "001.txt")

    def sha(data):
        return hashlib.sha256(data).hexdigest()
    listing = "".join(f"{sha((tmp_path / 'in' / n).read_bytes())}  {n}\n" for n in ("000.txt", "sub/001.txt"))
    first = prepare.prepare([tmp_path / "in"], demo[0], tmp_path / "o1", 0.5, log=quiet)
    assert first["inputs_sha256"] == sha(listing.encode())
    (tmp_path / "in").rename(tmp_path / "moved")
    assert prepare.prepare([tmp_path / "moved"], demo[0], tmp_path / "o2", 0.5, log=quiet)["inputs_sha256"] == \
        first["inputs_sha256"]
    (tmp_path / "moved" / "sub" / "001.txt").write_text("gamma delta!")
    assert prepare.prepare([tmp_path / "moved"], demo[0], tmp_path / "o3", 0.5, log=quiet)["inputs_sha256"] != \
        first["inputs_sha256"]


def test_prepare_trains_a_tokenizer_on_the_training_documents_only(tmp_path):
    """Documents 3 and 7 (held out at 0.25) are one made-up word repeated: a BPE trained on them
    would merge its letters first. None of its pairs is in the training documents."""
    docs = [f"The cat sat on mat number {i}. " * 5 for i in range(8)]
    docs[3] = docs[7] = "zyqzyq " * 200
    write_docs(tmp_path / "in", docs, "jsonl")
    meta = prepare.prepare([tmp_path / "in"], None, tmp_path / "out", 0.25, vocab_size=300, log=quiet)
    tok, eos, sha = prepare.load_tokenizer(tmp_path / "out")
    assert (meta["tokenizer_sha256"], meta["eos_id"], meta["vocab_size"]) == (sha, eos, tok.get_vocab_size())
    assert not [t for t in tok.get_vocab() if "zy" in t or "yq" in t or "qz" in t]
    assert read_back(tmp_path / "out", "val", tmp_path / "out") == [docs[3], docs[7]]  # bytes cover any text
    assert read_back(tmp_path / "out", "train", tmp_path / "out") == [d for i, d in enumerate(docs) if i % 4 != 3]


def test_prepare_parquet_without_pyarrow_says_so(tmp_path, demo, monkeypatch):
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now fails, as when not installed
    with pytest.raises(SystemExit) as e:
        prepare.main([str(tmp_path / "x.parquet"), "--tokenizer", str(demo[0]), "--out", str(tmp_path / "o")])
    assert "pyarrow" in str(e.value.code) and "x.parquet" in str(e.value.code)


def two_docs(d):
    (d / "a.txt").write_text("one\n\ntwo")


TOK = ["--tokenizer", "MODEL"]  # MODEL: the demo's model folder


@pytest.mark.parametrize("setup, flags, expected", [
    (lambda d: (d / "a.jsonl").write_text('{"txt": 1}\n'), TOK, "a.jsonl:1: not a JSON object with a 'text' field"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "x"}\n{"text": 1}\n'), TOK,
     "a.jsonl:2: not a JSON object with a 'text' field"),
    (lambda d: (d / "a.txt").write_bytes(b"\xff\xfe bad"), TOK, "not UTF-8"),
    (lambda d: (d / "a.txt").write_text("one document only"), TOK, "leave a split empty"),
    (lambda d: (d / "a.txt").write_text(" \n\n \n"), TOK, "leave a split empty"),
    (two_docs, [*TOK, "--val-fraction", "1"], "--val-fraction 1.0 must be between 0 and 1"),
    (two_docs, [*TOK, "--train-tokenizer", "300"], "give either --tokenizer or --train-tokenizer N"),
    (two_docs, [], "give either --tokenizer or --train-tokenizer N"),
    (two_docs, ["--train-tokenizer", "100"], "--train-tokenizer 100: must be at least 257"),
    (lambda d: (d / "a.txt").write_text("one document only"), ["--train-tokenizer", "300"], "leave a split empty"),
    (lambda d: (d / "a.jsonl").write_text('{"text": "x"}\n{"txt": 1}\n'), ["--train-tokenizer", "300"],
     "a.jsonl:2: not a JSON object with a 'text' field"),
])
def test_prepare_bad_input_is_one_line_and_leaves_nothing(tmp_path, demo, setup, flags, expected):
    setup(tmp_path)
    with pytest.raises(SystemExit) as e:
        prepare.main([str(next(tmp_path.iterdir())), "--out", str(tmp_path / "o" / "data"),
                      *(str(demo[0]) if f == "MODEL" else f for f in flags)])
    assert expected in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "o").exists()  # not even the folders --out would have made


def test_failed_prepare_leaves_the_old_data_untouched(tmp_path, demo):
    write_docs(tmp_path / "good", ["first", "second", "third", "fourth"], "jsonl")
    prepare.prepare([tmp_path / "good"], None, tmp_path / "out", 0.5, vocab_size=260, log=quiet)
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    (tmp_path / "bad.jsonl").write_text('{"text": "new"}\n' * 3000 + "not json\n")  # fails after a batch
    for tokenizer, vocab_size in ((demo[0], None), (None, 300)):
        with pytest.raises(ValueError, match="bad.jsonl:3001"):
            prepare.prepare([tmp_path / "bad.jsonl"], tokenizer, tmp_path / "out", 0.5, vocab_size=vocab_size,
                            log=quiet, overwrite=True)
        assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "good", "out"]  # no staging folder left


def test_prepare_never_replaces_what_is_in_out_unless_told(tmp_path, demo):
    """A second run on the same --out is refused (the first's files kept); --overwrite replaces the data
    whole, leaving no file of the old run; a folder of other files is never replaced."""
    write_docs(tmp_path / "a", ["first", "second", "third", "fourth"], "jsonl")
    write_docs(tmp_path / "b", ["fifth", "sixth", "seventh", "eighth", "ninth", "tenth"], "jsonl")
    prepare.prepare([tmp_path / "a"], demo[0], tmp_path / "out", 0.5, log=quiet)
    (tmp_path / "out" / "prose.bin").write_bytes(b"\0" * 8)  # a file another stage added to the data
    before = {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()}
    with pytest.raises(SystemExit) as e:
        prepare.main([str(tmp_path / "b"), "--tokenizer", str(demo[0]), "--out", str(tmp_path / "out")])
    assert str(e.value.code) == (f"error: --out {tmp_path}/out: holds prepared data (meta.json); give another "
                                 "--out, or --overwrite to replace it")
    assert {f.name: f.read_bytes() for f in (tmp_path / "out").iterdir()} == before
    prepare.main([str(tmp_path / "b"), "--tokenizer", str(demo[0]), "--out", str(tmp_path / "out"), "--overwrite",
                  "--val-fraction", "0.5"])
    assert sorted(f.name for f in (tmp_path / "out").iterdir()) == ["meta.json", "train.bin", "val.bin",
                                                                "val_documents.json"]
    assert json.loads((tmp_path / "out" / "meta.json").read_text())["train_documents"] == 3
    (tmp_path / "out" / "state.json").write_text("{}")  # a run someone saved in the data folder
    with pytest.raises(ValueError, match="out: holds state.json besides the data, which --overwrite would delete"):
        prepare.prepare([tmp_path / "a"], demo[0], tmp_path / "out", 0.5, log=quiet, overwrite=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"mine: holds files not made by data/prepare.py \(no meta.json\)"):
        prepare.prepare([tmp_path / "a"], demo[0], tmp_path / "mine", 0.5, log=quiet, overwrite=True)
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_prepared_data_has_the_permissions_of_a_folder_made_by_mkdir(tmp_path, demo):
    """The data is made in a private temporary folder, then renamed: it must not stay private."""
    write_docs(tmp_path / "a", ["first", "second", "third", "fourth"], "jsonl")
    (tmp_path / "made").mkdir()
    prepare.prepare([tmp_path / "a"], demo[0], tmp_path / "out", 0.5, log=quiet)
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "made").stat().st_mode


def test_prepare_refuses_an_out_inside_its_input_and_an_input_inside_its_out(tmp_path, demo):
    """Else a second run reads its own meta.json and tokenizer.json as documents, or replaces its input."""
    write_docs(tmp_path / "in", ["first", "second", "third", "fourth"], "jsonl")
    with pytest.raises(ValueError, match=f"--out {tmp_path}/in/data: inside the input {tmp_path}/in "):
        prepare.prepare([tmp_path / "in"], demo[0], tmp_path / "in" / "data", 0.5, log=quiet)
    with pytest.raises(ValueError, match=f"{tmp_path}/in/docs.jsonl: inside --out {tmp_path}/in, which this run"):
        prepare.prepare([tmp_path / "in" / "docs.jsonl"], demo[0], tmp_path / "in", 0.5, log=quiet)
    assert [f.name for f in (tmp_path / "in").iterdir()] == ["docs.jsonl"]


@pytest.mark.parametrize("out, expected", [
    ("file/data", "--out {tmp}/file/data: {tmp}/file is a file, not a folder"),
    ("file", "--out {tmp}/file: {tmp}/file is a file, not a folder"),
    ("locked/new/data", "--out {tmp}/locked/new/data: {tmp}/locked is not writable"),
])
def test_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch, out, expected):
    """Checked first: the missing input and tokenizer are not even looked at. Nothing is made."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "locked").mkdir()
    allowed = os.access  # as for a user without write permission (root may write anywhere)
    monkeypatch.setattr(prepare.os, "access", lambda p, mode: Path(p) != tmp_path / "locked" and allowed(p, mode))
    listing = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        prepare.main([str(tmp_path / "none.txt"), "--tokenizer", str(tmp_path / "none"),
                      "--out", str(tmp_path / out)])
    assert e.value.code == "error: " + expected.format(tmp=tmp_path)
    with pytest.raises(ValueError, match="is not writable" if "locked" in out else "is a file"):
        prepare.check_out(tmp_path / out, "--out")
    assert sorted(tmp_path.rglob("*")) == listing


# ----------------------------------------------------------------------------------------
# The batch, the loss and the schedule


class BatchShape:
    batch_size, seq_len, grad_accum = 3, 8, 2


def test_loss_uses_targets_shifted_once(demo):
    """On the tokens 0, 1, 2, ... every target is its input + 1 (shifted twice it would be + 2), and
    the model's loss on (x, y) is the cross-entropy of logits[:, t] against the token at t + 1."""
    x, y = train.get_batch(np.arange(500, dtype=np.uint32), BatchShape, (0, 0, 0, 0), 0, "cpu")
    assert x.shape == y.shape == (3, 8) and torch.equal(y, x + 1)
    model = ob.Ouroboros.from_pretrained(demo[0], device="cpu")
    tokens = np.fromfile(demo[1] / "train.bin", dtype=np.uint32)
    x, y = train.get_batch(tokens, BatchShape, (0, 0, 0, 0), 0, "cpu")
    logits, loss = model(x, 2, y)
    window = torch.cat([x, y[:, -1:]], 1)  # (B, T+1): the tokens as they lie in the file
    torch.testing.assert_close(loss, F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()))


def test_batch_is_a_pure_function_of_seed_step_micro_rank():
    tokens = np.arange(10_000, dtype=np.uint32)
    batch = {key: train.get_batch(tokens, BatchShape, key[:4], key[4], "cpu")[0]
             for key in [(0, 0, 5, 0, 0), (0, 0, 5, 0, 1), (0, 0, 5, 1, 0), (0, 0, 6, 0, 0), (1, 0, 5, 0, 0)]}
    assert torch.equal(batch[0, 0, 5, 0, 0], train.get_batch(tokens, BatchShape, (0, 0, 5, 0), 0, "cpu")[0])
    assert len({tuple(b.flatten().tolist()) for b in batch.values()}) == len(batch)  # every key its own batch


def test_lr_schedule_warmup_then_cosine_in_optimizer_steps(tmp_path, demo):
    """Warmup 2 of 10 steps: lr/2, lr, then cosine: at step 6 (half of the 8 cosine steps) the mean
    of lr and min-lr. A run with 3 micro-steps per update logs one line per optimizer step, each
    with get_lr of that step: the schedule counts optimizer steps, not micro-steps."""
    class A:
        lr, min_lr, warmup, steps = 1.0, 0.1, 2, 10
    assert [train.get_lr(s, A) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1])
    assert train.get_lr(9, A) < train.get_lr(8, A) < train.get_lr(7, A)
    train.main(run_args(demo, tmp_path, "--grad-accum", "3", "--steps", "5", "--warmup", "2"))
    args = train.parse_args(run_args(demo, tmp_path, "--steps", "5", "--warmup", "2"))
    assert [m["lr"] for m in metrics(tmp_path)] == [train.get_lr(s, args) for s in range(5)]


def test_grad_accumulation_matches_one_big_batch(tmp_path, demo):
    """2 sequences in one micro-batch or 1 + 1 in two: the same tokens, the same mean loss and
    gradient norm (a sum instead of a mean would double it), the same weights after 2 updates."""
    one = train.main(run_args(demo, tmp_path / "a", "--steps", "2", "--batch-size", "2", "--grad-accum", "1"))
    two = train.main(run_args(demo, tmp_path / "b", "--steps", "2", "--batch-size", "1", "--grad-accum", "2"))
    for m, n in zip(metrics(tmp_path / "a"), metrics(tmp_path / "b")):
        assert (m["loss"], m["grad_norm"]) == pytest.approx((n["loss"], n["grad_norm"]), rel=1e-5)
    for p, q in zip(one.trainable_parameters(), two.trainable_parameters()):
        # Adam divides by sqrt(v): the Controller's gradients at update 2 are tiny (its heads were
        # zero at update 1), so their round-off moves a weight by a fraction of one lr (1e-2) step.
        torch.testing.assert_close(p, q, rtol=0, atol=1e-3)
    assert not torch.equal(one.gate.bias, torch.full_like(one.gate.bias, -2.0))  # it did train


def test_trainables_are_float32_master_weights(tmp_path, demo):
    """Frozen weights bf16, trainables float32: one AdamW step of lr 1e-4 moves the gate bias from
    -2 by ~1e-4, far below bf16's spacing of 2^-6 = 0.0156 there, so a bf16 copy would not move."""
    model = train.main(run_args(demo, tmp_path, "--dtype", "bfloat16", "--steps", "1", "--warmup", "0",
                                "--lr", "1e-4"))
    assert model.base.model.norm.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.trainable_parameters())
    moved = (model.gate.bias.detach() + 2).abs()
    # Nearly all move (a gradient summed in bf16 may round a rare small entry to 0), none by more than lr
    assert (moved > 1e-5).float().mean() > 0.9 and (moved < 2e-4).all()
    assert (model.gate.bias.to(torch.bfloat16) == -2).all()


def test_depths_draws_each_update_from_the_list(tmp_path, demo):
    train.main(run_args(demo, tmp_path, "--depths", "1,3", "--steps", "8", "--eval-every", "100"))
    assert {m["depth"] for m in metrics(tmp_path)} == {1, 3}


def test_flops_per_token_matches_torch_flop_counter(demo):
    """The MFU formula against torch's own count of the matmuls of one forward + backward, less
    what is recomputed (MFU counts the model's FLOPs, not recomputation): with checkpointing, one
    more forward of each loop step, counted here on its own. The formula counts the input gradients of
    every matmul of the loop; at step 0 the input (the prelude's output) needs none, so it may exceed
    the count a little."""
    from torch.utils.flop_counter import FlopCounterMode
    model = ob.Ouroboros.from_pretrained(demo[0], device="cpu")
    cfg, x = model.cfg, torch.randint(0, 500, (2, 32))
    with FlopCounterMode(display=False) as steps, torch.no_grad():
        h = torch.randn(2, 32, cfg.hidden_size)
        for s in range(3):
            h = model.step(h, s, ob.rope(cfg, torch.arange(32)))
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        with FlopCounterMode(display=False) as counter:
            model(x, 3, x)[1].backward()
        recomputed = checkpointing * steps.get_total_flops()
        formula = ob.flops_per_token(model, 3, 32) * x.numel()
        assert 1.0 <= formula / (counter.get_total_flops() - recomputed) < 1.05, checkpointing


# ----------------------------------------------------------------------------------------
# Evaluation, checkpoints, resume


def test_final_table_is_one_protocol_with_reduction_and_gap(tmp_path, demo):
    """results.json: baseline, full and ours under evaluate_final's protocol. The baseline's held-out
    loss is recomputed here by hand: non-overlapping windows spread evenly over the whole split, in
    batches of --batch-size, mean next-token cross-entropy per batch (windows.json keeps those); and
    the percentages follow (base - ours) / base and (base - ours) / (base - full)."""
    train.main(run_args(demo, tmp_path, "--eval-full"))
    res = json.loads((tmp_path / "results.json").read_text())
    scored = json.loads((tmp_path / "windows.json").read_text())
    args = train.parse_args(run_args(demo, tmp_path))
    model = ob.Ouroboros.from_pretrained(demo[0], device="cpu")
    val = np.fromfile(demo[1] / "val.bin", dtype=np.uint32)
    T, B = args.seq_len, args.batch_size
    slots = (len(val) - 1) // T
    n = min(slots, args.final_tokens // T)
    starts = [i * slots // n * T for i in range(n - n % B)]
    assert len(set(starts)) == len(starts) and all(b - a >= T for a, b in zip(starts, starts[1:]))  # no overlap
    assert starts[-1] + T + 1 <= len(val) and (n < slots or starts[-1] // T == slots - 1)  # spread to the end
    by_hand = []
    for i in range(0, len(starts), B):
        w = torch.from_numpy(np.stack([val[j:j + T + 1] for j in starts[i:i + B]]).astype(np.int64))
        by_hand.append(F.cross_entropy(model.baseline(w[:, :-1])[0].flatten(0, 1), w[:, 1:].flatten()).item())
    assert scored["baseline"]["held-out"] == pytest.approx(by_hand, rel=1e-5)
    assert res["baseline"]["held-out"] == pytest.approx(np.mean(by_hand), rel=1e-6)
    assert res["run"]["final_batches"]["held-out"] == len(by_hand) > 1
    for s in ("train", "held-out"):
        b, f, o = res["baseline"][s], res["full"][s], res["ours"][s]
        assert res["loss reduction %"][s] == pytest.approx(100 * (b - o) / b)
        assert res["gap recovered %"][s] == pytest.approx(100 * (b - o) / (b - f))
        assert res["ours"][s] == pytest.approx(np.mean(scored["ours"][s]))
    assert [m["step"] for m in metrics(tmp_path) if "val_loss" in m] == [2, 4]  # --eval-every 2


def test_adaptive_depth_and_coda_adapters_train_and_report_depth_and_flops(tmp_path, demo):
    """--ponder-cost: the log and results.json give the steps a token took (fewer than --depth once
    the halting head learns), and the forward FLOPs per token that depth costs; --coda-rank
    adds adapters. The trained file loads and generates through the command line."""
    train.main(run_args(demo, tmp_path, "--ponder-cost", "0.5", "--coda-rank", "2", "--depth", "4", "--lr", "0.3"))
    res, log = json.loads((tmp_path / "results.json").read_text()), metrics(tmp_path)
    assert {m["depth"] for m in log} == {4}  # the most steps
    assert 1 <= min(m["steps"] for m in log) and max(m["steps"] for m in log) <= 4
    assert log[-1]["steps"] < 4  # a high ponder cost and lr: the tokens learned to stop early
    model = ob.Ouroboros.from_pretrained(demo[0], device="cpu", halting=True, coda_rank=2)
    for s in ("train", "held-out"):
        d = res["mean depth"][s]
        assert 1 <= d < 4
        assert res["forward GFLOP per token"][s] == pytest.approx(ob.forward_flops(model, d, 4) / 1e9)
    assert ob.forward_flops(model, 1, 4) < ob.forward_flops(model, 4, 4)
    text = subprocess.run([sys.executable, "ouroboros.py", "--model", str(demo[0]), "--trained",
                           str(tmp_path / "ouroboros.safetensors"), "--prompt", "def", "--max-new-tokens", "5"],
                          cwd=HERE, capture_output=True, text=True)
    assert text.returncode == 0 and text.stdout.startswith("def"), text.stderr
    assert "loop steps per token (at most 4)" in text.stderr


def test_checkpoint_is_safetensors_and_json_and_loads(tmp_path, demo):
    """No pickles: optimizer moments for every trainable in safetensors, the rest in JSON, and
    ouroboros.safetensors loads into a fresh model with Ouroboros.load_trainable."""
    trained = train.main(run_args(demo, tmp_path))
    assert sorted(f.name for f in tmp_path.iterdir()) == [
        "lock", "metrics.jsonl", "optimizer.safetensors", "ouroboros.safetensors", "results.json", "state.json",
        "windows.json"]
    moments = load_file(tmp_path / "optimizer.safetensors")
    for name, p in trained.named_trainable():
        assert moments[f"{name}.exp_avg"].shape == p.shape and moments[f"{name}.step"].item() == 4
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 4 and state["options"]["rank"] == 8 and state["tokens_seen"] == 4 * 2 * 2 * 16
    fresh = ob.Ouroboros.from_pretrained(demo[0], device="cpu")
    fresh.load_trainable(tmp_path / "ouroboros.safetensors")
    x = torch.randint(0, 500, (1, 12))
    assert torch.equal(fresh(x, 2)[0], trained(x, 2)[0])


@pytest.mark.parametrize("sig, mode", [(signal.SIGINT, []), (signal.SIGTERM, []), (signal.SIGINT, ["--pretrain"])],
                         ids=["ctrl-c", "sigterm", "pretrain"])
def test_interrupt_and_resume_equals_uninterrupted(tmp_path, demo, monkeypatch, capsys, sig, mode):
    """A signal during update 3 of 6: the update finishes, is saved, and the run ends cleanly; the
    resumed run then ends bit for bit where the uninterrupted one does (CPU, float32). The same
    holds when pretraining, where the weights themselves come back from --out."""
    whole = train.main(run_args(demo, tmp_path / "once", "--steps", "6", "--save-every", "100", *mode))
    get_lr, handler = train.get_lr, signal.getsignal(sig)

    def interrupt_at_2(step, args):
        if step == 2:
            os.kill(os.getpid(), sig)
        return get_lr(step, args)
    monkeypatch.setattr(train, "get_lr", interrupt_at_2)
    argv = run_args(demo, tmp_path / "twice", "--steps", "6", "--save-every", "100", *mode)
    train.main(argv)
    assert json.loads((tmp_path / "twice" / "state.json").read_text())["step"] == 3
    assert signal.getsignal(sig) is handler  # the handler is given back
    monkeypatch.setattr(train, "get_lr", get_lr)
    resumed = train.main(argv + ["--resume"])
    assert f"resumed {tmp_path / 'twice'} at step 3" in capsys.readouterr().out
    for (name, p), (_, q) in zip(checkpoint.trainables(whole), checkpoint.trainables(resumed)):
        assert torch.equal(p, q), name
    assert [m["loss"] for m in metrics(tmp_path / "once")] == \
        [m["loss"] for m in metrics(tmp_path / "twice")]  # steps 1-3 before the signal, 4-6 after


def test_pretraining_lowers_the_loss_and_writes_a_checkpoint_the_loader_reads(tmp_path, demo):
    """--pretrain trains every weight of a Qwen2 made from --model's config.json (its weights are
    not read). --out is then a Hugging Face checkpoint with the data's tokenizer: Qwen2.from_pretrained
    reads it back to identical logits, and Ouroboros.from_pretrained cuts it like Qwen2.5-3B."""
    model = train.main(run_args(demo, tmp_path, "--pretrain", "--steps", "30", "--warmup", "2",
                                "--eval-every", "100"))
    losses = [m["loss"] for m in metrics(tmp_path)]
    # 30 updates, with a margin: the data are this repository's files, so they change with every commit
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert "| depth" not in train.log_line(metrics(tmp_path)[-1], train.parse_args(["--pretrain"]))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in tmp_path.iterdir()}
    assert (tmp_path / "tokenizer.json").read_bytes() == (demo[0] / "tokenizer.json").read_bytes()
    x = torch.randint(0, SMALL.vocab_size, (2, 16))
    assert torch.equal(ob.Qwen2.from_pretrained(tmp_path, device="cpu")(x)[0], model(x)[0])
    cut = ob.Ouroboros.from_pretrained(tmp_path, device="cpu")
    assert torch.equal(cut.baseline(x)[0], ob.Qwen2.from_pretrained(tmp_path, [0, 3, 5], device="cpu")(x)[0])
    assert set(json.loads((tmp_path / "results.json").read_text())) == {"model", "run"}

@pytest.mark.parametrize("init", ["model", "baseline"])
def test_pretraining_from_the_model_or_its_baseline_starts_from_their_weights(tmp_path, demo, init):
    """--init model (continued training) and --init baseline (prune, then heal): the study's equally
    trained references. Their first loss is the frozen model's (the full one, or the baseline Ouroboros
    cuts) on the first batch an Ouroboros run of the same seed trains on; --out reads back as a Qwen2."""
    argv = run_args(demo, tmp_path, "--pretrain", "--init", init, "--steps", "2", "--seed", "3")
    model = train.main(argv)
    args = train.parse_args(argv)
    x, y = train.get_batch(np.fromfile(demo[1] / "train.bin", np.uint32), args, (3, train.TRAIN, 0, 0), 0, "cpu")
    x2, y2 = train.get_batch(np.fromfile(demo[1] / "train.bin", np.uint32), args, (3, train.TRAIN, 0, 0), 1, "cpu")
    frozen = (ob.Qwen2.from_pretrained(demo[0], device="cpu", dtype=torch.float32) if init == "model" else
              ob.Ouroboros.from_pretrained(demo[0], device="cpu", dtype=torch.float32).baseline)
    first = (frozen(x, y, return_logits=False)[1] + frozen(x2, y2, return_logits=False)[1]) / 2
    assert metrics(tmp_path)[0]["loss"] == pytest.approx(first.item(), abs=1e-5)
    assert model.cfg.num_hidden_layers == (SMALL.num_hidden_layers if init == "model" else 3)
    tokens = torch.randint(0, SMALL.vocab_size, (2, 16))
    assert torch.equal(ob.Qwen2.from_pretrained(tmp_path, device="cpu")(tokens)[0], model(tokens)[0])


# ----------------------------------------------------------------------------------------
# Never lose a run


def test_rerunning_a_command_is_refused_and_the_run_kept(tmp_path, demo):
    """The same command again without --resume, as a user types it: exit status 1, one line naming
    the saved file and the ways on, and every file of the run is byte for byte as it was."""
    argv = run_args(demo, tmp_path, "--steps", "2")
    train.main(argv)
    before = {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.name != "lock"}
    run = subprocess.run([sys.executable, "train.py", *argv], cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 1 and run.stderr.count("\n") == 1, run.stderr
    assert f"{tmp_path}/state.json: a run is saved" in run.stderr
    assert all(way in run.stderr for way in ("--resume", "another --out", "--overwrite"))
    assert {f.name: f.read_bytes() for f in tmp_path.iterdir() if f.name != "lock"} == before


@pytest.mark.parametrize("flags, message", [
    ([], "config.json: {out} holds a model, not a run of train.py; give another --out"),
    (["--overwrite"], "config.json: {out} holds a model, not a run of train.py"),  # would delete it
    (["--pretrain"], "config.json: {out} holds a model, not a run of train.py"),
    (["--resume"], "{out}/state.json: not found (no checkpoint to resume: run without --resume)"),
])
def test_an_out_that_holds_a_model_is_refused_and_left_as_it_was(tmp_path, tiny, demo, flags, message):
    """--out pointing at a model folder (here a sharded one, which has no model.safetensors): refused in
    one line before anything, not even OUT/lock, is written there."""
    out = tmp_path / "model"
    shutil.copytree(tiny, out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert message.format(out=out) in error_line(run_args(demo, out, *flags))
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_a_refused_run_leaves_no_folder_and_no_lock(tmp_path, demo):
    """A refusal after the lock was taken (here: data too short for the windows) leaves --out as it was:
    not made at all when it did not exist."""
    data = tmp_path / "data"
    tiny_data(demo[0], data)
    assert "val.bin: " in error_line(run_args((demo[0], data), tmp_path / "new" / "out", "--seq-len", "64"))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["data", "data.jsonl"]


def test_a_finished_run_goes_further_with_resume_and_more_steps(tmp_path, demo):
    """A run that finished at step 4, resumed with --steps 6: steps 5 and 6 follow with the lr of a
    6-step schedule (the cosine is recomputed for the new end), metrics.jsonl keeps its first 4
    lines, and the same --steps again is refused: there is nothing left to do."""
    train.main(run_args(demo, tmp_path, "--steps", "4"))
    first = (tmp_path / "metrics.jsonl").read_text()
    assert "at step 4, and --steps is 4: give a larger --steps" in error_line(
        run_args(demo, tmp_path, "--steps", "4", "--resume"))
    train.main(run_args(demo, tmp_path, "--steps", "6", "--resume"))
    args = train.parse_args(run_args(demo, tmp_path, "--steps", "6"))
    assert (tmp_path / "metrics.jsonl").read_text().startswith(first)
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    assert [m["lr"] for m in metrics(tmp_path)][4:] == [train.get_lr(s, args) for s in (4, 5)]
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 6


def test_resume_takes_the_saved_runs_options_where_the_command_gives_none(tmp_path, demo):
    """`--out OUT --resume --steps 6` goes on as the run was made (its model, data, batch shape, lr,
    warmup...), not with this file's defaults, and ends where the full command does. What the command
    does give is compared with the saved run: another value is refused, naming the option typed."""
    for out in (tmp_path / "short", tmp_path / "full"):
        train.main(run_args(demo, out, "--steps", "4"))
    short = train.main(["--out", str(tmp_path / "short"), "--resume", "--steps", "6"])
    full = train.main(run_args(demo, tmp_path / "full", "--steps", "6", "--resume"))
    for (name, p), (_, q) in zip(checkpoint.trainables(short), checkpoint.trainables(full)):
        assert torch.equal(p, q), name
    assert [m["step"] for m in metrics(tmp_path / "short")] == [1, 2, 3, 4, 5, 6]
    assert "and --steps is 6: give a larger --steps" in error_line(["--out", str(tmp_path / "short"), "--resume"])
    message = error_line(["--out", str(tmp_path / "short"), "--resume", "--steps", "8", "--warmup", "3"])
    assert "--resume with other options (warmup: checkpoint 1, now 3)" in message


def test_the_same_command_with_eval_on_resumes(tmp_path, demo):
    """--eval-on appends to a list: resumed, the files the command gives replace the saved run's, rather
    than being appended to them and refused as scored twice (the study resumes its runs with their full
    command, --eval-on prose.bin included)."""
    other = tmp_path / "other.bin"
    shutil.copyfile(demo[1] / "val.bin", other)
    train.main(run_args(demo, tmp_path / "run", "--steps", "2", "--eval-on", str(other)))
    train.main(run_args(demo, tmp_path / "run", "--steps", "4", "--eval-on", str(other), "--resume"))
    assert list(json.loads((tmp_path / "run" / "results.json").read_text())["ours"]) == ["train", "held-out", "other"]


def test_compile_says_what_it_costs_on_a_cpu(tmp_path, demo, monkeypatch, capsys):
    """--compile on a CPU works, but compiling takes minutes: the log says so before the first step."""
    monkeypatch.setattr(torch, "compile", lambda model: model)  # the compiled path itself: tested elsewhere
    train.main(run_args(demo, tmp_path, "--steps", "1", "--warmup", "0", "--compile"))
    out = capsys.readouterr().out
    assert "--compile: the first steps compile the model (on a CPU: minutes, paid back only in long runs)" in out
    assert out.index("--compile:") < out.index("step 1/1")
    train.main(run_args(demo, tmp_path / "default", "--steps", "1", "--warmup", "0"))  # on a CPU: eager by default
    assert "--compile" not in capsys.readouterr().out


def damage_state(out, **changes):
    state = json.loads((out / "state.json").read_text())
    args = {**state["args"], **changes.pop("args", {})}
    (out / "state.json").write_text(json.dumps({**state, **changes, "args": args}))


@pytest.mark.parametrize("damage, message", [
    (lambda out: (out / "optimizer.safetensors").unlink(), "{out}/optimizer.safetensors: not found, so the "
     "checkpoint in {out} cannot be resumed (start afresh with --overwrite)"),
    (lambda out: damage_state(out, step=None), "{out}/state.json: step is None: not what train.py saves"),
    (lambda out: damage_state(out, options=[]), "{out}/state.json: options is []: not what train.py saves"),
    (lambda out: damage_state(out, args=dict(batch_size=0)), "--batch-size 0 must be a positive integer"),
    (lambda out: damage_state(out, args=dict(seed=-1)), "--seed -1 must be an integer in 0..2**63-1"),
])
def test_resume_refuses_a_damaged_checkpoint_before_loading(tmp_path, demo, monkeypatch, damage, message):
    """A file missing, or state.json values that train.py never writes (its own options are checked as the
    command line's are): one line, before the model loads."""
    train.main(run_args(demo, tmp_path, "--steps", "2"))
    damage(tmp_path)
    monkeypatch.setattr(ob.Ouroboros, "from_pretrained", lambda *a, **k: pytest.fail("loaded before the check"))
    assert message.format(out=tmp_path) in error_line(["--out", str(tmp_path), "--steps", "4", "--resume"])


def test_a_run_saved_before_an_option_existed_resumes_and_its_trainables_load(tmp_path, demo):
    """Files written before --coda-rank, --ponder-cost and --controller-width existed lack them:
    they are read as those options' defaults, which is what such a run had."""
    train.main(run_args(demo, tmp_path, "--steps", "2"))
    new = ("coda_rank", "ponder_cost", "controller_width", "halting")
    state = json.loads((tmp_path / "state.json").read_text())
    state["options"] = {k: v for k, v in state["options"].items() if k not in new}
    (tmp_path / "state.json").write_text(json.dumps(state))
    file = tmp_path / "ouroboros.safetensors"
    with safe_open(file, framework="pt", device="cpu") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    meta["ouroboros"] = json.dumps({k: v for k, v in json.loads(meta["ouroboros"]).items() if k not in new})
    save_file(tensors, file, metadata=meta)
    train.main(run_args(demo, tmp_path, "--steps", "4", "--resume"))
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
    ob.Ouroboros.from_pretrained(demo[0], device="cpu").load_trainable(file)  # the resumed run rewrote it;
    save_file(tensors, file, metadata=meta)  # and the old file itself loads too
    ob.Ouroboros.from_pretrained(demo[0], device="cpu").load_trainable(file)


def test_overwrite_starts_afresh(tmp_path, demo):
    train.main(run_args(demo, tmp_path, "--steps", "4"))
    train.main(run_args(demo, tmp_path, "--steps", "2", "--overwrite"))
    assert [m["step"] for m in metrics(tmp_path)] == [1, 2]
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2


@pytest.mark.parametrize("extra, expected", [
    (["--lr", "0"], "--lr 0.0 must be > 0 and finite"),
    (["--lr", "inf"], "--lr inf must be > 0 and finite"),
    (["--ponder-cost", "inf"], "--ponder-cost inf must be >= 0 and finite"),
    (["--pretrain", "--ponder-cost", "0.01"], "--pretrain trains a plain Qwen2: --ponder-cost"),
    (["--pretrain", "--coda-rank", "2"], "--pretrain trains a plain Qwen2"),
    (["--device", "tpu9"], "device 'tpu9': not a device torch knows"),
    *([(["--device", "cuda"], "device 'cuda': this torch sees no CUDA GPU")] if not torch.cuda.is_available() else []),
    (["--warmup", "10"], "--warmup 10 must be in 0..--steps"),
    (["--min-lr", "1"], "--min-lr 1.0 must be in 0..--lr"),
    (["--resume", "--overwrite"], "--resume and --overwrite do not go together"),
    (["--pretrain", "--eval-full"], "--pretrain and --eval-full do not go together"),
    (["--init", "model"], "--init model must be random without --pretrain"),
    (["--seq-len", "1"], "--seq-len 1 must be >= 2 (one token has no context to learn from)"),
    (["--out", "FILE/run"], "is a file, not a folder"),
    (["--eval-depths", "0,65"], "depth 0 is outside 1..64"),  # not after training and the final table
])
def test_options_are_refused_before_anything_is_loaded(tmp_path, demo, monkeypatch, extra, expected):
    def not_now(*args, **kwargs):
        raise AssertionError("loaded before the options were checked")
    monkeypatch.setattr(ob.Ouroboros, "from_pretrained", not_now)
    monkeypatch.setattr(prepare, "load_data", not_now)
    (tmp_path / "file").write_text("")
    extra = [str(tmp_path / "file" / "run") if a == "FILE/run" else a for a in extra]
    assert expected in error_line(run_args(demo, tmp_path / "out", *extra))
    assert not (tmp_path / "out").exists()


def test_a_malformed_depth_list_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--depths", "4,x"])
    assert e.value.code == 2 and "'4,x' is not a comma-separated list of depths" in capsys.readouterr().err


CHECKPOINT_FILES = ("ouroboros.safetensors", "optimizer.safetensors", "state.json")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, demo, monkeypatch):
    """Loss NaN from update 4 on: the run stops with one line before applying it, and the files
    are still those saved at update 2, byte for byte."""
    forward, save, calls, saved = ob.Ouroboros.forward, checkpoint.save, [], []

    def nan_from_call_4(self, *args, **kwargs):
        logits, loss = forward(self, *args, **kwargs)
        calls.append(1)
        return logits, loss * float("nan") if len(calls) >= 4 else loss

    def save_and_copy(out, *args):
        save(out, *args)
        saved.append({name: (out / name).read_bytes() for name in CHECKPOINT_FILES})
    monkeypatch.setattr(ob.Ouroboros, "forward", nan_from_call_4)
    monkeypatch.setattr(checkpoint, "save", save_and_copy)
    message = error_line(run_args(demo, tmp_path, "--grad-accum", "1", "--eval-every", "100", "--steps", "6"))
    assert "step 4: loss nan" in message and "checkpoint (step 2) is kept" in message
    assert len(saved) == 1 and {name: (tmp_path / name).read_bytes() for name in CHECKPOINT_FILES} == saved[0]
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2

# ----------------------------------------------------------------------------------------
# Bad input to train.py: one line naming the cause, nothing lost


def truncate(file):
    file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])


def edit_meta(data_dir, **changes):
    meta = json.loads((data_dir / "meta.json").read_text())
    (data_dir / "meta.json").write_text(json.dumps({**meta, **changes}))


def poke(file, token):
    """Token 10 of a token file set to `token`."""
    tokens = np.fromfile(file, dtype=np.uint32)
    tokens[10] = token
    tokens.tofile(file)


def tiny_data(model, data):
    """Data whose held-out split is 4 documents of ~4 tokens: too short for 64-token windows."""
    docs = data.parent / f"{data.name}.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(400)))
    prepare.prepare([docs], model, data, val_fraction=0.01, log=lambda *a, **k: None, overwrite=True)


# case: (extra options, setup(model dir, data dir) of the copies, what the error line must say)
BAD_RUNS = {
    "missing model": (["--model", "nowhere"], None, "nowhere/config.json: not found (download the model: "
                                                    "huggingface-cli download Qwen/Qwen2.5-3B"),
    "missing data": (["--data", "nowhere"], None, "nowhere/meta.json: not found (make it: python data/prepare.py"),
    "corrupt safetensors": ([], lambda m, d: (m / "model.safetensors").write_bytes(b"\x08\0\0\0\0\0\0\0garbage!"),
                            "model.safetensors: not a readable safetensors file"),
    "truncated safetensors": ([], lambda m, d: truncate(m / "model.safetensors"),
                              "model.safetensors: not a readable safetensors file"),
    "another tokenizer": ([], lambda m, d: edit_meta(d, tokenizer_sha256="0" * 64),
                          "made with another tokenizer"),
    "another vocabulary": ([], lambda m, d: edit_meta(d, vocab_size=151936),
                           "vocab_size 151936 exceeds the model's 512"),
    "truncated token file": ([], lambda m, d: truncate(d / "train.bin"), "train.bin: "),
    "token id past the vocabulary": ([], lambda m, d: poke(d / "train.bin", 512),
                                     "train.bin: token id 512 is outside the model's vocabulary 0..511"),
    "empty token file": ([], lambda m, d: (d / "train.bin").write_bytes(b"") or edit_meta(d, train_tokens=0),
                         "train.bin: 0 tokens are too few for --seq-len 16"),
    "seq-len above the model": (["--seq-len", "257"], None, "--seq-len 257 exceeds max_position_embeddings 256"),
    "seq-len above the data": (["--seq-len", "64"], tiny_data, "val.bin: "),
    "depth 0": (["--depth", "0"], None, "depth 0 is outside 1..64"),
    "depth above max_steps": (["--depths", "4,65"], None, "depth 65 is outside 1..64"),
    "rank too large": (["--rank", "100"], None, "rank 100 is out of range"),
    "resume without checkpoint": (["--resume"], None, "state.json: not found (no checkpoint to resume"),
    "eval-on not found": (["--eval-on", "nowhere"], None, "--eval-on {tmp}/nowhere: not found"),
    "eval-on a folder": (["--eval-on", "data"], None, "--eval-on {tmp}/data: a folder, not a token file"),
    "eval-on not tokens": (["--eval-on", "data/meta.json"], None, "meta.json: {size} bytes: not a file of uint32"),
    "out inside data": (["--out", "data/run"], None, "--out {tmp}/data/run: inside --data {tmp}/data, a folder of "
                        "data/prepare.py's"),
    "empty out": (["--out", ""], None, "--out is empty: give a folder"),
    "negative seed": (["--seed", "-1"], None, "--seed -1 must be an integer in 0..2**63-1"),
    "negative peak": (["--peak-flops", "-5"], None, "--peak-flops -5.0 must be > 0 and finite"),
    "demo with a model": (["--demo"], None, "--demo makes its own model and data (in --out): drop --model and --data"),
    "meta null": ([], lambda m, d: edit_meta(d, vocab_size=None), "meta.json: vocab_size is None, not a count"),
    "meta a list": ([], lambda m, d: (d / "meta.json").write_text("[1]"), "meta.json: not a JSON object (it is a "
                    "list)"),
    "config a list": ([], lambda m, d: (m / "config.json").write_text("[{}]"), "config.json: not a JSON object"),
    "config not UTF-8": ([], lambda m, d: (m / "config.json").write_bytes(b"\xff{}"), "config.json: not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_input_is_one_line_error(tmp_path, demo, case):
    extra, setup, expected = BAD_RUNS[case]
    model, data = tmp_path / "model", tmp_path / "data"
    for src, dst in zip(demo, (model, data)):  # copies: the shared demo files stay intact
        dst.mkdir()
        for f in src.iterdir():
            (dst / f.name).write_bytes(f.read_bytes())
    if setup:
        setup(model, data)
    extra = [str(tmp_path / a) if a in ("nowhere", "data", "data/meta.json", "data/run") else a for a in extra]
    expected = expected.format(tmp=tmp_path, size=f"{(data / 'meta.json').stat().st_size:,}")
    assert expected in error_line(run_args((model, data), tmp_path / "out", *extra)), case
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before the run began


@pytest.mark.parametrize("change", [["--rank", "4"], ["--lr", "1e-3"], ["--pool", "mean"], ["--no-gate"]])
def test_resume_with_other_options_is_refused(tmp_path, demo, change):
    train.main(run_args(demo, tmp_path, "--steps", "2"))
    before = (tmp_path / "ouroboros.safetensors").read_bytes()
    message = error_line(run_args(demo, tmp_path, "--steps", "2", "--resume", *change))
    assert "--resume with other options" in message and change[0][2:].replace("-", "_") in message
    assert (tmp_path / "ouroboros.safetensors").read_bytes() == before


def test_resume_refuses_a_half_written_checkpoint(tmp_path, demo):
    train.main(run_args(demo, tmp_path, "--steps", "2"))
    state = json.loads((tmp_path / "state.json").read_text())
    (tmp_path / "state.json").write_text(json.dumps({**state, "step": 1}))  # as if killed between two files
    message = error_line(run_args(demo, tmp_path, "--resume", "--steps", "2"))
    assert "optimizer.safetensors: step 2, state.json says 1" in message


def test_a_second_run_on_the_same_out_is_refused_while_the_first_runs(tmp_path, demo):
    """The first run holds OUT/lock (an OS lock) until it ends: a second train.py there is refused in
    one line naming the holder, and leaves the run alone. A lock whose process was killed with
    kill -9 is gone with it: the next run starts."""
    argv = run_args(demo, tmp_path, "--steps", "2")
    checkpoint.hold(tmp_path)  # as a running train.py holds it
    try:
        message = error_line(argv)
    finally:
        checkpoint.release()
    assert f"{tmp_path}/lock: {tmp_path} is in use by train.py (pid {os.getpid()} on" in message
    assert not (tmp_path / "metrics.jsonl").exists()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print(flush=True); time.sleep(60)",
                               str(tmp_path / "lock")], stdout=subprocess.PIPE)
    holder.stdout.readline()  # it holds the lock now
    assert "is in use by" in error_line(argv)
    holder.kill()
    holder.wait()
    train.main(argv)
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2


def test_a_save_cut_short_leaves_a_checkpoint_to_resume_from(tmp_path, demo):
    """Killed while a save is written: the previous checkpoint is whole. Killed while its files move
    in (here: the optimizer state of step 4 already moved, the step-2 weights and state.json not):
    the next start moves the rest. Either way --resume ends where an uninterrupted run does."""
    whole = train.main(run_args(demo, tmp_path / "whole", "--steps", "6"))
    train.main(run_args(demo, tmp_path / "four", "--steps", "4"))
    for cut in ("while written", "while moved in"):
        out = tmp_path / cut
        train.main(run_args(demo, out, "--steps", "2"))
        stage = out / "save.tmp"
        shutil.copytree(tmp_path / "four", stage, ignore=shutil.ignore_patterns("metrics.jsonl", "results.json",
                                                                                   "lock"))
        if cut == "while written":  # no state.json yet: not whole
            (stage / "state.json").unlink()
        else:
            os.replace(stage / "optimizer.safetensors", out / "optimizer.safetensors")
        resumed = train.main(run_args(demo, out, "--steps", "6", "--resume"))
        assert not stage.exists()
        steps = [m["step"] for m in metrics(out)]
        assert steps == ([1, 2, 3, 4, 5, 6] if cut == "while written" else [1, 2, 5, 6]), cut
        if cut == "while written":
            for (name, p), (_, q) in zip(checkpoint.trainables(whole), checkpoint.trainables(resumed)):
                assert torch.equal(p, q), (cut, name)


def test_a_run_killed_before_its_results_writes_them_when_resumed(tmp_path, demo, monkeypatch):
    """Its last step is saved but results.json is not there (killed in the final evaluation): the
    same command with --resume writes it, and so do the demo and the study (stdlib.run_logged), with
    the same numbers as the run that was not killed."""
    train.main(run_args(demo, tmp_path, "--steps", "2"))
    expected = json.loads((tmp_path / "results.json").read_text())
    (tmp_path / "results.json").unlink()
    train.main(run_args(demo, tmp_path, "--steps", "2", "--resume"))
    got = json.loads((tmp_path / "results.json").read_text())
    assert {k: v for k, v in got.items() if k != "run"} == {k: v for k, v in expected.items() if k != "run"}
    assert got["run"]["tok_s"] > 0  # from the steps in metrics.jsonl: none ran in the resumed process
    (tmp_path / "results.json").unlink()
    argv = run_args(demo, tmp_path, "--steps", "2")
    del argv[argv.index("--out"):argv.index("--out") + 2]  # run_logged gives --out, and --resume
    assert stdlib.run_logged(tmp_path, argv, train.main)


def test_ctrl_c_in_the_final_evaluation_stops_it_and_resume_finishes(tmp_path, demo, monkeypatch):
    """The loop's handler only sets a flag, so a Ctrl-C in the final evaluation used to do nothing.
    There it stops the evaluation, in one line that says the run is saved; --resume writes the results."""
    report = checkpoint.report

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)  # the signal arrives before this ends
    monkeypatch.setattr(checkpoint, "report", interrupted)
    with pytest.raises(SystemExit, match="interrupted in the final evaluation: the run is saved in"):
        train.main(run_args(demo, tmp_path, "--steps", "2"))
    monkeypatch.setattr(checkpoint, "report", report)
    train.main(run_args(demo, tmp_path, "--steps", "2", "--resume"))
    assert (tmp_path / "results.json").is_file()


def test_held_out_families_never_straddle_the_split(tmp_path):
    """The study's held-out split is whole module families (cp850.py and cp858.py are one family,
    "encodings"; _pydecimal.py and decimal.py another), near the asked share of the characters; and
    the documentation's prose (pydoc_data) is in neither split, but in prose.bin alone."""
    root = Path(stdlib.sysconfig.get_paths()["stdlib"])
    assert stdlib.family(root / "encodings" / "cp850.py") == stdlib.family(root / "encodings" / "cp858.py")
    assert stdlib.family(root / "_pydecimal.py") == stdlib.family(root / "decimal.py") == "decimal"
    files = [f for f in stdlib.stdlib_files() if stdlib.family(f) != stdlib.PROSE]
    held = stdlib.held_out_families(files, 0.05)
    share = sum(f.stat().st_size for f in files if stdlib.family(f) in held) / sum(f.stat().st_size for f in files)
    assert 0.05 <= share < 0.05 * (1 + 1 / 3)  # it stops at the share; no family is over a third of it
    with pytest.raises(SystemExit):  # the data stage, then a pretraining that "stops": data/ is kept
        stdlib.pretrained_base(tmp_path, miniature.QUICK, lambda out, argv: False, quiet)
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    quick = [f for f in stdlib.stdlib_files(miniature.QUICK.every_nth_file) if stdlib.family(f) != stdlib.PROSE]
    in_held = [f for f in quick if stdlib.family(f) in meta["held_out_families"]]
    assert meta["val_documents"] == len(in_held) > 0 and meta["train_documents"] + len(in_held) <= len(quick)
    prose = json.loads((tmp_path / "data" / "prose.json").read_text())
    assert prose["tokens"] == (tmp_path / "data" / "prose.bin").stat().st_size // 4 and prose["topics"] > 10
    # where each document starts, for a bootstrap by family (val.bin) and by topic (prose.bin): after an EOS
    eos = meta["eos_id"]
    for tokens, starts in (("val.bin", json.loads((tmp_path / "data" / "val_documents.json").read_text())["starts"]),
                           ("prose.bin", prose["starts"])):
        ids = np.fromfile(tmp_path / "data" / tokens, dtype=np.uint32)
        assert starts[0] == 0 and all(ids[i - 1] == eos for i in starts[1:])
        assert (ids[:-1] == eos).sum() == len(starts) - 1
    files = json.loads((tmp_path / "data" / "val_documents.json").read_text())["files"]
    assert sorted(files) == sorted(map(str, in_held))


def test_the_blind_control_is_the_controller_without_its_input(tiny):
    """controller="blind": the Controller's parameters exactly, and an output that depends on the
    step alone, equal to the Controller's own on a zero input."""
    blind = ob.Ouroboros.from_pretrained(tiny, device="cpu", controller="blind")
    ours = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    assert [(n, p.shape) for n, p in blind.named_trainable()] == [(n, p.shape) for n, p in ours.named_trainable()]
    randomize_trainables(blind)
    p = torch.randn(2, 5, blind.controller.w1.in_features)
    c = blind.controller
    assert torch.equal(c(p, 1), c(torch.randn_like(p), 1)) and not torch.equal(c(p, 1), c(p, 2))
    assert torch.equal(c(p, 1), ob.Controller.forward(c, torch.zeros_like(p), 1))


def test_runs_never_replay_the_bases_pretraining_batches(demo):
    """The same seed draws different windows for pretraining and for an Ouroboros run: the
    study's seed-0 runs do not train on the base's own batches."""
    args = train.parse_args(["--model", str(demo[0]), "--data", str(demo[1]), "--seq-len", "16"])
    tokens = np.arange(10_000, dtype=np.uint32)
    for step in range(3):
        pre, run = (train.get_batch(tokens, args, (0, stream, step, 0), 0, "cpu")[0]
                    for stream in (train.PRETRAIN, train.TRAIN))
        assert not torch.equal(pre, run)


def test_paired_intervals_find_a_shift_and_none_where_there_is_none():
    """miniature.paired: A − B over the same batches, bootstrapped over batches (and seeds)."""
    rng = np.random.default_rng(0)
    a = rng.normal(5, 0.3, (3, 40))
    same = miniature.paired(a, a)
    assert same["diff"] == same["lo"] == same["hi"] == 0 and same["seeds"] == 3 and same["batches"] == 40
    shifted = miniature.paired(a - 0.01, a + rng.normal(0, 0.001, a.shape))  # a small but consistent gain
    assert shifted["hi"] < 0 and shifted["lo"] <= shifted["diff"] <= shifted["hi"]
    noise = miniature.paired(a, a + rng.normal(0, 0.3, a.shape))
    assert noise["lo"] < 0 < noise["hi"]
    assert miniature.verdict(shifted, "lower") == "reproduced" and miniature.verdict(noise, "lower") == (
        "not distinguishable") and miniature.verdict(miniature.paired(a + 0.01, a), "lower") == "reversed"


def test_the_cluster_bootstrap_resamples_whole_clusters():
    """Batches of one module family move together: with two families whose differences disagree, the
    interval over families is much wider than over batches; with a family per batch it is the same width."""
    rng = np.random.default_rng(0)
    b = rng.normal(5, 0.3, (1, 200))
    a = b + np.where(np.arange(200) < 100, -0.02, 0.0) + rng.normal(0, 0.001, b.shape)  # one family gains
    by_batch, by_family = miniature.paired(a, b), miniature.paired(a, b, clusters=[i < 100 for i in range(200)])
    assert by_family["clusters"] == 2 and by_batch["clusters"] is None
    assert by_family["hi"] - by_family["lo"] > 5 * (by_batch["hi"] - by_batch["lo"])
    each = miniature.paired(a, b, clusters=list(range(200)))
    assert each["diff"] == by_batch["diff"]
    assert 0.8 < (each["hi"] - each["lo"]) / (by_batch["hi"] - by_batch["lo"]) < 1.25


def test_equal_needs_an_interval_within_the_margin_and_holm_corrects_the_claims_together():
    """An "equal" claim holds only when the 90% interval lies within ±MARGIN: a zero difference measured
    too loosely is "not shown equal". Holm keeps the smallest p-values that stay under alpha / (m − k)."""
    rng = np.random.default_rng(0)
    a = rng.normal(5, 0.3, (1, 400))
    tight = miniature.paired(a + rng.normal(0, 0.001, a.shape), a)
    loose = miniature.paired(a + rng.normal(0, 0.3, a.shape), a)
    assert miniature.verdict(tight, "equal").startswith("equal within ±0.005")
    assert miniature.verdict(loose, "equal").startswith("not distinguishable, not shown equal")
    assert miniature.verdict(miniature.paired(a - 0.05, a), "equal") == "not reproduced: A lower"
    assert miniature.holm([0.001, 0.04, 0.03, 0.5]) == [True, False, False, False]  # 0.03 > 0.05 / 3
    assert miniature.holm([0.001, 0.02, 0.01]) == [True, True, True]
    assert miniature.verdict(miniature.paired(a - 0.01, a), "lower", survives=False) == "reproduced, not after Holm"
    assert 0 < loose["p"] <= 1 and tight["lo90"] >= tight["lo"] and tight["hi90"] <= tight["hi"]


def test_a_learning_rate_sweep_goes_on_until_its_best_rate_is_inside_what_it_tried():
    """Each variant's sweep starts at 6e-4, 2e-3 and 6e-3; while its best (lowest training loss) is the
    lowest or highest rate it tried, it tries the next one on the ladder, up to the ladder's ends. A
    diverged run counts as worst; a sweep with a run not done yet has no best."""
    budget, bowl = miniature.FULL, lambda centre: lambda lr: (math.log(lr / centre)) ** 2
    shapes = dict.fromkeys(miniature.SWEPT, bowl(2e-2))  # best at 2e-2: goes up to 6e-2 to see it is
    shapes.update({miniature.LOOP: lambda lr: -lr,  # ever better: up to the ladder's end
                   miniature.STATIC: lambda lr: math.inf if lr > 2e-3 else -lr,  # diverges above 2e-3
                   miniature.OURS: bowl(1.5e-4)})  # best below the first rates: down to 6e-5 to see it is
    losses = {}
    while missing := [(v, lr) for v, (rates, _) in miniature.plan(budget, losses).items() for lr in rates
                      if (v, lr) not in losses]:
        losses.update({(v, lr): shapes[v](lr) for v, lr in missing})
    swept = miniature.plan(budget, losses)
    assert swept[miniature.LOOP] == ([6e-4, 2e-3, 6e-3, 2e-2, 6e-2, 2e-1], 2e-1)
    assert swept[miniature.STATIC] == ([6e-4, 2e-3, 6e-3], 2e-3)
    assert swept[miniature.OURS] == ([6e-5, 2e-4, 6e-4, 2e-3, 6e-3], 2e-4)
    assert swept[miniature.HEALED] == ([6e-4, 2e-3, 6e-3, 2e-2, 6e-2], 2e-2)
    del losses[miniature.HEALED, 6e-2]
    assert miniature.plan(budget, losses)[miniature.HEALED] == ([6e-4, 2e-3, 6e-3, 2e-2, 6e-2], None)


def test_a_diverged_seed_marks_its_row_and_the_report_goes_on():
    """A reference whose seed diverged: its row says so (seed and step), and the gap against the equally
    trained references is "-" for every row, not an error; a sweep in which every rate diverged has no
    best rate."""
    m, batches = miniature, [4.0, 4.2, 4.1, 4.3]

    def row(x, **info):  # a loss x + 4.15 on the held-out modules, over 4 batches
        return dict(seeds=[0], windows={"held-out": [[x + b for b in batches]]}, mean={"held-out": x + 4.15},
                    **{"by seed": {"held-out": [x + 4.15]}}, **info)
    rows = {m.BASELINE: row(1.0, trainable=0) | dict(seeds=[None]),
            "full model": row(0.0, trainable=0) | dict(seeds=[None]),
            m.OURS: row(0.5, lr=6e-3, depth=4.0, flops=0.002, trainable=9),
            m.FULL_TRAINED: row(-0.1, lr=6e-4, trainable=99),
            m.HEALED: dict(seeds=[0], windows={}, lr=6e-4, diverged="seed 1, step 3: loss nan, grad norm nan")}
    md = m.tables(rows, depth_sweep=False)
    assert f"| {m.HEALED} | 0.0006 | 1 | diverged: seed 1, step 3: loss nan, grad norm nan |" in md
    assert m.gaps(rows, m.OURS, "held-out") == [[50.0], None] and "| 50.0 | - |" in md
    diverged = {(v, lr): math.inf for v in m.SWEPT for lr in m.QUICK.ladder}
    assert m.plan(m.QUICK, diverged)[m.OURS] == ([2e-3, 6e-3], None)


def test_an_interrupted_base_says_to_run_the_same_command(tmp_path):
    """The base's pretraining stopped by Ctrl-C (run_logged returns False, with no diverged.txt):
    the message is the command that works, not train.py's "--resume", which the study has not."""
    with pytest.raises(SystemExit, match=r"interrupted: .*base is saved; run the same command again to continue"):
        stdlib.pretrained_base(tmp_path, miniature.QUICK, lambda out, argv: False, quiet)


@pytest.mark.parametrize("corpus, message", [
    ("nowhere", "error: --corpus {tmp}/nowhere: no such folder"),
    ("two files", "error: 2 document(s) leave a split empty: one in 10 is held out, so give a corpus of more files"),
])
def test_the_study_refuses_a_bad_corpus_in_one_line(tmp_path, corpus, message):
    folder = tmp_path / corpus
    if corpus == "two files":
        write_docs(folder, ["print('a')\n", "print('b')\n"], "txt")
    with pytest.raises(SystemExit) as e:
        miniature.main(["--quick", "--corpus", str(folder), "--work", str(tmp_path / "work")])
    assert message.format(tmp=tmp_path) in str(e.value.code) and "\n" not in str(e.value.code)
    assert "--val-fraction" not in str(e.value.code)


@pytest.mark.parametrize("made, argv, message", [
    ("quick", [], "error: {work}/recipe.json: {work} was made with another recipe (config.vocab_size 512 there, "
     "4096 now; config.hidden_size 64 there, 128 now;"),
    ("demo", ["--quick"], "error: {work}/recipe.json: {work} was made with another recipe (config.vocab_size 4096 "
     "there, 512 now;"),
    ("other files", ["--quick"], "error: {work}: holds files but no recipe.json (made by something else, or before "
     "recipes were recorded): give another folder, or delete it"),
    ("other files", ["--quick", "--fresh"], "error: --fresh --work {work}: holds no recipe.json, so it was not made "
     "by a study; it is left as it is"),
    ("nothing", ["--quick", "--results", "experiments/results"], "error: --results experiments/results: the "
     "committed study's; --quick writes its smoke results elsewhere (by default WORK/results)"),
])
def test_the_study_never_takes_or_replaces_what_another_budget_made(tmp_path, made, argv, message):
    """A --work made for the smoke budget, or by the demo, is refused by the study (its runs and base would be
    taken as done); so is a folder it did not make, and --quick aimed at the committed results. Refused
    before any stage, nothing changed."""
    work = tmp_path / "work"
    work.mkdir()
    if made in ("quick", "demo"):
        stdlib.claim(work, miniature.QUICK if made == "quick" else stdlib.DEMO)
    if made == "other files":
        (work / "notes.txt").write_text("mine")
    before = {f: f.read_bytes() for f in work.rglob("*") if f.is_file()}
    committed = (HERE / "experiments" / "results" / "miniature.json").read_bytes()
    with pytest.raises(SystemExit) as e:
        miniature.main(["--work", str(work), *argv])
    assert str(e.value.code).startswith(message.format(work=work)), e.value.code
    assert "\n" not in str(e.value.code)
    assert {f: f.read_bytes() for f in work.rglob("*") if f.is_file() and f.name != "lock"} == before
    assert (HERE / "experiments" / "results" / "miniature.json").read_bytes() == committed


def test_a_study_may_list_more_runs_on_a_work_folder_made_before(tmp_path):
    """The ranks and learning rates choose which runs a study lists, and a run's folder names its rank and
    rate, so a work folder made under others is taken (one whose recipe.json recorded them too); one made
    with other seeds or another number of steps is not."""
    work = tmp_path / "work"
    work.mkdir()
    stdlib.claim(work, miniature.QUICK)
    more = dataclasses.replace(miniature.QUICK, ranks=(8,), lrs=(6e-4,), ladder=(6e-4, 2e-3))
    stdlib.claim(work, more)
    recorded = json.loads((work / "recipe.json").read_text())
    (work / "recipe.json").write_text(json.dumps(recorded | {"ranks": [8, 32], "lrs": [6e-3]}))
    stdlib.claim(work, more)
    for other, message in ((dict(steps=5), "steps 4 there, 5 now"), (dict(seeds=(1, 2)), "seeds [0, 1] there")):
        with pytest.raises(ValueError, match=re.escape(message)):
            stdlib.claim(work, dataclasses.replace(miniature.QUICK, **other))


@pytest.mark.parametrize("argv, message", [
    (["--work", "{tmp}/afile"], "error: --work {tmp}/afile: {tmp}/afile is a file, not a folder"),
    (["--results", "{tmp}/afile"], "error: --results {tmp}/afile: {tmp}/afile is a file, not a folder"),
    (["--corpus", "{tmp}/empty"], "error: --corpus {tmp}/empty: no .txt, .md, .rst, .py, .jsonl, .parquet file in it"),
])
def test_the_study_refuses_a_file_for_a_folder_and_claims_nothing_it_did_not_make(tmp_path, argv, message):
    """One line; and a work folder whose data stage failed is left unclaimed (no recipe.json), so that the
    same command with a good corpus runs there."""
    (tmp_path / "afile").write_text("")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        miniature.main(["--quick", "--work", str(tmp_path / "work"), *(a.format(tmp=tmp_path) for a in argv)])
    assert str(e.value.code).startswith(message.format(tmp=tmp_path)), e.value.code
    assert not (tmp_path / "work" / "recipe.json").exists()


def test_two_runs_on_one_work_folder_take_turns(tmp_path, monkeypatch):
    """Two demos (or studies) started at once: the second waits for the first's data and base, then finds
    them made; it never reads the first's half-made files."""
    import threading
    spans, said = [], []

    def make_base(work, base, run, log, corpus, seed):  # stands in for the data and base stages
        start = time.monotonic()
        time.sleep(0.5)
        spans.append((start, time.monotonic()))
        return work / "base", work / "data"

    monkeypatch.setattr(stdlib, "make_base", make_base)
    both = [threading.Thread(target=stdlib.pretrained_base, args=(tmp_path, stdlib.DEMO, None, said.append))
            for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join(timeout=30)
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0 and said == [f"waiting for another process to finish preparing {tmp_path}"]


def test_ctrl_c_while_the_study_prepares_data_is_one_line(tmp_path):
    """Ctrl-C before any run starts (here, as the tokenizer is trained): no traceback, one line."""
    folder = tmp_path / "corpus"
    write_docs(folder, [f"def f{i}(x):\n    return x * {i}\n" * 200 for i in range(400)], "txt")
    study = subprocess.Popen([sys.executable, "experiments/miniature.py", "--quick", "--corpus", str(folder),
                              "--work", str(tmp_path / "work")], cwd=HERE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    assert study.stdout.readline().startswith("[data]")
    study.send_signal(signal.SIGINT)
    _, err = study.communicate(timeout=120)
    assert study.returncode == 1 and err.startswith("interrupted: ") and err.count("\n") == 1, err
    assert not (tmp_path / "work" / "data").exists()  # prepare.py leaves nothing half-made


def test_default_paths_say_how_to_get_them(tmp_path, demo, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "huggingface-cli download Qwen/Qwen2.5-3B --local-dir models/Qwen2.5-3B" in error_line([])
    message = error_line(["--model", str(demo[0]), "--seq-len", "16"])
    assert "data/fineweb-edu/meta.json: not found" in message and "data/prepare.py" in message


def test_cli_error_is_one_line_and_exit_status_1(tmp_path):
    """The real command lines: exit status 1, one line on stderr, no traceback."""
    for cmd in ([sys.executable, "train.py", "--model", str(tmp_path / "none")],
                [sys.executable, "data/prepare.py", str(tmp_path / "none.txt"), "--tokenizer", "x", "--out", "y"],
                [sys.executable, "ouroboros.py", "--model", str(tmp_path / "none"), "--prompt", "hi"]):
        run = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
        assert run.returncode == 1 and run.stderr.count("\n") == 1 and run.stderr.startswith("error: "), run.stderr

# ----------------------------------------------------------------------------------------
# Demo, benchmark, many processes


def test_demo_runs_on_a_pretrained_base_and_caches_it(tmp_path, capsys, monkeypatch):
    """The demo at the smoke budget of the miniature study: a base pretrained on the standard
    library, then Ouroboros on it, ending in the table of baseline, full and ours. A second run
    reuses the base (pretrained once) and replaces its own previous run instead of refusing it."""
    monkeypatch.setattr(stdlib, "DEMO", miniature.QUICK)
    argv = ["--demo", "--out", str(tmp_path), "--steps", "3", "--warmup", "1", "--seq-len", "32", "--eval-batches", "2"]
    train.main(argv)
    res = json.loads((tmp_path / "ouroboros" / "results.json").read_text())
    assert {"baseline", "full", "ours", "gap recovered %"} <= set(res)
    layers = miniature.QUICK.config.num_hidden_layers
    assert ob.Qwen2Config.from_pretrained(tmp_path / "base").num_hidden_layers == layers
    base = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    train.main(argv)
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == base
    assert "held-out" in capsys.readouterr().out


def test_benchmark_runs_from_config_json_alone(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(SMALL.to_dict()))
    train.main(["--benchmark", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "o"), "--device", "cpu",
                "--steps", "3", "--seq-len", "32", "--batch-size", "1", "--grad-accum", "1",
                "--peak-flops", "1e12"])
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith("benchmark: ") and "tok/s" in line and "MFU" in line and "MFU -" not in line
    assert "peak memory" in line and not (tmp_path / "o" / "state.json").exists()


def ddp_worker(rank, world, port, argv, out):
    # torchrun's environment. TORCHELASTIC_USE_AGENT_STORE: the rendezvous store is already served (by
    # the test, as torchrun's agent serves it), so no rank binds a port of its own.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    train.main(argv).save_trainable(Path(out) / f"rank{rank}.safetensors")
    # Its work done and saved, the rank leaves without the interpreter's teardown: there gloo's threads
    # can abort the process (pytorch/pytorch#179291), seen once in a clean-clone run under load.
    sys.stdout.flush()
    os._exit(0)


def test_ddp_two_processes_keep_identical_weights(tmp_path, demo):
    """torchrun's environment, 2 CPU processes on gloo, each reading its own half of the data:
    after 3 updates the trainables are identical on both ranks (only they are synchronised).
    The store is bound here on port 0, before the ranks start: no port to lose between a probe and a bind."""
    import torch.distributed as dist
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    argv = run_args(demo, tmp_path, "--steps", "3")
    ranks = torch.multiprocessing.spawn(ddp_worker, args=(2, store.port, argv, str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + 600
    while not ranks.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ranks.processes:
                p.kill()
            pytest.fail("test_ddp_two_processes_keep_identical_weights: the 2 ranks did not finish in 600 s")
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert not torch.equal(ranks[0]["gate.bias"], torch.full_like(ranks[0]["gate.bias"], -2.0))
    state = json.loads((tmp_path / "state.json").read_text())  # rank 0 saved
    assert state["options"]["world_size"] == 2 and state["tokens_seen"] == 3 * 2 * 2 * 16 * 2
    cfg = ob.Qwen2Config.from_pretrained(demo[0])
    single = prepare.load_data(train.parse_args(argv), cfg, 0, 1)["train"]
    halves = [prepare.load_data(train.parse_args(argv), cfg, r, 2)["train"] for r in (0, 1)]
    assert np.array_equal(np.concatenate(halves), single) and len(halves[0]) < len(single)

# ----------------------------------------------------------------------------------------
# Export: a Hugging Face folder that transformers loads (python ouroboros.py export)


def export(tiny, trained, out, *flags):
    ob.main(["export", "--model", str(tiny), "--trained", str(trained), "--out", str(out), *flags])
    return out


def base_with(tiny, trained):
    """The model an export of `trained` holds, built from the base as generation builds it."""
    model = ob.Ouroboros.from_pretrained(tiny, device="cpu", **ob.read_trainable_options(trained))
    model.load_trainable(trained)
    return model


@pytest.mark.parametrize("options", [None, dict(halting=True, coda_rank=2, controller="static")])
def test_an_export_reads_back_as_the_model_it_came_from(tiny, trained, tmp_path, options):
    """Ouroboros.from_pretrained(OUT) gives the base's logits with the trainables, to the bit. OUT holds the
    kept layers 0, 3 and 5 of 6 (the removed 1, 2 and 4 live on only in layer 3's 14 LoRA bases), the
    trainables, the tokenizer and this ouroboros.py; weights in safetensors, nothing pickled."""
    if options:  # the extensions' trainables (halting head, coda adapters) travel too
        trained = tmp_path / "t.safetensors"
        randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu", **options)).save_trainable(trained)
    out = export(tiny, trained, tmp_path / "hf", "--depth", "3")
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "modeling_ouroboros.py",
                                                     "ouroboros.py", "ouroboros.safetensors", "tokenizer.json"]
    with safe_open(out / "model.safetensors", framework="pt") as f:
        layers = {int(name.split(".")[2]) for name in f.keys() if name.startswith("model.layers.")}
        bases = [name for name in f.keys() if ".lora_" in name]
    assert layers == {0, 3, 5} and len(bases) == 14 and all(b.startswith("model.layers.3.") for b in bases)
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["depth"], config["auto_map"]["AutoModelForCausalLM"]) == \
        ("ouroboros", 3, "modeling_ouroboros.OuroborosForCausalLM")
    assert (out / "ouroboros.py").read_bytes() == Path(ob.__file__).read_bytes()
    assert (out / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()
    model, back = base_with(tiny, trained), ob.Ouroboros.from_pretrained(out)
    assert back.options == model.options and torch.equal(back(ids(), 3)[0], model(ids(), 3)[0])


def test_ouroboros_py_imports_neither_transformers_nor_the_project():
    """An export holds ouroboros.py alone: it imports nothing of the project, and transformers only in
    the modeling file it writes out (MODELING)."""
    import ast
    tree = ast.parse((HERE / "ouroboros.py").read_text())
    modules = {(node.module if isinstance(node, ast.ImportFrom) else alias.name).split(".")[0]
               for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not modules & {"transformers", "train", "checkpoint", "data", "experiments"}, modules
    assert "from transformers import" in ob.MODELING and "from .ouroboros import Ouroboros" in ob.MODELING


# What a transformers user runs, in a process of its own (transformers' copy of the remote code goes to
# HF_MODULES_CACHE, here under tmp_path): logits, the loss with labels, greedy tokens, padding refused.
TRANSFORMERS_USER = """
import sys, torch, transformers
from safetensors.torch import load_file, save_file
folder, inputs, outputs = sys.argv[1:]
x = load_file(inputs)
model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
result = model(x["idx"], labels=x["idx"])
greedy = model.generate(x["prompt"], max_new_tokens=8, do_sample=False)
save_file(dict(logits=result.logits.contiguous(), loss=result.loss, greedy=greedy), outputs)
try:
    model(x["idx"], attention_mask=torch.ones_like(x["idx"]).tril())
except ValueError as e:
    print(type(model).__module__.split(".")[0], transformers.__version__, e)
"""


def test_transformers_loads_an_export_with_our_logits_loss_and_greedy_tokens(tiny, trained, tmp_path):
    pytest.importorskip("transformers", reason="the export's transformers side: pip install transformers")
    out = export(tiny, trained, tmp_path / "hf", "--depth", "3")
    idx, prompt = ids(), ids(B=1, T=5)
    save_file({"idx": idx, "prompt": prompt}, tmp_path / "in.safetensors")
    run = subprocess.run([sys.executable, "-c", TRANSFORMERS_USER, str(out), "in.safetensors", "out.safetensors"],
                         cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("transformers_modules ") and run.stdout.endswith(
        " attention_mask has padding: Ouroboros attends to every position\n"), run.stdout
    got, model = load_file(tmp_path / "out.safetensors"), base_with(tiny, trained)
    logits, loss = model(idx, 3, F.pad(idx[:, 1:], (0, 1), value=-100))  # transformers' labels, shifted once
    torch.testing.assert_close(got["logits"], logits)
    torch.testing.assert_close(got["loss"], loss)
    assert torch.equal(got["greedy"], ob.generate(model, prompt, 8, 3, temperature=0))


# Each case: flags after "export --model {tiny} --trained {trained} --out {tmp}/out" (a later flag wins),
# and what the error line says. {tmp}/full holds a file of the user's; {tmp}/bare is tiny without a tokenizer.
BAD_EXPORTS = {
    "trained for another base": (["--trained", "{other}"],
                                 "saved with other options (config hidden_size: file 48, model 32"),
    "out holds files": (["--out", "{tmp}/full"], "--out {tmp}/full: holds files (an export never replaces anything"),
    "out is a file": (["--out", "{tmp}/full/mine.txt"], "--out {tmp}/full/mine.txt: is a file"),
    "out inside a file": (["--out", "{tmp}/full/mine.txt/x"],
                          "--out {tmp}/full/mine.txt/x: {tmp}/full/mine.txt is a file"),
    "depth past the trained table": (["--depth", "9"], "--depth 9 is outside 1..8 (max_steps)"),
    "trained not found": (["--trained", "{tmp}/none.safetensors"], "{tmp}/none.safetensors: not found"),
    "no tokenizer": (["--model", "{tmp}/bare"], "{tmp}/bare/tokenizer.json: not found"),
    "no model folder": (["--model", "{tmp}/none"], "--model {tmp}/none: no such folder"),
}


@pytest.mark.parametrize("case", list(BAD_EXPORTS))
def test_export_refuses_bad_input_in_one_line_before_loading_weights(tiny, trained, other_trained, tmp_path,
                                                                      monkeypatch, case):
    """Nothing is loaded, and nothing is written: the user's file is as it was, and no folder is left."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("mine")
    shutil.copytree(tiny, tmp_path / "bare", ignore=shutil.ignore_patterns("tokenizer.json"))
    before = sorted(tmp_path.rglob("*"))
    monkeypatch.setattr(ob.Checkpoint, "__init__", lambda *a: pytest.fail("weights loaded before the check"))
    flags, message = BAD_EXPORTS[case]
    fill = lambda text: text.format(tmp=tmp_path, other=other_trained)  # noqa: E731
    with pytest.raises(SystemExit) as e:
        export(tiny, trained, tmp_path / "out", *map(fill, flags))
    line = str(e.value.code)
    assert line.startswith("error: ") and "\n" not in line and fill(message) in line, line
    assert sorted(tmp_path.rglob("*")) == before and (tmp_path / "full" / "mine.txt").read_text() == "mine"


def edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


# Each case: what is done to an export of {trained} at OUT, and what the error says.
BAD_READS = {
    "a tensor missing": (lambda out, other: save_file(
        {k: v for k, v in load_file(out / "model.safetensors").items() if k != "model.norm.weight"},
        out / "model.safetensors"), "model.safetensors: not the tensors of its config.json "
                                   "(model.norm.weight: file missing, model (32,); 1 in all)"),
    "a depth past the table": (lambda out, other: edit_json(out / "config.json", depth=9),
                               "config.json: key 'depth' is 9: must be an integer in 1..8"),
    "an option of the wrong kind": (lambda out, other: edit_json(out / "config.json", ouroboros={"rank": "eight"}),
                                    "config.json: option 'rank' is 'eight' in its 'ouroboros': must be an integer"),
    "trainables of another base": (lambda out, other: shutil.copyfile(other, out / "ouroboros.safetensors"),
                                   "ouroboros.safetensors: saved with other options (rank: file 8, model 4"),
}


@pytest.mark.parametrize("case", list(BAD_READS))
def test_reading_a_damaged_export_is_one_line(tiny, trained, other_trained, tmp_path, case):
    out = export(tiny, trained, tmp_path / "hf")
    damage, message = BAD_READS[case]
    damage(out, other_trained)
    with pytest.raises(ValueError) as e:
        ob.Ouroboros.from_pretrained(out)
    assert message in str(e.value) and "\n" not in str(e.value), e.value


def test_an_export_is_read_with_its_own_options_and_a_base_is_no_export(tiny, trained, tmp_path):
    out = export(tiny, trained, tmp_path / "hf")
    with pytest.raises(ValueError, match=re.escape(f"{out}: an export is read with the options it was made with; "
                                                   "give none (given: rank)")):
        ob.Ouroboros.from_pretrained(out, rank=4)
    with pytest.raises(ValueError, match=re.escape(f"{tiny}: not an Ouroboros export (config.json: model_type "
                                                   "'qwen2' and no 'ouroboros' options; make one with python "
                                                   "ouroboros.py export)")):
        ob.Ouroboros.from_export(tiny)

# ----------------------------------------------------------------------------------------
# CUDA: bf16 frozen weights, flash attention (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def twins(tiny, device, dtype):
    """The same checkpoint and the same random trainables (seed 0) on `device` with frozen weights in
    `dtype`, and on the CPU in float32."""
    torch.manual_seed(0)
    reference = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu", dtype=torch.float32))
    model = ob.Ouroboros.from_pretrained(tiny, device=device, dtype=dtype)
    with torch.no_grad():
        for p, q in zip(model.trainable_parameters(), reference.trainable_parameters()):
            p.copy_(q)
    return model, reference


@cuda
def test_cuda_matches_cpu_in_float32_and_bf16_within_the_rounding_measured_on_the_cpu(tiny):
    """float32 on the GPU equals float32 on the CPU to round-off (TF32 off, torch's default for matmuls).
    bf16 differs from float32 by rounding that the loop amplifies, on any device: the bound is that
    difference as measured on the CPU for this very model (bf16 on the CPU against float32), with room
    for other kernels' rounding."""
    assert not torch.backends.cuda.matmul.allow_tf32
    idx = ids()
    gpu32, cpu32 = twins(tiny, "cuda", torch.float32)
    expected = cpu32(idx, depth=3)[0]
    torch.testing.assert_close(gpu32(idx.cuda(), depth=3)[0].cpu(), expected, atol=1e-4, rtol=1e-4)
    gpu16, cpu16 = twins(tiny, "cuda", torch.bfloat16)[0], twins(tiny, "cpu", torch.bfloat16)[0]
    cpu_rounding = (cpu16(idx, depth=3)[0].float() - expected).abs().max().item()
    gpu_rounding = (gpu16(idx.cuda(), depth=3)[0].float().cpu() - expected).abs().max().item()
    assert 0 < cpu_rounding and gpu_rounding <= 2 * cpu_rounding, (gpu_rounding, cpu_rounding)


@cuda
def test_cuda_bf16_trains_its_float32_trainables_and_generates(tiny):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cuda"))
    assert model.base.model.norm.weight.dtype == torch.bfloat16 and model.gate.weight.dtype == torch.float32
    idx = ids().cuda()
    model(idx, depth=3, targets=idx.roll(-1, 1), return_logits=False)[1].backward()
    torch.optim.AdamW(model.trainable_parameters(), lr=3e-4).step()
    assert (model.gate.bias != -2.0).all()
    assert torch.equal(ob.generate(model, idx, 5, depth=2, top_k=1)[:, :12], idx)


@cuda
def test_cuda_compiled_training_step_equals_eager():
    """train.py's default on CUDA: the compiled model's loss and gradients are the eager ones (float32,
    where the compiler's reordering is round-off; trainables of std 0.05, as on the CPU)."""
    torch.manual_seed(0)
    model = randomize_trainables(ob.Ouroboros.from_config(TINY, device="cuda", dtype=torch.float32), std=0.05)
    idx = ids().cuda()
    results = []
    for forward in (model, torch.compile(model)):
        loss = forward(idx, 3, idx.roll(-1, 1), return_logits=False)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
        model.zero_grad(set_to_none=True)
    (eager, g_eager), (compiled, g_compiled) = results
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_compiled, g_eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@cuda
@pytest.mark.parametrize("halting", [False, True])
def test_cuda_compiled_decoding_equals_eager_decoding_and_recomputation(tiny, halting):
    """generate(compile=True) on the GPU: CUDA graphs replayed token after token give the eager tokens, and
    both are greedy decoding by recomputation; with halting too (float32: no near-ties from rounding)."""
    model = (halting_model(tiny, -0.3) if halting else randomize_trainables(
        ob.Ouroboros.from_pretrained(tiny, device="cpu"))).cuda()
    prompt = ids(B=2, T=7).cuda()
    with torch.no_grad():
        expected = greedy_by_recomputation(lambda x: model(x, depth=3), prompt, 10)
    assert torch.equal(ob.generate(model, prompt, 10, depth=3, top_k=1), expected)
    assert torch.equal(ob.generate(model, prompt, 10, depth=3, top_k=1, compile=True), expected)


@cuda
def test_cuda_checkpointing_gives_the_same_loss_and_gradients(tiny):
    """--checkpointing recomputes each loop step in backward: the same numbers, bf16 on the GPU."""
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cuda"))
    idx = ids().cuda()
    results = []
    for checkpointing in (False, True):
        model.checkpointing = checkpointing
        loss = model(idx, 4, idx.roll(-1, 1), return_logits=False)[1]
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.trainable_parameters()]))
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=0)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@cuda
def test_cuda_flash_attention_serves_grouped_query_heads():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn = ob.Attention(TINY).cuda().bfloat16()
    x = torch.randn(2, 16, TINY.hidden_size, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take this call
        attn(x, ob.rope(TINY, torch.arange(16, device="cuda"), torch.bfloat16))

def test_ci_runs_the_readme_commands():
    """.ci/run installs into an empty venv with the README's own lines and runs its test command: every
    command of .ci/run after the venv is made is a line of the README's install block, word for word."""
    readme = (HERE / "README.md").read_text()
    block = readme.split("## Install and test", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    ci = (HERE / ".ci" / "run").read_text().splitlines()
    commands = ci[ci.index('source "$venv/bin/activate"') + 1:]
    assert any("venv" in line for line in ci[:ci.index('source "$venv/bin/activate"')])
    assert commands and all(line in block.splitlines() for line in commands), commands
    assert commands[-1] == "python -m pytest -q test_ouroboros.py"

# ----------------------------------------------------------------------------------------
# The miniature study (experiments/miniature.py) at its smoke budget


def test_miniature_quick_runs_every_stage_and_writes_every_row(tmp_path):
    """corpus → tokenizer → data → pretrained base → every variant → report, as a user runs it;
    then the same command again finds every stage done and only writes the report."""
    cmd = [sys.executable, "experiments/miniature.py", "--quick", "--work", str(tmp_path / "work"),
           "--results", str(tmp_path / "results")]
    first = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    study = json.loads((tmp_path / "results" / "miniature.json").read_text())
    todo, unsettled = miniature.todo(tmp_path / "work", miniature.QUICK)
    assert study["not run yet"] == study["sweeps not settled"] == [] and not unsettled
    assert len({r.folder for r in todo}) == len(todo)
    rows, best = study["rows"], {v: b for v, (_, b) in study["sweeps"].items()}
    for run in todo:  # every run scored, with each of its seeds and its largest gradient norm
        assert run.seed in rows[run.row]["seeds"], run
        assert len(rows[run.row]["largest gradient norm"]) == len(rows[run.row]["seeds"]), run
    for row in miniature.SWEPT:  # the headline rows, controls and references: every seed at their best rates
        assert sorted(rows[miniature.at(row, best[row], miniature.QUICK)]["seeds"]) == list(miniature.QUICK.seeds)
        assert sorted(rows[miniature.at(row, best[row], miniature.QUICK) + " [second base]"]["seeds"]) == list(
            miniature.QUICK.seeds)
    for row in (miniature.LOOP, miniature.OURS, miniature.BLIND, miniature.CODA_ALONE):  # and at one rate for all
        assert sorted(rows[row]["seeds"]) == list(miniature.QUICK.seeds)
    windows = [(run.base, tmp_path / "work" / "runs" / run.folder / "windows.json") for run in todo]
    scored = [(base, json.loads(file.read_text())) for base, file in windows if file.is_file()]
    refs = [(base, sorted(w.keys() & {"baseline", "full"})) for base, w in scored if "baseline" in w]
    assert refs == [(0, ["baseline", "full"]), (1, ["baseline", "full"])]  # frozen: scored once per base
    assert {"baseline model", "full model", "baseline model [second base]", "full model [second base]",
            "dynamic, mean pool (the paper's), prefix-pooled (as it generates)",
            f"{miniature.AUTHORS}, evaluated at depth 16"} <= set(rows)
    claims = study["claims"]
    assert len(claims["at best rates"]) == len([c for c in miniature.CLAIMS if miniature.AUTHORS not in c  # one rate
                                                 and "rank 64" not in c[0]])  # the quick budget's ranks: 8 and 32
    for claim in claims["at best rates"] + claims["one rate for all"]:  # every interval on both held-out sets
        for split in miniature.HELD_OUT:
            c = claim[split]
            assert c["lo"] <= c["diff"] <= c["hi"] and c["batches"] > 1, claim
    table = (tmp_path / "results" / "miniature.md").read_text()
    at_best, sweeps, one_rate = table.split("### ")[1:4]
    assert all(f"| {r.name} | {best[r.rate]:g} |" in at_best for r in miniature.study_rows(miniature.QUICK) if r.rate)
    assert all(f"| {r.name} | 0.002 |" in one_rate for r in miniature.study_rows(miniature.QUICK) if r.seeds)
    assert all(f"| {v} | " in sweeps for v in miniature.SWEPT) and "gap recovered %, equally trained" in at_best
    assert "| 1. ours against the baseline given the same updates (prune, then heal) |" in at_best
    frozen = next(line for line in at_best.splitlines() if line.startswith("| baseline model | - | - |"))
    assert frozen.split(" | ")[5:9] == ["0.0", "0.0", "-", "-"]  # the frozen pair's gap: against itself only
    corpus = study["corpus"]
    assert corpus["files"] > 10 and len(corpus["sha256"]) == 64 and corpus["val_tokens"] > 0
    assert corpus["held_out_families"] and corpus["prose"]["topics"] > 10 and len(corpus["prose"]["sha256"]) == 64
    if importlib.util.find_spec("matplotlib"):  # the figures, or the line that says how to get them
        assert (tmp_path / "results" / "miniature.png").is_file()
    else:
        assert "pip install matplotlib" in first.stdout and not (tmp_path / "results" / "miniature.png").exists()
    again = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True)
    assert again.returncode == 0 and "[runs]" not in again.stdout and "[base]" not in again.stdout
    report = subprocess.run(cmd + ["--report"], cwd=HERE, capture_output=True, text=True)  # runs nothing, same tables
    assert report.returncode == 0 and (tmp_path / "results" / "miniature.md").read_text() == table
    refused = subprocess.run(cmd + ["--report", "--rerun", todo[0].folder], cwd=HERE, capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith("error: --report writes the report of what is done")
    second = next(run for run in todo if run.base and run.row.startswith(miniature.LOOP))  # afresh, on its base
    fresh = subprocess.run(cmd + ["--rerun", second.folder], cwd=HERE, capture_output=True, text=True)
    assert fresh.returncode == 0 and fresh.stdout.count("difference +0.0e+00") == 2, fresh.stdout + fresh.stderr
    wrong = subprocess.run(cmd + ["--rerun", "nope"], cwd=HERE, capture_output=True, text=True)
    assert wrong.returncode == 1 and wrong.stderr.startswith("error: --rerun nope: not a run")
    assert "[" not in wrong.stdout  # refused before any stage ran

# ----------------------------------------------------------------------------------------
# The side-by-side benchmark's profile (experiments/benchmark.py --profile)


@pytest.mark.parametrize("argv, message", [
    (["--against", "HEAD", "--rounds", "0"], "error: --rounds 0: must be at least 1"),
    (["--against", "HEAD", "--dtypes", "float64"], "error: --dtypes float64: 'float64' is not bfloat16 or float32"),
    (["--profile", "--model", "nowhere"], "nowhere/config.json: not found"),
    (["--profile", "--depth", "0"], "error: --depth 0: must be in 1..64"),
    (["--against", "HEAD", "--checkpoint", "{tmp}/notes"], "error: --checkpoint {tmp}/notes: neither a checkpoint"),
])
def test_benchmark_refuses_bad_options_before_any_work(tmp_path, monkeypatch, argv, message):
    from experiments import benchmark
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("mine")
    monkeypatch.setattr(benchmark, "worktree", lambda *a: pytest.fail("a worktree before the check"))
    with pytest.raises(SystemExit) as e:
        benchmark.main([a.format(tmp=tmp_path) for a in argv])
    assert str(e.value.code).startswith("error: ") and message.format(tmp=tmp_path) in str(e.value.code)
    assert [f.name for f in (tmp_path / "notes").iterdir()] == ["mine.txt"]


def test_benchmark_reads_a_sharded_checkpoint_and_never_writes_into_it(tiny, tmp_path, monkeypatch):
    """--checkpoint on a model folder without a model.safetensors (sharded): used as it is."""
    from experiments import benchmark
    shutil.copytree(tiny, tmp_path / "model")
    before = {f.name: f.read_bytes() for f in (tmp_path / "model").iterdir()}

    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop
    monkeypatch.setattr(benchmark, "worktree", stop)
    with pytest.raises(Stop):
        benchmark.main(["--against", "HEAD", "--checkpoint", str(tmp_path / "model")])
    assert {f.name: f.read_bytes() for f in (tmp_path / "model").iterdir()} == before


def test_benchmark_profile_counts_the_step_it_takes(tiny, capsys):
    """One step of the tiny model, profiled. The tensors alive during the step include, at the end
    of its forward pass, everything kept for backward, so their peak is at least that much."""
    from experiments import benchmark
    benchmark.profile(HERE, tiny, "float32", depth=2)
    out = capsys.readouterr().out
    kept, peak = (float(x.replace(",", "")) for x in re.search(
        r"kept for backward: ([\d,.]+) MB .* alive during the step: ([\d,.]+) MB", out).groups())
    assert 0 < kept <= peak and "matmul" in out and "attention" in out

# ----------------------------------------------------------------------------------------
# The GPU check (experiments/gpu.py) in its CPU smoke mode


def test_gpu_script_smoke_mode_runs_every_stage(tmp_path):
    """python experiments/gpu.py --smoke, as the suite's CPU stand-in for the GPU run: every stage in
    order, each ok with every figure of the report present and plausible, in gpu.json and in gpu.md.
    (This name must not hold the word its first stage selects with pytest -k: it would run itself.)"""
    from experiments import gpu
    run = subprocess.run([sys.executable, "experiments/gpu.py", "--smoke", "--results", str(tmp_path)],
                         cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert all(report["environment"][k] for k in ("date", "gpu", "torch", "cuda", "cudnn", "commit"))
    stages = [s for s in gpu.STAGES if s.name != "authors"]  # that one needs --authors DIR
    assert [s["stage"] for s in report["stages"]] == [s.name for s in stages]
    table, log = (tmp_path / "gpu.md").read_text(), (tmp_path / "gpu.log").read_text()
    for stage, done in zip(stages, report["stages"]):
        assert done["status"] == "ok" and 0 < done["wall_s"] <= done["limit_s"] <= stage.limit_s, done
        assert f"| {stage.name} | status | ok" in table and f"===== {stage.name}: " in log
        for key, label, _ in stage.figures:
            value = done["figures"][key]  # counts may be 0; measurements must be > 0; texts must say something
            assert (value >= 0 if type(value) is int else value > 0 if type(value) is float else
                    isinstance(value, str) and value), (stage.name, key, value)
            assert f"| {stage.name} | {label} | " in table
    figures = {s["stage"]: s["figures"] for s in report["stages"]}
    tests = figures["cuda-tests"]
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] + tests["skipped"] >= 2
    assert all(figures["sdpa-kernels"][f"{backend}_{call}"].startswith(("accepted", "refused: "))
               for backend in ("flash", "efficient") for call in ("training", "decode"))
    assert "--compile" in figures["train-compile"]["command"] and "--checkpointing" in figures["train-deep"]["command"]
    assert figures["decode"]["long_prompt_tokens"] > figures["decode"]["short_prompt_tokens"]
    assert 0 < figures["decode"]["work_ops_per_token"] < figures["decode"]["ops_per_token"]
    assert not list(tmp_path.glob("*.tmp"))  # every file renamed into place

def test_saved_weights_are_readable_as_any_file_made_here(tiny, tmp_path):
    """safetensors writes a file for its owner alone (0600); ours get what open() would give them."""
    umask = os.umask(0o022)
    try:
        ob.Ouroboros.from_pretrained(tiny, device="cpu").save_trainable(tmp_path / "t.safetensors")
        assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


# ----------------------------------------------------------------------------------------
# lm-evaluation-harness through our model (experiments/evaluate.py; skipped without lm-eval)


@pytest.fixture(scope="module")
def evaluation(tiny, tmp_path_factory):
    """(the lm-eval module, our evaluate module, trainables of `tiny` with non-zero values)."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is an extra: pip install -r experiments/"
                                  "requirements-eval.txt")
    from experiments import evaluate
    file = tmp_path_factory.mktemp("eval") / "ouroboros.safetensors"
    torch.manual_seed(0)
    randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cpu"), std=0.1).save_trainable(file)
    return lm_eval, evaluate, file


def requests(kind, *arguments):
    from lm_eval.api.instance import Instance
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(arguments)]


@pytest.mark.parametrize("which", ["ours", "baseline", "full"])
def test_lm_eval_receives_our_models_sum_of_token_log_probabilities(tiny, evaluation, which):
    """Batched, padded and truncated as lm-eval's requests come, each loglikelihood is the sum of the
    continuation's token log-probabilities that the model gives it alone, to float32 round-off."""
    _, evaluate, file = evaluation
    lm = evaluate.OuroborosLM(str(tiny), file, which, depth=3, batch_size=3, max_length=24, device="cpu")
    source = (HERE / "ouroboros.py").read_text()
    pairs = [(source[:40], source[40:52]), ("def main(", "argv=None):"), ("", "import torch"),
             (source[:300], source[300:310]), ("x = 1 ", "+ 2")]  # one truncated to 24 tokens; an empty context
    got = lm.loglikelihood(requests("loglikelihood", *pairs))
    model = ob.Qwen2.from_pretrained(tiny, device="cpu") if which == "full" else \
        ob.Ouroboros.from_pretrained(tiny, device="cpu", **ob.read_trainable_options(file))
    if which == "ours":
        model.load_trainable(file)
    tok = ob.read_tokenizer(tiny)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        context, continuation = context.rstrip(" "), context[len(context.rstrip(" ")):] + continuation
        ctx = tok.encode(context, add_special_tokens=False).ids or [tok.token_to_id("<|endoftext|>")]
        cont = tok.encode(context + continuation, add_special_tokens=False).ids[len(ctx) if context else 0:]
        x = torch.tensor([(ctx + cont)[-25:][:-1]])
        logits = {"ours": lambda: model(x, 3)[0], "baseline": lambda: model.baseline(x)[0],
                  "full": lambda: model(x)[0]}[which]().float()
        at = F.log_softmax(logits[0, -len(cont):], -1)
        expected = at.gather(1, torch.tensor(cont)[:, None]).sum().item()
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-5)
        assert greedy == bool((at.argmax(-1) == torch.tensor(cont)).all())


def test_lm_eval_rolling_loglikelihood_and_generation_go_through_our_model(tiny, evaluation):
    """loglikelihood_rolling: a text that fits in one window is log p(text | <|endoftext|>); in windows
    of 8 tokens each token is still predicted once. generate_until: ob.generate's greedy tokens, cut
    at the first stop string."""
    _, evaluate, file = evaluation
    lm = evaluate.OuroborosLM(str(tiny), file, "ours", depth=2, device="cpu")
    text = (HERE / "README.md").read_text()[:40]
    tok = ob.read_tokenizer(tiny)
    tokens = [tok.token_to_id("<|endoftext|>")] + tok.encode(text, add_special_tokens=False).ids
    logits = lm.model(torch.tensor([tokens]), 2)[0].float()
    expected = F.log_softmax(logits[0, :-1], -1).gather(1, torch.tensor(tokens[1:])[:, None]).sum().item()
    assert lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))[0] == pytest.approx(expected, 1e-5)
    lm.max_length = 8
    assert lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))[0] < 0
    lm.max_length = 64
    prompt = "def main("
    [got] = lm.generate_until(requests("generate_until", (prompt, {"until": ["\n"], "max_gen_toks": 12})))
    idx = torch.tensor([tok.encode(prompt, add_special_tokens=False).ids])
    new = ob.generate(lm.model, idx, 12, 2, temperature=0)[0, idx.size(1):].tolist()
    assert got == tok.decode(new).split("\n")[0]


def test_lm_eval_scores_the_baseline_the_full_model_and_ours_on_the_local_task(tiny, evaluation, tmp_path, capsys):
    """One command: the three models through lm-eval on the next-line task made from held-out files
    (here the json family of this Python's library), a table, and results.json."""
    _, evaluate, file = evaluation
    shutil.copytree(tiny, tmp_path / "base")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "meta.json").write_text(json.dumps({"held_out_families": ["json"]}))
    argv = ["--model", str(tmp_path / "base"), "--trained", str(file), "--depth", "2", "--out",
            str(tmp_path / "eval"), "--limit", "12", "--device", "cpu"]
    table = evaluate.main(argv)
    docs = [json.loads(line) for line in (tmp_path / "eval" / "tasks" / "stdlib_next_line.jsonl").open()]
    assert len(docs) == 200 and all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in docs)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    assert list(results) == ["baseline", "full", "ours"] == list(table)
    for which in results:
        assert 0 <= results[which]["stdlib_next_line"]["acc"] <= 1
    assert "stdlib_next_line acc: baseline " in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "stdlib_next_line,no_such_task"], "--tasks: unknown task 'no_such_task'"),
    (["--trained", "{other}"], "saved with other options"),
    (["--depth", "0"], "--depth 0 is outside 1..64"),
    (["--depth", "65"], "--depth 65 is outside 1..64"),
    (["--trained", "{mean}"], "pool='mean' lets every position see the future"),
    ([], "no config.json"),
])
def test_lm_eval_command_refuses_bad_input_in_one_line(tiny, evaluation, other_trained, tmp_path, argv, message):
    _, evaluate, file = evaluation
    model = str(tmp_path / "nowhere") if argv == [] else str(tiny)
    if "{mean}" in argv:
        mean = ob.Ouroboros.from_pretrained(tiny, device="cpu", pool="mean")
        mean.save_trainable(tmp_path / "mean.safetensors")
    argv = [a.replace("{other}", str(other_trained)).replace("{mean}", str(tmp_path / "mean.safetensors"))
            for a in argv]
    with pytest.raises(SystemExit) as e:
        evaluate.main(["--model", model, "--trained", str(file), "--out", str(tmp_path / "eval"), *argv])
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "eval").exists()  # refused before anything is written: the corrected command runs


def test_our_qwen2_gives_the_logits_of_transformers_qwen2(tiny):
    """The reference implementation of Qwen2, where the extra is installed: the same checkpoint, the
    same logits (float32), sharded checkpoint and tied embeddings included."""
    transformers = pytest.importorskip("transformers", reason="transformers is an extra: pip install -r "
                                       "experiments/requirements-eval.txt")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    idx = ids()
    with torch.no_grad():
        expected = reference(idx).logits
    torch.testing.assert_close(ob.Qwen2.from_pretrained(tiny, device="cpu")(idx)[0], expected, atol=1e-5, rtol=1e-5)
