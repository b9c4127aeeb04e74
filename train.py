"""
Train Ouroboros: only the Controller, the gate and the per-step norms learn; Qwen2 is frozen.

    python train.py --depth 4 --rank 8          # the paper's recipe on a GPU
    python train.py --demo                      # a one-minute CPU smoke run on random weights
"""
import json
from pathlib import Path

from safetensors.torch import save_file

import ouroboros as ob

# ----------------------------------------------------------------------------------------
# Demo: a tiny random checkpoint in the Hugging Face layout, so nothing has to be downloaded

DEMO_CONFIG = ob.Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=6,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             rope_theta=10000.0, tie_word_embeddings=True)


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


def write_tokenizer(path, texts, vocab_size):
    """A byte-level BPE tokenizer.json (Qwen's kind) trained on `texts`, EOS <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.save(str(Path(path) / "tokenizer.json"))
    return tok
