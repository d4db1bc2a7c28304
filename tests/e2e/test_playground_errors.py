"""The playground shows every error the API returns, never failing silently: 401 (missing or wrong key) at the key
field, 429 with its Retry-After, 413, and 503 while Redis is down. Real API processes (no worker needed: the jobs
only have to be accepted, refused or queued); and a page with many waiting jobs still works."""

from __future__ import annotations

import re

import httpx
from service_harness import ApiServer, free_port, make_settings

from service.contracts.config import DEFAULT_MANIFEST

PROMPT = "a green square on a yellow background"


def settings_for(redis_url: str, prefix: str, **overrides):
    return make_settings(redis_url, prefix, DEFAULT_MANIFEST, models=["spo-tiny"], **overrides)


def retry_in(text: str) -> int:
    found = re.search(r"Retry in (\d+) s\.", text)
    assert found, text
    return int(found.group(1))


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")


def set_key(page, key: str) -> None:
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # the key is taken on change


def banner(page) -> str:
    page.wait_for_selector("#banner:not([hidden])")
    return page.inner_text("#banner-text")


def test_api_keys_queue_full_and_body_too_large(redis_url, prefix, page):
    server = ApiServer(settings_for(redis_url, prefix, api_keys=["pg-secret"], queue_max_length=1,
                                    max_body_bytes=1024)).start()
    api = httpx.Client(base_url=server.url, headers={"Authorization": "Bearer pg-secret"})
    try:
        # No key: the page says a key is needed, at the key field and in the banner.
        open_page(page, server.url)
        assert "needs an API key" in banner(page)
        assert "missing API key" in page.inner_text("#api-key-error")
        assert page.get_attribute("#api-key", "aria-invalid") == "true"
        assert page.inner_text("#model-limits") == "models could not be loaded"
        # The live strip is open like /metrics: no worker runs here.
        page.wait_for_function("() => document.getElementById('live-text').textContent.includes('0 live workers')")

        set_key(page, "not-the-key")
        page.wait_for_function("() => document.getElementById('api-key-error').textContent.includes('not accepted')")
        set_key(page, "pg-secret")
        page.wait_for_selector("#model option[value=spo-tiny]", state="attached")
        assert page.is_hidden("#banner") and page.is_hidden("#api-key-error")

        page.fill("#prompt", PROMPT)
        page.get_by_role("button", name="Generate").click()
        page.wait_for_selector(".job[data-status=queued]")
        job_id = page.get_attribute(".job", "data-job-id")
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert "position 1 in line" in page.inner_text(".job .job-status")

        # The queue holds one job: the next submission is a 429, shown with its Retry-After.
        refused = api.post("/v1/jobs", json={"prompt": PROMPT})
        assert refused.status_code == 429
        page.get_by_role("button", name="Generate").click()
        text = banner(page)
        assert text.startswith("Submitting: Too many requests: ") and refused.json()["error"]["message"] in text
        assert 0 < retry_in(text) <= int(refused.headers["Retry-After"])  # counted down from the header
        assert page.locator(".job").count() == 1

        # A body over SPO_MAX_BODY_BYTES: 413.
        page.fill("#prompt", "a red circle " * 100)
        page.get_by_role("button", name="Generate").click()
        page.wait_for_function("() => document.getElementById('banner-text').textContent.includes('too large')")
        assert "Request too large: request body exceeds 1024 bytes" in page.inner_text("#banner-text")

        # Reload: the key stayed with this tab (session storage), and the queued job is still followed.
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert page.input_value("#api-key") == "pg-secret"
        assert page.is_hidden("#banner")
        page.wait_for_selector(f'.job[data-job-id="{job_id}"][data-status=queued]')
        assert page.evaluate("sessionStorage.getItem('spo-playground:api-key')") == "pg-secret"
        assert page.evaluate("localStorage.getItem('spo-playground:jobs')").count(job_id) == 1
        assert page.problems == []
    finally:
        server.stop()


def test_redis_down_is_a_503_banner(prefix, page):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    server = ApiServer(settings_for(closed, prefix)).start()
    try:
        open_page(page, server.url)
        page.wait_for_function("() => document.getElementById('live-text').textContent.includes('unavailable')")
        assert page.get_attribute("#live", "data-state") == "down"
        page.fill("#prompt", PROMPT)
        page.get_by_role("button", name="Generate").click()
        text = banner(page)
        assert text.startswith("Submitting: Service unavailable: the job queue (Redis) is unavailable"), text
        assert 0 < retry_in(text) <= 5  # the API's Retry-After: 5, counted down
        assert page.locator(".job").count() == 0
        assert page.problems == []
    finally:
        server.stop()


def test_many_waiting_jobs_leave_connections_for_the_page(redis_url, prefix, page):
    """Each followed job holds an event stream, and a browser opens at most six connections to one origin: with
    eight jobs waiting the page still submits, and streams at most three of them (the others are polled)."""
    server = ApiServer(settings_for(redis_url, prefix)).start()
    try:
        open_page(page, server.url)
        page.fill("#prompt", PROMPT)
        for count in range(1, 9):
            page.get_by_role("button", name="Generate").click()
            page.wait_for_function("n => document.querySelectorAll('.job[data-status=queued]').length === n",
                                   arg=count, timeout=10_000)
        for position in range(1, 9):  # newest first: the last one submitted is 8th in line
            page.wait_for_function(
                "p => [...document.querySelectorAll('.job-status')].some(e => e.textContent.includes(p))",
                arg=f"position {position} in line", timeout=10_000)
        streams = [u for u in page.requests if u.endswith("/events")]
        assert 1 <= len(streams) <= 3, streams
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        page.wait_for_function("() => document.querySelectorAll('.job[data-status=queued]').length === 8")

        page.get_by_role("button", name="Clear history").click()
        assert page.locator(".job").count() == 0 and page.is_visible("#jobs-empty")
        assert page.evaluate("localStorage.getItem('spo-playground:jobs')") is None
        page.reload()
        page.wait_for_selector("body[data-ready=true]")
        assert page.locator(".job").count() == 0
        assert page.problems == []
    finally:
        server.stop()
