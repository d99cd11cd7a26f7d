// Calls to the gateway's JSON API with the key the user signed in with, and the sign-in that keeps it.
// The key lives in this tab's sessionStorage only: never in a URL, a cookie or localStorage.

export class ApiError extends Error {
  /** @param {number} status @param {{message?: string, code?: string, type?: string, param?: string}} info */
  constructor(status, info) {
    super(info.message || `HTTP ${status}`);
    this.status = status;
    this.info = info;
  }

  /** One plain line: status, code, message, and the field or run it names. */
  describe() {
    const { code, type, param, run_id: runId } = this.info;
    const parts = [this.status ? `${this.status}` : "", code || type || ""].filter(Boolean);
    let text = `${parts.join(" ")}: ${this.message}`;
    if (param) text += ` (field: ${param})`;
    if (runId && !this.message.includes(runId)) text += ` (run ${runId})`;
    return text;
  }
}

/** A message for any error a call can end with. */
export function describe(err) {
  if (err instanceof ApiError) return err.describe();
  if (err && err.name === "AbortError") return "Stopped.";
  return `Network error: ${err && err.message ? err.message : err}`;
}

async function errorFrom(resp) {
  let info = { message: `${resp.status} ${resp.statusText}` };
  try {
    const body = await resp.json();
    if (body && body.error) info = body.error;
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(resp.status, info);
}

/** JSON call; resolves to the parsed body (null for an empty one), rejects with ApiError. */
export async function call(key, method, path, body, { headers = {}, signal } = {}) {
  const init = { method, headers: { Authorization: `Bearer ${key}`, ...headers }, signal, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(path, init);
  if (!resp.ok) throw await errorFrom(resp);
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

/** Streams a chat completion: yields each chunk object of the server-sent events until `[DONE]`. */
export async function* streamChat(key, body, signal) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: {
      Authorization: `Bearer ${key}`, "Content-Type": "application/json", Accept: "text/event-stream",
    },
    body: JSON.stringify({ ...body, stream: true }),
    signal,
    cache: "no-store",
  });
  if (!resp.ok) throw await errorFrom(resp);
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    // Events end with a blank line; sse-starlette writes CRLF line ends.
    const events = buffer.split(/\r\n\r\n|\n\n|\r\r/);
    buffer = events.pop();
    for (const event of events) {
      const data = event.split(/\r\n|\n|\r/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue; // a comment (the keep-alive ping)
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      // Once the headers are sent, the gateway reports a failure in-band, as OpenAI does.
      if (chunk.error) throw new ApiError(0, chunk.error);
      yield chunk;
    }
  }
}

/** A random id, for idempotency keys and the sticky `user` of canary routing. */
export function randomId(prefix) {
  return `${prefix}${crypto.randomUUID().replace(/-/g, "")}`;
}

/**
 * Wires a page's sign-in form. `check(key)` validates the key against the API (rejecting with an ApiError
 * shown as is, or as `explain(err)` words it); `onSignedIn(key, checked)` gets the key and what `check`
 * resolved to.
 */
export function setupSignIn({ storageKey, check, onSignedIn, onSignedOut, explain = describe }) {
  const section = document.getElementById("sign-in");
  const form = document.getElementById("sign-in-form");
  const input = document.getElementById("key");
  const error = document.getElementById("sign-in-error");
  const who = document.getElementById("who");
  const signOut = document.getElementById("sign-out");

  function showError(text) {
    error.textContent = text;
    error.hidden = !text;
  }

  async function signIn(key, fromStorage) {
    showError("");
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const checked = await check(key);
      sessionStorage.setItem(storageKey, key);
      section.hidden = true;
      who.hidden = false;
      input.value = "";
      onSignedIn(key, checked);
    } catch (err) {
      if (fromStorage) sessionStorage.removeItem(storageKey);
      section.hidden = false;
      showError(explain(err));
      input.focus();
    } finally {
      button.disabled = false;
    }
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = input.value.trim();
    if (key) signIn(key, false);
  });
  signOut.addEventListener("click", () => {
    sessionStorage.removeItem(storageKey);
    who.hidden = true;
    section.hidden = false;
    onSignedOut();
    input.focus();
  });

  const saved = sessionStorage.getItem(storageKey);
  if (saved) signIn(saved, true);
  else section.hidden = false;
}

/** Creates an element: el("button", {type: "button", class: "x", onclick: f}, "text", child, ...). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "class") node.className = value;
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** The metadata labels of InstructGPT's interface, as the feedback API names them. */
export const FLAGS = [
  ["fails_instruction", "Fails to follow the instruction"],
  ["hallucination", "Makes up facts (hallucination)"],
  ["inappropriate", "Inappropriate (harmful, offensive)"],
];

/**
 * The sign-in of the pages for application keys (chat, labeling): the key is checked with GET /v1/models,
 * whose card names the served model; `onSignedIn(key, card)` gets both.
 */
export function setupAppSignIn({ onSignedIn, onSignedOut }) {
  setupSignIn({
    storageKey: "alignloop.app_key",
    check: (key) => call(key, "GET", "/v1/models"),
    onSignedIn(key, models) {
      const card = models.data[0];
      document.getElementById("who-text").textContent = `${card.id} v${card.version}`;
      onSignedIn(key, card);
    },
    onSignedOut,
  });
}
