"""
Ouroboros: a recursive transformer that re-weights its looped layer at every step.

A from-scratch, single-file implementation of "Ouroboros: Dynamic Weight Generation
for Recursive Transformers via Input-Conditioned LoRA Modulation" (arXiv 2604.02051).

A pretrained Qwen2.5-3B (36 layers) is cut in three. The first 8 layers (the Prelude)
and the last 8 (the Coda) are kept, frozen. Of the 20 layers between them only layer 18
survives, and it is applied `depth` times in a loop. So that each pass can do something
different, a small Controller network reads the hidden state and emits, for step s, a
vector c_s that scales the directions of a frozen low-rank (LoRA) basis on each of the
layer's seven projections. The basis is the SVD of what the removed layers did
differently from layer 18, so the Controller starts from the directions that matter.

    ids ─► embed ─► Prelude: layers 0..7 (frozen, run without autograd)
                      │ h
         ┌────────────┤  for s = 0 .. depth-1:
         │   c_s   = Controller(pool(h), s)                      (7 targets × r)
         │   h_new = StepNorm_s( Layer_18(h; W + (α/r) B diag(c_s) A) )
         │   g     = σ(W_g [h_new; h] + b_g)                     (b_g = -2: keep 88% of h)
         └── h     = g ⊙ h_new + (1 - g) ⊙ h
                      │
                   Coda: layers 28..35 (frozen) ─► norm ─► lm_head ─► logits

Everything of Qwen2 is frozen; only the Controller, the gate and the per-step norms
train: 9,193,088 numbers at rank 8 on Qwen2.5-3B.

    python ouroboros.py --model DIR --prompt "Once upon a time" --depth 4   # generate
    python train.py --depth 4 --rank 8                                      # train
    python ouroboros.py export --model DIR --trained FILE --out HF_DIR      # a folder transformers loads
    pytest test_ouroboros.py                                                # test

Part 1 is the method in plain PyTorch, in the paper's order: config → Qwen2 → surgery and SVD
bases → Controller → the recurrent model (gate, per-step norms, the loop) → loading → generation.
It runs on its own: cut the file at the PART 2 banner, and what is left loads a checkpoint,
trains and generates (with the causal pool), with the same numbers to float32 round-off (a test
runs it so). The classes Part 2 extends keep their names, so what the whole file runs is Part 2's.
Part 2 plugs into Part 1 what a paper leaves out: kernels that keep less for backward, mixed
precision, per-token halting, coda adapters, checkpointing, compiled decoding, the checks of
every input, FLOP counting, the export to a Hugging Face folder and the command line.
"""
import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# The seven projections of a layer that get a LoRA basis, named as in the checkpoint.
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MAX_STEPS = 64  # rows of the Controller's step table by default: depth can be 1..64

# ========================================================================================
# PART 1: THE METHOD
# ========================================================================================

# ----------------------------------------------------------------------------------------
# Config: one dataclass, filled from the checkpoint's config.json


@dataclass
class Qwen2Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_pretrained(cls, path):
        return cls.from_dict(json.loads((Path(path) / "config.json").read_text()))

    @classmethod
    def from_dict(cls, raw):
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__ if name in raw})

    def to_dict(self):
        """config.json contents, as transformers writes them."""
        return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], **asdict(self)}

# ----------------------------------------------------------------------------------------
# Qwen2 blocks: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU MLP


def rms_norm(x, weight, eps):
    """x · rsqrt(mean(x²) + eps), computed in float32, cast back, times the weight."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * x32.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def rope(cfg, pos, dtype=torch.float32):
    """cos and sin of the rotary angles pos · θ^(-2i/hd) of positions pos (T,), computed in float32
    whatever the weights, then given in `dtype`, the embeddings' (cast once here, not at every call)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=pos.device).float() / hd)  # (hd/2,)
    angles = torch.outer(pos.float(), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], -1)  # (T, hd): dimension i pairs with i + hd/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate each pair (x_i, x_{i+hd/2}) of x (B, n_head, T, hd) by its angle."""
    x1, x2 = x.chunk(2, -1)  # (B, n_head, T, hd/2) each
    return x * cos + torch.cat([-x2, x1], -1) * sin


def project(linear, x, c):
    """linear(x). Only the looped layer's projections take a modulation c: the surgery makes them
    LoRALinear, and the loop passes c; every other layer is called with c = None."""
    return linear(x) if c is None else linear(x, c)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        self.q_proj = nn.Linear(d, self.n_head * hd, bias=True)
        self.k_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.v_proj = nn.Linear(d, self.n_kv * hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * hd, d, bias=False)

    def forward(self, x, cos_sin, cache=None, c=None):
        B, T, _ = x.shape
        q = project(self.q_proj, x, c).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k, v, mask = self.keys_values(x, cos_sin, cache, c)  # (B, n_kv, keys, hd) each
        # Causal over the sequence (training, the prompt); a decoded token attends to the keys the
        # cache holds (mask). enable_gqa: the n_kv heads serve n_head queries without repeating K and V.
        y = F.scaled_dot_product_attention(apply_rope(q, *cos_sin), k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=True)  # (B, nh, T, hd)
        return project(self.o_proj, y.transpose(1, 2).reshape(B, T, -1), c)  # (B, T, d)

    def keys_values(self, x, cos_sin, cache=None, c=None):
        """K (rotated) and V of x, and no mask; with a cache, what KVCache.update gives."""
        B, T, _ = x.shape
        k = project(self.k_proj, x, c).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        v = project(self.v_proj, x, c).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, n_kv, T, hd)
        k = apply_rope(k, *cos_sin)
        return cache.update(k, v) if cache is not None else (k, v, None)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj, self.up_proj = nn.Linear(d, i, bias=False), nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x, c=None):
        return project(self.down_proj, self.swiglu(project(self.gate_proj, x, c), project(self.up_proj, x, c)), c)

    @staticmethod
    def swiglu(gate, up):
        return F.silu(gate) * up


class Block(nn.Module):
    """Pre-norm decoder layer: h += attn(norm(h)); h += mlp(norm(h))."""

    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos_sin, cache=None, c=None):
        h = h + self.self_attn(self.input_layernorm(h), cos_sin, cache, c)
        return h + self.mlp(self.post_attention_layernorm(h), c)

# ----------------------------------------------------------------------------------------
# Qwen2: embedding, the layers, final norm and head


class Qwen2(nn.Module):
    """The Qwen2 decoder. Module names mirror the checkpoint's tensor names, so loading is
    an identity map. `layers` keeps a subset of the layers under their checkpoint numbers
    (model.layers.18 is layer 18 of the file); the default keeps them all."""

    def __init__(self, cfg, layers=None):
        super().__init__()
        self.cfg = cfg
        keep = range(cfg.num_hidden_layers) if layers is None else layers
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleDict({str(i): Block(cfg) for i in keep}),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        if not cfg.tie_word_embeddings:  # tied: the output projection is the embedding matrix
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, path, layers=None, device=None, dtype=None):
        cfg = Qwen2Config.from_pretrained(path)
        device, dtype = placement(device, dtype)
        return load_frozen(cls.on_meta(cfg, layers), Checkpoint(path, device).read, dtype)

    @classmethod
    def on_meta(cls, cfg, layers=None):
        """The module with shapes but no storage, to be filled by load_frozen."""
        with torch.device("meta"):
            return cls(cfg, layers)

    def embed(self, idx, caches=None):
        """Token embeddings (B, T, d) and the rotary table of their positions; when generating, the
        positions go on from where the caches are."""
        pos = torch.arange(idx.size(1), device=idx.device) + (caches.position.at if caches is not None else 0)
        h = self.model.embed_tokens(idx)  # (B, T, d)
        return h, rope(self.cfg, pos, h.dtype)

    def run(self, layers, h, cos_sin, caches=None):
        """h through the kept layers numbered `layers`, each with a KV cache of its own when generating."""
        for i in layers:
            h = self.model.layers[str(i)](h, cos_sin, cache_of(caches, f"layer {i}"))
        return h

    def head(self, h, targets=None, return_logits=True):
        """Final norm, logits (B, T, vocab), and the mean cross-entropy over targets != -100.
        With targets and return_logits=False, the logits are None (training needs only the loss)."""
        w = self.model.embed_tokens.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        if targets is None:
            return F.linear(self.model.norm(h), w), None
        return self.cross_entropy(self.model.norm(h), w, targets, return_logits=return_logits)

    @staticmethod
    def cross_entropy(x, w, targets, return_logits=True):
        """(logits, loss) of x (..., d) against the output matrix W (vocab, d)."""
        logits = F.linear(x, w)
        loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-100)
        return (logits if return_logits else None), loss

    def forward(self, idx, targets=None, caches=None, return_logits=True):
        """With caches (generation), only the last position's logits are computed."""
        h, cos_sin = self.embed(idx, caches)
        h = self.run(self.model.layers, h, cos_sin, caches)
        return self.head(h[:, -1:] if caches is not None else h, targets, return_logits)

# ----------------------------------------------------------------------------------------
# Surgery and SVD bases


def split_layers(L, prelude=None, recurrent=None, coda=None):
    """Prelude [0, P), recurrent layer R, coda [L-C, L). The paper's 8 / 18 / 8 of 36
    layers, in the same proportions for other depths (24 layers: 5 / 12 / 5)."""
    P = round(8 * L / 36) if prelude is None else prelude
    C = round(8 * L / 36) if coda is None else coda
    R = L // 2 if recurrent is None else recurrent
    if not (0 <= P <= R < L - C and C >= 0):
        raise ValueError(f"split prelude={P}, recurrent={R}, coda={C} is out of range for {L} layers "
                         f"(need 0 <= prelude <= recurrent < {L} - coda)")
    removed = [i for i in range(P, L - C) if i != R]
    if not removed:
        raise ValueError(f"split prelude={P}, recurrent={R}, coda={C} of {L} layers removes no layer "
                         "(the LoRA bases are built from the removed layers)")
    return P, R, C, removed


