"""The official ollama client through a platform that turns every request into GET."""

import asyncio
import hashlib
import json

import ollama
import pytest

from .get_only_front import PUBLIC_HOST, make_front
from .helpers import unused_url

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(io_loop, front_url):
    client = ollama.AsyncClient(host=front_url)
    yield client
    io_loop.run_sync(client.close)


def upstream_calls(fake):
    return [(seen.method, seen.path) for seen in fake.seen]


async def test_without_the_proxy_the_platform_breaks_every_post(servers, upstream_url):
    """The premise: without the proxy, Ollama refuses the platform's requests."""
    direct = ollama.AsyncClient(host=servers.start(make_front(upstream_url)))
    with pytest.raises(ollama.ResponseError) as caught:
        await direct.chat(model="llama3.2", messages=MESSAGES)
    assert caught.value.status_code in (403, 405)
    await direct.close()


async def test_list_ps_show(client, fake):
    assert "llama3.2" in [m.model for m in (await client.list()).models]
    assert (await client.ps()).models == []
    assert (await client.show("llama3.2")).modelfile == "FROM x"
    assert upstream_calls(fake) == [("GET", "/api/tags"), ("GET", "/api/ps"), ("POST", "/api/show")]
    assert all(seen.headers["Host"] != PUBLIC_HOST for seen in fake.seen)


async def test_chat_and_generate_whole_and_streamed(client, fake):
    whole = await client.chat(model="llama3.2", messages=MESSAGES)
    assert whole.message.content == "tok0 tok1 tok2 " and whole.done
    parts = [part async for part in await client.chat(model="llama3.2", messages=MESSAGES, stream=True)]
    assert [p.message.content for p in parts] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert parts[-1].done and parts[-1].done_reason == "stop"
    generated = await client.generate(model="llama3.2", prompt="x")
    assert generated.response == "tok0 tok1 tok2 "
    streamed = [p.response async for p in await client.generate(model="llama3.2", prompt="x", stream=True)]
    assert streamed == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert set(upstream_calls(fake)) == {("POST", "/api/chat"), ("POST", "/api/generate")}


async def test_load_and_unload_answer_one_object(client):
    loaded = await client.generate(model="llama3.2")
    assert loaded.done_reason == "load"
    unloaded = await client.generate(model="llama3.2", keep_alive=0)
    assert unloaded.done_reason == "unload"


async def test_embed_and_embeddings(client, fake):
    assert (await client.embed(model="llama3.2", input=["a", "b"])).embeddings == [[0.1, 0.2], [0.1, 0.2]]
    assert (await client.embeddings(model="llama3.2", prompt="a")).embedding == [0.1, 0.2]
    assert upstream_calls(fake) == [("POST", "/api/embed"), ("POST", "/api/embeddings")]


@pytest.mark.parametrize("action", ["pull", "push"])
async def test_pull_and_push_streamed_and_whole(client, fake, action):
    call = getattr(client, action)
    assert (await call("llama3.2")).status == "success"
    statuses = [p.status async for p in await call("llama3.2", stream=True)]
    assert statuses == ["pulling manifest", "pulling abc", "success"]
    assert upstream_calls(fake) == [("POST", f"/api/{action}")] * 2


async def test_create_from_an_uploaded_blob(client, fake, tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 8192)  # 2 MiB, sent chunked by the async client
    digest = await client.create_blob(weights)
    assert digest == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert digest in fake.blobs
    response = await client.create(model="mine", files={"model.gguf": digest})
    assert response.status == "success"
    assert upstream_calls(fake)[-1] == ("POST", "/api/create")


async def test_sync_client_uploads_a_blob_with_content_length(io_loop, front_url, fake, tmp_path):
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" * 100_000)
    sync = ollama.Client(host=front_url)
    digest = await asyncio.get_running_loop().run_in_executor(None, sync.create_blob, weights)
    sync.close()
    assert digest in fake.blobs


async def test_copy_and_delete_succeed_with_exactly_200(client, fake):
    assert (await client.copy("llama3.2", "backup")).status == "success"
    assert (await client.delete("backup")).status == "success"
    assert "backup" not in fake.models
    assert upstream_calls(fake) == [("POST", "/api/copy"), ("DELETE", "/api/delete")]
    with pytest.raises(ollama.ResponseError) as caught:
        await client.delete("backup")
    assert caught.value.status_code == 404 and "not found" in caught.value.error


async def test_errors_reach_the_client_as_ollama_errors(client):
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model="missing", messages=MESSAGES)
    assert (caught.value.status_code, caught.value.error) == (404, "model 'missing' not found")


async def test_proxy_errors_are_shown_by_the_client(servers, make_proxy):
    url = unused_url()
    client = ollama.AsyncClient(host=servers.start(make_front(make_proxy(upstream=url))))
    with pytest.raises(ollama.ResponseError) as caught:
        await client.list()
    assert caught.value.status_code == 502
    assert caught.value.error == "upstream 'default' refused the connection"
    await client.close()


async def test_openai_chat_completions_stream_through_the_platform(front_url, http, fake):
    body = {"model": "llama3.2", "messages": MESSAGES, "stream": True}
    events = []
    async with http.stream("POST", front_url + "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"] == "text/event-stream"
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]) == "Hello"
    assert upstream_calls(fake) == [("POST", "/v1/chat/completions")]


async def test_aliases_through_the_platform(front_url, http, fake):
    assert (await http.get(front_url + "/api/ls")).json()["models"]
    unloaded = await http.post(front_url + "/api/unload", json={"model": "llama3.2"})
    assert unloaded.json()["done_reason"] == "unload"
    assert upstream_calls(fake) == [("GET", "/api/tags"), ("POST", "/api/generate")]


async def test_override_header_through_the_platform(front_url, http, fake):
    digest = "sha256:" + "0" * 64
    response = await http.post(
        front_url + "/api/blobs/" + digest, content=b"x", headers={"X-HTTP-Method-Override": "HEAD"}
    )
    assert response.status_code == 404
    assert upstream_calls(fake) == [("HEAD", "/api/blobs/" + digest)] and fake.blobs == set()


async def test_unknown_paths_pass_through_the_platform(front_url, http):
    response = await http.post(front_url + "/api/from-the-future", json={"x": 1})
    assert (response.status_code, response.text) == (404, "404 page not found")
