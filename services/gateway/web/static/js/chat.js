// The chat page: a conversation with streamed answers, thumbs (with an optional comment and flags) on every
// answer, and Regenerate, after which the user can pick the better answer (a `comparison`).
import { call, describe, el, FLAGS, randomId, setupAppSignIn, streamChat } from "./api.js";

const USER_KEY = "alignloop.chat_user";

const state = {
  key: null,
  model: null,
  turns: [], // {role: "user", content} | {role: "assistant", alternatives: [alt], chosen: alt|null, node}
  controller: null,
};

const $ = (id) => document.getElementById(id);
const conversation = $("conversation");
const statusLine = $("chat-status");

function announce(text) {
  statusLine.textContent = text;
}

// A stable, random id per tab: the gateway keeps one user on one side of a canary split.
function chatUser() {
  let user = sessionStorage.getItem(USER_KEY);
  if (!user) {
    user = randomId("web-");
    sessionStorage.setItem(USER_KEY, user);
  }
  return user;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").hidden = !on;
  for (const button of conversation.querySelectorAll("button.regenerate")) button.disabled = on;
}

/** The messages a request for the answer at turn `upTo` sends: everything said before it. */
function history(upTo) {
  const messages = [];
  for (const turn of state.turns.slice(0, upTo)) {
    if (turn.role === "user") {
      messages.push({ role: "user", content: turn.content });
    } else {
      const alt = turn.chosen || [...turn.alternatives].reverse().find((a) => a.status === "done");
      if (alt) messages.push({ role: "assistant", content: alt.text });
    }
  }
  return messages;
}

function samplingParams() {
  const params = {};
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(temperature)) params.temperature = temperature;
  if (Number.isFinite(maxTokens)) params.max_tokens = maxTokens;
  return params;
}

// ---- rendering --------------------------------------------------------------------------------------------

function addUserTurn(content) {
  const node = el("li", { class: "turn user" }, el("p", { class: "speaker" }, "You"),
    el("div", { class: "text" }, content));
  conversation.append(node);
  state.turns.push({ role: "user", content, node });
}

function addAssistantTurn() {
  const alternatives = el("div", { class: "alternatives" });
  const regenerate = el("button", { type: "button", class: "regenerate" }, "Regenerate");
  const node = el("li", { class: "turn assistant" }, el("p", { class: "speaker" }, "Assistant"), alternatives,
    el("div", { class: "turn-actions" }, regenerate));
  const turn = { role: "assistant", alternatives: [], chosen: null, node, alternativesNode: alternatives };
  regenerate.addEventListener("click", () => generate(turn));
  conversation.append(node);
  state.turns.push(turn);
  return turn;
}

function addAlternative(turn) {
  const number = turn.alternatives.length + 1;
  const alt = { text: "", completionId: null, status: "streaming", vote: null, chunks: 0 };
  const uid = randomId("a");
  alt.title = el("h2", { class: "answer-title", id: `${uid}-title` }, `Answer ${number}`);
  alt.textNode = el("div", { class: "text", "aria-live": "off" });
  alt.statusNode = el("p", { class: "answer-status", role: "status" });
  alt.node = el("article", { class: "answer", "aria-labelledby": `${uid}-title`, "aria-busy": "true" },
    alt.title, alt.textNode, alt.statusNode);
  turn.alternatives.push(alt);
  turn.alternativesNode.append(alt.node);
  return alt;
}

// Drawn here rather than taken from an emoji font, which many Linux machines lack.
function thumbIcon(down) {
  const ns = "http://www.w3.org/2000/svg";
  const icon = document.createElementNS(ns, "svg");
  const attrs = { viewBox: "0 0 24 24", width: 18, height: 18, "aria-hidden": "true", class: "icon" };
  for (const [k, v] of Object.entries(attrs)) icon.setAttribute(k, String(v));
  const hand = document.createElementNS(ns, "path");
  // A cuff and a hand with the thumb up; turned round for thumbs down.
  hand.setAttribute("d", "M2 10h4v11H2z "
    + "M8 10l4-7c1.2-1 3-.3 3 1.5L14 9h6c1.5 0 2.5 1.3 2 2.8l-2 7.7c-.3.9-1 1.5-2 1.5H8z");
  if (down) hand.setAttribute("transform", "rotate(180 12 12)");
  icon.append(hand);
  return icon;
}