def svd_basis(delta, rank):
    """Best rank-r factors of Δ (out, in): A = Vᵀ[:r] (r, in), B = U[:, :r] diag(S[:r]) (out, r)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank].clone(), U[:, :rank] * S[:rank]


class LoRALinear(nn.Module):
    """One of layer R's seven projections after the surgery: its frozen weight and bias, and a frozen
    LoRA basis A (r, in), B (out, r). Given the modulation c (..., 7, r) of all seven, it adds its own
    slice: y = x Wᵀ + b + ((x Aᵀ) ⊙ c_t) Bᵀ, i.e. ΔW = B diag(c_t) A (c_t already carries α/r)."""

    def __init__(self, linear, A, B, slot):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias  # the same tensors, under the same names
        self.register_buffer("lora_A", A, persistent=False)
        self.register_buffer("lora_B", B, persistent=False)
        self.slot = slot  # which of the 7 targets this projection is: TARGETS[slot]

    def forward(self, x, c=None):
        y = F.linear(x, self.weight, self.bias)
        if c is None:
            return y
        return y + ((x @ self.lora_A.T) * c[..., self.slot, :]) @ self.lora_B.T

# ----------------------------------------------------------------------------------------
# Controller: the hypernetwork that makes each recurrence step input-dependent


class Controller(nn.Module):
    """c_{t,s} = H_t u,  u = SiLU(W3 SiLU(W2 [z; e_s] + b2) + b3),  z = SiLU(W1 p + b1)."""

    def __init__(self, d, rank, max_steps, E):
        super().__init__()
        self.w1 = nn.Linear(d, 2 * E)  # W1, b1: pooled state -> z
        self.step_embedding = nn.Embedding(max_steps, E)  # e_s
        self.w2 = nn.Linear(3 * E, 2 * E)  # W2, b2
        self.w3 = nn.Linear(2 * E, E)  # W3, b3
        self.heads = nn.Linear(E, len(TARGETS) * rank, bias=False)  # H_t of the 7 targets, stacked
        nn.init.zeros_(self.heads.weight)  # c = 0, so ΔW = 0: step s of a fresh model is the plain layer

    def forward(self, p, s):
        z = F.silu(self.w1(p))  # (B, T, 2E)
        e = self.step_embedding.weight[s].expand(*z.shape[:-1], -1)  # (B, T, E)
        u = F.silu(self.w3(F.silu(self.w2(torch.cat([z, e], -1)))))  # (B, T, E)
        return self.heads(u).unflatten(-1, (len(TARGETS), -1))  # (B, T, 7, r)


class StaticModulation(nn.Module):
    """Ablation "static per-step LoRA": c[s, t] is a learned table that ignores the input."""

    def __init__(self, d, rank, max_steps, E):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(max_steps, len(TARGETS), rank))

    def forward(self, p, s):
        return self.table[s]  # (7, r), the same for every sequence and position

# ----------------------------------------------------------------------------------------
# The recurrent model: prelude, gated and normalised loop over layer R, coda


class Ouroboros(nn.Module):
    """Prelude, `depth` gated and normalised steps of the modulated layer R, coda.

    Build it with from_pretrained. The constructor makes the trainables (the paper's: Controller,
    gate, per-step norms) and an empty (meta) frozen trunk; `build` fills the trunk from the
    checkpoint and does the surgery. Part 2's Ouroboros, a subclass under the same name, adds what
    goes beyond the paper (halting, coda adapters, the "blind" control, mixed precision)."""
    CONTROLLERS = {"dynamic": Controller, "static": StaticModulation, "none": None}

    def __init__(self, cfg, rank=8, alpha=16.0, prelude=None, recurrent=None, coda=None,
                 controller="dynamic", pool="causal", gate=True, step_norm=True, max_steps=MAX_STEPS,
                 controller_width=128):
        super().__init__()
        L, d = cfg.num_hidden_layers, cfg.hidden_size
        P, R, C, self.removed = split_layers(L, prelude, recurrent, coda)
        self.cfg, self.prelude, self.recurrent, self.coda = cfg, range(P), R, range(L - C, L)
        self.options = dict(rank=rank, alpha=alpha, prelude=P, recurrent=R, coda=C, controller=controller,
                            pool=pool, gate=gate, step_norm=step_norm, max_steps=max_steps,
                            controller_width=controller_width)
        with torch.device("meta"):  # the frozen trunk is filled from the checkpoint later
            self.base = Qwen2(cfg, layers=[*self.prelude, R, *self.coda])
        self.scale = alpha / rank  # the α/r of ΔW = (α/r) B diag(c) A
        # c_s; controller="none" is the ablation "loop alone": layer R looped as it is, only gate and norms train
        kind = self.CONTROLLERS[controller]
        self.controller = kind(d, rank, max_steps, controller_width) if kind else None
        self.pool = pool  # may change at run time: a mean-pool model scored with the causal pool sees no future
        self.gate = nn.Linear(2 * d, d) if gate else None  # g = σ(W_g [h_new; h] + b_g)
        if gate:
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, -2.0)  # σ(-2) = 0.1192: 88% of h is kept at init
        self.step_norms = nn.Parameter(torch.ones(max_steps, d)) if step_norm else None  # one RMSNorm weight per step

    @property
    def layer(self):
        return self.base.model.layers[str(self.recurrent)]

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **options):
        cfg = Qwen2Config.from_pretrained(path)
        device, dtype = placement(device, dtype)
        return cls.build(cfg, Checkpoint(path, device).read, device, dtype, options)

    @classmethod
    def build(cls, cfg, read, device, dtype, options):
        """The model with its trunk read by read(name), and the surgery: layer R's seven projections
        get their LoRA bases. Only the 17 kept layers are held; the removed ones are read one tensor
        at a time, for the bases, and never all in memory."""
        with torch.device(device):
            model = cls(cfg, **options)  # trainables: float32, initialised on the device
        load_frozen(model.base, read, dtype)
        # Δ_t = mean over removed layers i of (W_t[i] - W_t[R]), in float32; its best rank-r factors.
        for slot, t in enumerate(TARGETS):
            linear = model.layer.get_submodule(t)
            total = sum(read(f"model.layers.{i}.{t}.weight").float() for i in model.removed)
            A, B = svd_basis(total / len(model.removed) - linear.weight.float(), model.options["rank"])
            model.layer.set_submodule(t, LoRALinear(linear, A.to(dtype), B.to(dtype), slot))
        return model

    def pooled(self, h, cache=None):
        """p, what the Controller reads, in float32: the mean of h over the whole sequence (pool="mean",
        the paper's: every position sees the future), or over positions 0..τ for each position τ
        (causal). When generating, the step's cache carries the sum of the positions before."""
        if self.pool == "mean":  # it cannot generate: each new token would change every earlier position's p
            return h.float().mean(1, keepdim=True)  # (B, 1, d)
        sums = self.prefix_sums(h.float())  # (B, T, d): h_0 + ... + h_τ
        count = torch.arange(1, h.size(1) + 1, device=h.device)  # τ + 1, (T,)
        if cache is not None:
            sums, count = cache.running_sum(sums, count)
        return sums / count[:, None]  # (B, T, d)

    @staticmethod
    def prefix_sums(x):
        """x_0 + ... + x_τ at each position τ of x (B, T, d); Part 2 sums without a scan over T."""
        return x.cumsum(1)

    def modulation(self, h, s, cache=None):
        """c_s, scaled by α/r: (B, T, 7, r) per position for the causal pool, (B, 1, 7, r) per
        sequence for the mean pool, (7, r) for the static table, None with no controller."""
        if self.controller is None:
            return None
        return self.scale * self.controller(self.pooled(h, cache), s)

    def step(self, h, s, cos_sin, cache=None):
        """One recurrence step: modulated layer R, per-step norm, gated update."""
        h_new = self.layer(h, cos_sin, cache, self.modulation(h, s, cache))
        if self.step_norms is not None:
            h_new = rms_norm(h_new, self.step_norms[s], self.cfg.rms_norm_eps)  # StepNorm_s
        if self.gate is None:
            return h_new
        g = torch.sigmoid(self.gate(torch.cat([h_new, h], -1)))  # (B, T, d)
        return g * h_new + (1 - g) * h

    def forward(self, idx, depth=4, targets=None, caches=None, return_logits=True):
        """Logits and loss after `depth` loop steps. When generating (caches), the last position's logits."""
        with torch.no_grad():  # the prelude is frozen and nothing before it trains
            h, cos_sin = self.base.embed(idx, caches)
            h = self.base.run(self.prelude, h, cos_sin, caches)
        h = self.loop(h, depth, cos_sin, caches)
        h = self.base.run(self.coda, h, cos_sin, caches)
        return self.base.head(h[:, -1:] if caches is not None else h, targets, return_logits)

    def loop(self, h, depth, cos_sin, caches=None):
        """The recurrence: h ← step_s(h) for s = 0 .. depth-1. Each step attends to its own past."""
        for s in range(depth):
            h = self.step(h, s, cos_sin, cache_of(caches, f"step {s}"))
        return h

    def baseline(self, idx, targets=None, return_logits=True):
        """The pruned model with no loop: prelude, layer R once, coda ("17-layer baseline")."""
        return self.base(idx, targets, return_logits=return_logits)

    def named_trainable(self):
        return [(n, p) for n, p in self.named_parameters() if not n.startswith("base.")]

    def trainable_parameters(self):
        return [p for _, p in self.named_trainable()]

    def save_trainable(self, file):
        """Trainable tensors to safetensors, with the options and config as metadata."""
        tensors = {n: p.detach().float().cpu().contiguous() for n, p in self.named_trainable()}
        meta = {"ouroboros": json.dumps(self.options), "config": json.dumps(asdict(self.cfg))}
        save_atomic(tensors, file, meta)

    def load_trainable(self, file):
        with safe_open(file, framework="pt", device="cpu") as f, torch.no_grad():
            for name, p in self.named_trainable():
                p.copy_(f.get_tensor(name))

# ----------------------------------------------------------------------------------------
# Loading: safetensors straight to the device, one tensor at a time


def placement(device, dtype):
    """Defaults: CUDA with bf16 frozen weights when there is a GPU, else CPU in float32."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


class Checkpoint:
    """A Hugging Face checkpoint directory: model.safetensors, or an index and its shards.
    Tensors are read by name, straight to `device`, and only when asked for."""

    def __init__(self, path, device):
        self.path, self.device, self.open_files = Path(path), device, {}
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.where = {name: self.path / file for name, file in weight_map.items()}
        else:
            file = self.path / "model.safetensors"
            self.where = dict.fromkeys(self.open(file).keys(), file)

    def open(self, file):
        if file not in self.open_files:
            self.open_files[file] = safe_open(file, framework="pt", device=str(self.device))
        return self.open_files[file]

    def read(self, name):
        return self.open(self.where[name]).get_tensor(name)


def load_frozen(module, read, dtype):
    """Fill a module built on the meta device from read(name); every tensor frozen."""
    module.load_state_dict({name: read(name).to(dtype) for name in module.state_dict()}, assign=True)
    return module.requires_grad_(False)


def save_atomic(tensors, file, metadata=None):
    """safetensors to file.tmp, then a rename: never a half-written file."""
    save_file(tensors, f"{file}.tmp", metadata=metadata)
    os.replace(f"{file}.tmp", file)

# ----------------------------------------------------------------------------------------
# Generation: prefill, then one token at a time with a KV cache per attention call


class Position:
    """Where decoding is, for max_len positions: `at`, the position of the next token, and `seen`, the
    keys a token there attends to (those up to it). Shared by every cache of a model, moved on by the
    caller after each forward pass, in place: tensors, not Python numbers, so that a compiled decoding
    step is one graph that reads them anew at every token."""

    def __init__(self, max_len, device):
        self.keys = torch.arange(max_len, device=device)  # (max_len,)
        self.at = torch.zeros((), dtype=torch.long, device=device)
        self.seen = self.keys[None] <= self.at  # (1, max_len)

    def advance(self, T):
        self.at += T
        torch.le(self.keys[None], self.at, out=self.seen)


class KVCache:
    """Keys and values of one attention call, allocated for every position by the prompt (the prefill),
    then written one decoded token at a time, in place. After the prefill nothing changes shape: one
    compiled decoding step serves every token. A loop step's cache also carries the causal pool's
    running sum of h (h_sum)."""

    def __init__(self, position):
        self.position, self.k, self.v, self.h_sum = position, None, None, None

    def update(self, k, v):
        """k, v (B, n_kv, T, hd) of the new tokens written in; returns the keys, values and mask to attend to."""
        B, n_kv, T, hd = k.shape
        if self.k is None:  # the prompt, at 0..T-1: it attends to itself, causally (no mask)
            max_len = len(self.position.keys)
            self.k, self.v = k.new_zeros(B, n_kv, max_len, hd), v.new_zeros(B, n_kv, max_len, hd)
            self.k[:, :, :T], self.v[:, :, :T] = k, v
            return k, v, None
        self.k.index_copy_(2, self.position.at.view(1), k)
        self.v.index_copy_(2, self.position.at.view(1), v)
        return self.k, self.v, self.position.seen  # (B, n_kv, max_len, hd) each, and (1, max_len)

    def running_sum(self, sums, count):
        """The causal pool's sums and counts with the positions before: the prompt's prefix sums start
        the running sum; a decoded token's state is added to it."""
        if self.h_sum is None:
            self.h_sum = sums[:, -1:].clone()
            return sums, count
        self.h_sum.add_(sums)
        return self.h_sum, (self.position.at + 1).view(1)


class Caches:
    """The KV caches of one generation, by attention call: "layer 3" for a kept layer of the trunk,
    "step 2" for a step of the loop (each step attends to its own past). Each is made on first use."""

    def __init__(self, position):
        self.position, self.calls = position, {}

    def __getitem__(self, name):
        if name not in self.calls:
            self.calls[name] = KVCache(self.position)
        return self.calls[name]


def cache_of(caches, name):
    """The cache of one attention call when generating; None in training and evaluation."""
    return None if caches is None else caches[name]


def sample(logits, temperature=1.0, top_k=None):
    """Next ids (B, 1) from last-position logits (B, vocab); temperature 0 or top_k 1 is greedy."""
    if temperature == 0 or top_k == 1:
        return logits.argmax(-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1)


def next_logits(model, x, caches, depth):
    """Logits (B, vocab) of the token after x (B, T), the caches holding every position before x."""
    logits, _ = model(x, depth, caches=caches) if isinstance(model, Ouroboros) else model(x, caches=caches)
    return logits[:, -1]


@torch.no_grad()
def stream(model, idx, max_new_tokens, depth=4, temperature=1.0, top_k=None, decode=next_logits):
    """Yield the new tokens (B, 1) one by one; the first comes after the prompt's prefill.
    decode(model, x, caches, depth) gives the next logits (Part 2 passes a compiled one)."""
    position = Position(idx.size(1) + max_new_tokens, idx.device)
    caches, x = Caches(position), idx
    for _ in range(max_new_tokens):
        logits = decode(model, x, caches, depth)  # (B, vocab)
        position.advance(x.size(1))
        x = sample(logits, temperature, top_k)  # (B, 1)
        yield x


def generate(model, idx, max_new_tokens, *args, **kwargs):
    """Continue idx (B, T) by max_new_tokens; returns (B, T + max_new_tokens). The other arguments are stream's."""
    return torch.cat([idx, *stream(model, idx, max_new_tokens, *args, **kwargs)], 1)

# ========================================================================================
# PART 2: ENGINEERING AND BEYOND THE PAPER
# Nothing here is needed to follow the method: what makes it lean, fast and safe, the two
# extensions that are off by default, and the command line. It plugs into Part 1 at the end
# ("Part 1 with Part 2 plugged in"): each class there subclasses Part 1's class of the same
# name, and each function wraps Part 1's, so that the whole file builds and runs these.
# ========================================================================================
import argparse  # noqa: E402
import contextlib  # noqa: E402
import inspect  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import fields, MISSING  # noqa: E402
from functools import partial  # noqa: E402

from safetensors import SafetensorError  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

# ----------------------------------------------------------------------------------------
# Kernels: the MLP's product and the loss, with less kept for backward


class SwiGLU(torch.autograd.Function):
    """F.silu(a) * b, keeping only a and b for backward (autograd would keep silu(a) as well: a
    third tokens × intermediate tensor per layer call). Backward recomputes silu(a)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * b, a), grad * F.silu(a)  # silu' as autograd has it


class LinearCrossEntropy(torch.autograd.Function):
    """F.cross_entropy((x @ w.T).float(), targets, ignore_index=-100), and the logits x @ w.T,
    with nothing vocabulary-sized kept for backward.

    F.cross_entropy on float32 logits would keep tokens × vocab float32 log-probabilities for
    backward (2.5 GB for Qwen2.5-3B at 2 × 2048 tokens) and make as large a gradient. Instead,
    the vocabulary is walked a block of columns at a time, with an online softmax (as flash
    attention walks its keys). Each block of logits (tokens × 4,096: 4 MB in float32 at 256
    tokens) is copied to the returned tensor, if one is asked for; gives the logit of each token
    whose target lies in the block; is folded into a running max m and sum s of exp(logit - m)
    per token; and, while it is still at hand, is multiplied back by its rows of W into
    Σ exp(logit - m) W. At the end that sum divided by s is softmax · W, so the gradient
    d loss / dx = (softmax · W − W[target]) / n is ready when the forward pass ends. Besides the
    returned logits (in the activations' dtype), no (tokens × vocab) tensor exists, nothing
    vocabulary-sized is kept for backward, and backward only scales the gradient by the incoming
    one. The matmuls are the two that logits and then their gradient would take. When W trains
    (pretraining), the logits are kept, and backward walks their blocks once more for
    d loss / dW = (softmax − onehot)ᵀ x / n: a third matmul, as autograd would make. Targets must
    be -100 or in the vocabulary (train.py checks its token files). Call it through linear_cross_entropy."""

    @staticmethod
    def forward(ctx, x, w, targets, grad_enabled, block, return_logits):
        x2, t = x.flatten(0, -2), targets.flatten()  # (N, d), (N,)
        (N, d), V, device = x2.shape, len(w), x.device
        grad_x, grad_w = (grad_enabled and needs for needs in ctx.needs_input_grad[:2])
        logits = x2.new_empty(N, V) if return_logits or grad_w else None  # in the activations' dtype
        m = torch.full((N,), -math.inf, device=device)  # running max of each row, float32
        s = torch.zeros(N, device=device)  # running Σ exp(logit - m)
        sw = torch.zeros(N, d, device=device) if grad_x else None  # running Σ exp(logit - m) W
        picked = torch.zeros(N, device=device)  # the logit of each target
        # exp(logit - m) of one block, in float32 and (for the matmul) in x's dtype: allocated once
        e32 = torch.empty(N, min(block, V), device=device)
        e16 = torch.empty_like(e32, dtype=x2.dtype) if grad_x and x2.dtype != torch.float32 else None
        for j in range(0, V, block):
            wb = w[j:j + block]  # (n, d), n = block but at the end
            part = x2 @ wb.T  # (N, n)
            if logits is not None:
                logits[:, j:j + block] = part
            here = (t >= j) & (t < j + len(wb))  # the targets in this block
            picked = torch.where(here, part.gather(1, (t - j).clamp(0, len(wb) - 1)[:, None])[:, 0].float(),
                                 picked)
            m_new = torch.maximum(m, part.amax(1).float())
            rescale = (m - m_new).exp_()  # what the sums so far are worth under the new max
            e = e32[:, :len(wb)].copy_(part).sub_(m_new[:, None]).exp_()
            s = s.mul_(rescale).add_(e.sum(1))
            if grad_x:
                sw = sw.mul_(rescale[:, None]).add_((e if e16 is None else e16[:, :len(wb)].copy_(e)) @ wb)
            m = m_new
        lse = m + s.log()
        weight = (t != -100).float() / (t != -100).sum()  # 1/n for each counted target, else 0
        if grad_x:  # (softmax · W - W[target]) / n, rows whose target is -100 zeroed
            sw = ((sw / s[:, None] - w[t.clamp(min=0)].float()) * weight[:, None]).to(x2.dtype)
        ctx.save_for_backward(sw, *((x2, logits, t, lse, weight) if grad_w else ()))
        ctx.block, ctx.x_shape = block, x.shape
        ctx.set_materialize_grads(False)  # no zero (N, vocab) gradient for the logits
        if logits is not None:
            ctx.mark_non_differentiable(logits)
        loss = ((lse - picked) * weight).sum()
        return (logits.view(*x.shape[:-1], V) if return_logits else None), loss

    @staticmethod
    def backward(ctx, _, grad_loss):
        sw, *kept = ctx.saved_tensors
        grad_x = (sw * grad_loss).view(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # d loss / dW = (softmax - onehot(t))ᵀ x / n, a block of rows at a time
            x2, logits, t, lse, weight = kept
            grad_w = torch.empty(logits.size(1), x2.size(1), dtype=x2.dtype, device=x2.device)
            for j in range(0, logits.size(1), ctx.block):
                g = torch.sub(logits[:, j:j + ctx.block], lse[:, None]).exp_()  # softmax, float32
                here = (t >= j) & (t < j + g.size(1))
                g[here, t[here] - j] -= 1
                grad_w[j:j + ctx.block] = g.mul_(weight[:, None] * grad_loss).to(x2.dtype).T @ x2
        return grad_x, grad_w, None, None, None, None


def linear_cross_entropy(x, w, targets, block=4096, return_logits=True):
    """(logits, loss) of x (..., d) against W (vocab, d), see LinearCrossEntropy; logits are None
    with return_logits=False (training needs only the loss: no (tokens × vocab) tensor at all).
    The gradient of x is made in the forward pass only where autograd will ask for it. Under
    autocast, x and W are cast here, as autocast casts them for x Wᵀ."""
    check_targets(targets, x)
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, w = x.to(dtype), w.to(dtype)
    return LinearCrossEntropy.apply(x, w, targets, torch.is_grad_enabled(), block, return_logits)


def prefix_sums(x, block=64):
    """x.cumsum(1) for x (B, T, d), as two matmuls instead of a scan over T (a GPU runs a scan over a
    middle dimension slowly): within each block of positions, a lower-triangular matrix of ones
    sums the block's prefix; across blocks, a strictly lower one adds the totals of the blocks before."""
    B, T, d = x.shape
    if T == 1:  # decoding: one position is its own prefix
        return x
    block = min(block, T)
    blocks = F.pad(x, (0, 0, 0, -T % block)).view(B, -1, block, d)  # (B, n, block, d), zeros at the end
    n = blocks.size(1)
    with torch.autocast(x.device.type, enabled=False):  # in x's dtype: bf16 sums of thousands of terms drift
        within = torch.ones(block, block, device=x.device, dtype=x.dtype).tril() @ blocks  # (B, n, block, d)
        before = torch.ones(n, n, device=x.device, dtype=x.dtype).tril(-1) @ within[:, :, -1]  # (B, n, d)
    return (within + before[:, :, None]).view(B, -1, d)[:, :T]  # (B, T, d)

# ----------------------------------------------------------------------------------------
# Compiled decoding (gpt-fast's recipe): static caches, one graph, CUDA graphs on a GPU


def compiled_decoding(caches):
    """next_logits compiled for one decoded token. After the prefill the caches keep their shapes and
    are updated in place (KVCache), so a single graph serves every token; their tensors are marked as
    fixed in memory, so that on a GPU the graph is captured once as a CUDA graph and replayed
    ("reduce-overhead"), one launch instead of hundreds per token."""
    position = caches.position
    for t in (position.keys, position.at, position.seen,
              *(t for c in caches.calls.values() for t in (c.k, c.v, c.h_sum))):
        if t is not None:  # guard=False: the next generate's new caches reuse the graph (re-recorded, not recompiled)
            torch._dynamo.mark_static_address(t, guard=False)
    return torch.compile(next_logits, mode="reduce-overhead" if position.keys.is_cuda else None, dynamic=False)


# Attention while decoding. A GPU profile found cuDNN's kernel building a new plan at every decoded
# token, when the key length grew with each; the static caches now keep one length, which may make it
# fast again: until a GPU run says so, decoding leaves it out.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def decoding(compile=False):
    """stream's decode step: next_logits without cuDNN attention and, with compile=True, compiled
    once the prefill has filled the caches."""
    compiled = []

    def decode(model, x, caches, depth):
        with sdpa_kernel(DECODE_ATTENTION):
            logits = (compiled[0] if compiled else next_logits)(model, x, caches, depth)
        if compile and not compiled:
            compiled.append(compiled_decoding(caches))
        return logits
    return decode

# ----------------------------------------------------------------------------------------
# A control for the static ablation


class BlindController(Controller):
    """controller="blind": the Controller's own network and parameters with its pooled input
    replaced by zeros, so c_s depends on the step alone. A static per-step table of the
    Controller's size and optimisation: what is left of "dynamic" when the input is taken away."""

    def forward(self, p, s):
        return super().forward(torch.zeros_like(p), s)

# ----------------------------------------------------------------------------------------
# Beyond the paper: per-token adaptive depth (halting)


class Halting:
    """Beyond the paper, per-token adaptive depth: ACT (Graves 2016, "Adaptive Computation Time")
    over the loop, for one forward pass. After step s each position that still runs emits a
    halting probability λ_s = σ(w · h_s + b), and it stops at the first step N where
    λ_0 + ... + λ_N ≥ 1 - ε (or at the last step). What the coda reads is the mean of its states
    weighted by p_s = λ_s for s < N and the remainder R = 1 - (λ_0 + ... + λ_{N-1}) at N.
    The ponder cost ρ = (N + 1) + R: steps taken, plus R, through which λ learns to stop sooner.

    A halted position's state is carried unchanged. At the steps it skips it still takes part in
    attention: its K/V are recomputed from its carried state, with that step's modulation (what
    the unmasked layer would give it). Training, evaluation and cached decoding all follow this
    rule, so cached generation equals recomputation; a halted token costs K and V per skipped step."""
    eps = 0.01

    @staticmethod
    def head(d):
        """The halting head λ_s = σ(w · h_s + b), Ouroboros.halt."""
        head = nn.Linear(d, 1)
        nn.init.zeros_(head.weight)
        # λ = σ(-3) = 0.047: a fresh model runs every step up to 21 (21 σ(-3) >= 0.99), and the
        # coda reads mostly the last state (0.86 of the mixture at depth 4)
        nn.init.constant_(head.bias, -3.0)
        return head

    def __init__(self, h):
        B, T, _ = h.shape
        self.running = torch.ones(B, T, dtype=torch.bool, device=h.device)  # not yet halted
        self.total = torch.zeros(B, T, device=h.device)  # Σ of the halting weights so far
        self.steps = torch.zeros(B, T, device=h.device)  # N + 1, the steps taken
        self.remainder = torch.zeros(B, T, device=h.device)  # R
        self.out = torch.zeros(h.shape, device=h.device)  # Σ_s p_s h_s: what the coda reads

    @classmethod
    def loop(cls, model, h, depth, cos_sin, caches=None):
        """Ouroboros.loop with halting: the state the coda reads. model.last_halting keeps the steps
        each position took and its ponder cost."""
        halting = cls(h)
        for s in range(depth):
            cache = cache_of(caches, f"step {s}")
            if not halting.running.any():  # every position has halted
                if cache is None:  # nobody attends to the steps left
                    break
                cls.skip(model, h, s, cos_sin, cache)  # a later token will attend to them
                continue
            h = halting.update(h, model.step(h, s, cos_sin, cache), s, depth, model.halt)
        h, model.last_halting, halting.out = halting.out.to(h.dtype), halting, None
        return h

    def update(self, h, h_new, s, depth, head):
        """The state after step s: h_new where the position runs, h (carried) where it halted."""
        running = self.running
        h = torch.where(running[..., None], h_new, h)
        lam = torch.sigmoid(head(h).float())[..., 0]  # λ_s (B, T)
        stop = running & ((self.total + lam >= 1 - self.eps) | (s == depth - 1))
        p = torch.where(stop, 1 - self.total, lam) * running  # p_s: λ_s, or R where it stops, 0 if halted
        self.out = self.out + p[..., None] * h
        self.remainder = torch.where(stop, p, self.remainder)
        self.total, self.steps, self.running = self.total + p, self.steps + running, running & ~stop
        return h

    @staticmethod
    def skip(model, h, s, cos_sin, cache):
        """Step s of positions that all halted: only their K/V, for later tokens to attend to
        (and the causal pool's running sum); their state is carried unchanged."""
        x = model.layer.input_layernorm(h)
        model.layer.self_attn.keys_values(x, cos_sin, cache, model.modulation(h, s, cache))

    @property
    def ponder(self):
        return self.steps + self.remainder  # ρ = (N + 1) + R, per position

# ----------------------------------------------------------------------------------------
# Beyond the paper: coda adapters


class Adapter(nn.Module):
    """Beyond the paper, coda adaptation: ΔW_t = (α/r) B_t A_t on the 7 projections of one coda
    layer. The coda was trained on the output of the layers that are gone; this lets it adapt.
    B_t = 0 at initialisation, so a fresh model is unchanged; A_t ~ N(0, 1/in), LoRA-like.

    It hangs on the projections it adapts, as forward hooks (y += (α/r)(x A_tᵀ) B_tᵀ). They act
    but in Ouroboros.baseline, which runs the same layers without them (Adapter.off)."""

    def __init__(self, layer, rank, alpha):
        super().__init__()
        shapes = [layer.get_submodule(t).weight.shape for t in TARGETS]  # (out, in) of each target
        self.A = nn.ParameterList([nn.Parameter(torch.randn(rank, i) / i ** 0.5) for _, i in shapes])
        self.B = nn.ParameterList([nn.Parameter(torch.zeros(o, rank)) for o, _ in shapes])
        self.scale = alpha / rank
        self.on = True
        for t, name in enumerate(TARGETS):
            layer.get_submodule(name).register_forward_hook(partial(self.hook, t))

    def forward(self, x, t):
        return self.scale * (x @ self.A[t].T) @ self.B[t].T

    def hook(self, t, projection, inputs, y):
        return y + self(inputs[0], t) if self.on else None  # None: y as it is

    @classmethod
    def on_coda(cls, model, rank, alpha):
        """Ouroboros.adapters: one Adapter per coda layer, under the layer's number."""
        most = min(min(model.layer.get_submodule(t).weight.shape) for t in TARGETS)
        if not 0 <= rank <= most:
            raise ValueError(f"coda_rank {rank} is out of range: use 0 (no adapters) to {most}")
        if not model.coda:
            raise ValueError(f"coda_rank {rank} with coda=0: there is no coda layer to adapt")
        return nn.ModuleDict({str(i): cls(model.base.model.layers[str(i)], rank, alpha) for i in model.coda})

    @staticmethod
    @contextlib.contextmanager
    def off(adapters):
        """The context in which the adapters do not act (None: there are none)."""
        adapters = list(adapters.values()) if adapters is not None else []
        for adapter in adapters:
            adapter.on = False
        try:
            yield
        finally:
            for adapter in adapters:
                adapter.on = True


# ----------------------------------------------------------------------------------------
# FLOPs per token: the model FLOPs of MFU, and what a decoded token costs


def weight_counts(model):
    """Weights of layer R's matrices, of the LoRA bases it applies (none for the loop alone), and of
    the coda adapters."""
    layer = sum(p.numel() for p in model.layer.parameters() if p.dim() == 2)
    lora = sum(b.numel() for b in model.layer.buffers()) if model.controller is not None else 0
    adapters = sum(p.numel() for p in model.adapters.parameters()) if model.adapters is not None else 0
    return layer, lora, adapters


def flops_per_token(model, depth, T):
    """Model FLOPs per trained token, for MFU. As in PaLM, recomputation is not counted:
    --checkpointing costs time but no model FLOPs. A matmul with N weights costs 2N per token
    forward; backward, 2N for its input's gradient and 2N for its weights'. Frozen weights get
    no weight gradient:
        prelude (no autograd)                      2 N_layer P
        loop, coda, lm_head (frozen)               4 (N_layer + N_lora) depth + 4 N_layer C + 4 d V
        Controller, gate, halting head (trained)   6 N_train depth
        coda adapters (trained)                    6 N_adapters
        attention QKᵀ and AV (no causal halving)   4 T d per call forward, twice that backward
    N_layer: a layer's weight matrices; N_lora: the frozen A and B; biases and norms are neglected.
    Pretraining (every weight trains): 6 N per token for the N weights of the matrices, plus attention."""
    cfg = model.cfg
    attn = 4 * T * cfg.hidden_size
    if not isinstance(model, Ouroboros):  # the embedding is a lookup, but when tied it is also the head
        matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
        return 6 * (matrices + cfg.tie_word_embeddings * cfg.vocab_size * cfg.hidden_size) + \
            3 * attn * cfg.num_hidden_layers
    P, C = len(model.prelude), len(model.coda)
    layer, lora, adapters = weight_counts(model)
    train = sum(m.weight.numel() for m in model.modules()
                if isinstance(m, torch.nn.Linear) and m.weight.requires_grad)
    return (P * (2 * layer + attn) + depth * (4 * (layer + lora) + 6 * train + 3 * attn)
            + C * (4 * layer + 3 * attn) + 6 * adapters + 4 * cfg.hidden_size * cfg.vocab_size)


def forward_flops(model, steps, depth):
    """Forward FLOPs per token of Ouroboros when a token takes `steps` of `depth` loop steps (a
    mean, with halting): 2 per weight of each matmul it needs; attention scores left out. A step
    that a halted token skips still costs its K and V (with their LoRA) and the Controller: what
    later tokens attend to. The batched training and evaluation passes compute every step (masked);
    this is what a token costs when decoding."""
    layer, lora, adapters = weight_counts(model)
    attn = model.layer.self_attn
    kv = sum(m.weight.numel() + bool(lora) * (m.lora_A.numel() + m.lora_B.numel())
             for m in (attn.k_proj, attn.v_proj))
    linears = lambda module: sum(m.weight.numel() for m in module.modules()  # noqa: E731
                                 if isinstance(m, torch.nn.Linear))
    # The Controller runs per token with the causal pool; the mean pool runs it once per sequence.
    ctrl = linears(model.controller) if model.controller is not None and model.pool == "causal" else 0
    trained = ctrl + sum(linears(m) for m in (model.gate, model.halt) if m is not None)
    head = model.cfg.hidden_size * model.cfg.vocab_size
    return 2 * ((len(model.prelude) + len(model.coda)) * layer + adapters + head
                + steps * (layer + lora + trained) + (depth - steps) * (kv + ctrl))


# ----------------------------------------------------------------------------------------
# Loading: what Part 1's loader does not check, and what it does not need


def check_device(device):
    """One line for a device torch does not know, or a CUDA GPU this machine lacks."""
    try:
        device = torch.device(device or "cpu")
    except RuntimeError as e:
        raise ValueError(f"device {device!r}: not a device torch knows ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: this torch sees no CUDA GPU (use --device cpu)")


def write_json(file, obj):
    """JSON to file.tmp, then a rename: never a half-written file."""
    Path(f"{file}.tmp").write_text(json.dumps(obj, indent=2))
    os.replace(f"{file}.tmp", file)


def read_json(file, hint):
    """A JSON file, or one line naming it: not found (with a hint how to get it), or not JSON."""
    if not Path(file).is_file():
        raise FileNotFoundError(f"{file}: not found ({hint})")
    try:
        raw = json.loads(Path(file).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{file}: not a JSON object (it is a {type(raw).__name__})")
    return raw


def read_tokenizer(path):
    """A tokenizer.json (or a model directory holding one), or one line naming it: not found, or not a
    tokenizer (truncated, or not JSON)."""
    from tokenizers import Tokenizer
    path = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (give a tokenizer.json or a model directory)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception
        raise ValueError(f"{path}: not a readable tokenizer.json ({e})") from None


def random_weights(cfg, device, std=0.02):
    """A stand-in for Checkpoint.read: N(0, std) for every tensor, 1 + N(0, std) for norms."""
    shapes = {k: v.shape for k, v in Qwen2.on_meta(cfg).state_dict().items()}

    def read(name):
        t = torch.randn(shapes[name], device=device).mul_(std)
        return t.add_(1) if name.endswith("norm.weight") else t
    return read


def read_trainable_options(file, with_config=False):
    """The options an Ouroboros trainable file was saved with."""
    if not Path(file).is_file():
        raise FileNotFoundError(f"{file}: " + ("a folder: give the file (OUT/ouroboros.safetensors)"
                                               if Path(file).is_dir() else "not found"))
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    if "ouroboros" not in meta:
        raise ValueError(f"{file}: not an Ouroboros trainable file (no 'ouroboros' metadata)")
    try:
        saved, config = json.loads(meta["ouroboros"]), json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: its metadata is not valid JSON ({e})") from None
    if not (isinstance(saved, dict) and isinstance(config, dict)):
        raise ValueError(f"{file}: its metadata is not a JSON object")
    options = saved_options(saved, f"{file}", "its metadata")
    return (options, config) if with_config else options


def saved_options(saved, source, where):
    """Options as saved (a trainable file's metadata, an export's config.json) over the defaults, or one
    line naming an option this version does not know or one of the wrong kind."""
    defaults = option_defaults()  # an option added since the file was saved had its default value then
    for k, v in saved.items():
        if k not in defaults:
            raise ValueError(f"{source}: unknown option {k!r} in {where} (known: {', '.join(defaults)})")
        kind = int if defaults[k] is None else type(defaults[k])  # None: a layer number, or the default
        if not (is_a(v, kind) or (defaults[k] is None and v is None)):
            raise ValueError(f"{source}: option {k!r} is {v!r} in {where}: must be {KINDS[kind]}")
        if k in ("rank", "alpha", "max_steps", "controller_width") and not v > 0:
            raise ValueError(f"{source}: option {k!r} is {v!r} in {where}: must be above 0")
    return {**defaults, **saved}


def trained_options(file, cfg):
    """The options of a trainable file, once it is known to be made for the base `cfg` (its config is
    in its metadata), or one line naming what differs."""
    options = read_trainable_options(file)
    check_trainable(file, options, cfg)
    return options


def check_depth(depth, max_steps, name="depth"):
    """A depth the Controller's step table has a row for."""
    if not 1 <= depth <= max_steps:
        raise ValueError(f"{name} {depth} is outside 1..{max_steps} (max_steps)")


def check_trainable(file, options, cfg, model=None):
    """A trainable file saved with these options and for this base config, with the tensors of
    `model` (by default one built on the meta device), or one line naming every difference."""
    saved, config = read_trainable_options(file, with_config=True)
    diff = [f"{k}: file {saved.get(k)!r}, model {v!r}" for k, v in options.items() if saved.get(k) != v]
    diff += [f"config {k}: file {config.get(k)!r}, model {v!r}" for k, v in asdict(cfg).items()
             if config.get(k) != v]
    if diff:
        raise ValueError(f"{file}: saved with other options ({'; '.join(diff)})")
    model = model or Ouroboros.from_config(cfg, "meta", **options)
    shapes = {n: tuple(p.shape) for n, p in model.named_trainable()}
    with safe_open(file, framework="pt", device="cpu") as f:
        saved = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    diff = [f"{n}: file {saved.get(n, 'missing')}, model {s}" for n, s in shapes.items() if saved.get(n) != s]
    if diff:  # metadata that does not describe the tensors
        raise ValueError(f"{file}: its tensors are not those of its options ({'; '.join(diff[:2])})")

# ----------------------------------------------------------------------------------------
# Input checks: one line naming the file, key or value, before any expensive work


def config_from_dict(cls, raw, source):
    """Qwen2Config.from_dict: refuse what this file does not implement, in one line."""
    if not isinstance(raw, dict):
        raise ValueError(f"{source}: not a JSON object")

    def refuse(what):
        raise ValueError(f"{source}: {what} is not supported (supported: model_type 'qwen2' "
                         "with SiLU, full attention in every layer and unscaled RoPE)")
    if raw.get("model_type") != "qwen2":
        refuse(f"model_type {raw.get('model_type')!r}")
    if raw.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {raw['hidden_act']!r}")
    if raw.get("use_sliding_window") or "sliding_attention" in (raw.get("layer_types") or ()):
        refuse("sliding-window attention")
    rope = raw.get("rope_parameters") or {}  # transformers 5.x spelling
    if raw.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        refuse(f"rope scaling {raw.get('rope_scaling') or rope}")
    raw = dict(raw)  # transformers' own readings of an absent (or null) key:
    if raw.get("num_key_value_heads") is None:  # as many key/value heads as query heads
        raw["num_key_value_heads"] = raw.get("num_attention_heads")
    if "rope_theta" not in raw and "rope_theta" in rope:  # 5.x: the theta is in rope_parameters
        raw["rope_theta"] = rope["rope_theta"]
    for f in fields(cls):
        value, need = raw.get(f.name), "true or false" if f.type is bool else f"{KINDS[f.type]} above 0"
        if f.name in raw and value is None:  # null would silently be a default: another model than described
            raise ValueError(f"{source}: key {f.name!r} is null: must be {need}"
                             + ("" if f.default is MISSING else f" (leave the key out for the default {f.default})"))
        if f.default is MISSING and value is None:
            raise ValueError(f"{source}: key {f.name!r} is missing")
        if value is not None and not (is_a(value, f.type) and (f.type is bool or value > 0)):
            raise ValueError(f"{source}: key {f.name!r} is {value!r}: must be {need}")
    cfg = cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})
    if raw.get("head_dim", cfg.head_dim) != cfg.head_dim:
        refuse(f"head_dim {raw['head_dim']} != hidden_size / num_attention_heads")
    return cfg


KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def is_a(value, kind):
    """`value`, as JSON gives it, is of `kind` (int, float, bool or str): a bool is not a number, an
    int is a float, and a float is finite (an int too large for one is not)."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    if kind is float and isinstance(value, int):
        return abs(value) <= sys.float_info.max
    return isinstance(value, (int, float) if kind is float else kind) and (kind is not float or math.isfinite(value))


def check_config(cfg):
    """Qwen2Config.__post_init__: heads that split the hidden size into even halves, and query
    heads in whole groups per key/value head."""
    if cfg.hidden_size % cfg.num_attention_heads or cfg.head_dim % 2:
        raise ValueError(f"hidden_size {cfg.hidden_size} must split into "
                         f"{cfg.num_attention_heads} heads of even size")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads {cfg.num_attention_heads} is not a multiple "
                         f"of num_key_value_heads {cfg.num_key_value_heads}")


def check_ids(ids, vocab_size, what):
    """A one-line error naming an id outside 0..vocab_size-1, rather than an index error from deep
    inside torch. It waits for the device (one host sync), so it runs where ids enter (the prompt of
    generate; train.py checks its token files), never inside forward."""
    lo, hi = ids.aminmax()
    if ((lo < 0) | (hi >= vocab_size)).item():
        raise ValueError(f"{what} id {(lo if lo < 0 else hi).item()} is outside the vocabulary 0..{vocab_size - 1}")


def check_idx(idx):
    """Qwen2.embed's input: a non-empty (batch, time) tensor (its shape alone: no host sync)."""
    if idx.dim() != 2 or idx.numel() == 0:
        raise ValueError(f"idx must be a non-empty (batch, time) tensor of ids, got shape {tuple(idx.shape)}")


def check_targets(targets, x):
    """The loss's targets: one per position (their values are the data's, checked where it enters)."""
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape {tuple(x.shape[:-1])}")


def check_options(options):
    """The options given to Ouroboros that need no weights (the defaults are good ones)."""
    for name, allowed in (("controller", tuple(Ouroboros.CONTROLLERS)), ("pool", ("causal", "mean"))):
        if name in options and options[name] not in allowed:
            raise ValueError(f"{name}={options[name]!r}: choose one of {allowed}")
    if options.get("max_steps", 1) < 1:
        raise ValueError(f"max_steps={options['max_steps']} must be at least 1")


def check_rank(layer, rank):
    """A LoRA rank that each target of the looped layer can have (at most its smaller side)."""
    for t in TARGETS:
        out, inp = layer.get_submodule(t).weight.shape
        if not 1 <= rank <= min(out, inp):
            raise ValueError(f"rank {rank} is out of range for {t} ({out} x {inp}): use 1..{min(out, inp)}")


def check_generation(cfg, n_prompt, max_new_tokens, temperature=1.0, top_k=None):
    """One line for a request generation cannot serve; main asks before loading any weight."""
    if n_prompt == 0:
        raise ValueError("the prompt is empty: give at least one token")
    for name, value, low in (("max_new_tokens", max_new_tokens, 1), ("temperature", temperature, 0),
                             ("top_k", top_k, 1)):
        if value is not None and not low <= value < math.inf:  # nan too
            raise ValueError(f"{name}={value}: must be at least {low}"
                             + ("" if math.isfinite(value) else " and finite"))
    if n_prompt + max_new_tokens > cfg.max_position_embeddings:
        raise ValueError(f"prompt ({n_prompt} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"the model's {cfg.max_position_embeddings} positions")


def check_prompt(model, idx, max_new_tokens, temperature, top_k):
    """stream's request: a (batch, time) prompt that fits, and a model that can decode."""
    if idx.dim() != 2:
        raise ValueError(f"the prompt must be a (batch, time) tensor of ids, got shape {tuple(idx.shape)}")
    check_generation(model.cfg, idx.size(1), max_new_tokens, temperature, top_k)
    check_ids(idx, model.cfg.vocab_size, "token")
    if isinstance(model, Ouroboros) and model.pool == "mean":
        raise ValueError("pool='mean' cannot generate: every new token would change the modulation "
                         "of all earlier positions (train with pool='causal')")

# ----------------------------------------------------------------------------------------
# Export: a Hugging Face folder of a trained model, which transformers loads
#
#   OUT/config.json             the base's config.json with model_type "ouroboros", the options ("ouroboros"),
#                               the depth to run ("depth") and auto_map (the classes of modeling_ouroboros.py)
#   OUT/model.safetensors       the kept layers under Qwen2's names, and layer R's LoRA bases (...q_proj.lora_A)
#   OUT/ouroboros.safetensors   the trainables, as train.py saves them (a --trained file for the base)
#   OUT/tokenizer.json          the base's (and its tokenizer_config.json, if it has one)
#   OUT/ouroboros.py            this file: it builds the model (Ouroboros.from_export)
#   OUT/modeling_ouroboros.py   transformers' side, MODELING below: this file never imports transformers

MODELING = '''"""Ouroboros (arXiv 2604.02051) for transformers, written by `python ouroboros.py export`:

    model = AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)

The model is the one ouroboros.py (beside this file) builds. It keeps no KV cache: generate runs the whole
sequence again for each new token (ouroboros.py's own generate decodes with caches)."""
import torch
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

from .ouroboros import Ouroboros


class OuroborosConfig(PretrainedConfig):
    model_type = "ouroboros"  # config.json: the base's Qwen2 keys, the options ("ouroboros") and "depth"


class OuroborosForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OuroborosConfig

    def __init__(self, config, ouroboros=None):
        super().__init__(config)
        self.post_init()
        self.ouroboros = ouroboros  # after post_init, which would initialise its weights anew

    @classmethod
    def from_pretrained(cls, path, *args, config=None, dtype=None, device_map=None, **hub_options):
        """Built by ouroboros.py's loader, Ouroboros.from_export. dtype (or the older torch_dtype): a torch
        dtype or its name (None or "auto": float32 on a CPU, bf16 on a GPU); device_map: one device.
        A local folder needs none of the hub's options."""
        dtype = hub_options.get("torch_dtype") if dtype is None else dtype
        dtype = None if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype
        ouroboros = Ouroboros.from_export(path, device=None if device_map == "auto" else device_map, dtype=dtype)
        model = cls(config or OuroborosConfig.from_pretrained(path), ouroboros)
        model.generation_config.use_cache = False  # generate passes the whole sequence (prepare_inputs...)
        return model.eval()

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        """Logits (B, T, vocab) after config.depth loop steps; with labels (B, T), the mean loss of
        predicting labels[:, t + 1] at t, as transformers' causal LMs shift them. Padding is refused."""
        if attention_mask is not None and not attention_mask.bool().all():
            raise ValueError("attention_mask has padding: Ouroboros attends to every position")
        targets = None if labels is None else F.pad(labels[:, 1:], (0, 1), value=-100)  # (B, T)
        logits, loss = self.ouroboros(input_ids, self.config.depth, targets)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
'''
AUTO_MAP = {"AutoConfig": "modeling_ouroboros.OuroborosConfig",
            "AutoModelForCausalLM": "modeling_ouroboros.OuroborosForCausalLM"}


def export(model_dir, trained, out, depth=4):
    """Write the folder OUT (above) of the base model_dir and the trainables train.py saved. Everything
    is checked before a weight loads; the folder is written beside OUT and renamed to OUT when whole."""
    model_dir, out = Path(model_dir), Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):  # an empty folder may be replaced
        raise ValueError(f"--out {out}: {'holds files' if out.is_dir() else 'is a file'} (an export never "
                         "replaces anything: give a new folder)")
    if (inside := next((p for p in out.parents if p.exists() and not p.is_dir()), None)) is not None:
        raise ValueError(f"--out {out}: {inside} is a file, not a folder")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"--model {model_dir}: no such folder (a Hugging Face checkpoint directory)")
    raw = read_json(model_dir / "config.json", "a Hugging Face checkpoint directory has one")
    cfg = Qwen2Config.from_dict(raw, source=model_dir / "config.json")
    read_tokenizer(model_dir)  # there, and readable
    options = trained_options(trained, cfg)
    check_depth(depth, options["max_steps"], "--depth")
    try:
        stage = staging_folder(out)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror})") from None
    try:
        dtype = Checkpoint(model_dir, "cpu").read("model.norm.weight").dtype  # the frozen weights keep the base's
        model = Ouroboros.from_pretrained(model_dir, "cpu", dtype, **options)
        model.load_trainable(trained)
        frozen = {**model.base.state_dict(), **dict(model.base.named_buffers())}  # the buffers: the LoRA bases
        save_atomic({k: v.contiguous() for k, v in frozen.items()}, stage / "model.safetensors", {"format": "pt"})
        model.save_trainable(stage / "ouroboros.safetensors")
        write_json(stage / "config.json", {**raw, "model_type": "ouroboros", "architectures": ["OuroborosForCausalLM"],
                                           "auto_map": AUTO_MAP, "ouroboros": model.options, "depth": depth})
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (model_dir / name).is_file():
                shutil.copyfile(model_dir / name, stage / name)
        shutil.copyfile(__file__, stage / "ouroboros.py")
        (stage / "modeling_ouroboros.py").write_text(MODELING)
        try:
            os.rename(stage, out)  # whole, at once; refused if something came into OUT meanwhile
        except OSError as e:
            raise ValueError(f"--out {out}: cannot be made ({e.strerror}); nothing was written there") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone once renamed; a failure leaves nothing
    return out


