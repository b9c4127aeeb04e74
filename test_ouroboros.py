"""Tests that read like the specification (SPEC.md). CPU, offline, a few seconds each.

Tiny random Qwen2 checkpoints are written to tmp_path in the exact Hugging Face layout
(config.json, model.safetensors or an index + shards, tokenizer.json) and read back
through the real loader.
"""
import json
import math

import pytest
import torch

import ouroboros as ob
from train import write_checkpoint, write_tokenizer

TINY = ob.Qwen2Config(vocab_size=288, hidden_size=32, intermediate_size=48, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=5e4, tie_word_embeddings=True)
# Default split of 6 layers: prelude [0, 1), recurrent 3, coda [5, 6); removed 1, 2, 4.

QWEN25_3B = ob.Qwen2Config(vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                           num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                           rope_theta=1e6, tie_word_embeddings=True)


def random_tensors(cfg, std=0.2):
    read = ob.random_weights(cfg, "cpu", std)
    return {name: read(name) for name in ob.Qwen2.on_meta(cfg).state_dict()}


def write_tiny(path, cfg=TINY, shards=1, tensors=None, edit=None):
    """A tiny random checkpoint + tokenizer; edit(config_dict) may change config.json."""
    config = cfg.to_dict()
    if edit:
        edit(config)
    write_checkpoint(path, config, tensors or random_tensors(cfg), shards)
    write_tokenizer(path, [open(ob.__file__).read()], vocab_size=cfg.vocab_size - 16)
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
    cos_sin = ob.rope(TINY, 0, 5, "cpu")
    h_new = ob.rms_norm(model.layer(h, cos_sin), torch.ones(TINY.hidden_size), TINY.rms_norm_eps)
    keep = 1 - 1 / (1 + math.e ** 2)
    assert keep == pytest.approx(0.8808, abs=1e-4)
    torch.testing.assert_close(model.step(h, 0, cos_sin), keep * h + (1 - keep) * h_new)


def test_step_norm_gives_each_step_its_own_unit_rms(tiny):
    model = ob.Ouroboros.from_pretrained(tiny, gate=False, device="cpu")
    h = torch.randn(2, 5, TINY.hidden_size) * 7
    out = model.step(h, 0, ob.rope(TINY, 0, 5, "cpu"))
    torch.testing.assert_close(out.pow(2).mean(-1), torch.ones(2, 5), atol=1e-4, rtol=0)
    assert model.step_norms.shape == (64, TINY.hidden_size)


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
    write_checkpoint(path, TINY.to_dict(), {**random_tensors(TINY), "model.layers.6.mlp.up_proj.weight": torch.zeros(1)})


def config_edit(**changes):
    return lambda path: (path / "config.json").write_text(json.dumps({**TINY.to_dict(), **changes}))


