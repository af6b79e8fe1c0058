"""`slm serve` as clients see it: a real server process on 127.0.0.1, driven by the official
`openai` client, raw HTTP (httpx) for malformed bodies, and headless Chromium for the chat page."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import REPO, tiny_experiment
from simplified_slm.cli.main import main
from simplified_slm.serving.text import TextStream
from simplified_slm.tokenizers import BPETokenizer, load_tokenizer
from simplified_slm.tokenizers.chat_template import ChatTemplate

KEY = "test-key"
MAX_BATCH = 4
MAX_QUEUE = 8
CONTEXT = 1024
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny GPT trained for a few steps; a long context so a request can run for a while."""
    tmp = tmp_path_factory.mktemp("serve")
    cfg = tiny_experiment(tmp / "run", max_steps=40, eval_every=20, sample_every=40, checkpoint_every=40)
    cfg["model"]["context_length"] = CONTEXT
    (tmp / "cfg.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp / "cfg.json")]) == 0
    return tmp / "run" / "checkpoints" / "best"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_path: Path, log: Path, *options: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "simplified_slm.cli", "serve", "--model_path", str(model_path),
                             "--port", str(port), *options], env=ENV, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server did not come up:\n{log.read_text()}")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    proc, url = start_server(model_dir, log, "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
                             "--api-key", KEY)
    yield url
    assert stop_server(proc) == 0, log.read_text()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=5).json()


def slm_generate(model_dir: Path, tmp: Path, prompt: str, *options: str) -> str:
    out = tmp / "generated.txt"
    result = subprocess.run([sys.executable, "-m", "simplified_slm.cli", "generate", "--model_path", str(model_dir),
                             "--prompt", prompt, "--output_file", str(out), "--device", "cpu", *options],
                            env=ENV, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out.read_text(encoding="utf-8")[len(prompt):]


def complete(client: openai.OpenAI, prompt: str, **kw) -> str:
    return client.completions.create(model="m", prompt=prompt, **kw).choices[0].text


def test_models_health_and_page_without_key(client, server):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.endswith("step_00000040")
    assert health(server)["status"] == "ok"
    page = httpx.get(server + "/", timeout=5)
    assert page.status_code == 200 and "<title>slm chat</title>" in page.text


@pytest.mark.parametrize("options,sampling", [(("--greedy",), {"temperature": 0}),
                                              (("--temperature", "0.9", "--seed", "11"),
                                               {"temperature": 0.9, "seed": 11})])
def test_completion_equals_slm_generate(client, model_dir, tmp_path, options, sampling):
    expected = slm_generate(model_dir, tmp_path, "ROMEO:", "--max_tokens", "40", *options)
    response = client.completions.create(model="m", prompt="ROMEO:", max_tokens=40, **sampling)
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason == "length"
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (6, 40)


def test_streaming_concatenates_to_the_whole_reply(client):
    whole = complete(client, "KING:", max_tokens=30, temperature=0)
    chunks = list(client.completions.create(model="m", prompt="KING:", max_tokens=30, temperature=0, stream=True))
    assert len(chunks) > 2
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 30

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=25, temperature=0)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 25
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=25, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == chat.choices[0].message.content
    assert parts[-1].choices == [] and parts[-1].usage.total_tokens == chat.usage.total_tokens


def test_concurrent_requests_equal_their_solo_runs(client, server):
    """Requests that share the batch (admitted at different steps) get their solo tokens."""
    jobs = [("To be", {"temperature": 0}), ("First Citizen:", {"temperature": 0.8, "seed": 1}),
            ("O", {"temperature": 0}), ("What says the", {"temperature": 1.2, "seed": 7, "extra_body": {"top_k": 5}}),
            ("Speak", {"temperature": 0.7, "seed": 3, "top_p": 0.9}), ("I", {"temperature": 0})]
    solo = [complete(client, p, max_tokens=60, **kw) for p, kw in jobs]
    before = health(server)["generated_tokens"]

    def run(i):
        time.sleep(0.01 * i)  # staggered, so later requests join a running batch
        return complete(client, jobs[i][0], max_tokens=60, **jobs[i][1])

    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, range(len(jobs))))
    assert together == solo
    assert health(server)["generated_tokens"] - before == 60 * len(jobs)


