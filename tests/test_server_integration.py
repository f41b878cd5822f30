"""The server on the embedded SmolLM2-135M-Instruct, through the official openai client (a few tokens each)."""
from __future__ import annotations

import pytest

from server_helpers import Server

pytestmark = pytest.mark.integration
MODEL = "embedded"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(None, tmp_path_factory.mktemp("embedded") / "data").start(timeout=300)
    yield srv
    srv.stop()


def test_embedded_chat_and_completion(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [MODEL]
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
                                         max_tokens=12, temperature=0)
    assert "Paris" in out.choices[0].message.content
    assert out.usage.completion_tokens <= 12
    stream = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0,
                                       stream=True)
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text.strip()


def test_embedded_session_remembers(server):
    client, http = server.client(), server.http()
    sid = http.post("/v1/sessions", json={}).json()["id"]
    client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, extra_body={"session_id": sid},
                                   messages=[{"role": "user", "content": "My name is Ada. Please remember it."}])
    stream = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=0, stream=True,
                                            extra_body={"session_id": sid},
                                            messages=[{"role": "user", "content": "What is my name?"}])
    reply = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Ada" in reply  # only the new turn was sent: the name came from the session's stream
