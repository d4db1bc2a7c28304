"""The web playground in headless Chromium against a real `spo serve` on the embedded default model: a person's
first session, step by step, checked against what the API itself says."""

from __future__ import annotations

import io

import httpx
import numpy as np
from PIL import Image
from playground_harness import NARROW, screenshot, screenshots_dir

PROMPT = "a red circle on a blue background"
STEPS = 20  # the job whose progress the test follows
# Records every text the job cards' status line shows, in order, from the DOM's own mutation records, so no state
# is missed however quickly the events arrive.
RECORD_STATUS = """() => {
  window.seen = [];
  new MutationObserver((records) => {
    for (const r of records) {
      if (!r.target.classList || !r.target.classList.contains("job-status")) continue;
      for (const node of r.addedNodes) window.seen.push([r.target.closest(".job").dataset.jobId, node.textContent]);
    }
  }).observe(document.getElementById("job-list"), { subtree: true, childList: true });
}"""
# The <img> element's decoded pixels, read back through a canvas (same-origin blob: image, so readable).
IMG_PIXELS = """(img) => {
  const canvas = document.createElement("canvas");
  canvas.width = img.naturalWidth;
  canvas.height = img.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(img, 0, 0);
  return Array.from(context.getImageData(0, 0, canvas.width, canvas.height).data);
}"""


def submit(page, **fields) -> str:
    """Fill the form (control id -> value), press Generate, return the new job's id (the first card)."""
    before = page.locator(".job").count()
    for control, value in fields.items():
        page.fill(f"#{control}", str(value))
    page.get_by_role("button", name="Generate").click()
    page.wait_for_function("n => document.querySelectorAll('.job').length > n", arg=before)
    return page.locator(".job").first.get_attribute("data-job-id")


def card(page, job_id: str):
    return page.locator(f'.job[data-job-id="{job_id}"]')


def wait_card_status(page, job_id: str, status: str, timeout: float = 120_000) -> None:
    page.wait_for_selector(f'.job[data-job-id="{job_id}"][data-status="{status}"]', timeout=timeout)