def test_n_choices(client):
    response = client.completions.create(model="m", prompt="HAMLET:", max_tokens=20, temperature=1.0, seed=5, n=3)
    texts = [c.text for c in sorted(response.choices, key=lambda c: c.index)]
    assert len(texts) == 3 and len(set(texts)) > 1
    assert texts[0] == complete(client, "HAMLET:", max_tokens=20, temperature=1.0, seed=5)
    assert texts[1] == complete(client, "HAMLET:", max_tokens=20, temperature=1.0, seed=6)  # choice i: seed + i
    assert response.usage.completion_tokens == 60
    streamed = ["", "", ""]
    for chunk in client.completions.create(model="m", prompt="HAMLET:", max_tokens=20, temperature=1.0, seed=5,
                                           n=3, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == texts


def test_stop_sequences_and_echo(client):
    text = complete(client, "LUCIO:", max_tokens=50, temperature=0.9, seed=2)
    stop = text[10:12]
    cut = text.find(stop)
    stopped = client.completions.create(model="m", prompt="LUCIO:", max_tokens=50, temperature=0.9, seed=2,
                                        stop=[stop, "\x00never"])
    assert stopped.choices[0].text == text[:cut] and stopped.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="m", prompt="LUCIO:", max_tokens=50, temperature=0.9, seed=2, stop=stop, stream=True))
    assert streamed == text[:cut]
    assert complete(client, "LUCIO:", max_tokens=50, temperature=0.9, seed=2, echo=True) == "LUCIO:" + text


def test_bad_requests_are_openai_errors(client, server):
    with pytest.raises(openai.BadRequestError, match="context") as err:
        client.completions.create(model="m", prompt="x", max_tokens=CONTEXT)
    assert err.value.body["param"] == "max_tokens" and err.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="m", prompt="x" * (CONTEXT + 5), max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="m", prompt="x", temperature=5)
    with pytest.raises(openai.BadRequestError, match="max-batch"):
        client.completions.create(model="m", prompt="x", n=MAX_BATCH + 1)
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="m", messages=[])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server + "/v1/models").status_code == 401
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in ('{"prompt": "a\\ud800b", "echo": true, "max_tokens": 2}',
                 '{"messages": [{"role": "user", "content": "\\udc80"}], "max_tokens": 2}'):
        for route in ("/v1/completions", "/v1/chat/completions"):
            response = httpx.post(server + route, content=body, headers=headers)
            assert response.status_code == 400, response.text
    big = httpx.post(server + "/v1/completions", content=b"{" + b" " * (2 << 20) + b"}",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert big.status_code == 413 and "exceeds" in big.json()["error"]["message"]


def test_full_queue_gives_429_and_the_server_recovers(client, server):
    def run(i):
        try:
            return len(list(client.completions.create(model="m", prompt="Now", max_tokens=600, temperature=0,
                                                      stream=True)))
        except openai.RateLimitError:
            return "429"

    burst = MAX_BATCH + MAX_QUEUE + 8
    with ThreadPoolExecutor(burst) as pool:
        results = list(pool.map(run, range(burst)))
    assert "429" in results
    assert sum(r != "429" for r in results) >= MAX_BATCH
    assert complete(client, "To be", max_tokens=5, temperature=0)
    assert health(server)["running"] == 0


def test_a_client_that_disconnects_stops_its_generation(client, server):
    before = health(server)["generated_tokens"]
    stream = client.completions.create(model="m", prompt="Now", max_tokens=CONTEXT - 10, temperature=0, stream=True)
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    deadline = time.monotonic() + 10
    while health(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health(server)["running"] == 0
    assert health(server)["generated_tokens"] - before < (CONTEXT - 10) // 2

    before = health(server)["generated_tokens"]  # a non-streamed request whose client gives up
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server + "/v1/completions", json={"prompt": "Now", "max_tokens": CONTEXT - 10}, timeout=0.2,
                   headers={"Authorization": f"Bearer {KEY}"})
    time.sleep(0.5)
    deadline = time.monotonic() + 10
    while health(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert health(server)["generated_tokens"] - before < (CONTEXT - 10) // 2


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 8) | st.integers(min_value=10**6) | st.integers(max_value=-10**6)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8)
FIELDS = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
          "stream", "echo", "max_completion_tokens", "stream_options"]
