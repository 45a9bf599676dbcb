"""`POST /v1/chat/completions` through the official `openai` client against a REAL `sparsec serve` process:
the tiny Llama artifact, its tokenizer given a chat template (written into model/tokenizer_config.json,
manifest re-hashed), and the same artifact without one (a 400)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the chat tests use the official openai client (dev extra)")
pytest.importorskip("prometheus_client", reason="the server's /metrics needs prometheus_client")

from serve_helpers import compile_tiny, start_server  # noqa: E402

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
MESSAGES = [{"role": "system", "content": "You answer in Python."},
            {"role": "user", "content": "Open a file and return a stream."}]


def with_chat_template(artifact: Path, out: Path) -> Path:
    """A copy of `artifact` whose tokenizer has TEMPLATE as its chat template (the manifest re-hashed)."""
    from compiler.artifact import Artifact

    shutil.copytree(artifact, out)
    cfg_path = out / "model" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg, indent=2))
    Artifact.load(out, verify=False).update()
    return out


@pytest.fixture(scope="module")
def chat_artifacts(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("chat-artifacts")
    plain = compile_tiny(tiny_model_dir, "llama", root / "plain")
    return {"plain": plain, "chat": with_chat_template(plain, root / "chat")}


@pytest.fixture(scope="module")
def chat_server(chat_artifacts, tmp_path_factory):
    server = start_server(chat_artifacts["chat"], tmp_path_factory.mktemp("logs"), "--model-name", "tiny-chat",
                          "--max-wait-ms", "0")
    yield server
    assert server.stop() == 0, server.log_text()


def client(server) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def rendered_ids(artifact: Path) -> list[int]:
    """MESSAGES through the template by transformers itself: the prompt the server must build."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifact / "model")
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert text.endswith("<s>assistant\n")
    return tok(text, add_special_tokens=False)["input_ids"]


def test_chat_completion_is_the_templated_prompt_completed(chat_server, chat_artifacts):
    ids = rendered_ids(chat_artifacts["chat"])
    with client(chat_server) as oc:
        chat = oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=8)
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-") and chat.model == "tiny-chat"
    (choice,) = chat.choices
    assert choice.message.role == "assistant" and choice.index == 0
    assert chat.usage.prompt_tokens == len(ids) and 1 <= chat.usage.completion_tokens <= 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    # the same tokens through /v1/completions (the shared generation path) give the same text
    with chat_server.client() as c:
        plain = c.post("/v1/completions", json={"prompt": ids, "max_tokens": 8}).json()["choices"][0]
    assert choice.message.content == plain["text"] and choice.finish_reason == plain["finish_reason"]
    with client(chat_server) as oc:  # max_completion_tokens is the current name of the budget
        short = oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_completion_tokens=3)
    assert short.usage.completion_tokens <= 3
    assert plain["text"].startswith(short.choices[0].message.content)


def test_chat_streaming_equals_non_streaming(chat_server):
    with client(chat_server) as oc:
        full = oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10)
        chunks = list(oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and not first.delta.content and first.finish_reason is None
    content = [ch.choices[0].delta.content for ch in chunks[1:] if ch.choices and ch.choices[0].delta.content]
    assert "".join(content) == full.choices[0].message.content and len(content) >= 2  # really incremental
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    # on the wire: SSE events ending with data: [DONE]
    with chat_server.client() as c, c.stream("POST", "/v1/chat/completions",
                                             json={"messages": MESSAGES, "max_tokens": 4, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and all("usage" not in json.loads(e[6:]) for e in events[:-1])


def test_chat_stop_and_seeded_sampling(chat_server):
    with client(chat_server) as oc:
        text = oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12).choices[0].message.content
        stop = next((text[i:i + 2] for i in range(2, len(text) - 1) if text[i:i + 2].strip()), None)
        assert stop, f"no usable stop string in {text!r}"
        cut = oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, stop=[stop])
        assert cut.choices[0].message.content == text[:text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=12, stop=stop, stream=True)
        assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == text[:text.find(stop)]
        sampled = [oc.chat.completions.create(model="tiny-chat", messages=MESSAGES, max_tokens=6, temperature=1.0,
                                              top_p=0.9, seed=11).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_bad_chat_requests_are_4xx(chat_server):
    cases = [
        ({"messages": []}, 422),
        ({"messages": [{"role": "tool", "content": "x"}]}, 422),
        ({"messages": [{"role": "user", "content": 5}]}, 422),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 422),
        ({"messages": "hello"}, 422),
        ({"messages": MESSAGES, "max_tokens": 0}, 422),
        ({"messages": MESSAGES, "max_tokens": 4, "max_completion_tokens": 5}, 400),
        ({"messages": MESSAGES, "n": 2}, 400),
        ({"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400),
        ({"messages": MESSAGES, "max_tokens": 10_000}, 400),
        ({"messages": MESSAGES, "model": "other"}, 404),
    ]
    with chat_server.client() as c:
        for body, status in cases:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["message"]
        parts = c.post("/v1/chat/completions", json={"max_tokens": 3, "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Open a file "}, {"type": "text", "text": "now."}]}]})
        assert parts.status_code == 200, parts.text
        assert 'status="500"' not in c.get("/metrics").text


def test_model_without_chat_template_is_a_400(chat_artifacts, tmp_path):
    server = start_server(chat_artifacts["plain"], tmp_path, "--max-wait-ms", "0")
    try:
        with client(server) as oc, pytest.raises(openai.BadRequestError) as info:
            oc.chat.completions.create(model=chat_artifacts["plain"].name, messages=MESSAGES, max_tokens=4)
        assert info.value.status_code == 400
        assert "has no chat template" in info.value.body["message"] and "/v1/completions" in info.value.body["message"]
        with server.client() as c:  # the plain completions route still serves it
            assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    finally:
        assert server.stop() == 0, server.log_text()
