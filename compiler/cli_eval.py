"""`sparsec eval`: perplexity, top-1 and greedy-continuation agreement (causal LMs) or embedding fidelity
and nearest-neighbour overlap (encoders) vs the dense reference."""

from __future__ import annotations

import json

import click

from compiler.cli_stream import stream_options


@click.command("eval")
@click.argument("model_or_artifact")
@click.option("--data", default="eval", show_default=True, help="Held-out text: 'eval' (built-in stdlib corpus) | FILE.txt | FILE.jsonl | DIR.")
@click.option("--reference", help="Dense reference model (default for an artifact: its source model).")
@click.option("--seqlen", type=int, default=256, show_default=True, help="Window / truncation length (capped by the model).")
@click.option("--stride", type=int, default=128, show_default=True, help="Perplexity: new tokens scored per window.")
@click.option("--max-tokens", type=int, default=16384, show_default=True, help="Perplexity: tokens evaluated.")
@click.option("--max-texts", type=int, default=256, show_default=True, help="Embeddings: texts compared.")
@click.option("--greedy-prompts", type=int, default=8, show_default=True, help="LMs: held-out prompts greedy-decoded by both models (0: skip).")
@click.option("--greedy-tokens", type=int, default=32, show_default=True, help="LMs: tokens decoded per prompt.")
@click.option("--knn", type=int, default=10, show_default=True, help="Encoders: neighbours compared per text (retrieval overlap).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@stream_options
def eval_cmd(model_or_artifact, data, reference, seqlen, stride, max_tokens, max_texts, greedy_prompts, greedy_tokens, knn, as_json,
             stream, max_memory):
    """Evaluate MODEL_OR_ARTIFACT on held-out text (against its dense reference when there is one)."""
    from compiler.cli_stream import max_memory_bytes
    from compiler.evaluate import EvalConfig, evaluate_models, resolve_target

    cfg = EvalConfig(seqlen=seqlen, stride=stride, max_tokens=max_tokens, max_texts=max_texts,
                     greedy_prompts=greedy_prompts, greedy_tokens=greedy_tokens, knn=knn)
    result = evaluate_models(resolve_target(model_or_artifact, reference), data, cfg, stream=stream,
                             max_memory=max_memory_bytes(max_memory))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result["metric"] == "perplexity":
        line = f"perplexity on '{data}': {result['compiled']:.3f} ({result['tokens']:,} tokens, seqlen {result['seqlen']})"
        if result.get("dense") is not None:
            line += f"; dense reference {result['dense']:.3f} (x{result['ratio']:.3f})"
            line += f"; top-1 agreement with dense {100 * result['top1_agreement']:.1f}%"
            if "greedy_prefix_match" in result:
                line += (f"; greedy continuations ({result['greedy_prompts']} prompts x {result['greedy_tokens']} tokens): "
                         f"{100 * result['greedy_prefix_match']:.1f}% identical before first divergence, "
                         f"{100 * result['greedy_token_agreement']:.1f}% same tokens")
    elif result["metric"] == "embedding_cosine":
        line = (f"embedding cosine vs dense on '{data}': mean {result['compiled']:.4f}, min {result['min']:.4f} "
                f"over {result['samples']} texts")
        overlap = next((k for k in result if k.startswith("retrieval_overlap@")), None)
        if overlap:
            line += f"; nearest-neighbour overlap@{overlap.split('@')[1]} {100 * result[overlap]:.1f}%"
    else:
        line = f"{result['metric']}: {result['compiled']:.4f}"
    click.echo(line)