def read_export(path):
    """The Qwen2 config, options and depth of an export's config.json, or one line: not an export."""
    file = Path(path) / "config.json"
    raw = read_json(file, "an export has one: python ouroboros.py export --help")
    if raw.get("model_type") != "ouroboros" or not isinstance(raw.get("ouroboros"), dict):
        raise ValueError(f"{path}: not an Ouroboros export (config.json: model_type {raw.get('model_type')!r} "
                         "and no 'ouroboros' options; make one with python ouroboros.py export)")
    cfg = Qwen2Config.from_dict({**raw, "model_type": "qwen2"}, source=file)
    options = saved_options(raw["ouroboros"], file, "its 'ouroboros'")
    depth = raw.get("depth")
    if not (is_a(depth, int) and 1 <= depth <= options["max_steps"]):
        raise ValueError(f"{file}: key 'depth' is {depth!r}: must be an integer in 1..{options['max_steps']}")
    return cfg, options, depth


def check_export_tensors(file, model):
    """model.safetensors of an export holds exactly the kept layers and the bases of this model, or one line."""
    if not file.is_file():
        raise FileNotFoundError(f"{file}: not found (an export holds its frozen weights there)")
    rank, shapes = model.options["rank"], {n: tuple(t.shape) for n, t in model.base.state_dict().items()}
    for t in TARGETS:
        out, inp = model.layer.get_submodule(t).weight.shape
        shapes |= {f"model.layers.{model.recurrent}.{t}.lora_A": (rank, inp),
                   f"model.layers.{model.recurrent}.{t}.lora_B": (out, rank)}
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            saved = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    diff = [f"{n}: file {saved.get(n, 'missing')}, model {s}" for n, s in shapes.items() if saved.get(n) != s]
    diff += [f"{n}: unexpected" for n in saved if n not in shapes]
    if diff:
        raise ValueError(f"{file}: not the tensors of its config.json ({'; '.join(diff[:2])}; {len(diff)} in all)")

