"""`corolla api` against a live local swarm, with the official `openai` package as the client, and its pages in a
real headless Chromium.

One swarm for the module: SmolLM2 in two workers (0:15 with metrics, 15:30), and
half of a tiny 4-block model sharing SmolLM2's tokenizer (blocks 0:2 only), so
the API offers one model with a full chain and one without.
"""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from corolla.bus.client import BusLoop, ConnectionPool
from corolla.bus.messages import InfoRequest
from corolla.worker.launcher import LocalSwarm

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

SMOL = "SmolLM2-135M-Instruct"
SMOL_BLOCKS = 30
WORKER_FLAGS = ["--threads", "1", "--no-mdns", "--gossip-interval", "0.5"]
CACHE_TOKENS = 20000
SCREENSHOTS = Path(__file__).resolve().parents[1] / "perf" / "out" / "screenshots"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"not within {timeout} s: {condition}")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def caches(endpoints: list[str]) -> list[tuple[int, int]]:
    """(free, total) KV-cache tokens of each worker, from its own answer to an info request."""
    bus = BusLoop.get()

    async def ask():
        pool = ConnectionPool(bus.context)
        try:
            return [await pool.get(e).request(InfoRequest(), 5.0) for e in endpoints]
        finally:
            await pool.close()

    return [(i.cache_tokens_free, i.cache_tokens_total) for i in bus.run(ask())]


def metric(text: str, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name}{labels}")


