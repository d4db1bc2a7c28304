// The playground: a client of the public HTTP API, like any other. Plain JS, no dependencies, no build step.
//
// Everything goes through fetch() so the API key (Authorization: Bearer) reaches every route: the job events are
// read from a streamed fetch (EventSource cannot send headers) and images are fetched and shown as blob: URLs.
// Jobs this browser submitted are kept in localStorage; the key in sessionStorage (this tab only).

const HISTORY_KEY = "spo-playground:jobs";
const API_KEY_KEY = "spo-playground:api-key";
const HISTORY_MAX = 50;
const FINISHED = new Set(["succeeded", "failed", "cancelled", "expired"]);
// API field (`param` of a 400) -> the form control that holds it
const FIELDS = {
  model: "model", prompt: "prompt", negative_prompt: "negative_prompt", n: "n", size: "size",
  num_inference_steps: "steps", guidance_scale: "guidance", seed: "seed", priority: "priority",
};

const $ = (id) => document.getElementById(id);
const models = new Map();

// -- API access --------------------------------------------------------------------------------------------------

class ApiFailure extends Error {
  constructor(status, message, param, code, retryAfter) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
  }
}

function apiKey() {
  return sessionStorage.getItem(API_KEY_KEY) || "";
}

async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiFailure(0, `cannot reach the service (${err.message})`, null, "network_error", null);
  }
  if (!response.ok) throw await failureOf(response);
  return response;
}

async function failureOf(response) {
  let detail = {};
  try {
    detail = (await response.json()).error || {};
  } catch (_) {
    // not the API's JSON error body (a proxy's page, say): the status says enough
  }
  const message = detail.message || `${response.status} ${response.statusText}`;
  return new ApiFailure(response.status, message, detail.param || null, detail.code || null,
                        response.headers.get("Retry-After"));
}

