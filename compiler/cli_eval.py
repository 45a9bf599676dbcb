"""`sparsec eval`: perplexity (causal LMs) or embedding fidelity vs the dense reference (encoders)."""

from __future__ import annotations

import json

import click


@click.command("eval")
@click.argument("model_or_artifact")
@click.option("--data", default="eval", show_default=True, help="Held-out text: 'eval' (built-in stdlib corpus) | FILE.txt | FILE.jsonl | DIR.")
@click.option("--reference", help="Dense reference model (default for an artifact: its source model).")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Window / truncation length (capped by the model).")
@click.option("--stride", type=int, default=128, show_default=True, help="Perplexity: new tokens scored per window.")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Perplexity: tokens evaluated.")
@click.option("--max-texts", type=int, default=256, show_default=True, help="Embeddings: texts compared.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_cmd(model_or_artifact, data, reference, seqlen, stride, max_tokens, max_texts, as_json):
    """Evaluate MODEL_OR_ARTIFACT on held-out text (against its dense reference when there is one)."""
    from compiler.evaluate import EvalConfig, evaluate_models, resolve_target

    cfg = EvalConfig(seqlen=seqlen, stride=stride, max_tokens=max_tokens, max_texts=max_texts)
    result = evaluate_models(resolve_target(model_or_artifact, reference), data, cfg)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result["metric"] == "perplexity":
        line = f"perplexity on '{data}': {result['compiled']:.3f} ({result['tokens']:,} tokens, seqlen {result['seqlen']})"
        if result.get("dense") is not None:
            line += f"; dense reference {result['dense']:.3f} (x{result['ratio']:.3f})"
    elif result["metric"] == "embedding_cosine":
        line = (f"embedding cosine vs dense on '{data}': mean {result['compiled']:.4f}, min {result['min']:.4f} "
                f"over {result['samples']} texts")
    else:
        line = f"{result['metric']}: {result['compiled']:.4f}"
    click.echo(line)