function feedbackControls(turn, alt, index) {
  const label = `answer ${index + 1}`;
  const thumbs = ["up", "down"].map((value) => el("button", {
    type: "button", class: `thumb thumb-${value}`, "aria-pressed": "false",
    "aria-label": value === "up" ? `Thumbs up: ${label} is good` : `Thumbs down: ${label} is bad`,
    dataset: { value },
    onclick: () => sendThumbs(alt, value),
  }, thumbIcon(value === "down"), value === "up" ? "Good" : "Bad"));
  alt.thumbs = thumbs;

  const uid = randomId("c");
  alt.comment = el("textarea", { id: `${uid}-comment`, rows: 2 });
  alt.flags = FLAGS.map(([name, text]) => {
    const box = el("input", { type: "checkbox", id: `${uid}-${name}`, name });
    const node = el("div", { class: "check" }, box, el("label", { for: `${uid}-${name}` }, text));
    return { name, box, node };
  });
  // One vote per answer, sent with whatever comment and flags are filled in at that moment: a second
  // submission would be a second feedback event, counted twice in the stats.
  const details = el("details", { class: "comment" },
    el("summary", {}, "Comment and flags (optional)"),
    el("p", { class: "help" }, "Fill these in before choosing Good or Bad: they are sent with your vote."),
    el("label", { for: `${uid}-comment` }, "Comment"), alt.comment,
    el("fieldset", { class: "flags" }, el("legend", {}, "Flags"), alt.flags.map((f) => f.node)));

  alt.prefer = el("button", {
    type: "button", class: "prefer", "aria-pressed": "false", hidden: true,
    onclick: () => prefer(turn, alt),
  }, "Prefer this answer");

  alt.node.append(el("div", { class: "feedback", role: "group", "aria-label": `Feedback on ${label}` },
    thumbs, alt.prefer), details);
}

function refreshControls() {
  const last = state.turns[state.turns.length - 1];
  for (const turn of state.turns) {
    if (turn.role !== "assistant") continue;
    turn.node.querySelector("button.regenerate").hidden = turn !== last;
    const rateable = turn.alternatives.filter((a) => a.status === "done");
    for (const alt of turn.alternatives) {
      if (!alt.prefer) continue;
      alt.prefer.hidden = rateable.length < 2 || alt.status !== "done";
      const chosen = turn.chosen === alt;
      alt.prefer.setAttribute("aria-pressed", String(chosen));
      alt.prefer.textContent = chosen ? "Preferred ✓" : "Prefer this answer";
      alt.node.classList.toggle("preferred", chosen);
    }
  }
}

// ---- chat -------------------------------------------------------------------------------------------------

async function generate(turn) {
  const index = state.turns.indexOf(turn);
  const alt = addAlternative(turn);
  refreshControls();
  state.controller = new AbortController();
  busy(true);
  announce("Answering…");
  try {
    const body = { model: state.model, messages: history(index), user: chatUser(), ...samplingParams() };
    for await (const chunk of streamChat(state.key, body, state.controller.signal)) {
      for (const choice of chunk.choices || []) {
        if (choice.index !== 0) continue;
        alt.completionId = alt.completionId || choice.completion_id;
        const delta = choice.delta && choice.delta.content;
        if (delta) {
          alt.text += delta;
          alt.textNode.textContent = alt.text;
          alt.chunks += 1;
        }
        if (choice.finish_reason) alt.finishReason = choice.finish_reason;
      }
    }
    alt.status = "done";
    if (!alt.text) alt.textNode.append(el("em", {}, "(an empty answer)"));
    if (alt.finishReason === "length") alt.statusNode.textContent = "Cut off at the length limit.";
    alt.node.dataset.completionId = alt.completionId;
    feedbackControls(turn, alt, turn.alternatives.indexOf(alt));
    announce(turn.alternatives.length > 1
      ? "Another answer is ready: pick the one you prefer." : "Answer ready.");
  } catch (err) {
    alt.status = err && err.name === "AbortError" ? "stopped" : "error";
    // An answer that did not finish was never recorded: there is nothing to give feedback on.
    alt.statusNode.className = alt.status === "error" ? "answer-status error" : "answer-status";
    alt.statusNode.setAttribute("role", alt.status === "error" ? "alert" : "status");
    alt.statusNode.textContent = alt.status === "error" ? `The answer failed: ${describe(err)}` : "Stopped.";
    announce(alt.status === "error" ? "The answer failed." : "Stopped.");
  } finally {
    alt.node.setAttribute("aria-busy", "false");
    alt.node.dataset.status = alt.status;
    state.controller = null;
    busy(false);
    refreshControls();
  }
}