// Server-Sent Events over a streamed response: yields {event, data} per event.
async function* events(path, signal) {
  const response = await api(path, { headers: { Accept: "text/event-stream" }, signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // A chunk may end between the \r and \n of one line break: keep a trailing \r for the next chunk.
    const cut = buffer.endsWith("\r") ? buffer.length - 1 : buffer.length;
    const lines = buffer.slice(0, cut).split(/\r\n|\r|\n/);
    buffer = lines.pop() + buffer.slice(cut);
    for (const line of lines) {
      if (line === "") {
        if (data.length) yield { event: name, data: data.join("\n") };
        name = "message";
        data = [];
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let content = colon < 0 ? "" : line.slice(colon + 1);
        if (content.startsWith(" ")) content = content.slice(1);
        if (field === "event") name = content;
        else if (field === "data") data.push(content);
      }
    }
  }
}

// -- messages ----------------------------------------------------------------------------------------------------

let bannerTimer = null;

function showBanner(text, retryAfter) {
  clearInterval(bannerTimer);
  const banner = $("banner");
  const render = (seconds) => {
    $("banner-text").textContent = seconds > 0 ? `${text} Retry in ${seconds} s.` : text;
  };
  let seconds = Number.parseInt(retryAfter, 10);
  render(seconds);
  if (seconds > 0) {
    bannerTimer = setInterval(() => {
      seconds -= 1;
      render(seconds);
      if (seconds <= 0) clearInterval(bannerTimer);
    }, 1000);
  }
  banner.hidden = false;
}

function hideBanner() {
  clearInterval(bannerTimer);
  $("banner").hidden = true;
}

function fieldError(id, message) {
  const control = $(id);
  const error = $(`${id}-error`);
  error.textContent = message;
  error.hidden = false;
  control.setAttribute("aria-invalid", "true");
}

function clearFieldErrors() {
  for (const error of document.querySelectorAll("form .error")) {
    error.hidden = true;
    error.textContent = "";
  }
  for (const control of document.querySelectorAll("form [aria-invalid]")) control.removeAttribute("aria-invalid");
}

// What a failed call means to the person at the page; a 400 goes next to its field when there is one.
function report(failure, context) {
  if (failure.status === 401) {
    const text = apiKey() ? `The API key was not accepted: ${failure.message}.`
      : `This service needs an API key: ${failure.message}.`;
    fieldError("api-key", text);
    showBanner(`${context}: ${text} Enter a key in the API key field.`);
    return;
  }
  const field = failure.status === 400 && FIELDS[failure.param];
  if (field) {
    fieldError(field, failure.message);
    $(field).focus();
    showBanner(`${context}: check the highlighted field (${failure.param}).`);
    return;
  }
  const prefix = {
    0: "Network error", 400: "Bad request", 404: "Not found", 409: "Conflict", 413: "Request too large",
    422: "Request refused", 429: "Too many requests", 503: "Service unavailable",
  }[failure.status] || `Error ${failure.status}`;
  showBanner(`${context}: ${prefix}: ${failure.message}.`, failure.retryAfter);
}

// -- models ------------------------------------------------------------------------------------------------------

async function loadModels() {
  let list;
  try {
    list = await (await api("/v1/models")).json();
  } catch (failure) {
    $("model-limits").textContent = "models could not be loaded";
    report(failure, "Loading models");
    return false;
  }
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren();
  models.clear();
  for (const card of list.data) {
    models.set(card.id, card);
    select.append(new Option(card.id, card.id));
  }
  if (models.has(chosen)) select.value = chosen;
  applyModel();
  return true;
}

function applyModel() {
  const card = models.get($("model").value);
  if (!card) return;
  const [gmin, gmax] = card.guidance_range;
  $("model-limits").textContent = `${card.kind} · sizes ${card.sizes.join(", ")} · images 1–${card.max_n} · `
    + `steps 1–${card.max_steps} · guidance ${gmin}–${gmax} · prompt ≤ ${card.max_prompt_tokens} tokens`
    + (card.description ? ` · ${card.description}` : "");
  $("size-options").replaceChildren(...card.sizes.map((size) => new Option(size, size)));
  $("size").value = card.default_size;
  $("n").max = card.max_n;
  $("steps").max = card.max_steps;
  $("steps").value = card.default_steps;
  $("guidance").min = gmin;
  $("guidance").max = gmax;
  $("guidance").value = card.default_guidance;
}

// -- history -----------------------------------------------------------------------------------------------------

function loadHistory() {
  try {
    const records = JSON.parse(localStorage.getItem(HISTORY_KEY) || "[]");
    return Array.isArray(records) ? records.filter((r) => r && typeof r.id === "string") : [];
  } catch (_) {
    return [];
  }
}

function saveRecord(record) {
  const records = loadHistory().filter((r) => r.id !== record.id);
  records.unshift(record);
  localStorage.setItem(HISTORY_KEY, JSON.stringify(records.slice(0, HISTORY_MAX)));
}

function recordOf(view) {
  const r = view.request;
  return {
    id: view.id, model: view.model, status: view.status, priority: view.priority, created_at: view.created_at,
    prompt: r.prompt, negative_prompt: r.negative_prompt, n: r.n, size: r.size, steps: r.num_inference_steps,
    guidance: r.guidance_scale, seeds: view.seeds,
  };
}

// -- job cards ---------------------------------------------------------------------------------------------------

const cards = new Map(); // job id -> {element, record, controller}

function card(record) {
  const li = $("job-template").content.firstElementChild.cloneNode(true);
  li.dataset.jobId = record.id;
  li.querySelector(".job-title").textContent = record.prompt;
  const when = new Date(record.created_at * 1000).toLocaleString();
  li.querySelector(".job-meta").textContent = `${record.model} · ${record.size} · ${record.n} image`
    + `${record.n === 1 ? "" : "s"} · ${record.steps} steps · guidance ${record.guidance} · ${record.priority}`
    + ` · ${when} · job ${record.id}`;
  li.querySelector("progress").setAttribute("aria-label", `progress of job ${record.id}`);
  li.querySelector(".cancel").addEventListener("click", () => cancel(record.id));
  const entry = { element: li, record, controller: new AbortController(), positionTimer: null };
  cards.set(record.id, entry);
  $("jobs-empty").hidden = true;
  return entry;
}

function setStatus(entry, status, detail = "") {
  const li = entry.element;
  li.dataset.status = status;
  li.querySelector(".job-status").textContent = detail ? `${status} · ${detail}` : status;
  li.querySelector(".cancel").hidden = FINISHED.has(status);
  if (entry.record.status !== status) {
    entry.record.status = status;
    saveRecord(entry.record);
  }
  if (status === "queued" && entry.streaming) watchPosition(entry);
  else stopWatchingPosition(entry);
}

function setProgress(entry, step, total) {
  const bar = entry.element.querySelector("progress");
  bar.max = total;
  bar.value = step;
}

function positionText(position) {
  return position === null || position === undefined ? "waiting" : `position ${position + 1} in line`;
}

// The events say when a job leaves the queue; its place in line comes from the job view, re-read while queued.
function watchPosition(entry) {
  if (entry.positionTimer) return;
  entry.positionTimer = setInterval(async () => {
    try {
      const view = await (await api(`/v1/jobs/${entry.record.id}`)).json();
      if (view.status === "queued" && entry.record.status === "queued") {
        setStatus(entry, "queued", positionText(view.queue_position));
      }
    } catch (_) {
      // the event stream reports what matters (expiry, auth); a missed position update is harmless
    }
  }, 1000);
}

function stopWatchingPosition(entry) {
  clearInterval(entry.positionTimer);
  entry.positionTimer = null;
}

function jobError(entry, text) {
  const error = entry.element.querySelector(".job-error");
  error.textContent = text;
  error.hidden = !text;
}

function applyView(entry, view) {
  entry.record.seeds = view.seeds;
  setProgress(entry, view.progress.step, view.progress.total);
  if (view.status === "queued") setStatus(entry, "queued", positionText(view.queue_position));
  else if (view.status === "running") {
    setStatus(entry, "running", `step ${view.progress.step}/${view.progress.total}`
      + (view.cancel_requested ? " · cancelling" : ""));
  } else if (view.status === "succeeded") {
    setStatus(entry, "succeeded", `${view.progress.total}/${view.progress.total} steps`);
    showImages(entry, view);
  } else if (view.status === "failed") {
    setStatus(entry, "failed");
    jobError(entry, view.error ? `${view.error.type}: ${view.error.message}` : "the job failed");
  } else if (view.status === "cancelled" && view.started_at) {
    setStatus(entry, "cancelled", `stopped at step ${view.progress.step}/${view.progress.total}`);
  } else {
    setStatus(entry, view.status);
  }
}

function expired(entry) {
  setStatus(entry, "expired", "the service no longer has this job (its lifetime passed, or another API key)");
  entry.element.querySelector("progress").hidden = true;
  entry.element.querySelector(".images").replaceChildren();
}

async function showImages(entry, view) {
  const list = entry.element.querySelector(".images");
  if (entry.imagesShown || entry.imagesLoading) return;
  entry.imagesLoading = true;
  list.replaceChildren();
  let complete = true;
  const record = entry.record;
  for (let k = 0; k < view.images.length; k += 1) {
    const seed = view.seeds[k];
    const item = $("image-template").content.firstElementChild.cloneNode(true);
    list.append(item);
    try {
      const blob = await (await api(`/v1/jobs/${record.id}/images/${k}`)).blob();
      const url = URL.createObjectURL(blob);
      const img = item.querySelector("img");
      img.alt = `image ${k + 1} of “${record.prompt}”, seed ${seed}`;
      img.dataset.index = k;
      img.src = url;
      const link = item.querySelector(".download");
      link.href = url;
      link.download = `${record.model}-${record.id.slice(0, 8)}-seed${seed}.png`;
      link.setAttribute("aria-label", `Download image ${k + 1} (seed ${seed})`);
    } catch (failure) {
      complete = false;
      item.querySelector("img").remove();
      item.querySelector(".download").remove();
      jobError(entry, failure.status === 404 ? "its images have expired" : `image ${k}: ${failure.message}`);
    }
    item.querySelector(".seed").textContent = `seed ${seed}`;
    const reuse = item.querySelector(".reuse");
    reuse.setAttribute("aria-label", `Reuse seed ${seed} and this job's settings`);
    reuse.addEventListener("click", () => reuseSeed(record, seed));
  }
  entry.imagesLoading = false;
  entry.imagesShown = complete;
}

function reuseSeed(record, seed) {
  if (models.has(record.model)) {
    $("model").value = record.model;
    applyModel();
  }
  $("prompt").value = record.prompt;
  $("negative_prompt").value = record.negative_prompt || "";
  $("size").value = record.size;
  $("steps").value = record.steps;
  $("guidance").value = record.guidance;
  $("seed-random").checked = false;
  $("seed").disabled = false;
  $("seed").value = seed;
  $("seed").focus();
}

// Follow one job to its end over the event stream; reconnects (after re-reading the job) if the stream drops.
// A browser keeps at most six connections to one origin over HTTP/1.1, and each event stream holds one for as long
// as its job lasts: at most MAX_STREAMS jobs are streamed at once, the others are polled until a stream is free.
const MAX_STREAMS = 3;
const POLL_MS = 2000;
let streamsOpen = 0;
const streamQueue = [];

function takeStream() {
  if (streamsOpen < MAX_STREAMS) {
    streamsOpen += 1;
    return Promise.resolve();
  }
  return new Promise((resolve) => streamQueue.push(resolve));
}

function giveBackStream() {
  const next = streamQueue.shift();
  if (next) next(); // the slot passes on as it is
  else streamsOpen -= 1;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function follow(entry) {
  if (entry.following) return;
  entry.following = true;
  let granted = false;
  let abandoned = false;
  const grant = takeStream().then(() => {
    granted = true;
    if (abandoned) giveBackStream();
  });
  try {
    while (!granted) {
      await Promise.race([grant, sleep(POLL_MS)]);
      if (granted) break;
      if (await pollOnce(entry)) return;
    }
    entry.streaming = true;
    if (entry.record.status === "queued") watchPosition(entry);
    try {
      await followStream(entry);
    } finally {
      entry.streaming = false;
      stopWatchingPosition(entry);
      giveBackStream();
    }
  } finally {
    abandoned = !granted;
    entry.following = false;
  }
}

// One look at a job that waits for a stream; true once there is nothing more to follow.
async function pollOnce(entry) {
  if (entry.controller.signal.aborted) return true;
  try {
    const view = await (await api(`/v1/jobs/${entry.record.id}`)).json();
    applyView(entry, view);
    return FINISHED.has(view.status);
  } catch (failure) {
    if (failure.status === 404) {
      expired(entry);
      return true;
    }
    jobError(entry, `could not load this job: ${failure.message}`);
    return failure.status === 401;
  }
}

async function followStream(entry) {
  const id = entry.record.id;
  for (;;) {
    try {
      for await (const message of events(`/v1/jobs/${id}/events`, entry.controller.signal)) {
        const data = JSON.parse(message.data);
        if (message.event === "status") {
          if (data.status === "running") {
            const bar = entry.element.querySelector("progress");
            setStatus(entry, "running", `step ${bar.value}/${bar.max}`);
          } else if (data.status !== "queued" || entry.record.status !== "queued") {
            setStatus(entry, data.status);
          }
        } else if (message.event === "progress") {
          setProgress(entry, data.step, data.total);
          setStatus(entry, "running", `step ${data.step}/${data.total}`);
        } else if (message.event === "end") {
          if (data.status === "expired") expired(entry);
          else applyView(entry, data);
          return;
        }
      }
    } catch (failure) {
      if (failure.name === "AbortError") return;
      if (failure.status === 404) {
        expired(entry);
        return;
      }
      if (failure.status === 401) {
        jobError(entry, "cannot follow this job: the API key is missing or not accepted");
        report(failure, "Following a job");
        return;
      }
      jobError(entry, `lost the event stream (${failure.message}); reconnecting`);
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
    try {
      const view = await (await api(`/v1/jobs/${id}`)).json();
      jobError(entry, "");
      applyView(entry, view);
      if (FINISHED.has(view.status)) return;
    } catch (failure) {
      if (failure.status === 404) {
        expired(entry);
        return;
      }
    }
  }
}

async function cancel(id) {
  const entry = cards.get(id);
  try {
    const response = await api(`/v1/jobs/${id}/cancel`, { method: "POST" });
    const view = await response.json();
    if (response.status === 202) setStatus(entry, "running", "cancelling at the next step");
    else applyView(entry, view);
  } catch (failure) {
    if (failure.status === 404) expired(entry);
    else jobError(entry, `cancel: ${failure.message}`);
  }
}

// -- submit ------------------------------------------------------------------------------------------------------

function numberOrRaw(id) {
  // Empty: leave it to the model's default. Anything else goes to the API as typed, which names what is wrong.
  const control = $(id);
  if (control.value === "") return control.validity.badInput ? "" : undefined;
  const value = Number(control.value);
  return Number.isFinite(value) ? value : control.value;
}

function requestBody() {
  const body = {
    model: $("model").value || undefined,
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    n: numberOrRaw("n"),
    size: $("size").value.trim() || undefined,
    num_inference_steps: numberOrRaw("steps"),
    guidance_scale: numberOrRaw("guidance"),
    priority: $("priority").value,
  };
  if (!$("seed-random").checked) body.seed = numberOrRaw("seed") ?? "";
  return body;
}

async function submit(event) {
  event.preventDefault();
  clearFieldErrors();
  hideBanner();
  const button = $("submit");
  button.disabled = true;
  try {
    const response = await api("/v1/jobs", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(requestBody()),
    });
    const view = await response.json();
    const record = recordOf(view);
    saveRecord(record);
    const entry = card(record);
    $("job-list").prepend(entry.element);
    applyView(entry, view);
    follow(entry);
  } catch (failure) {
    report(failure, "Submitting");
  } finally {
    button.disabled = false;
  }
}

// -- live strip --------------------------------------------------------------------------------------------------

async function pollLive() {
  const text = $("live-text");
  try {
    const response = await fetch("/playground/status", { cache: "no-store" });
    if (!response.ok) {
      const failure = await failureOf(response);
      text.textContent = `service unavailable: ${failure.message}`;
      $("live").dataset.state = "down";
    } else {
      const status = await response.json();
      text.textContent = Object.entries(status.models).map(([name, m]) => `${name}: ${m.queue_depth} in queue · `
        + `${m.workers} live worker${m.workers === 1 ? "" : "s"}`).join("  |  ");
      $("live").dataset.state = Object.values(status.models).every((m) => m.workers > 0) ? "up" : "degraded";
    }
  } catch (err) {
    text.textContent = `the service does not answer (${err.message})`;
    $("live").dataset.state = "down";
  }
}

// -- start -------------------------------------------------------------------------------------------------------

function restoreHistory() {
  const records = loadHistory();
  for (const record of records) {
    const entry = card(record);
    $("job-list").append(entry.element);
    if (record.status === "expired") {
      expired(entry);
      continue;
    }
    setStatus(entry, record.status || "queued");
    resume(entry);
  }
}

async function resume(entry) {
  try {
    const view = await (await api(`/v1/jobs/${entry.record.id}`)).json();
    applyView(entry, view);
    if (!FINISHED.has(view.status)) follow(entry);
  } catch (failure) {
    if (failure.status === 404) expired(entry);
    else jobError(entry, `could not load this job: ${failure.message}`);
  }
}

function clearHistory() {
  for (const entry of cards.values()) {
    entry.controller.abort();
    stopWatchingPosition(entry);
  }
  cards.clear();
  for (const img of document.querySelectorAll("#job-list img")) URL.revokeObjectURL(img.src);
  localStorage.removeItem(HISTORY_KEY);
  $("job-list").replaceChildren();
  $("jobs-empty").hidden = false;
}

async function start() {
  $("api-key").value = apiKey();
  $("api-key").addEventListener("change", async () => {
    const key = $("api-key").value.trim();
    if (key) sessionStorage.setItem(API_KEY_KEY, key);
    else sessionStorage.removeItem(API_KEY_KEY);
    clearFieldErrors();
    hideBanner();
    if (await loadModels()) {
      for (const entry of cards.values()) {
        if (entry.record.status !== "expired") resume(entry);
      }
    }
  });
  $("model").addEventListener("change", applyModel);
  $("seed-random").addEventListener("change", () => {
    $("seed").disabled = $("seed-random").checked;
    if (!$("seed").disabled) $("seed").focus();
  });
  $("generate").addEventListener("submit", submit);
  $("banner-close").addEventListener("click", hideBanner);
  $("clear-history").addEventListener("click", clearHistory);
  pollLive();
  setInterval(pollLive, 2000);
  await loadModels();
  restoreHistory();
  document.body.dataset.ready = "true";
}

start();