BAD_CHECKPOINTS = {
    "missing config.json": (lambda p: (p / "config.json").unlink(), "config.json: not found"),
    "missing shard": (lambda p: (p / "model-00002-of-00003.safetensors").unlink(),
                      "model-00002-of-00003.safetensors: shard not found"),
    "no weights": (lambda p: [f.unlink() for f in p.glob("model*")], "no model.safetensors"),
    "missing tensor": (drop("model.layers.4.self_attn.k_proj.bias"), "'model.layers.4.self_attn.k_proj.bias' is missing"),
    "unexpected tensor": (extra, "unexpected tensor 'model.layers.6.mlp.up_proj.weight'"),
    "wrong shape": (reshape, r"'model.layers.2.mlp.up_proj.weight' has shape \(47, 32\), config.json implies \(48, 32\)"),
    "truncated file": (lambda p: p.joinpath("model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}"),
                       "model.safetensors: not a readable safetensors file"),
    "model_type": (config_edit(model_type="llama"), "model_type 'llama' is not supported"),
    "sliding window": (config_edit(use_sliding_window=True), "sliding-window attention is not supported"),
    "rope scaling": (config_edit(rope_scaling={"type": "yarn", "factor": 4.0}), "rope scaling .* is not supported"),
    "missing key": (lambda p: (p / "config.json").write_text(json.dumps(
        {k: v for k, v in TINY.to_dict().items() if k != "hidden_size"})), "key 'hidden_size' is missing"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_is_refused_clearly(tmp_path, case):
    break_it, message = BAD_CHECKPOINTS[case]
    write_tiny(tmp_path, shards=3 if case == "missing shard" else 1)
    break_it(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
        ob.Ouroboros.from_pretrained(tmp_path, device="cpu")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("options, message", [
    (dict(prelude=4, recurrent=2), "split prelude=4, recurrent=2, coda=1 is out of range for 6 layers"),
    (dict(recurrent=5), "out of range"),
    (dict(prelude=3, recurrent=3, coda=2), "removes no layer"),
    (dict(rank=17), r"rank 17 is out of range for self_attn.k_proj \(16 x 32\)"),
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
def test_token_outside_vocabulary_is_refused(tiny, bad):
    idx = ids()
    idx[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside the vocabulary 0..{TINY.vocab_size - 1}"):
        ob.Ouroboros.from_pretrained(tiny, device="cpu")(idx)

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


@pytest.mark.parametrize("flag", [[], ["--baseline"], ["--full"], ["--trained"]])
def test_command_line_prints_a_continuation(tiny, tmp_path, capsys, flag):
    if flag == ["--trained"]:
        model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, rank=4, device="cpu"))
        model.save_trainable(tmp_path / "t.safetensors")
        flag = ["--trained", str(tmp_path / "t.safetensors")]
    ob.main(["--model", str(tiny), "--prompt", "class Ouroboros", "--depth", "2",
             "--max-new-tokens", "8", "--top-k", "5", *flag])
    out, err = capsys.readouterr()
    assert out.startswith("class Ouroboros") and len(out) > len("class Ouroboros\n")
    assert "decode:" in err and "tokens/s" in err


def test_command_line_refuses_trainables_of_another_model(tiny, tmp_path, capsys):
    other = write_tiny(tmp_path / "other", ob.Qwen2Config(**{**vars(TINY), "hidden_size": 48}))
    ob.Ouroboros.from_pretrained(other, device="cpu").save_trainable(tmp_path / "t.safetensors")
    with pytest.raises(SystemExit, match="saved with other options .*config hidden_size: file 48, model 32"):
        ob.main(["--model", str(tiny), "--prompt", "hi", "--trained", str(tmp_path / "t.safetensors")])


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "hi", "--max-new-tokens", "4", "--top-k", "0"], "top_k=0"),
    (["--prompt", "hi", "--max-new-tokens", "4", "--temperature", "-0.5"], "temperature=-0.5"),
    (["--prompt", "hi", "--max-new-tokens", "100"], "exceeds the model's 64 positions"),
])
def test_command_line_refuses_bad_input_in_one_line(tiny, args, message):
    with pytest.raises(SystemExit, match=f"^error: .*{message}[^\\n]*$"):
        ob.main(["--model", str(tiny), *args])

# ----------------------------------------------------------------------------------------
# CUDA: bf16 frozen weights, flash attention (skipped without a GPU)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_bf16_model_matches_float32_and_trains(tiny):
    model = randomize_trainables(ob.Ouroboros.from_pretrained(tiny, device="cuda"))
    assert model.base.model.norm.weight.dtype == torch.bfloat16
    reference = ob.Ouroboros.from_pretrained(tiny, device="cpu")
    with torch.no_grad():  # same checkpoint; copy the random trainables across
        for p, q in zip(model.trainable_parameters(), reference.trainable_parameters()):
            q.copy_(p)
    idx = ids()
    logits, loss = model(idx.cuda(), depth=3, targets=idx.roll(-1, 1).cuda())
    torch.testing.assert_close(logits.float().cpu(), reference(idx, depth=3)[0], atol=0.1, rtol=0.05)
    loss.backward()
    torch.optim.AdamW(model.trainable_parameters(), lr=3e-4).step()
    assert (model.gate.bias != -2.0).all()
    assert torch.equal(ob.generate(model, idx.cuda(), 5, depth=2, top_k=1)[:, :12].cpu(), idx)


@cuda
def test_cuda_flash_attention_serves_grouped_query_heads():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    attn = ob.Attention(TINY).cuda().bfloat16()
    x = torch.randn(2, 16, TINY.hidden_size, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # raises if flash cannot take this call
        attn(x, ob.rope(TINY, 0, 16, "cuda"))
