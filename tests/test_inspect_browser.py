"""The inspector page in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) against a
real `lmgen serve` on the embedded model: what the page shows is checked against the server's logprobs, lmgen's
Sampler on the same logits, and the engine's beam search; the page may talk to 127.0.0.1 only.  Screenshots go to
tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from lmgen.sampling.params import SamplingParams
from tests.server_process import MODEL, ServerProcess
from tests.test_inspect_api import logits_of, sampler_kept

ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPT = "The capital of France is"


def chromium_paths() -> tuple[str, str]:
    """(browser, driver), installed with apt when missing; skips with the reason when that is impossible."""
    def found():
        return shutil.which("chromium"), shutil.which("chromedriver")

    browser, driver = found()
    if browser and driver:
        return browser, driver
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("Chromium is missing and cannot be installed here (needs apt-get as root): "
                    "apt-get install chromium chromium-driver")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            pytest.skip(f"Chromium could not be installed ({' '.join(cmd)} failed): {r.stderr.strip()[-300:]}")
    browser, driver = found()
    if not (browser and driver):
        pytest.skip("apt-get installed chromium but chromium / chromedriver are not on PATH")
    return browser, driver


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("inspect-browser"), api_key=None)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = chromium_paths()
    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager must not phone home (the driver path is given anyway)
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1900",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    drv = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    drv.set_page_load_timeout(60)
    ARTIFACTS.mkdir(exist_ok=True)
    yield drv
    drv.quit()


def renders(drv) -> int:
    return drv.execute_script("return window.lmgenInspector.renders")


def act(drv, fn, timeout=120):
    """Runs `fn` (a click, a control move) and waits until the page rendered its answer; fails on a shown error."""
    before, errors = renders(drv), drv.execute_script("return window.lmgenInspector.errors")
    fn()
    WebDriverWait(drv, timeout).until(
        lambda d: renders(d) > before or d.execute_script("return window.lmgenInspector.errors") > errors)
    assert drv.execute_script("return window.lmgenInspector.errors") == errors, drv.find_element(By.ID, "status").text
    return drv.execute_script("return window.lmgenInspector.lastRenderMs")


def set_control(drv, name, value):
    drv.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                       "e.dispatchEvent(new Event('input'));", name, str(value))


def rows(drv) -> list[dict]:
    out = []
    for tr in drv.find_elements(By.CSS_SELECTOR, "#candidates tbody tr"):
        cells = tr.find_elements(By.TAG_NAME, "td")
        out.append({"id": int(tr.get_attribute("data-id")), "kept": tr.get_attribute("data-kept") == "1",
                    "text": cells[1].text, "raw": float(cells[3].find_element(By.CLASS_NAME, "p").text),
                    "element": tr})
    return out


def visible(text: str) -> str:
    """The page's readable form of a token's text."""
    return text.replace(" ", "\u2423").replace("\n", "\u21b5").replace("\t", "\u21e5") or "\u2205"


def session(drv) -> dict:
    return drv.execute_script("return window.lmgenInspector.session")


def completion(server, prompt, **kw) -> dict:
    r = httpx.post(server.base + "/v1/completions", json={"model": MODEL, "prompt": prompt, **kw}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_watch_a_token_being_chosen(browser, server):  # browser first: a skip starts no server
    drv = browser
    drv.get(server.base + "/inspect")
    WebDriverWait(drv, 60).until(lambda d: d.find_element(By.ID, "status").text == "ready")
    prompt = drv.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    set_control(drv, "temperature", 0)
    act(drv, lambda: drv.find_element(By.ID, "start").click())
    step_ms = [act(drv, lambda: drv.find_element(By.ID, "step").click()) for _ in range(5)]
    (ARTIFACTS / "inspector-timings.json").write_text(json.dumps({"step_render_ms": step_ms}))
    print("step render ms:", [round(ms) for ms in step_ms])
    drv.save_screenshot(str(ARTIFACTS / "inspector-steps.png"))

    # the probabilities shown are the server's logprobs (greedy, top 20) at every step
    lp = completion(server, PROMPT, max_tokens=5, temperature=0, logprobs=20)["choices"][0]["logprobs"]
    chips = drv.find_elements(By.CSS_SELECTOR, "#output-tokens .tok")
    assert [c.find_element(By.CLASS_NAME, "t").text for c in chips] == [visible(t) for t in lp["tokens"]]
    for i, top in enumerate(lp["top_logprobs"]):
        drv.find_elements(By.CSS_SELECTOR, "#output-tokens .tok")[i].click()  # shows that step (no request)
        shown = {r["text"]: r["raw"] for r in rows(drv)}
        assert len(shown) >= 20
        for text, logprob in top.items():
            assert shown[visible(text)] == pytest.approx(np.exp(logprob), abs=1e-4)

    # moving temperature and top-p re-filters the current step exactly as lmgen's Sampler would
    s = session(drv)
    prompt_ids = [t["id"] for t in s["prompt_tokens"]]
    outputs = [t["id"] for t in s["output_tokens"]]
    logits = logits_of(server, s["id"], -1)
    kept_counts = []
    for temperature, top_p in [(0.7, 1.0), (0.7, 0.8), (1.5, 0.8), (1.5, 0.95)]:
        act(drv, lambda: set_control(drv, "temperature", temperature))
        act(drv, lambda: set_control(drv, "top_p", top_p))
        params = SamplingParams(temperature=temperature, top_p=top_p, seed=session(drv)["params"]["seed"])
        kept = sampler_kept(logits, params, prompt_ids, outputs)
        shown = rows(drv)
        assert {r["id"] for r in shown if r["kept"]} == {r["id"] for r in shown} & kept
        assert f"{len(kept)} token(s) of the vocabulary" in drv.find_element(By.ID, "step-summary").text
        kept_counts.append(len(kept))
    assert len(set(kept_counts)) > 1  # the controls did change the kept set
    drv.save_screenshot(str(ARTIFACTS / "inspector-filtered.png"))

    # clicking a candidate that is not the top one forces it; the next steps continue from it
    forced_row = rows(drv)[2]
    forced_index = len(outputs)
    act(drv, lambda: forced_row["element"].click())
    act(drv, lambda: drv.find_element(By.ID, "step").click())
    s = session(drv)
    out_ids = [t["id"] for t in s["output_tokens"]]
    assert out_ids[:forced_index] == outputs and out_ids[forced_index] == forced_row["id"]
    assert len(out_ids) == forced_index + 2
    lp = completion(server, prompt_ids + out_ids[:forced_index + 1], max_tokens=1, temperature=0, logprobs=5)
    step_before_last = s["steps"][forced_index + 1]
    assert step_before_last["chosen"]["id"] == out_ids[forced_index + 1]
    drv.find_elements(By.CSS_SELECTOR, "#output-tokens .tok")[forced_index + 1].click()
    shown = {r["text"]: r["raw"] for r in rows(drv)}
    for text, logprob in lp["choices"][0]["logprobs"]["top_logprobs"][0].items():
        assert shown[visible(text)] == pytest.approx(np.exp(logprob), abs=1e-4)

    # beams: beam_width beams, the best is the engine's beam search
    Select(drv.find_element(By.ID, "beam-width")).select_by_visible_text("3")
    act(drv, lambda: drv.find_element(By.ID, "beams").click())
    results = drv.find_elements(By.CSS_SELECTOR, "#beam-results li")
    assert len(results) == 3
    best = completion(server, PROMPT, max_tokens=6, temperature=0, beam_width=3)["choices"][0]["text"]
    assert results[0].get_attribute("data-text") == best
    statuses = {n.get_attribute("data-status") for n in drv.find_elements(By.CSS_SELECTOR, ".beam-node")}
    assert {"live", "pruned", "finished"} <= statuses

    # attention of the newest token over its context, for a chosen layer and head
    Select(drv.find_element(By.ID, "att-layer")).select_by_visible_text("5")
    Select(drv.find_element(By.ID, "att-head")).select_by_visible_text("2")
    act(drv, lambda: drv.find_element(By.ID, "attention").click())
    weights = [float(c.get_attribute("data-weight")) for c in drv.find_elements(By.CSS_SELECTOR, "#attention-view .tok")]
    assert len(weights) == s["steps"][-1]["kv"]["context_tokens"] and sum(weights) == pytest.approx(1.0, abs=1e-4)
    drv.save_screenshot(str(ARTIFACTS / "inspector-beams-attention.png"))

    # chat mode: the template's rendered text with its special tokens, Chinese included
    drv.find_element(By.ID, "mode-chat").click()
    prompt = drv.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("你好，世界")
    act(drv, lambda: drv.find_element(By.ID, "start").click())
    rendered = drv.find_element(By.ID, "rendered").text
    assert "<|im_start|>user" in rendered and "你好，世界" in rendered
    specials = drv.find_elements(By.CSS_SELECTOR, "#prompt-tokens .tok.special")
    assert specials and specials[0].find_element(By.CLASS_NAME, "t").text == "<|im_start|>"
    count = drv.find_element(By.ID, "prompt-count").text
    assert count == f"{len(drv.find_elements(By.CSS_SELECTOR, '#prompt-tokens .tok'))} tokens"
    drv.save_screenshot(str(ARTIFACTS / "inspector-chat.png"))

    # the page talked to this server only
    urls = []
    for entry in drv.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        if msg["method"] == "Network.requestWillBeSent":
            urls.append(msg["params"]["request"]["url"])
    assert urls and all(u.startswith(server.base + "/") for u in urls), [u for u in urls if not u.startswith(server.base)]


def test_the_page_carries_the_api_key_from_its_url(browser, tmp_path):
    """`lmgen inspect --api-key KEY` prints /inspect#key=KEY: the page sends it; without it the page says why."""
    from tests.server_process import KEY

    srv = ServerProcess(tmp_path)  # --api-key KEY
    try:
        browser.get(srv.base + "/inspect")
        WebDriverWait(browser, 60).until(lambda d: "API key" in d.find_element(By.ID, "status").text)
        browser.get(f"{srv.base}/inspect#key={KEY}")
        browser.refresh()  # a new fragment alone does not reload the page
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text == "ready")
        act(browser, lambda: browser.find_element(By.ID, "start").click())
        assert len(rows(browser)) >= 20
    finally:
        srv.stop()
