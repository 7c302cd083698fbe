"""The search page at `/`, driven from the keyboard in a real headless Chromium (Debian's, through Selenium and
Debian's chromedriver) against a real server: all-MiniLM-L6-v2 and the sample collection, examples/papers.jsonl.

The expected first hits are the passages each query is plainly about, chosen by reading the corpus.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import InProcessServer, ServerProcess
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from scholarembed import Client, Passage

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SAMPLE = Path(__file__).parents[1] / "examples" / "papers.jsonl"
TITLES = {record["_id"]: record["title"] for record in (json.loads(line) for line in SAMPLE.read_text().splitlines())}


@pytest.fixture(scope="module")
def page_url(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Iterator[str]:
    server = ServerProcess(tmp_path_factory.mktemp("search-page"), "--model", str(minilm_dir))
    try:
        records = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
        with Client(server.address) as client:
            passages = [Passage(id=r["_id"], title=r["title"], text=r["text"], metadata=r["metadata"]) for r in records]
            client.upsert_passages("papers", passages)
        match = re.search(r"HTTP +(http://127\.0\.0\.1:\d+/)", server.output())
        assert match, server.output()
        yield match.group(1)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail("the search page test needs Debian's chromium and chromium-driver (apt-get install; .ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        yield driver
    finally:
        driver.quit()


def open_page(browser: webdriver.Chrome, url: str) -> None:
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "model").text)  # the model's id is shown
    assert browser.switch_to.active_element.get_attribute("id") == "query"  # typing starts in the query box


def wait_for_answer(browser: webdriver.Chrome) -> None:
    WebDriverWait(browser, 60).until(
        lambda b: "result" in b.find_element(By.ID, "status").text or b.find_element(By.ID, "error").text
    )


def results(browser: webdriver.Chrome) -> list[dict[str, Any]]:
    error = browser.find_element(By.ID, "error").text
    assert not error, f"the page shows an error: {error}"
    return [
        {
            "title": item.find_element(By.CLASS_NAME, "title").text,
            "meta": item.find_element(By.CLASS_NAME, "meta").text,
            "ranks": "".join(r.text for r in item.find_elements(By.CLASS_NAME, "ranks")),
        }
        for item in browser.find_elements(By.CSS_SELECTOR, "#results li")
    ]


def test_a_dense_search_typed_and_submitted_with_enter_shows_the_expected_first_hit(browser, page_url) -> None:
    open_page(browser, page_url)
    browser.switch_to.active_element.send_keys("graphene band gap under strain", Keys.ENTER)
    wait_for_answer(browser)
    hits = results(browser)
    assert len(hits) == 10
    assert hits[0]["title"] == f"1. {TITLES['graphene-strain']}"
    assert re.match(r"score 0\.\d{4} · id graphene-strain · ", hits[0]["meta"])
    assert {"year: 2019", "field: physics"} <= set(hits[0]["meta"].split(" · "))
    assert "10 results" in browser.find_element(By.ID, "status").text
    # Self-contained: everything the page loaded came from this server.
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert loaded and all(url.startswith(page_url) for url in loaded), loaded


def test_a_hybrid_search_chosen_from_the_keyboard_shows_each_lists_rank(browser, page_url) -> None:
    open_page(browser, page_url)
    query = browser.switch_to.active_element
    query.send_keys("BRCA1 mutation breast cancer risk", Keys.TAB)  # -> collection
    browser.switch_to.active_element.send_keys(Keys.TAB)  # -> mode
    mode = browser.switch_to.active_element
    assert mode.get_attribute("id") == "mode"
    mode.send_keys("h")  # "hybrid (both, fused)"
    browser.switch_to.active_element.send_keys(Keys.TAB)  # -> top k
    top_k = browser.switch_to.active_element
    assert top_k.get_attribute("id") == "top_k"
    top_k.send_keys(Keys.CONTROL, "a")
    top_k.send_keys("5", Keys.ENTER)
    wait_for_answer(browser)
    hits = results(browser)
    assert len(hits) == 5
    assert hits[0]["title"] == f"1. {TITLES['brca1-risk']}"
    assert re.fullmatch(r"dense #1 \(0\.\d{4}\) · lexical #1 \(\d+\.\d{4}\)", hits[0]["ranks"]), hits[0]["ranks"]
    assert all(re.search(r"dense (#\d+|: not)", hit["ranks"]) for hit in hits)
    assert "(hybrid)" in browser.find_element(By.ID, "status").text


def test_numeric_filters_are_conditions_every_hit_meets(browser, page_url) -> None:
    open_page(browser, page_url)
    browser.switch_to.active_element.send_keys("cancer")
    browser.find_element(By.ID, "add-filter").send_keys(Keys.ENTER)  # a button, pressed from the keyboard
    key = browser.switch_to.active_element
    assert "key" in key.get_attribute("class")  # focus moved into the new filter
    key.send_keys("year", Keys.TAB)
    browser.switch_to.active_element.send_keys("at l")  # "at least"
    browser.switch_to.active_element.send_keys(Keys.TAB)
    browser.switch_to.active_element.send_keys("2020", Keys.ENTER)
    wait_for_answer(browser)
    hits = results(browser)
    years = [int(re.search(r"year: (\d+)", hit["meta"]).group(1)) for hit in hits]
    assert years and min(years) >= 2020
    assert len(hits) == sum(
        1 for line in SAMPLE.read_text().splitlines() if int(json.loads(line)["metadata"]["year"]) >= 2020
    )


def test_errors_are_shown_on_the_page(browser, page_url) -> None:
    open_page(browser, page_url)
    collection = browser.find_element(By.ID, "collection")
    collection.clear()
    collection.send_keys("no-such-collection")
    browser.find_element(By.ID, "query").send_keys("protein folding", Keys.ENTER)
    wait_for_answer(browser)
    error = browser.find_element(By.ID, "error").text
    assert error.startswith("404 not_found:") and "no-such-collection" in error
    assert not browser.find_elements(By.CSS_SELECTOR, "#results li")


def test_with_tokens_the_page_loads_and_its_searches_need_one(tiny_engine, tmp_path) -> None:
    """The page is static and holds no data, so it is served without a token; every search it sends needs one
    (the page's "Access token" field)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("page-token\n")
    server = InProcessServer(tiny_engine, http_port=0, auth_token_file=str(tokens), data_dir=str(tmp_path / "data"))
    url = f"http://127.0.0.1:{server.server.http_port}/"
    try:
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and b'id="token"' in page.read()
        body = json.dumps({"collection": "papers", "queries": ["protein"], "top_k": 1}).encode()
        search = urllib.request.Request(url + "v1/search", body, {"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(search, timeout=30)
        assert refused.value.code == 401
        search.add_header("Authorization", "Bearer page-token")
        with pytest.raises(urllib.error.HTTPError) as unknown:
            urllib.request.urlopen(search, timeout=30)
        assert unknown.value.code == 404  # past the token: the collection does not exist
    finally:
        server.stop()
