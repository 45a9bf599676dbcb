"""`sparsec serve`: the batching and text helpers in-process, then REAL server processes on loopback
(`python -m compiler.cli serve ART --port <free>`) hit by httpx, serving artifacts compiled here
(tiny BERT, tiny Llama, the pretrained MiniLM) on the onnxruntime backend."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("prometheus_client", reason="the server's /metrics needs prometheus_client")

from serve_helpers import COMPILE_FAST, Server, compile_tiny, free_port, serve_cmd, start_server  # noqa: E402

from runtimes.decode.loop import SamplingParams, sample  # noqa: E402
from runtimes.serve.app import wait_until_ready  # noqa: E402
from runtimes.serve.batching import DynamicBatcher, QueueFull  # noqa: E402
from runtimes.serve.text import Pooling, length_buckets, pad_batch, pool  # noqa: E402

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


# -- in-process: batcher, padding, pooling, sampling ---------------------------------------------------
def test_batcher_groups_concurrent_items_and_keeps_order():
    calls: list[tuple[str, list[int]]] = []

    def run_batch(key, payloads):
        calls.append((key, list(payloads)))
        time.sleep(0.01)
        return [p * 10 for p in payloads]

    async def main():
        b = DynamicBatcher(run_batch, max_batch_size=4, max_wait_ms=20, max_queue=100)
        b.start()
        results = await asyncio.gather(*(b.submit("k", [i, i + 100]) for i in range(5)))
        await b.close()
        return results

    results = asyncio.run(main())
    assert results == [[i * 10, (i + 100) * 10] for i in range(5)]
    assert all(len(p) <= 4 for _, p in calls)
    assert len(calls) < 10  # grouped: 10 items in fewer backend calls
    assert sorted(x for _, p in calls for x in p) == sorted([*range(5), *range(100, 105)])


def test_batcher_bounded_queue_refuses_whole_request_and_separates_keys():
    seen_keys: list[set[str]] = []

    def run_batch(key, payloads):
        seen_keys.append({key})
        time.sleep(0.05)
        return payloads

    async def main():
        b = DynamicBatcher(run_batch, max_batch_size=8, max_wait_ms=0, max_queue=3)
        b.start()
        first = asyncio.ensure_future(b.submit("a", [1, 2, 3]))
        await asyncio.sleep(0)  # queued, not yet taken
        with pytest.raises(QueueFull) as info:
            b.enqueue("b", [4])
        assert info.value.retry_after_s >= 1
        assert await first == [1, 2, 3]
        mixed = await asyncio.gather(b.submit("a", [5]), b.submit("b", [6]))
        await b.close()
        return mixed

    assert asyncio.run(main()) == [[5], [6]]
    assert all(len(keys) == 1 for keys in seen_keys)


def test_batcher_delivers_backend_errors_and_close_drains():
    def run_batch(key, payloads):
        if key == "bad":
            raise RuntimeError("backend exploded")
        time.sleep(0.02)
        return payloads

    async def main():
        b = DynamicBatcher(run_batch, max_batch_size=2, max_wait_ms=0, max_queue=50)
        b.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await b.submit("bad", [1])
        pending = [asyncio.ensure_future(b.submit("ok", [i])) for i in range(6)]
        await asyncio.sleep(0)
        await b.close()  # must finish the 6 queued items first
        return [await p for p in pending]

    assert asyncio.run(main()) == [[i] for i in range(6)]


def test_pad_and_mean_pool_ignore_padding():
    ids, mask = pad_batch([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left_ids, left_mask = pad_batch([[5, 6, 7], [8]], pad_id=0, left=True)
    assert left_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and left_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 3, 4)).astype(np.float32)
    hidden[1, 1:] = 1e6  # padding positions must not leak into the mean
    out = pool(hidden, mask, Pooling("mean", normalize=False))
    np.testing.assert_allclose(out[0], hidden[0].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[1], hidden[1, 0], rtol=1e-6)
    normed = pool(hidden, mask, Pooling("mean", normalize=True))
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(pool(hidden, mask, Pooling("cls", normalize=False)), hidden[:, 0])


def test_length_buckets_bound_padding_waste():
    lengths = [10, 12, 100, 11, 95, 30, 200, 98]
    groups = length_buckets(lengths, max_waste=0.25, slack_tokens=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert max(lengths[i] for i in g) * len(g) - real <= max(0.25 * real, 8)
    assert any({2, 4, 7} <= set(g) for g in groups)  # 95, 98, 100 share a call
    assert length_buckets([30] * 32) == [list(range(32))]


def test_fast_tokenizer_path_equals_the_hf_tokenizer(tiny_model_dir, minilm_dir):
    from runtimes.serve.text import load_text_model

    texts = ["Return the sum of a and b.", "", "  spaces  ", "ünïcödé — ∑ 漢字 🙂", "word " * 600]
    for directory in (tiny_model_dir("bert"), minilm_dir):
        text = load_text_model(Path(directory))
        assert text.fast is not None
        expected = [list(ids) for ids in text.tokenizer(texts, add_special_tokens=True, truncation=False)["input_ids"]]
        assert text.encode(texts) == expected  # no truncation from tokenizer.json, same special tokens
        assert len(expected[-1]) > 600


def test_sampling_greedy_top_p_and_seed():
    logits = np.array([0.0, 5.0, 4.9, -3.0])
    assert sample(logits, SamplingParams(temperature=0.0), np.random.default_rng(0)) == 1
    # top_p small enough keeps only the most likely token
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.3), np.random.default_rng(s)) for s in range(20)}
    assert draws == {1}
    a = [sample(logits, SamplingParams(temperature=1.5), np.random.default_rng(7)) for _ in range(1)]
    b = [sample(logits, SamplingParams(temperature=1.5), np.random.default_rng(7)) for _ in range(1)]
    assert a == b


# -- real servers ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_model_dir):
    """Compile the tiny BERT and tiny Llama once for this module (lowered to ONNX, onnxruntime)."""
    root = tmp_path_factory.mktemp("serve-artifacts")
    return {arch: compile_tiny(tiny_model_dir, arch, root / arch) for arch in ("bert", "llama")}


@pytest.fixture(scope="module")
def bert_server(artifacts, tmp_path_factory):
    """The main encoder server: API key required, batches of up to 8 waiting up to 25 ms."""
    server = start_server(artifacts["bert"], tmp_path_factory.mktemp("logs"), "--max-batch-size", "8",
                          "--max-wait-ms", "25", "--model-name", "tiny-bert", env={"SPARSEC_API_KEY": KEY})
    yield server
    assert server.stop() == 0, server.log_text()


def reference_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Mean pooling + L2 normalisation of the artifact's own HF model in torch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1).numpy()


TEXTS = ["Return the sum of a and b.", "Open a file and return a stream.", "x"]


def test_embeddings_match_the_torch_model(bert_server, artifacts):
    with bert_server.client(headers=AUTH) as c:
        r = c.post("/v1/embeddings", json={"input": TEXTS, "model": "tiny-bert"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["model"] == "tiny-bert"
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        got = np.array([d["embedding"] for d in body["data"]], dtype=np.float32)
        np.testing.assert_allclose(got, reference_embeddings(artifacts["bert"] / "model", TEXTS), atol=2e-4)
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 3
        timing = dict(part.strip().split(";dur=") for part in r.headers["server-timing"].split(","))
        assert set(timing) == {"queue", "inference"} and float(timing["inference"]) > 0
        b64 = c.post("/v1/embeddings", json={"input": TEXTS[0], "encoding_format": "base64"}).json()
        decoded = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
        np.testing.assert_allclose(decoded, got[0], atol=1e-6)


def test_health_models_metrics_and_raw_infer(bert_server):
    with bert_server.client(headers=AUTH) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/readyz").json()["status"] == "ready"
        card = c.get("/v1/models").json()["data"][0]
        assert card["id"] == "tiny-bert" and card["task"] == "embeddings" and card["backend"] == "onnxruntime"
        assert 0.3 < card["artifact"]["sparsity"]["overall_measured"] < 0.7  # default target 0.5
        assert [t["name"] for t in card["inputs"]][:2] == ["input_ids", "attention_mask"]
        ids = [[3, 40, 41, 42], [3, 50, 51, 52]]
        feeds = {t["name"]: ids if t["name"] == "input_ids" else [[1, 1, 1, 1]] * 2 if t["name"] == "attention_mask"
                 else [[0] * 4] * 2 for t in card["inputs"]}
        r = c.post("/v1/infer", json={"inputs": feeds})
        assert r.status_code == 200, r.text
        out = r.json()
        name = card["outputs"][0]["name"]
        assert out["shapes"][name][:2] == [2, 4] and np.isfinite(np.array(out["outputs"][name])).all()
        # the raw hidden states pool to the same embedding /v1/embeddings gives for the same tokens
        emb = c.post("/v1/embeddings", json={"input": ids}).json()["data"][0]["embedding"]
        hidden = np.array(out["outputs"][name][0])
        pooled = hidden.mean(axis=0)
        np.testing.assert_allclose(pooled / np.linalg.norm(pooled), emb, atol=2e-4)
        text = c.get("/metrics").text
        for metric in ("sparsec_requests_total", "sparsec_request_latency_seconds_bucket", "sparsec_batch_size_bucket",
                       "sparsec_queue_depth", "sparsec_requests_in_progress", "sparsec_model_ready"):
            assert metric in text


def test_user_errors_are_4xx_never_500(bert_server):
    with bert_server.client(headers=AUTH) as c:
        cases = [
            (c.get("/v1/nope"), 404),
            (c.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"}), 422),
            (c.post("/v1/embeddings", json={"input": 5}), 422),
            (c.post("/v1/embeddings", json={"input": ["ok", 3]}), 422),
            (c.post("/v1/embeddings", json={}), 422),
            (c.post("/v1/embeddings", json={"input": []}), 400),
            (c.post("/v1/embeddings", json={"input": "a", "model": "other"}), 404),
            (c.post("/v1/embeddings", json={"input": "a", "dimensions": 5}), 400),
            (c.post("/v1/embeddings", json={"input": [[1, 2, 10 ** 9]]}), 400),
            (c.post("/v1/completions", json={"prompt": "a"}), 400),
            (c.post("/v1/infer", json={"inputs": {"input_ids": [[1, 2]]}}), 400),
            (c.post("/v1/infer", json={"inputs": {"input_ids": [[1, 2]], "attention_mask": [[1]], "bogus": [1]}}), 400),
            (c.get("/v1/embeddings"), 405),
        ]
        for response, status in cases:
            assert response.status_code == status, (response.request.url, response.text)
            assert "message" in response.json()["error"]
        long = c.post("/v1/embeddings", json={"input": "word " * 400})
        assert long.status_code == 400 and "at most 256 tokens" in long.json()["error"]["message"]
        big = c.post("/v1/embeddings", json={"input": "a" * (3 * 1024 * 1024)})
        assert big.status_code == 413
        metrics = c.get("/metrics").text
    assert 'status="500"' not in metrics


def test_api_key_guards_v1_routes_only(bert_server):
    with bert_server.client() as c:
        assert c.get("/v1/models").status_code == 401
        assert c.post("/v1/embeddings", json={"input": "a"}, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/healthz").status_code == 200 and c.get("/metrics").status_code == 200
        metrics = c.get("/metrics").text
    # refused before routing, still counted under the route they were for
    assert _metric(metrics, "sparsec_requests_total", route="/v1/models", status="401") >= 1
    assert _metric(metrics, "sparsec_requests_total", route="/v1/embeddings", status="401") >= 1
    assert _metric(metrics, "sparsec_requests_total", route="unmatched", status="401") == 0


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_concurrent_requests_are_batched_and_answered_correctly(bert_server):
    texts = [f"request number {i}: " + "lorem ipsum " * (i % 5) for i in range(16)]
    with bert_server.client(headers=AUTH) as c:
        solo = [c.post("/v1/embeddings", json={"input": t}).json()["data"][0]["embedding"] for t in texts]
        before = c.get("/metrics").text

    async def burst():
        async with httpx.AsyncClient(base_url=bert_server.url, headers=AUTH, timeout=60) as ac:
            return await asyncio.gather(*(ac.post("/v1/embeddings", json={"input": t}) for t in texts))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 16
    for r, ref in zip(responses, solo):
        np.testing.assert_allclose(r.json()["data"][0]["embedding"], ref, atol=2e-5)
    with bert_server.client(headers=AUTH) as c:
        after = c.get("/metrics").text
    def delta(name: str) -> float:
        return _metric(after, name, kind="embeddings") - _metric(before, name, kind="embeddings")

    calls, items = delta("sparsec_batch_size_count"), delta("sparsec_batch_size_sum")
    assert items == 16
    assert calls < 16, f"16 concurrent requests took {calls} backend calls: not batched"


def test_full_queue_answers_503_with_retry_after(artifacts, tmp_path):
    server = start_server(artifacts["bert"], tmp_path, "--max-batch-size", "1", "--max-queue", "8", "--max-wait-ms", "0",
                          "--no-access-log")
    try:
        async def burst():
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as ac:
                body = {"input": ["some text to embed " * 8] * 4}
                return await asyncio.gather(*(ac.post("/v1/embeddings", json=body) for _ in range(30)))

        responses = asyncio.run(burst())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 503} and statuses.count(503) > 0 and statuses.count(200) > 0
        for r in responses:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and "queue is full" in r.json()["error"]["message"]
        with server.client() as c:  # more inputs than the whole queue holds: never a retry-forever 503
            r = c.post("/v1/embeddings", json={"input": ["x"] * 9})
            assert r.status_code == 400 and "at most 8 per request" in r.json()["error"]["message"], r.text
            assert c.post("/v1/embeddings", json={"input": ["x"] * 8}).status_code == 200
    finally:
        assert server.stop() == 0


def test_batcher_refuses_a_request_larger_than_the_queue_as_never_fitting():
    from runtimes.serve.batching import TooLarge

    async def main():
        b = DynamicBatcher(lambda key, payloads: payloads, max_batch_size=2, max_wait_ms=0, max_queue=3)
        b.start()
        with pytest.raises(TooLarge, match="can never be queued"):
            b.enqueue("k", [1, 2, 3, 4])
        result = await b.submit("k", [1, 2, 3])
        await b.close()
        return result

    assert asyncio.run(main()) == [1, 2, 3]


def test_request_cap_never_exceeds_the_queue(artifacts, tmp_path):
    from compiler.cli_serve import serve_cmd as click_serve
    from runtimes.serve.app import ServeConfig

    defaults = {p.name: p.default for p in click_serve.params}
    config = ServeConfig(artifact="x", max_queue=defaults["max_queue"], max_inputs=defaults["max_inputs"])
    assert config.request_cap == 2048 <= config.max_queue  # OpenAI's per-request limit fits the default queue
    assert ServeConfig(artifact="x", max_queue=100).request_cap == 100
    port = free_port()
    res = subprocess.run(serve_cmd(artifacts["bert"], port, "--max-batch-size", "4", "--max-queue", "8", "--max-inputs", "16"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--max-inputs (16)" in errors[0] and "--max-queue (8)" in errors[0]


def test_sigterm_answers_requests_on_open_keep_alive_connections(artifacts, tmp_path):
    """A keep-alive connection idle at SIGTERM stays open while in-flight requests finish; a request
    sent on it then gets 503 + Connection: close (before: the connection was closed under it, and the
    request got a transport error)."""
    server = start_server(artifacts["bert"], tmp_path, "--max-batch-size", "1", "--max-wait-ms", "0", "--no-access-log")
    body = {"input": ["a fairly long sentence for the tiny model to chew on " * 6] * 24}
    n = 16
    keep = httpx.Client(base_url=server.url, timeout=60)  # one pooled connection, reused below

    async def scenario():
        assert (await asyncio.to_thread(keep.get, "/healthz")).status_code == 200
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=64)) as ac:
            tasks = [asyncio.ensure_future(ac.post("/v1/embeddings", json=body)) for _ in range(n)]
            for _ in range(400):
                await asyncio.sleep(0.02)
                metrics = (await asyncio.to_thread(keep.get, "/metrics")).text
                if _metric(metrics, "sparsec_requests_in_progress") >= n + 1:
                    break
            else:
                pytest.fail("requests never all reached the server")
            server.proc.send_signal(signal.SIGTERM)
            probes = []  # on the kept connection until the server starts draining (no transport error)
            while len(probes) < 500 and (not probes or probes[-1].status_code == 200):
                await asyncio.sleep(0.02)
                probes.append(await asyncio.to_thread(keep.get, "/healthz"))
            return probes, await asyncio.gather(*tasks)

    try:
        probes, responses = asyncio.run(scenario())
    finally:
        keep.close()
    late = probes[-1]
    assert late.status_code == 503 and {p.status_code for p in probes[:-1]} <= {200}, late.text
    assert late.headers["connection"] == "close" and late.headers["retry-after"] == "1"
    assert "shutting down" in late.json()["error"]["message"]
    assert [r.status_code for r in responses] == [200] * n
    assert server.proc.wait(60) == 0, server.log_text()


def test_sigterm_during_load_finishes_every_accepted_request(artifacts, tmp_path):
    server = start_server(artifacts["bert"], tmp_path, "--max-batch-size", "1", "--max-wait-ms", "0")
    n = 24
    body = {"input": ["a fairly long sentence for the tiny model to chew on " * 6] * 24}

    async def load():
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=64)) as ac:
            tasks = [asyncio.ensure_future(ac.post("/v1/embeddings", json=body)) for _ in range(n)]
            for _ in range(400):  # all n requests inside the server (the probe itself is one more)
                await asyncio.sleep(0.02)
                metrics = (await ac.get("/metrics")).text
                if _metric(metrics, "sparsec_requests_in_progress") >= n + 1:
                    break
            else:
                pytest.fail("requests never all reached the server")
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(load())
    assert [r.status_code for r in responses] == [200] * n
    assert all(len(r.json()["data"]) == 24 for r in responses)
    assert server.proc.wait(60) == 0, server.log_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/healthz", timeout=2)
    assert "Shutting down" in server.log_text()


def test_tampered_artifact_is_refused(artifacts, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(artifacts["bert"], bad)
    graph = bad / "onnx" / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    port = free_port()
    res = subprocess.run(serve_cmd(bad, port), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "sha256 mismatch for 'onnx/model.onnx'" in res.stderr
    assert len([line for line in res.stderr.splitlines() if line.startswith("error:")]) == 1
    assert "Traceback" not in res.stderr


def test_unlowered_artifact_and_taken_port_are_one_line_errors(artifacts, tmp_path):
    from compiler.artifact import Artifact

    bare = tmp_path / "bare"
    shutil.copytree(artifacts["bert"], bare)
    shutil.rmtree(bare / "onnx")
    Artifact.load(bare, verify=False).update()  # a consistent manifest, without the lowered graph
    res = subprocess.run(serve_cmd(bare, free_port()), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "has no lowered graph" in res.stderr and "--backend onnxruntime" in res.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        res = subprocess.run(serve_cmd(artifacts["bert"], taken.getsockname()[1]), capture_output=True, text=True,
                             timeout=120)
    assert res.returncode == 1 and "cannot listen on 127.0.0.1" in res.stderr and "Traceback" not in res.stderr


def with_graph(artifact: Path, out: Path, node_op: str) -> Path:
    """A copy of `artifact` whose graph is one `node_op` node over a 3x4 table indexed by input_ids
    (manifest re-hashed, so it verifies): a real graph that real onnxruntime runs, or rejects."""
    import onnx
    from onnx import TensorProto, helper

    from compiler.artifact import Artifact

    shutil.copytree(artifact, out)
    art = Artifact.load(out)
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask")]
    output = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", 4])
    table = helper.make_tensor("table", TensorProto.FLOAT, [3, 4], [0.1] * 12)
    node = helper.make_node(node_op, ["table", "input_ids"], ["last_hidden_state"])
    graph = helper.make_graph([node], "edited", inputs, [output], [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(out / "onnx" / "model.onnx"))
    art.update(manifest_updates={"lowering": dict(art.manifest["lowering"], backend_files={},
                                                  files={"model": "onnx/model.onnx"})})
    return out


def test_backend_failure_is_500_with_logged_error_id(artifacts, tmp_path):
    """A graph that fails at run time for real (Gather index out of range on token ids >= 3)."""
    broken = with_graph(artifacts["bert"], tmp_path / "broken", "Gather")
    server = start_server(broken, tmp_path, "--max-wait-ms", "0")
    try:
        with server.client() as c:
            r = c.post("/v1/embeddings", json={"input": "hello world, this has many token ids"})
            assert r.status_code == 500
            error_id = r.json()["error"]["id"]
            assert error_id in r.json()["error"]["message"]
            ok = c.post("/v1/embeddings", json={"input": [[0, 1, 2]]})  # ids inside the table still work
            assert ok.status_code == 200 and c.get("/healthz").status_code == 200
    finally:
        assert server.stop() == 0
    assert f"error id {error_id}: backend failure" in server.log_text()


def test_model_that_fails_to_load_stops_the_server_with_exit_1(artifacts, tmp_path):
    """The model loads in the background (after verification); onnxruntime rejects an unknown op."""
    rejected = with_graph(artifacts["bert"], tmp_path / "rejected", "NoSuchOperator")
    res = subprocess.run(serve_cmd(rejected, free_port()), capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not be loaded on backend 'onnxruntime'" in errors[0]
    assert "error id" in errors[0] and "Traceback" in res.stderr  # the log keeps the cause

def test_static_shape_backend_pads_to_its_compiled_shape(artifacts, tmp_path):
    """DeepSparse compiles one (batch, seqlen): batches are padded to it, and seqlen is the token limit."""
    from compiler.registry import Registry

    ok, reason = Registry.default().get_backend("deepsparse").available()
    if not ok:
        pytest.skip(f"deepsparse unavailable: {reason}")
    server = start_server(artifacts["bert"], tmp_path, "--backend", "deepsparse", "--max-batch-size", "4",
                          "--seqlen", "32", "--max-wait-ms", "0", ready_timeout=300)
    try:
        with server.client() as c:
            texts = TEXTS + ["one more text", "and a fifth, beyond one static batch of four"]
            r = c.post("/v1/embeddings", json={"input": texts})
            assert r.status_code == 200, r.text
            got = np.array([d["embedding"] for d in r.json()["data"]])
            np.testing.assert_allclose(got, reference_embeddings(artifacts["bert"] / "model", texts), atol=1e-3)
            long = c.post("/v1/embeddings", json={"input": "word " * 40})
            assert long.status_code == 400 and "at most 32 tokens" in long.json()["error"]["message"]
            card = c.get("/v1/models").json()["data"][0]
            assert card["max_input_tokens"] == 32 and card["inputs"][0]["shape"] == [4, 32]
    finally:
        assert server.stop() == 0
    assert "evaluation" in server.log_text().lower()  # the licence notice is shown
    from compiler.artifact import Artifact

    Artifact.load(artifacts["bert"])  # the engine got a prepared copy: the artifact still verifies


# -- completions ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama_server(artifacts, tmp_path_factory):
    server = start_server(artifacts["llama"], tmp_path_factory.mktemp("logs"), "--max-wait-ms", "20")
    yield server
    assert server.stop() == 0, server.log_text()


def greedy_reference(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


PROMPTS = ["def read_file(path):\n    return", "The module provides"]


def test_greedy_completions_match_torch_generate(llama_server, artifacts):
    refs = [greedy_reference(artifacts["llama"] / "model", p, 8) for p in PROMPTS]
    with llama_server.client() as c:
        # one request with two prompts of different lengths: batched with left padding
        r = c.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 8})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["text"] for ch in body["choices"]] == refs
        assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] <= 16
        solo = c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 8}).json()
        assert solo["choices"][0]["text"] == refs[1]
        too_long = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 10_000})
        assert too_long.status_code == 400 and "at most 256 tokens" in too_long.json()["error"]["message"]
        assert c.post("/v1/embeddings", json={"input": "x"}).status_code == 400
        assert c.post("/v1/completions", json={"prompt": "x", "n": 2}).status_code == 400


def test_deepsparse_serves_completions_through_its_decoder(artifacts, tmp_path):
    """Completions run the backend's decoder (the loop `verify --decode` measures): DeepSparse, with fixed
    shapes and the loop in its worker, serves them too, and its fixed limits are 400s."""
    from compiler.registry import Registry

    ok, reason = Registry.default().get_backend("deepsparse").available()
    if not ok:
        pytest.skip(f"deepsparse unavailable: {reason}")
    refs = [greedy_reference(artifacts["llama"] / "model", p, 8) for p in PROMPTS]
    server = start_server(artifacts["llama"], tmp_path, "--backend", "deepsparse", "--seqlen", "32", ready_timeout=600)
    try:
        with server.client() as c:
            r = c.post("/v1/completions", json={"prompt": PROMPTS, "max_tokens": 8})
            assert r.status_code == 200, r.text
            assert [ch["text"] for ch in r.json()["choices"]] == refs
            over = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 40})
            assert over.status_code == 400 and "static cache" in over.json()["error"]["message"]
    finally:
        assert server.stop() == 0, server.log_text()


def test_deepsparse_refuses_what_it_cannot_serve_before_binding(artifacts, tmp_path):
    """`serve --backend deepsparse` of a causal LM it cannot run is one line and exit 1 before the port
    is bound (before: the port was bound, then the background load logged a traceback and exited 1):
    a graph with onnxruntime-only ops, and an LM artifact lowered without its KV cache."""
    import onnx
    from onnx import TensorProto, helper

    from compiler.artifact import Artifact
    from compiler.registry import Registry

    ok, reason = Registry.default().get_backend("deepsparse").available()
    if not ok:
        pytest.skip(f"deepsparse unavailable: {reason}")
    ort_only = tmp_path / "ort-only"
    shutil.copytree(artifacts["llama"], ort_only)
    value = helper.make_tensor_value_info
    node = helper.make_node("FusedMatMul", ["x", "x"], ["logits"], domain="com.microsoft")
    graph = helper.make_graph([node], "ort-only", [value("x", TensorProto.FLOAT, [2, 2])],
                              [value("logits", TensorProto.FLOAT, [2, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                                ir_version=8), str(ort_only / "onnx" / "ort-only.onnx"))
    art = Artifact.load(ort_only)
    lowering = art.manifest["lowering"]
    art.update(manifest_updates={"lowering": dict(lowering, backend_files={**(lowering.get("backend_files") or {}),
                                                                           "deepsparse": "onnx/ort-only.onnx"})})
    no_kv = tmp_path / "no-kv"
    shutil.copytree(artifacts["llama"], no_kv)
    art = Artifact.load(no_kv)
    art.update(manifest_updates={"lowering": {k: v for k, v in art.manifest["lowering"].items() if k != "kv"}})
    for artifact, expected in ((ort_only, "opset domain 'com.microsoft', which DeepSparse cannot run"),
                               (no_kv, "cannot serve completions: decode needs a causal-LM artifact lowered with its KV cache")):
        res = subprocess.run(serve_cmd(artifact, free_port(), "--backend", "deepsparse"), capture_output=True, text=True,
                             timeout=300)
        errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
        assert res.returncode == 1 and len(errors) == 1 and expected in errors[0], res.stderr
        assert "Traceback" not in res.stderr and "serving " not in res.stderr and "Uvicorn running" not in res.stderr

NO_TORCH = "import sys; sys.modules['torch'] = None; from compiler.cli import main; main()"


def test_onnx_artifacts_serve_without_torch(artifacts, tmp_path):
    """`sparsec serve` of an ONNX artifact (and so the deploy bundle's start.sh, which runs it) never
    imports torch: with `import torch` blocked, the encoder serves embeddings and the LM completions."""
    servers = {}
    try:
        for arch in ("bert", "llama"):
            port = free_port()
            log = tmp_path / f"{arch}.log"
            with open(log, "w") as fh:
                proc = subprocess.Popen([sys.executable, "-c", NO_TORCH, "serve", str(artifacts[arch]), "--port", str(port)],
                                        stdout=fh, stderr=subprocess.STDOUT)
            servers[arch] = Server(proc, f"http://127.0.0.1:{port}", log)
            assert wait_until_ready(servers[arch].url, 120, proc) == "ready", servers[arch].log_text()
        with servers["bert"].client() as c:
            r = c.post("/v1/embeddings", json={"input": TEXTS})
            assert r.status_code == 200, r.text
        with servers["llama"].client() as c:
            r = c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 4})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        for server in servers.values():
            assert server.stop() == 0, server.log_text()


def test_streaming_completion_equals_non_streaming(llama_server):
    with llama_server.client() as c:
        full = c.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 10}).json()["choices"][0]
        deltas, finish, done = [], None, False
        with c.stream("POST", "/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 10, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                choice = json.loads(line[6:])["choices"][0]
                deltas.append(choice["text"])
                finish = choice["finish_reason"] or finish
        assert done and "".join(deltas) == full["text"] and finish == full["finish_reason"]
        assert len(deltas) >= 2  # really incremental


def test_stop_strings_and_seeded_sampling(llama_server):
    with llama_server.client() as c:
        text = c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 12}).json()["choices"][0]["text"]
        stop = text[3:5] if len(text) >= 5 else None
        if stop and stop.strip():
            cut = c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 12, "stop": stop}).json()
            assert cut["choices"][0]["text"] == text[:text.find(stop)]
            assert cut["choices"][0]["finish_reason"] == "stop"
        sampled = [c.post("/v1/completions", json={"prompt": PROMPTS[1], "max_tokens": 6, "temperature": 1.0,
                                                   "seed": 11}).json()["choices"][0]["text"] for _ in range(2)]
        assert sampled[0] == sampled[1]


# -- MiniLM ----------------------------------------------------------------------------------------------
def test_minilm_artifact_serves_sentence_transformers_embeddings(minilm_dir, tmp_path):
    from click.testing import CliRunner

    from compiler.cli import main

    out = tmp_path / "minilm"
    # magnitude pruning needs no calibration pass: the cheapest real MiniLM artifact
    res = CliRunner().invoke(main, ["compile", "minilm", "-o", str(out), "--backend", "onnxruntime", "--allocation",
                                    "uniform", "--method", "magnitude", *COMPILE_FAST], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    server = start_server(out, tmp_path, "--max-wait-ms", "0")
    try:
        texts = ["A cat sits on the mat.", "Stock markets fell sharply today."]
        with server.client() as c:
            body = c.post("/v1/embeddings", json={"input": texts}).json()
            card = c.get("/v1/models").json()["data"][0]
    finally:
        assert server.stop() == 0
    got = np.array([d["embedding"] for d in body["data"]])
    assert got.shape == (2, 384) and card["max_input_tokens"] == 512
    np.testing.assert_allclose(got, reference_embeddings(out / "model", texts), atol=2e-4)
