// The labeling view, after InstructGPT's interface: one prompt, K answers sampled with n=K, a 1–7 rating and
// the metadata flags for each, and an ordering (drag, or Up/Down buttons) submitted as one `ranking`.
import { call, describe, el, FLAGS, randomId, setupAppSignIn } from "./api.js";

const LETTERS = "ABCDEFGHIJKLMNOP";

const $ = (id) => document.getElementById(id);
const state = { key: null, model: null, task: null };
// task: {id, answers: [{letter, completionId, text, ratingInputs, flagBoxes, comment, item}], order: [answer]}

function showError(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

// ---- sampling ---------------------------------------------------------------------------------------------

async function sample(prompt) {
  const k = parseInt($("k").value, 10);
  const body = { model: state.model, messages: [{ role: "user", content: prompt }], n: k };
  const temperature = parseFloat($("temperature").value);
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (Number.isFinite(temperature)) body.temperature = temperature;
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;

  showError("task-error", "");
  $("sample").disabled = true;
  $("task-status").textContent = `Sampling ${k} answers…`;
  try {
    const reply = await call(state.key, "POST", "/v1/chat/completions", body);
    const choices = [...reply.choices].sort((a, b) => a.index - b.index);
    showTask(choices);
    $("task-status").textContent = `${choices.length} answers to label.`;
  } catch (err) {
    $("task-status").textContent = "";
    showError("task-error", describe(err));
  } finally {
    $("sample").disabled = false;
  }
}

function answerCard(answer) {
  const uid = `answer-${answer.letter}`;
  answer.ratingInputs = [1, 2, 3, 4, 5, 6, 7].map((value) => el("input", {
    type: "radio", name: `${uid}-rating`, id: `${uid}-rating-${value}`, value,
  }));
  const scale = el("fieldset", { class: "likert" },
    el("legend", {}, `Rating of answer ${answer.letter}: 1 (worst) to 7 (best)`),
    el("div", { class: "likert-options" }, answer.ratingInputs.map((input, i) => el("span",
      { class: "likert-option" }, input, el("label", { for: input.id }, String(i + 1))))));
  answer.flagBoxes = FLAGS.map(([name, text]) => ({
    name, text, box: el("input", { type: "checkbox", id: `${uid}-${name}` }),
  }));
  const flags = el("fieldset", { class: "flags" }, el("legend", {}, `Flags for answer ${answer.letter}`),
    answer.flagBoxes.map((f) => el("div", { class: "check" }, f.box, el("label", { for: f.box.id }, f.text))));
  answer.comment = el("textarea", { id: `${uid}-comment`, rows: 2 });
  return el("article", { class: "card", id: uid, "aria-labelledby": `${uid}-title`,
    dataset: { completionId: answer.completionId } },
  el("h2", { id: `${uid}-title` }, `Answer ${answer.letter}`),
  el("div", { class: "text" }, answer.text || el("em", {}, "(an empty answer)")),
  scale, flags,
  el("label", { for: answer.comment.id }, "Comment (optional)"), answer.comment);
}

function showTask(choices) {
  const answers = choices.map((c, i) => ({
    letter: LETTERS[i], completionId: c.completion_id, text: c.message.content || "",
  }));
  state.task = { id: randomId("web-label-"), answers, order: [...answers], saved: false };
  $("answers").replaceChildren(...answers.map(answerCard));
  renderRanking();
  $("labels-form").hidden = false;
  $("submit-labels").disabled = false;
  $("next-task").hidden = true;
  $("labels-status").textContent = "";
  showError("labels-error", "");
  $("answers").querySelector("input")?.focus();
}

// ---- ranking: drag, or Up/Down buttons --------------------------------------------------------------------

function excerpt(text) {
  const flat = text.replace(/\s+/g, " ").trim();
  return flat.length > 80 ? `${flat.slice(0, 79)}…` : flat || "(empty)";
}

function move(answer, by, focusClass) {
  const order = state.task.order;
  const from = order.indexOf(answer);
  const to = from + by;
  if (to < 0 || to >= order.length) return;
  order.splice(from, 1);
  order.splice(to, 0, answer);
  renderRanking();
  $("labels-status").textContent = `Answer ${answer.letter} is now number ${to + 1}.`;
  // Keep the keyboard where it was: on the same button of the answer that moved (or its other one at an end).
  const item = $("rank-list").querySelector(`li[data-letter="${answer.letter}"]`);
  const button = item.querySelector(`button.${focusClass}:not([disabled])`)
    || item.querySelector("button:not([disabled])");
  button?.focus();
}

let dragged = null;

function renderRanking() {
  const order = state.task.order;
  $("rank-list").replaceChildren(...order.map((answer, i) => {
    const item = el("li", {
      draggable: "true", class: "rank-item",
      dataset: { letter: answer.letter, completionId: answer.completionId },
    },
      el("span", { class: "grip", "aria-hidden": "true" }, "⠿"),
      el("span", { class: "rank-pos", "aria-hidden": "true" }, `${i + 1}.`),
      el("span", { class: "rank-label" }, `Answer ${answer.letter}`),
      el("span", { class: "rank-excerpt" }, excerpt(answer.text)),
      el("span", { class: "rank-buttons" },
        el("button", {
          type: "button", class: "up", disabled: i === 0, "aria-label": `Move answer ${answer.letter} up`,
          onclick: () => move(answer, -1, "up"),
        }, "Up"),
        el("button", {
          type: "button", class: "down", disabled: i === order.length - 1,
          "aria-label": `Move answer ${answer.letter} down`, onclick: () => move(answer, 1, "down"),
        }, "Down")));
    item.addEventListener("dragstart", (ev) => {
      dragged = answer;
      ev.dataTransfer.effectAllowed = "move";
      ev.dataTransfer.setData("text/plain", answer.letter);
      item.classList.add("dragging");
    });
    item.addEventListener("dragend", () => {
      dragged = null;
      item.classList.remove("dragging");
    });
    item.addEventListener("dragover", (ev) => {
      if (dragged && dragged !== answer) ev.preventDefault();
    });
    item.addEventListener("drop", (ev) => {
      ev.preventDefault();
      if (!dragged || dragged === answer) return;
      // Dropped on the upper half of an item: before it; on the lower half: after it.
      const box = item.getBoundingClientRect();
      const after = ev.clientY > box.top + box.height / 2;
      const moving = dragged;
      order.splice(order.indexOf(moving), 1);
      order.splice(order.indexOf(answer) + (after ? 1 : 0), 0, moving);
      renderRanking();
      $("labels-status").textContent = `Answer ${moving.letter} is now number ${order.indexOf(moving) + 1}.`;
    });
    return item;
  }));
}

function rating(answer) {
  const picked = answer.ratingInputs.find((input) => input.checked);
  return picked ? parseInt(picked.value, 10) : null;
}

function sortByRating() {
  const unrated = state.task.answers.filter((a) => rating(a) === null);
  if (unrated.length) {
    const letters = unrated.map((a) => a.letter).join(", ");
    showError("labels-error", `Rate every answer first: ${letters} not rated yet.`);
    return;
  }
  showError("labels-error", "");
  // Stable: equal ratings keep their current order.
  state.task.order.sort((a, b) => rating(b) - rating(a));
  renderRanking();
  $("labels-status").textContent = `Ordered by rating: ${state.task.order.map((a) => a.letter).join(", ")}.`;
}

// ---- submitting -------------------------------------------------------------------------------------------

async function submitLabels() {
  const task = state.task;
  const unrated = task.answers.filter((a) => rating(a) === null);
  if (unrated.length) {
    const names = unrated.map((a) => `answer ${a.letter}`).join(", ");
    showError("labels-error", `Rate every answer before submitting: ${names} `
      + `${unrated.length === 1 ? "has" : "have"} no rating.`);
    return;
  }
  showError("labels-error", "");
  const items = task.answers.map((answer) => {
    const item = { kind: "rating", completion_id: answer.completionId, value: rating(answer) };
    const flags = Object.fromEntries(answer.flagBoxes.filter((f) => f.box.checked).map((f) => [f.name, true]));
    if (Object.keys(flags).length) item.flags = flags;
    const comment = answer.comment.value.trim();
    if (comment) item.comment = comment;
    return item;
  });
  items.push({ kind: "ranking", completion_ids: task.order.map((a) => a.completionId) });

  $("submit-labels").disabled = true;
  $("labels-status").textContent = "Saving…";
  try {
    // One batch, accepted whole or not at all; the task's id makes a repeated click a harmless replay.
    const result = await call(state.key, "POST", "/v1/feedback/batch", { items },
      { headers: { "Idempotency-Key": task.id } });
    task.saved = true;
    $("labels-status").textContent = `Saved: ${items.length - 1} ratings and 1 ranking `
      + `(${task.order.map((a) => a.letter).join(" > ")}).`;
    $("labels-form").dataset.saved = String(result.data.length);
    $("next-task").hidden = false;
    $("next-task").focus();
  } catch (err) {
    $("labels-status").textContent = "";
    showError("labels-error", `Not saved: ${describe(err)}`);
    $("submit-labels").disabled = false;
  }
}

// ---- wiring -----------------------------------------------------------------------------------------------

$("task-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const prompt = $("prompt").value.trim();
  if (prompt) sample(prompt);
});
$("labels-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  if (state.task && !state.task.saved) submitLabels();
});
$("sort-by-rating").addEventListener("click", sortByRating);
$("next-task").addEventListener("click", () => {
  state.task = null;
  $("labels-form").hidden = true;
  delete $("labels-form").dataset.saved;
  $("prompt").value = "";
  $("task-status").textContent = "";
  $("prompt").focus();
});

setupAppSignIn({
  onSignedIn(key, card) {
    state.key = key;
    state.model = card.id;
    $("labeling").hidden = false;
    $("prompt").focus();
  },
  onSignedOut() {
    state.key = null;
    state.task = null;
    $("labels-form").hidden = true;
    $("labeling").hidden = true;
  },
});