@pytest.fixture(scope="module")
def tiny_chat_folder(tmp_path_factory, smollm_folder):
    """A random 4-block Llama with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    path = tmp_path_factory.mktemp("tiny-chat")
    tokenizer = AutoTokenizer.from_pretrained(smollm_folder, local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def swarm(smollm_folder, tiny_chat_folder):
    """One gossip swarm, as real workers form one: the others join the first once it serves."""
    metrics_port = free_port()
    with LocalSwarm([["--model", smollm_folder, "--blocks", "0:15", "--metrics-port", str(metrics_port),
                      "--cache-tokens", str(CACHE_TOKENS), *WORKER_FLAGS]]) as first:
        seed = ["--initial-peers", *first.endpoints]
        with LocalSwarm([["--model", smollm_folder, "--blocks", "15:30", "--cache-tokens", str(CACHE_TOKENS), *seed,
                          *WORKER_FLAGS],
                         ["--model", tiny_chat_folder, "--blocks", "0:2", *seed, *WORKER_FLAGS]]) as others:
            yield SimpleNamespace(endpoints=first.endpoints + others.endpoints,
                                  metrics_url=f"http://127.0.0.1:{metrics_port}/metrics")


@pytest.fixture(scope="module")
def api(swarm, smollm_folder, tiny_chat_folder):
    """The API app served by uvicorn in a thread of this process, on a port bound here first."""
    from corolla.api.server import ApiServer, build
    app, state = build([smollm_folder, tiny_chat_folder], swarm.endpoints[:1], mdns=False)
    try:
        wait_until(lambda: not state.missing(SMOL, SMOL_BLOCKS) and len(state.view.peers()) == 3, 20)
    except AssertionError:
        state.stop()
        raise AssertionError(f"the API does not see the swarm: {state.view.peers()}, {state.probes}") from None
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = ApiServer(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 10)
    yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", state=state,
                          tiny=Path(tiny_chat_folder).name)
    server.should_exit = True
    thread.join(10)
    state.stop()
    sock.close()


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=120)


# ---- the OpenAI API ------------------------------------------------------------------------------


def test_models_lists_only_models_with_a_full_chain(client, api):
    assert [m.id for m in client.models.list()] == [SMOL]
    assert client.models.retrieve(SMOL).id == SMOL
    assert api.state.missing(api.tiny, 4) == [(2, 4)]


def test_chat_completion_uses_the_chat_template_and_counts_usage(client, smollm_tokenizer):
    reply = client.chat.completions.create(model=SMOL, messages=CAPITAL, max_tokens=20, temperature=0)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop" and reply.object == "chat.completion"
    prompt = smollm_tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True, tokenize=False)
    assert reply.usage.prompt_tokens == len(smollm_tokenizer(prompt, add_special_tokens=False).input_ids)
    assert 0 < reply.usage.completion_tokens <= 20
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_arrives_token_by_token_and_equals_the_whole_reply(client):
    whole = client.chat.completions.create(model=SMOL, messages=CAPITAL, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=SMOL, messages=CAPITAL, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 5, deltas  # one event per token, not one at the end
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_streamed_completion_with_length_limit(client):
    pieces = [c.choices[0].text for c in client.completions.create(
        model=SMOL, prompt="Once upon a time", max_tokens=10, temperature=0, stream=True)]
    whole = client.completions.create(model=SMOL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert "".join(pieces) == whole.choices[0].text and len([p for p in pieces if p]) >= 5
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10


def test_stop_sequences_cut_the_reply_also_when_streamed(client):
    reply = client.chat.completions.create(model=SMOL, messages=CAPITAL, max_tokens=20, temperature=0, stop=["Paris"])
    assert "Paris" not in reply.choices[0].message.content and reply.choices[0].message.content.rstrip()
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=SMOL, messages=CAPITAL, max_tokens=20, temperature=0, stop=["Paris"], stream=True) if c.choices)
    assert streamed == reply.choices[0].message.content


def test_seed_reproduces_a_sampled_reply(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=SMOL, prompt="My favourite colour is", max_tokens=12,
                                         temperature=1.3, top_p=0.95, seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first


def test_concurrent_requests_overlap_and_match_solo_replies(client):
    prompts = ["Write a short poem about the sea.", "List five fruits and say what colour each one is."]
    kwargs = dict(model=SMOL, max_tokens=24, temperature=0)
    solo = [client.chat.completions.create(messages=[{"role": "user", "content": p}], **kwargs)
            .choices[0].message.content for p in prompts]
    start = threading.Barrier(len(prompts))
    results: list[dict] = [{} for _ in prompts]

    def run(i: int) -> None:
        start.wait()
        texts, times = [], []
        for chunk in client.chat.completions.create(messages=[{"role": "user", "content": prompts[i]}],
                                                    stream=True, **kwargs):
            if chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
                times.append(time.monotonic())
        results[i] = {"text": "".join(texts), "first": times[0], "last": times[-1]}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r["text"] for r in results] == solo  # thread-safe: each generate() ran in its own session
    assert max(r["first"] for r in results) < min(r["last"] for r in results), "requests ran one after the other"


def test_errors_in_openai_shape(client, api):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    assert e.value.code == "model_not_found"
    for bad in (dict(temperature=3.0), dict(top_p=0.0), dict(n=2), dict(max_tokens=0), dict(stop=list("abcde")),
                dict(max_tokens=10**6), dict(messages=[])):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**{"model": SMOL, "messages": CAPITAL, **bad})
        assert e.value.status_code == 400 and e.value.body["message"], bad
    assert e.value.body["param"] == "messages"
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model=api.tiny, messages=CAPITAL, stream=stream)
        assert e.value.status_code == 503 and e.value.code == "missing_blocks" and "2:4" in e.value.message


def test_disconnect_mid_stream_closes_the_session_on_the_workers(client, swarm, api):
    smol_workers = swarm.endpoints[:2]
    assert all(free == total for free, total in caches(smol_workers))
    stream = client.chat.completions.create(
        model=SMOL, messages=[{"role": "user", "content": "Write a long essay about the history of Rome."}],
        max_tokens=400, temperature=0, stream=True)
    received = 0
    for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    assert all(free < total for free, total in caches(smol_workers))  # the session holds cache on both
    stream.close()
    started = time.monotonic()
    wait_until(lambda: all(free == total for free, total in caches(smol_workers)), 10, 0.2)
    assert time.monotonic() - started < 10  # 400 tokens would take far longer: generation stopped
    text = get(f"{api.url}/metrics")
    wait_until(lambda: metric(get(f"{api.url}/metrics"), "corolla_api_generations_total", model=SMOL,
                              reason="cancelled") >= 1, 5)
    assert metric(text, "corolla_api_sessions_open", model=SMOL) in (0.0, 1.0)


def test_client_giving_up_on_a_whole_reply_stops_it(client, swarm):
    smol_workers = swarm.endpoints[:2]
    impatient = client.with_options(timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(
            model=SMOL, messages=[{"role": "user", "content": "Write a long essay about the history of Rome."}],
            max_tokens=400, temperature=0)
    wait_until(lambda: all(free == total for free, total in caches(smol_workers)), 10, 0.2)


def test_metrics_of_the_api_and_a_worker(client, swarm, api):
    client.chat.completions.create(model=SMOL, messages=CAPITAL, max_tokens=4, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=CAPITAL)
    text = get(f"{api.url}/metrics")
    assert metric(text, "corolla_api_requests_total", route="/v1/chat/completions", status="200") >= 1
    assert metric(text, "corolla_api_requests_total", route="/v1/chat/completions", status="404") >= 1
    assert metric(text, "corolla_api_tokens_total", model=SMOL, kind="completion") >= 4
    assert metric(text, "corolla_api_first_token_seconds_count", model=SMOL) >= 1
    wait_until(lambda: metric(get(f"{api.url}/metrics"), "corolla_api_sessions_open", model=SMOL) == 0, 5)
    worker = get(swarm.metrics_url)
    steps = metric(worker, "corolla_worker_requests_total", kind="step", status="ok")
    assert steps >= 4 and metric(worker, "corolla_worker_request_seconds_count", kind="step") >= steps
    passes = metric(worker, "corolla_worker_compute_seconds_count", queue="inference")
    assert 1 <= passes <= steps  # decode steps of concurrent sessions may share a pass
    assert 0 < metric(worker, "corolla_worker_compute_seconds_sum", queue="inference") \
        < metric(worker, "corolla_worker_request_seconds_sum", kind="step")
    assert metric(worker, "corolla_worker_tokens_total", kind="step") > steps  # prefills carry many tokens
    assert metric(worker, "corolla_worker_requests_total", kind="open", status="ok") >= 1
    assert metric(worker, "corolla_worker_bytes_total", direction="in", codec="raw") > 0
    assert metric(worker, "corolla_worker_bytes_total", direction="out", codec="raw") > 0
    assert metric(worker, "corolla_worker_cache_tokens_free") + metric(worker, "corolla_worker_cache_tokens_used") \
        == CACHE_TOKENS
    assert metric(worker, "corolla_worker_sessions_open") >= 0


def test_cli_serves_the_api(swarm, smollm_folder):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "corolla", "api", "--model", smollm_folder, "--initial-peers",
                                swarm.endpoints[0], "--no-mdns", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "corolla api ready" in line:
                break
        assert re.search(rf"ready: http://127\.0\.0\.1:{port}", "".join(lines)), "".join(lines[-20:])
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: SMOL in get(f"{url}/v1/models"), 20, 0.5)
        assert "<title>Corolla chat</title>" in get(f"{url}/chat")
    finally:
        process.terminate()
        process.wait(15)


# ---- the pages in a real browser ----------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,860"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian's chromium and chromium-driver (`make setup` installs them when run as root)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def screenshot(driver, tmp_path, name: str) -> None:
    """Keep the picture as an artefact: in the test's tmp dir and under perf/out (gitignored)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    for folder in (tmp_path, SCREENSHOTS):
        driver.save_screenshot(str(folder / name))


