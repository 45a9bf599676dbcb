"""Sequential block runner: captured inputs, stats, pruned outputs fed forward, bounded memory."""

import torch

from compiler.block_runner import BlockRunner
from compiler.calibration import CalibrationConfig, build_calibration
from compiler.trace import load_and_trace


def _ir_and_samples(tiny_model_dir, arch="llama", samples=3, seqlen=16):
    ir = load_and_trace(str(tiny_model_dir(arch)))
    cal = build_calibration(ir, CalibrationConfig(samples=samples, seqlen=seqlen))
    return ir, cal.samples


def test_block_outputs_match_the_full_model(tiny_model_dir):
    """Feeding block outputs forward reproduces the model's own hidden states."""
    ir, samples = _ir_and_samples(tiny_model_dir)
    outs = None
    for step in BlockRunner(ir, samples):
        outs = step.outputs()
    with torch.no_grad():
        ref = ir.module(**samples[0], output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[-1] has the final norm applied in Llama; the pre-norm last block output is compared via norm
    final = ir.module.model.norm(outs[0])
    torch.testing.assert_close(final, ref[-1], rtol=1e-4, atol=1e-4)


def test_stats_count_every_token_and_match_direct_computation(tiny_model_dir):
    ir, samples = _ir_and_samples(tiny_model_dir, samples=2, seqlen=8)
    captured = {}
    first_q = ir.blocks[0].layers[0]
    for step in BlockRunner(ir, samples):
        # hooked only around layer_stats: samples may pass in one batched call (compiler/block_batching.py)
        handle = ir.get_module(first_q).register_forward_hook(lambda m, i, o: captured.setdefault("x", []).append(i[0].detach()))
        try:
            stats = step.layer_stats(hessian=True, layers=[first_q])
        finally:
            handle.remove()
        break
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in captured["x"]])
    st = stats[first_q]
    assert st.tokens == 16
    torch.testing.assert_close(st.sq_norm, (x * x).sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.hessian, 2 / 16 * x.t() @ x, rtol=1e-4, atol=1e-5)


def test_modified_block_feeds_pruned_outputs_forward(tiny_model_dir):
    ir, samples = _ir_and_samples(tiny_model_dir, samples=2, seqlen=8)
    dense_outs, pruned_outs = [], []
    for step in BlockRunner(ir.clone(), samples):
        dense_outs.append(step.outputs()[0].clone())
    runner = BlockRunner(ir, samples)
    for step in runner:
        step.layer_stats()
        if step.block.index == 0:
            for name in step.block.layers:
                ir.set_weight(name, torch.zeros_like(ir.weight(name)))
            step.mark_modified()
        pruned_outs.append(step.outputs()[0].clone())
    assert not torch.allclose(dense_outs[0], pruned_outs[0])
    assert not torch.allclose(dense_outs[1], pruned_outs[1])


def test_runner_holds_one_block_of_activations(tiny_model_dir):
    """Inputs for block k+1 replace those of block k: the runner never keeps a list per block."""
    ir, samples = _ir_and_samples(tiny_model_dir, samples=2, seqlen=8)
    seen = []
    for step in BlockRunner(ir, samples):
        seen.append(id(step.inputs.hidden))
        assert len(step.inputs.hidden) == 2
        assert step.inputs.hidden[0].shape == (1, 8, 64)
    assert len(set(seen)) == len(ir.blocks)


def test_encoder_and_conv1d_models_run(tiny_model_dir):
    for arch in ("bert", "gpt2", "opt"):
        ir, samples = _ir_and_samples(tiny_model_dir, arch, samples=2, seqlen=8)
        stats = [step.layer_stats() for step in BlockRunner(ir, samples)]
        assert len(stats) == 2 and all(s.tokens == 16 for s in stats[1].values())


def test_batched_block_calls_match_per_sample_calls(tiny_model_dir):
    """Samples share one block call when their other arguments agree; results equal per-sample calls."""
    for arch in ("llama", "bert"):
        ir, samples = _ir_and_samples(tiny_model_dir, arch=arch, samples=5, seqlen=16)
        batched = BlockRunner(ir, samples)
        single = BlockRunner(ir, samples)
        inputs = batched.capture_first_inputs()
        batched.check_batching(inputs)
        assert batched.groups == [[0, 1, 2, 3, 4]], arch
        module = ir.block_module(ir.blocks[0])
        a = batched.forward_samples(module, inputs)
        b = single.forward_samples(module, single.capture_first_inputs())  # groups None: per sample
        assert len(a) == len(b) == 5
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
        batched.max_batch_tokens = 32  # two samples of 16 tokens per call
        batched.check_batching(inputs)
        assert batched.groups == [[0, 1], [2, 3], [4]]


def test_layers_fed_one_input_share_their_stats(tiny_model_dir):
    """q/k/v (and gate/up) see the same tensor: one LayerStats object, its Hessian accumulated once and
    equal to each layer's own (computed with that layer hooked alone); o/down keep their own."""
    ir, samples = _ir_and_samples(tiny_model_dir, samples=3, seqlen=12)
    block = ir.blocks[0]
    names = {n.rsplit(".", 1)[-1]: n for n in block.layers}
    for step in BlockRunner(ir, samples):
        shared = step.layer_stats(hessian=True)
        alone = {n: step.layer_stats(hessian=True, layers=[n])[n] for n in (names["k_proj"], names["up_proj"])}
        break
    assert shared[names["q_proj"]] is shared[names["k_proj"]] is shared[names["v_proj"]]
    assert shared[names["gate_proj"]] is shared[names["up_proj"]]
    assert shared[names["o_proj"]] is not shared[names["q_proj"]] and shared[names["down_proj"]] is not shared[names["up_proj"]]
    for n, own in alone.items():
        assert shared[n].tokens == own.tokens == 36
        torch.testing.assert_close(shared[n].hessian, own.hessian)
        torch.testing.assert_close(shared[n].sq_norm, own.sq_norm)