async function send(content) {
  addUserTurn(content);
  const turn = addAssistantTurn();
  await generate(turn);
}

// ---- feedback ---------------------------------------------------------------------------------------------

function commentAndFlags(alt) {
  const extra = {};
  const comment = alt.comment.value.trim();
  if (comment) extra.comment = comment;
  const flags = Object.fromEntries(alt.flags.filter((f) => f.box.checked).map((f) => [f.name, true]));
  if (Object.keys(flags).length) extra.flags = flags;
  return extra;
}

async function submitThumbs(alt, value, doneText) {
  alt.statusNode.className = "answer-status";
  alt.statusNode.setAttribute("role", "status");
  alt.statusNode.textContent = "Saving…";
  try {
    const result = await call(state.key, "POST", "/v1/feedback",
      { kind: "thumbs", completion_id: alt.completionId, value, ...commentAndFlags(alt) });
    alt.vote = value;
    for (const b of alt.thumbs) {
      b.setAttribute("aria-pressed", String(b.dataset.value === value));
      b.setAttribute("aria-disabled", "true");
    }
    alt.comment.disabled = true;
    for (const f of alt.flags) f.box.disabled = true;
    alt.statusNode.textContent = doneText;
    alt.node.dataset.feedbackId = result.feedback_id;
  } catch (err) {
    alt.statusNode.className = "answer-status error";
    alt.statusNode.setAttribute("role", "alert");
    alt.statusNode.textContent = `Not saved: ${describe(err)}`;
  }
}

function sendThumbs(alt, value) {
  if (alt.vote) {
    alt.statusNode.textContent = `Your thumbs ${alt.vote} is already saved.`;
    return;
  }
  return submitThumbs(alt, value, `Thanks: thumbs ${value} saved.`);
}

async function prefer(turn, chosen) {
  const others = turn.alternatives.filter((a) => a !== chosen && a.status === "done");
  // The pair in the order they were shown; the chosen answer beats each of the others.
  const items = others.map((other) => {
    const shownFirst = turn.alternatives.indexOf(other) < turn.alternatives.indexOf(chosen);
    const pair = shownFirst ? [other, chosen] : [chosen, other];
    return {
      kind: "comparison", completion_ids: pair.map((a) => a.completionId), preferred: chosen.completionId,
    };
  });
  chosen.statusNode.className = "answer-status";
  chosen.statusNode.setAttribute("role", "status");
  chosen.statusNode.textContent = "Saving your choice…";
  try {
    await call(state.key, "POST", "/v1/feedback/batch", { items },
      { headers: { "Idempotency-Key": randomId("web-cmp-") } });
    turn.chosen = chosen;
    chosen.statusNode.textContent = "Thanks: your choice was saved. The conversation goes on from this answer.";
  } catch (err) {
    chosen.statusNode.className = "answer-status error";
    chosen.statusNode.setAttribute("role", "alert");
    chosen.statusNode.textContent = `Not saved: ${describe(err)}`;
  }
  refreshControls();
}

// ---- wiring -----------------------------------------------------------------------------------------------

function reset() {
  state.controller?.abort();
  state.turns = [];
  conversation.replaceChildren();
  announce("");
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const input = $("message");
  const content = input.value.trim();
  if (!content || state.controller) return;
  input.value = "";
  send(content);
});
$("message").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller?.abort());
$("new-chat").addEventListener("click", () => {
  reset();
  $("message").focus();
});

setupAppSignIn({
  onSignedIn(key, card) {
    state.key = key;
    state.model = card.id;
    $("chat").hidden = false;
    $("message").focus();
  },
  onSignedOut() {
    reset();
    state.key = null;
    $("chat").hidden = true;
  },
});