# ----------------------------------------------------------------------------------------
# Part 1 with Part 2 plugged in. Each class subclasses Part 1's class of the same name, so that
# whatever the whole file builds is the class below; each function wraps Part 1's (kept as a
# default argument). What Part 1 computes, they compute too (a test runs Part 1 alone against them).


@dataclass
class Qwen2Config(Qwen2Config):
    """Refuses in one line what this file does not implement (config_from_dict, check_config)."""

    def __post_init__(self):
        check_config(self)

    @classmethod
    def from_pretrained(cls, path):
        file = Path(path) / "config.json"
        return cls.from_dict(read_json(file, "a Hugging Face checkpoint directory has one"), source=file)

    @classmethod
    def from_dict(cls, raw, source="config"):
        return config_from_dict(cls, raw, source)


class Checkpoint(Checkpoint):
    """Part 1's Checkpoint, checking the files and every tensor against config.json: a missing file,
    a missing or unexpected tensor, a shape or a dtype get one line naming the file and the tensor."""

    def __init__(self, path, device):
        path = Path(path)
        if (path / "model.safetensors.index.json").is_file():
            if not isinstance(read_json(path / "model.safetensors.index.json", "").get("weight_map"), dict):
                raise ValueError(f"{path}/model.safetensors.index.json: no weight_map")
        elif not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
        super().__init__(path, device)
        cfg = Qwen2Config.from_pretrained(path)
        self.shapes = {k: tuple(v.shape) for k, v in Qwen2.on_meta(cfg).state_dict().items()}
        missing, unexpected = sorted(set(self.shapes) - set(self.where)), sorted(set(self.where) - set(self.shapes))
        if missing:
            raise ValueError(f"{self.path}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
        if unexpected:
            raise ValueError(f"{self.where[unexpected[0]]}: unexpected tensor {unexpected[0]!r} "
                             f"({len(unexpected)} in all) for a Qwen2 model of this config.json")

    def open(self, file):
        if file not in self.open_files and not file.is_file():
            raise FileNotFoundError(f"{file}: shard not found (named in model.safetensors.index.json)")
        try:
            return super().open(file)
        except SafetensorError as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None

    def read(self, name):
        header = self.open(self.where[name]).get_slice(name)
        shape, dtype = tuple(header.get_shape()), header.get_dtype()  # dtype: "BF16", "F32", "I8", ...
        if shape != self.shapes[name]:
            raise ValueError(f"{self.where[name]}: tensor {name!r} has shape {shape}, "
                             f"config.json implies {self.shapes[name]}")
        if dtype not in ("F16", "BF16", "F32", "F64"):  # an integer tensor cast to float would load silently
            raise ValueError(f"{self.where[name]}: tensor {name!r} is {dtype}, not floating point "
                             "(F16, BF16, F32 or F64)")
        try:
            return super().read(name)
        except SafetensorError as e:
            raise ValueError(f"{self.where[name]}: tensor {name!r} is unreadable ({e})") from None


def placement(device, dtype, unchecked=placement):
    check_device(device)
    return unchecked(device, dtype)


def save_atomic(tensors, file, metadata=None, private=save_atomic):
    """Part 1's, and the file as readable as any file made here (safetensors writes it for its owner only)."""
    private(tensors, file, metadata)
    os.chmod(file, as_made(0o666))


def staging_folder(out):
    """A hidden, empty folder beside `out`, with the permissions mkdir would give (mkdtemp makes it
    private), where a whole output is made before it is renamed to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(stage, as_made(0o777))
    return stage


def as_made(mode):
    """The permissions open() or mkdir() would give, under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


class MLP(MLP):
    swiglu = staticmethod(SwiGLU.apply)  # keeps two tokens × intermediate tensors for backward, not three


class Qwen2(Qwen2):
    """The loss without a (tokens × vocab) tensor (LinearCrossEntropy), the ids' shape checked, and
    random weights for what needs only a config.json (benchmarks, counting, pretraining)."""
    cross_entropy = staticmethod(linear_cross_entropy)

    def embed(self, idx, caches=None):
        check_idx(idx)
        return super().embed(idx, caches)

    @classmethod
    def from_config(cls, cfg, layers=None, device=None, dtype=None):
        """Random weights (speed and memory do not depend on the values)."""
        device, dtype = placement(device, dtype)
        return load_frozen(cls.on_meta(cfg, layers), random_weights(cfg, device), dtype)

    @classmethod
    def baseline_of(cls, path, device=None, dtype=None, prelude=None, recurrent=None, coda=None):
        """The baseline Ouroboros cuts from the checkpoint at `path` (prelude, layer R once, coda) as a
        Qwen2 of its own, its layers numbered 0..: save_pretrained writes what from_pretrained reads."""
        L = Qwen2Config.from_pretrained(path).num_hidden_layers
        P, R, C, _ = split_layers(L, prelude, recurrent, coda)
        kept = [*range(P), R, *range(L - C, L)]
        model = cls.from_pretrained(path, kept, device, dtype)
        model.model.layers = nn.ModuleDict({str(k): model.model.layers[str(i)] for k, i in enumerate(kept)})
        model.cfg = replace(model.cfg, num_hidden_layers=len(kept))
        return model

    def save_pretrained(self, path):
        """config.json and model.safetensors in the Hugging Face layout: from_pretrained reads them."""
        Path(path).mkdir(parents=True, exist_ok=True)
        save_atomic({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                    Path(path) / "model.safetensors", {"format": "pt"})
        write_json(Path(path) / "config.json", self.cfg.to_dict())


class Ouroboros(Ouroboros):
    """The paper's model (Part 1) with what lies beyond it, each off by default: halting=True
    (per-token adaptive depth, Halting), coda_rank > 0 (adapters on the coda, Adapter),
    controller="blind" (a control, BlindController) and `checkpointing` (recompute each step in
    backward). Always: every option checked, the causal pool without a scan (prefix_sums), and
    mixed precision: float32 trainables computing in the frozen trunk's dtype (bf16 on a GPU)."""
    CONTROLLERS = {**Ouroboros.CONTROLLERS, "blind": BlindController}
    prefix_sums = staticmethod(prefix_sums)

    def __init__(self, cfg, *, halting=False, coda_rank=0, **options):
        check_options(options)
        super().__init__(cfg, **options)
        check_rank(self.layer, self.options["rank"])
        self.options.update(halting=halting, coda_rank=coda_rank)
        self.halt = Halting.head(cfg.hidden_size) if halting else None
        self.last_halting = None  # the Halting of the last forward pass: steps taken, ponder cost
        self.adapters = Adapter.on_coda(self, coda_rank, self.options["alpha"]) if coda_rank else None
        self.checkpointing = False  # True: recompute each step in backward instead of storing it

    @classmethod
    def from_config(cls, cfg, device=None, dtype=None, **options):
        """Random frozen weights; on device="meta" nothing is allocated (for counting)."""
        device, dtype = placement(device, dtype)
        return cls.build(cfg, random_weights(cfg, device), device, dtype, options)

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, **options):
        """A base checkpoint (Part 1's surgery), or an export, which carries its options (from_export)."""
        if read_json(Path(path) / "config.json", "a Hugging Face checkpoint directory has one"
                     ).get("model_type") != "ouroboros":
            return super().from_pretrained(path, device, dtype, **options)
        if options:
            raise ValueError(f"{path}: an export is read with the options it was made with; give none "
                             f"(given: {', '.join(options)})")
        return cls.from_export(path, device, dtype)

    @classmethod
    def from_export(cls, path, device=None, dtype=None):
        """The model a folder of `export` holds: its kept layers and LoRA bases, and its trainables.
        The depth to run it at is its config.json's (read_export)."""
        cfg, options, _ = read_export(path)
        device, dtype = placement(device, dtype)
        with torch.device(device):
            model = cls(cfg, **options)  # trainables: float32, initialised on the device
        check_export_tensors(Path(path) / "model.safetensors", model)
        with safe_open(Path(path) / "model.safetensors", framework="pt", device=str(device)) as f:
            load_frozen(model.base, f.get_tensor, dtype)
            for slot, t in enumerate(TARGETS):  # the bases, as build made them from the layers now gone
                A, B = (f.get_tensor(f"model.layers.{model.recurrent}.{t}.lora_{x}").to(dtype) for x in "AB")
                model.layer.set_submodule(t, LoRALinear(model.layer.get_submodule(t), A, B, slot))
        model.load_trainable(Path(path) / "ouroboros.safetensors")
        return model

    def forward(self, idx, depth=4, targets=None, caches=None, return_logits=True):
        check_depth(depth, self.options["max_steps"])
        trunk = self.base.model.norm.weight  # a frozen weight: the trunk's device and dtype
        with torch.autocast(trunk.device.type, trunk.dtype, enabled=trunk.dtype != torch.float32):
            return super().forward(idx, depth, targets, caches, return_logits)

    def baseline(self, idx, targets=None, return_logits=True):
        with Adapter.off(self.adapters):  # the pruned model as it was: the coda without adapters
            return super().baseline(idx, targets, return_logits)

    def loop(self, h, depth, cos_sin, caches=None):
        if self.halt is None:
            return super().loop(h, depth, cos_sin, caches)
        return Halting.loop(self, h, depth, cos_sin, caches)  # each position stops when its head says so

    def step(self, h, s, cos_sin, cache=None):
        if self.checkpointing and torch.is_grad_enabled():  # memory of one step, not of `depth`
            return checkpoint(super().step, h, s, cos_sin, cache, use_reentrant=False)
        return super().step(h, s, cos_sin, cache)

    def load_trainable(self, file):
        check_trainable(file, self.options, self.cfg, self)  # the same options, base config and shapes
        super().load_trainable(file)


def option_defaults():
    """Every option of Ouroboros and its default: the paper's (Part 1), then Part 2's."""
    params = [*inspect.signature(Ouroboros.__mro__[1]).parameters.values(),
              *inspect.signature(Ouroboros).parameters.values()]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


@torch.no_grad()
def stream(model, idx, max_new_tokens, depth=4, temperature=1.0, top_k=None, compile=False, unchecked=stream):
    """Part 1's stream, the request checked first (check_prompt). compile=True: the decoding step is
    compiled once the prefill has filled the caches (compiled_decoding)."""
    check_prompt(model, idx, max_new_tokens, temperature, top_k)
    yield from unchecked(model, idx, max_new_tokens, depth, temperature, top_k, decode=decoding(compile))

# ----------------------------------------------------------------------------------------
# Command line: generate text; export a trained model


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["export"]:
        return export_main(argv[1:])
    ap = argparse.ArgumentParser(description="Generate text with Ouroboros from a Qwen2 checkpoint. "
                                 "`python ouroboros.py export --help`: a folder that transformers loads.")
    ap.add_argument("--model", required=True, help="Hugging Face checkpoint directory (config.json, "
                    "safetensors, tokenizer.json)")
    ap.add_argument("--trained", help="trainable weights saved by train.py (OUT/ouroboros.safetensors); "
                    "the options they were made with (halting, coda adapters, ...) come with them")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--depth", type=int, default=4, help="loop steps; for trainables made with --ponder-cost "
                    "(adaptive depth), the most steps: each token stops when its halting head says so")
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--baseline", action="store_true", help="the pruned model, layer R once")
    which.add_argument("--full", action="store_true", help="the unpruned model")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile", action="store_true", help="compile the decoding step (CUDA graphs on a GPU); "
                    "the first tokens wait for the compiler")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    try:
        # Everything that can be checked is checked before the weights load (minutes for 3B).
        if args.trained == "":
            raise ValueError("--trained is empty: give the file train.py saved (OUT/ouroboros.safetensors)")
        if args.trained and (args.full or args.baseline):
            raise ValueError(f"--trained with --{'full' if args.full else 'baseline'}: that model "
                             "has no trainables to load (drop one of the two)")
        placement(args.device, None)  # a device this machine has
        if not Path(args.model).is_dir():
            raise FileNotFoundError(f"--model {args.model}: no such folder (a Hugging Face checkpoint directory)")
        cfg = Qwen2Config.from_pretrained(args.model)
        options = trained_options(args.trained, cfg) if args.trained else {}
        check_depth(args.depth, options.get("max_steps", MAX_STEPS), "--depth")
        tok, dtype = read_tokenizer(Path(args.model) / "tokenizer.json"), args.dtype and getattr(torch, args.dtype)
        prompt = tok.encode(args.prompt).ids
        check_generation(cfg, len(prompt), args.max_new_tokens, args.temperature, args.top_k)
        if max(prompt) >= cfg.vocab_size:
            raise ValueError(f"{args.model}/tokenizer.json gives the prompt token id {max(prompt)}, outside the "
                             f"vocabulary 0..{cfg.vocab_size - 1} of its config.json (a tokenizer of another model?)")
        if args.full:
            model = Qwen2.from_pretrained(args.model, device=args.device, dtype=dtype)
        else:
            model = Ouroboros.from_pretrained(args.model, device=args.device, dtype=dtype, **options)
            if args.trained:
                model.load_trainable(args.trained)
            model = model.base if args.baseline else model
        device = next(model.parameters()).device
        idx = torch.tensor([prompt], dtype=torch.long, device=device)
        new, t_first, steps = [], None, []
        for x in stream(model, idx, args.max_new_tokens, args.depth, args.temperature, args.top_k, args.compile):
            new.append(x.item())  # .item() waits for the device, so the clock is honest
            t_first = t_first or time.perf_counter()
            if getattr(model, "halt", None) is not None:  # adaptive depth: the steps this token took
                steps.append(model.last_halting.steps[:, -1].mean().item())  # the new position's
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(args.prompt + tok.decode(new))
    if len(new) > 1:
        print(f"decode: {(len(new) - 1) / (time.perf_counter() - t_first):.1f} tokens/s"
              + (f", {sum(steps) / len(steps):.2f} loop steps per token (at most {args.depth})" if steps else ""),
              file=sys.stderr)


def export_main(argv):
    ap = argparse.ArgumentParser(prog="ouroboros.py export", description="Write a Hugging Face folder of a trained "
                                 "Ouroboros: AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True) "
                                 "loads it, and so does Ouroboros.from_pretrained(OUT).")
    ap.add_argument("--model", required=True, help="the Hugging Face checkpoint directory it was trained from "
                    "(config.json, safetensors, tokenizer.json)")
    ap.add_argument("--trained", required=True, help="trainable weights saved by train.py (ouroboros.safetensors "
                    "in its --out)")
    ap.add_argument("--out", required=True, help="the folder to write: a new one (never one that holds files)")
    ap.add_argument("--depth", type=int, default=4, help="loop steps the exported model runs")
    args = ap.parse_args(argv)
    try:
        out = export(args.model, args.trained, args.out, args.depth)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True) loads it")


if __name__ == "__main__":
    main()
