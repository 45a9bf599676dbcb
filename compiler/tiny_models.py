"""Tiny Hugging Face models built in-process (no hub), for tests, examples and benchmarks.

Each is a real architecture from transformers with a small config, random weights (fixed seed), and
a real byte-level BPE tokenizer trained on the offline stdlib corpus, saved as a normal HF
directory that `sparsec compile DIR` loads like any other model.
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCHITECTURES = ("llama", "opt", "gpt2", "bert", "qwen2", "mistral")


def train_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer trained on the stdlib docstring corpus (a few seconds at most)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from compiler.calibration import stdlib_corpus

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>", "[CLS]", "[SEP]", "[MASK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(stdlib_corpus("calib")[:2000], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_config(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 4, intermediate: int = 128):
    from transformers import BertConfig, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(vocab_size=vocab_size)
    if arch == "llama":
        return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                           intermediate_size=intermediate, max_position_embeddings=256, architectures=["LlamaForCausalLM"],
                           bos_token_id=0, eos_token_id=1, pad_token_id=2, **common)
    if arch == "mistral":
        return MistralConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                             intermediate_size=intermediate, max_position_embeddings=256, architectures=["MistralForCausalLM"],
                             bos_token_id=0, eos_token_id=1, pad_token_id=2, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                           intermediate_size=intermediate, max_position_embeddings=256, architectures=["Qwen2ForCausalLM"],
                           bos_token_id=0, eos_token_id=1, pad_token_id=2, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, ffn_dim=intermediate,
                         word_embed_proj_dim=hidden, max_position_embeddings=256, architectures=["OPTForCausalLM"],
                         bos_token_id=0, eos_token_id=1, pad_token_id=2, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=intermediate, n_positions=256,
                          architectures=["GPT2LMHeadModel"], bos_token_id=0, eos_token_id=1, **common)
    if arch == "bert":
        return BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate,
                          max_position_embeddings=256, architectures=["BertModel"], pad_token_id=2, **common)
    raise ValueError(f"unknown tiny architecture '{arch}' (known: {', '.join(ARCHITECTURES)})")


def build_tiny_model(arch: str, directory: str | Path, *, seed: int = 0, tokenizer=None, **sizes) -> Path:
    """Write a tiny `arch` model (random init, seeded) + tokenizer to `directory`; returns it."""
    from transformers import AutoModel, AutoModelForCausalLM

    directory = Path(directory)
    tokenizer = tokenizer or train_tokenizer()
    config = tiny_config(arch, vocab_size=len(tokenizer), **sizes)
    torch.manual_seed(seed)
    auto = AutoModel if arch == "bert" else AutoModelForCausalLM
    model = auto.from_config(config)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