def test_chat_page_streams_a_reply(browser, api, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.select import Select

    browser.get(f"{api.url}/chat")
    # the page lists the models once its fetch of /v1/models returns: until then nothing is selected
    wait_until(lambda: [o.text for o in Select(browser.find_element(By.ID, "model")).all_selected_options] == [SMOL],
               10)
    temperature = browser.find_element(By.ID, "temperature")
    temperature.clear()
    temperature.send_keys("0")
    browser.find_element(By.ID, "message").send_keys(CAPITAL[0]["content"], Keys.ENTER)
    seen = []  # the reply's text while it streams: it should grow in steps
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        replies = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")
        if replies:
            classes, text = browser.execute_script("return [arguments[0].className, arguments[0].textContent]",
                                                   replies[-1])
            if "streaming" not in classes:
                break
            if text and (not seen or seen[-1] != text):
                seen.append(text)
        time.sleep(0.02)
    reply = browser.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1].text
    assert "Paris" in reply, reply
    assert len(seen) >= 2, f"the reply did not stream: {seen}"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    assert browser.find_elements(By.CSS_SELECTOR, ".msg.user")[-1].text == CAPITAL[0]["content"]
    screenshot(browser, tmp_path, "chat.png")


def test_monitor_shows_every_worker_and_the_chains(browser, api, swarm, tmp_path):
    from selenium.webdriver.common.by import By

    browser.get(f"{api.url}/monitor")
    rows = wait_until(lambda: len(browser.find_elements(By.CSS_SELECTOR, "tr.worker")) == 3
                      and browser.find_elements(By.CSS_SELECTOR, "tr.worker"), 10)
    shown = "\n".join(r.text for r in rows)
    for endpoint in swarm.endpoints:
        assert endpoint in shown
    cards = {c.get_attribute("data-model"): c.text for c in browser.find_elements(By.CSS_SELECTOR, "section.model")}
    assert "full chain: yes" in cards[SMOL]
    assert "full chain: NO, missing blocks 2:4" in cards[api.tiny]
    assert len(browser.find_elements(By.CSS_SELECTOR, f'section[data-model="{SMOL}"] .strip:not(.small) .cell')) \
        == SMOL_BLOCKS
    wait_until(lambda: all("ok" in r.text for r in browser.find_elements(By.CSS_SELECTOR, "tr.worker")), 5)
    screenshot(browser, tmp_path, "monitor.png")