def test_playground_end_to_end(spo_serve, page, tmp_path):
    url = spo_serve
    api = httpx.Client(base_url=url, timeout=30)
    shots = screenshots_dir() or tmp_path / "screenshots"

    # Idle: the model picker and its limits come from /v1/models; the live strip shows the worker.
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    card_json = api.get("/v1/models").json()["data"][0]
    assert page.locator("#model option").all_inner_texts() == [card_json["id"]] == ["spo-tiny"]
    limits = page.inner_text("#model-limits")
    assert f"sizes {', '.join(card_json['sizes'])}" in limits and f"steps 1–{card_json['max_steps']}" in limits
    assert page.input_value("#size") == card_json["default_size"]
    assert page.input_value("#steps") == str(card_json["default_steps"])
    page.wait_for_function("() => document.getElementById('live-text').textContent.includes('1 live worker')")
    assert page.get_by_label("Prompt", exact=True).evaluate("e => [e.tagName, e.name, e.form.id]") == [
        "TEXTAREA", "prompt", "generate"]
    assert page.get_by_role("button", name="Generate").get_attribute("type") == "submit"
    page.fill("#prompt", PROMPT)
    screenshot(page, "idle", shots)
    page.evaluate(RECORD_STATUS)

    # A long job holds the worker, so the next ones are provably queued behind it.
    blocker = submit(page, size="128x128", n=8, steps=100)
    wait_card_status(page, blocker, "running")
    followed = submit(page, size="64x64", n=1, steps=STEPS)
    doomed = submit(page, size="64x64", n=1, steps=12)
    assert "queued" in card(page, doomed).locator(".job-status").inner_text()
    page.wait_for_function("() => document.getElementById('live-text').textContent.includes('3 in queue')")
    page.wait_for_function("p => p.value >= 3", arg=card(page, blocker).locator("progress").element_handle())
    screenshot(page, "running", shots)

    # Cancel the queued job from its card; the API agrees it never ran.
    card(page, doomed).get_by_role("button", name="Cancel").click()
    wait_card_status(page, doomed, "cancelled", timeout=10_000)
    doomed_view = api.get(f"/v1/jobs/{doomed}").json()
    assert doomed_view["status"] == "cancelled" and doomed_view["started_at"] is None

    # Cancel the running blocker too (it stops at its next step); the followed job runs next.
    card(page, blocker).get_by_role("button", name="Cancel").click()
    wait_card_status(page, blocker, "cancelled", timeout=30_000)
    wait_card_status(page, followed, "succeeded")
    seen = [text for job, text in page.evaluate("window.seen") if job == followed]
    assert any(t.startswith("queued · position") for t in seen), seen
    running = [t for t in seen if t.startswith("running · step ")]
    assert running and running[-1] == f"running · step {STEPS}/{STEPS}", seen  # the events' last step is N/N
    assert seen[-1] == f"succeeded · {STEPS}/{STEPS} steps", seen
    bar = card(page, followed).locator("progress")
    assert bar.evaluate("p => [p.value, p.max]") == [STEPS, STEPS]

    # The image on the page is the API's PNG, pixel for pixel, with its seed and a download link.
    view = api.get(f"/v1/jobs/{followed}").json()
    assert view["status"] == "succeeded" and view["progress"]["step"] == STEPS
    img = card(page, followed).locator("img")
    img.wait_for()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=img.element_handle())
    shown = np.array(img.evaluate(IMG_PIXELS), dtype=np.uint8).reshape(64, 64, 4)
    served = np.asarray(Image.open(io.BytesIO(api.get(f"/v1/jobs/{followed}/images/0").content)).convert("RGBA"))
    assert np.array_equal(shown, served)
    assert f"seed {view['seeds'][0]}" in card(page, followed).locator("figcaption").inner_text()
    assert str(view["seeds"][0]) in img.get_attribute("alt")
    assert card(page, followed).get_by_role("link", name="Download image 1").get_attribute("download").endswith(
        f"seed{view['seeds'][0]}.png")
    card(page, followed).get_by_role("button", name="Reuse seed").click()
    assert page.input_value("#seed") == str(view["seeds"][0]) and not page.is_checked("#seed-random")
    assert page.evaluate("document.activeElement.id") == "seed"
    # Everything has finished or was cancelled: nothing counts against the queue any more.
    page.wait_for_function("() => document.getElementById('live-text').textContent.includes('0 in queue')")
    screenshot(page, "done", shots)

    # A size the model does not serve: the API's 400 message appears next to the size field.
    page.fill("#size", "96x96")
    page.get_by_role("button", name="Generate").click()
    error = page.locator("#size-error")
    error.wait_for()
    message = api.post("/v1/jobs", json={"prompt": PROMPT, "size": "96x96"}).json()["error"]["message"]
    assert error.inner_text() == message and "96x96" in message
    assert page.get_attribute("#size", "aria-invalid") == "true"
    assert "size-error" in page.get_attribute("#size", "aria-describedby")
    assert page.evaluate("document.activeElement.id") == "size"
    assert page.locator(".job").count() == 3  # the 400 created no job
    screenshot(page, "error", shots)

    # Reload: the history is back from local storage, each job as the API sees it now; one the service no
    # longer has shows as expired.
    gone = "0" * 32
    page.evaluate("""gone => {
      const jobs = JSON.parse(localStorage.getItem("spo-playground:jobs"));
      jobs.push({...jobs[0], id: gone, status: "succeeded", created_at: Date.now() / 1000 - 7200});
      localStorage.setItem("spo-playground:jobs", JSON.stringify(jobs));
    }""", gone)
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    for job, status in ((followed, "succeeded"), (doomed, "cancelled"), (blocker, "cancelled"), (gone, "expired")):
        wait_card_status(page, job, status, timeout=20_000)
    assert api.get(f"/v1/jobs/{gone}").status_code == 404
    assert "expired" in card(page, gone).locator(".job-status").inner_text()
    assert card(page, followed).locator("img").count() == 1
    page.wait_for_function("img => img.complete && img.naturalWidth === 64",
                           arg=card(page, followed).locator("img").element_handle())

    # At 400 px nothing overflows sideways.
    page.set_viewport_size(NARROW)
    assert page.evaluate("document.documentElement.scrollWidth") <= NARROW["width"]

    # Only this origin, and no Content-Security-Policy violations.
    assert page.problems == []
    foreign = [u for u in page.requests if not u.startswith((url, "blob:" + url))]
    assert foreign == []
    assert len(page.requests) > 10  # requests were recorded, so the check above is not vacuous


def test_keyboard_order_and_labels(spo_serve, page):
    """Tab walks the form in reading order (a disabled seed is skipped), and every control has its label."""
    page.goto(spo_serve)
    page.wait_for_selector("body[data-ready=true]")
    order = []
    for _ in range(13):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    assert order == ["skip", "api-key", "model", "prompt", "negative_prompt", "n", "size", "steps", "guidance",
                     "seed-random", "priority", "submit", "clear-history"]
    for label, control in (("API key", "api-key"), ("Model", "model"), ("Prompt", "prompt"),
                           ("Negative prompt", "negative_prompt"), ("Images", "n"), ("Size (W×H)", "size"),
                           ("Steps", "steps"), ("Guidance", "guidance"), ("Seed", "seed"),
                           ("Random seed", "seed-random"), ("Priority", "priority")):
        assert page.get_by_label(label, exact=True).get_attribute("id") == control
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")  # back to the checkbox: unticking it enables the seed field, focused
    page.keyboard.press("Space")
    assert page.evaluate("document.activeElement.id") == "seed"