BODIES = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=8).map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"prompt": st.text(max_size=30), "max_tokens": st.integers(-2, 6)},
                          optional={"temperature": JSON_VALUES, "stop": JSON_VALUES, "n": st.integers(-1, 3),
                                    "stream": st.booleans(), "seed": JSON_VALUES})
    .map(lambda d: json.dumps(d).encode()),
    st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.text(max_size=9)
                                                                       | st.sampled_from(["user", "system"]),
                                                                       "content": JSON_VALUES}), max_size=3),
                           "max_tokens": st.integers(-1, 6)}).map(lambda d: json.dumps(d).encode()),
    st.binary(max_size=60),  # invalid UTF-8, not JSON at all
    st.text(max_size=30).map(lambda t: ('{"prompt": "' + t + '", "max_tokens": 3}').encode("utf-8", "surrogatepass")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES, route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_bodies_never_give_500(server, body, route):
    response = httpx.post(server + route, content=body, timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code in (200, 400), (response.status_code, response.text)
    if response.status_code == 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert health(server)["status"] == "ok"


def test_chat_page_streams_a_reply_in_chromium(server, tmp_path):
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1100,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    try:
        driver.set_page_load_timeout(30)
        driver.get(server + "/")
        key = driver.find_element(By.ID, "api-key")
        key.send_keys(KEY + Keys.TAB)  # the change event reloads the model name with the key
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text.endswith("step_00000040"))
        driver.find_element(By.ID, "prompt").send_keys("Good morrow, sir!" + Keys.ENTER)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#reply-1[data-done='true']"))
        reply = driver.find_element(By.ID, "reply-1")
        assert "error" not in reply.get_attribute("class"), reply.text
        assert reply.text.strip() and int(reply.get_attribute("data-chunks")) > 1  # it arrived in pieces
        assert "tokens/s" in driver.find_element(By.ID, "stats").text
        driver.save_screenshot(str(tmp_path / "chat.png"))
        if os.environ.get("SLM_SCREENSHOT_DIR"):
            Path(os.environ["SLM_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
            shutil.copy(tmp_path / "chat.png", Path(os.environ["SLM_SCREENSHOT_DIR"]) / "serve_chat.png")
    finally:
        driver.quit()


def test_sigterm_finishes_running_requests_and_exits_0(model_dir, tmp_path):
    proc, url = start_server(model_dir, tmp_path / "server.log", "--grace-period", "20")
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.completions.create(model="m", prompt="Now", max_tokens=300, temperature=0, stream=True)
    first = next(iter(stream))
    proc.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices[0].finish_reason is None and rest[-1].choices[0].finish_reason == "length"
    assert proc.wait(30) == 0, (tmp_path / "server.log").read_text()
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_serve_reports_user_errors_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "simplified_slm.cli", "serve", "--model_path",
                             str(tmp_path / "missing")], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "Traceback" not in result.stderr


def test_serve_without_the_serve_extra_names_the_install_command(model_dir):
    code = ("import sys; sys.modules['fastapi'] = None; from simplified_slm.cli.main import main; "
            f"sys.exit(main(['serve', '--model_path', {str(model_dir)!r}]))")
    result = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "pip install 'simplified-slm[serve]'" in result.stderr, result.stderr


def test_text_stream_holds_back_partial_stops_and_characters():
    pieces = {1: "ab", 2: "c<", 3: "/s", 4: ">x", 5: "\ufffd", 6: "é"}

    def decode(ids):  # 5 then 6 stands for a character split over two tokens
        return "".join(pieces[i] for i in ids).replace("\ufffdé", "é")

    text = TextStream(decode, ["</s>"])
    assert text.push(5) == ("", False)
    assert text.push(6) == ("é", False)
    text = TextStream(decode, ["</s>"])
    assert text.push(1) == ("ab", False)
    assert text.push(2) == ("c", False)    # "<" may start "</s>"
    assert text.push(3) == ("", False)
    assert text.push(4) == ("", True)      # the stop string and what follows are dropped
    assert text.text == "abc"


def test_chat_format_uses_the_model_template(tmp_path):
    assert ChatTemplate().render([{"role": "user", "content": "Hi"}]) == "User: Hi\nAssistant:"
    BPETokenizer.train(["Hi there"], vocab_size=260, special_tokens=("</s>",)).save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        **config, "chat_template": "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}"
                                   "{% if add_generation_prompt %}<|assistant|>{% endif %}"}))
    chat = ChatTemplate.for_tokenizer(load_tokenizer(tmp_path))  # the template travels with the tokenizer
    assert chat.render([{"role": "user", "content": "Hi"}]) == "<|user|>Hi</s><|assistant|>"
    assert chat.extra_stop == []
