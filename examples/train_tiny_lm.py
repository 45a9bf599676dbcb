"""Train a small Llama-architecture causal LM on the offline stdlib corpus (a benchmark fixture).

Perplexity only means something on a *trained* model; random tiny models have none. This script
trains a ~12M-parameter Llama (BPE vocab 4096, hidden 384, 6 layers) on the docstrings of all
stdlib modules except the held-out evaluation ones for at most `--minutes` (default 20) on the CPU, and saves a normal
Hugging Face directory. It is cached: a second run with the same settings returns at once.

    python examples/train_tiny_lm.py --out .cache/tiny-lm           # ~20 min on 2 cores
    sparsec eval .cache/tiny-lm --data eval                          # perplexity on held-out modules
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch


def build(vocab_size: int, hidden: int, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         intermediate_size=hidden * 8 // 3 // 64 * 64, max_position_embeddings=512,
                         tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
                         bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".cache/tiny-lm"))
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"}
    stamp = args.out / "train_settings.json"
    if stamp.is_file() and json.loads(stamp.read_text()).get("settings") == settings:
        print(f"cached: {args.out}")
        return

    from compiler.calibration import stdlib_corpus
    from compiler.tiny_models import train_tokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tokenizer = train_tokenizer(vocab_size=args.vocab)
    ids = tokenizer("\n\n".join(stdlib_corpus("train")), add_special_tokens=False)["input_ids"]
    data = torch.tensor(ids, dtype=torch.long)
    model = build(len(tokenizer), args.hidden, args.layers)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.1f}M params, {len(data):,} training tokens")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = random.Random(args.seed)
    deadline = time.time() + args.minutes * 60
    step, losses = 0, []
    model.train()
    while time.time() < deadline:
        starts = [rng.randint(0, len(data) - args.seqlen - 1) for _ in range(args.batch)]
        batch = torch.stack([data[s : s + args.seqlen] for s in starts])
        warm = min(1.0, (step + 1) / 50)
        for g in opt.param_groups:
            g["lr"] = args.lr * warm
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            recent = sum(losses[-50:]) / 50
            print(f"step {step}: loss {recent:.3f} (ppl {math.exp(recent):.1f}), {max(0, deadline - time.time()) / 60:.1f} min left")
    model.eval()
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    final = sum(losses[-50:]) / max(1, len(losses[-50:]))
    stamp.write_text(json.dumps({"settings": settings, "steps": step, "final_train_loss": final, "params": params}, indent=1))
    print(f"saved {args.out}: {step} steps, final train loss {final:.3f}")


if __name__ == "__main__":
    main()
