// The operator console: model versions with their aliases and feedback (a table and charts per day), promote,
// roll back and the canary; usage by tenant; pipeline runs with their steps' progress and MLflow links, start
// and cancel.
import { ApiError, call, describe, el, setupSignIn } from "./api.js";
import { dayRange, lineChart, seriesStyle } from "./chart.js";

const STORAGE_KEY = "alignloop.operator_key";
const ACTIVE = new Set(["queued", "running"]);
const RUNS_SHOWN = 10;

const $ = (id) => document.getElementById(id);
const MODELS_EVERY_MS = 30000;
const state = { key: null, config: null, versions: null, timer: null, modelsAt: 0 };

function show(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

const pct = (v) => (v === null || v === undefined ? "—" : `${(100 * v).toFixed(1)}%`);
const num = (v, digits = 2) => (v === null || v === undefined ? "—" : Number(v).toFixed(digits));

function when(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "medium" });
}

function mlflowLink(runId, text = "MLflow run") {
  const base = state.config && state.config.mlflow_url;
  if (!runId) return null;
  if (!base || !/^https?:\/\//.test(base)) return el("code", {}, runId);
  // The MLflow UI opens a run from its id alone (#/runs/ID), whatever its experiment.
  const href = `${base}/#/runs/${encodeURIComponent(runId)}`;
  return el("a", { href, target: "_blank", rel: "noopener noreferrer" },
    text, el("span", { class: "visually-hidden" }, ` ${runId} (opens MLflow in a new tab)`));
}

// ---- model versions ---------------------------------------------------------------------------------------

function versionRow(v, model) {
  const champion = v.aliases.includes("champion");
  const f = v.feedback;
  const cell = (col, value) => el("td", { dataset: { col }, class: "num" }, value);
  const actions = el("td", { dataset: { col: "actions" } });
  if (!champion) {
    actions.append(el("button", { type: "button", onclick: () => promote(model, v.version) },
      "Promote", el("span", { class: "visually-hidden" }, ` version ${v.version} to champion`)));
  }
  return el("tr", { dataset: { version: v.version } },
    el("th", { scope: "row", dataset: { col: "version" } }, `v${v.version}`, " ", mlflowLink(v.run_id, "run")),
    el("td", { dataset: { col: "aliases" } }, v.aliases.length
      ? v.aliases.map((a) => el("span", { class: `badge alias-${a}` }, a)) : "—"),
    cell("traffic", `${v.traffic_percent}%`),
    cell("responses", v.responses),
    cell("total", f.total),
    cell("thumbs_up", f.thumbs_up),
    cell("thumbs_down", f.thumbs_down),
    cell("thumbs_up_rate", pct(f.thumbs_up_rate)),
    cell("ratings", `${f.ratings}${f.ratings ? ` (${num(f.rating_mean)})` : ""}`),
    cell("rankings", f.rankings),
    cell("comparisons", f.comparisons),
    cell("flagged", f.flagged),
    actions);
}

function renderVersions(list) {
  state.versions = list;
  $("versions").querySelector("tbody").replaceChildren(...list.data.map((v) => versionRow(v, list.model)));
  const canary = list.canary;
  const canaryText = canary.version
    ? `canary v${canary.version} at ${canary.percent}% (${canary.serving ? "serving" : "not serving yet"})`
    : "no canary";
  const period = list.days ? `the last ${list.days} day${list.days === 1 ? "" : "s"}` : "all time";
  $("models-summary").textContent = `${list.model}: champion v${list.champion ?? "—"}, ${canaryText}. `
    + `Counts cover ${period} (UTC).`;
  $("rollback").disabled = !list.champion;
}

function renderCharts(stats, days) {
  const rows = stats.by_model_version_and_day;
  const charts = $("charts");
  const table = $("daily").querySelector("tbody");
  if (!rows.length) {
    charts.replaceChildren(el("p", { class: "help" }, "No feedback in this period yet."));
    table.replaceChildren();
    return;
  }
  const today = new Date().toISOString().slice(0, 10);
  const firstSeen = rows.map((r) => r.day).sort()[0];
  let first = firstSeen;
  if (days > 0) {
    const start = new Date(`${today}T00:00:00Z`);
    start.setUTCDate(start.getUTCDate() - (days - 1));
    first = start.toISOString().slice(0, 10);
  }
  const range = dayRange(first < today ? first : today, today);
  const versions = [...new Set(rows.map((r) => r.model_version))].sort((a, b) => Number(a) - Number(b));
  const byKey = new Map(rows.map((r) => [`${r.model_version}|${r.day}`, r]));
  const series = (value) => versions.map((version, i) => ({
    name: `v${version}`, style: seriesStyle(i),
    values: range.map((day) => value(byKey.get(`${version}|${day}`))),
  }));
  charts.replaceChildren(
    lineChart({ id: "chart-feedback", title: "Feedback events per day", days: range,
      series: series((r) => (r ? r.total : 0)),
      format: (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)) }),
    lineChart({ id: "chart-thumbs", title: "Thumbs-up rate per day", days: range, yMax: 1,
      series: series((r) => (r && r.thumbs_up_rate !== null ? r.thumbs_up_rate : null)),
      format: (v) => `${Math.round(100 * v)}%` }));
  const sorted = [...rows].sort((a, b) => b.day.localeCompare(a.day)
    || Number(a.model_version) - Number(b.model_version));
  table.replaceChildren(...sorted.map((r) => el("tr", {},
    el("td", {}, r.day), el("td", {}, `v${r.model_version}`), el("td", { class: "num" }, r.total),
    el("td", { class: "num" }, r.thumbs_up), el("td", { class: "num" }, r.thumbs_down),
    el("td", { class: "num" }, pct(r.thumbs_up_rate)), el("td", { class: "num" }, r.ratings),
    el("td", { class: "num" }, r.rankings), el("td", { class: "num" }, r.comparisons))));
}

function renderUsage(report) {
  const cols = ["requests", "completions", "prompt_tokens", "cached_prompt_tokens", "completion_tokens",
    "total_tokens"];
  const rows = report.by_tenant.map((t) => el("tr", { dataset: { tenant: t.tenant } },
    el("th", { scope: "row" }, t.name || "(revoked)"), el("td", {}, el("code", {}, t.tenant)),
    ...cols.map((c) => el("td", { class: "num", dataset: { col: c } }, t[c].toLocaleString("en-US")))));
  $("usage").tBodies[0].replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: 8 }, "No requests in this period."))]));
}

async function loadModels() {
  const days = parseInt($("days").value, 10);
  const [list, stats, usage] = await Promise.all([
    call(state.key, "GET", `/v1/admin/models/versions?days=${days}`),
    call(state.key, "GET", `/v1/admin/feedback/stats?days=${days}`),
    call(state.key, "GET", `/v1/admin/usage?days=${days}`),
  ]);
  renderVersions(list);
  renderCharts(stats, days);
  renderUsage(usage);
  state.modelsAt = Date.now();
}

async function modelAction(question, method, path, body, done) {
  if (!window.confirm(question)) return;
  show("models-error", "");
  $("models-status").textContent = "Working…";
  try {
    const aliases = await call(state.key, method, path, body);
    $("models-status").textContent = done(aliases);
    await loadModels();
  } catch (err) {
    $("models-status").textContent = "";
    show("models-error", describe(err));
  }
}

const was = (aliases) => (aliases.previous_champion ? ` (was v${aliases.previous_champion})` : "");

function promote(model, version) {
  return modelAction(`Promote ${model} v${version} to champion? Serving switches to it.`, "POST",
    "/v1/admin/models/promote", { version, reason: "operator console" },
    (a) => `Promoted: champion is now v${a.champion}${was(a)}.`);
}

// ---- pipeline runs ----------------------------------------------------------------------------------------

function stepRow(step) {
  const progress = Math.max(0, Math.min(1, step.progress || 0));
  return el("tr", { dataset: { step: step.name } },
    el("th", { scope: "row" }, step.name),
    el("td", {}, el("span", { class: `badge status-${step.status}` }, step.status)),
    el("td", {}, el("progress", { max: 1, value: progress, "aria-label": `${step.name} progress` }),
      ` ${Math.round(100 * progress)}%`),
    el("td", { class: "detail" }, step.detail || ""),
    el("td", {}, mlflowLink(step.mlflow_run_id) || "—"));
}

function runCard(run) {
  const active = ACTIVE.has(run.status);
  const head = el("div", { class: "run-head" },
    el("h3", {}, run.id),
    el("span", { class: `badge status-${run.status}` }, run.status),
    el("span", {}, `${run.trigger}, ${when(run.created_at)}`),
    mlflowLink(run.mlflow_run_id),
    active ? el("button", { type: "button", class: "cancel", onclick: () => cancelRun(run.id) },
      "Cancel", el("span", { class: "visually-hidden" }, ` run ${run.id}`)) : null);
  const notes = [
    run.reason ? el("p", {}, `Reason: ${run.reason}`) : null,
    run.outcome ? el("p", {}, `Outcome: ${run.outcome}`) : null,
    run.error ? el("p", { class: "error" }, `Error: ${run.error}`) : null,
  ];
  const steps = el("table", { class: "data steps" },
    el("caption", { class: "visually-hidden" }, `Steps of run ${run.id}`),
    el("thead", {}, el("tr", {},
      ["Step", "Status", "Progress", "Detail", "MLflow"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, run.steps.map(stepRow)));
  return el("article", { class: "run", dataset: { runId: run.id, status: run.status } }, head, notes,
    el("div", { class: "table-wrap" }, steps));
}

async function loadRuns() {
  const list = await call(state.key, "GET", `/v1/admin/pipelines/runs?limit=${RUNS_SHOWN}`);
  const runs = $("runs");
  const cards = list.data.map(runCard);
  runs.replaceChildren(...(cards.length ? cards : [el("p", { class: "help" }, "No runs yet.")]));
  // Poll quickly while a run moves, slowly otherwise.
  schedule(list.data.some((r) => ACTIVE.has(r.status)) ? 3000 : 15000);
}

function schedule(ms) {
  clearTimeout(state.timer);
  if (state.key) state.timer = setTimeout(() => refresh(Date.now() - state.modelsAt >= MODELS_EVERY_MS), ms);
}

async function startRun() {
  show("runs-error", "");
  $("runs-status").textContent = "Starting a run…";
  $("start-run").disabled = true;
  try {
    const reason = $("run-reason").value.trim();
    const run = await call(state.key, "POST", "/v1/admin/pipelines/runs", reason ? { reason } : {});
    $("runs-status").textContent = `Run ${run.id} started (${run.status}).`;
    $("run-reason").value = "";
  } catch (err) {
    $("runs-status").textContent = "";
    if (err instanceof ApiError && err.info.code === "pipeline_run_in_progress") {
      show("runs-error", `Not started: another run is in progress. ${describe(err)}`);
    } else {
      show("runs-error", `Not started: ${describe(err)}`);
    }
  } finally {
    $("start-run").disabled = false;
  }
  await loadRuns().catch((err) => show("runs-error", describe(err)));
}

async function cancelRun(runId) {
  show("runs-error", "");
  try {
    const run = await call(state.key, "POST", `/v1/admin/pipelines/runs/${encodeURIComponent(runId)}/cancel`);
    $("runs-status").textContent = `Run ${run.id}: ${run.status}.`;
  } catch (err) {
    show("runs-error", `Not cancelled: ${describe(err)}`);
  }
  await loadRuns().catch((err) => show("runs-error", describe(err)));
}

// ---- the page ---------------------------------------------------------------------------------------------

async function refresh(all = true) {
  try {
    await Promise.all([all ? loadModels() : null, loadRuns()]);
    show("console-error", "");
  } catch (err) {
    show("console-error", describe(err));
    schedule(15000);
  }
}

function signedIn(key, config) {
  state.key = key;
  state.config = config;
  $("console").hidden = false;
  refresh(true);
}

function signedOut() {
  clearTimeout(state.timer);
  state.key = null;
  $("console").hidden = true;
}

$("days").addEventListener("change", () => refresh(true));
$("refresh").addEventListener("click", () => refresh(true));
$("rollback").addEventListener("click", () => {
  const model = state.versions ? state.versions.model : "the policy";
  modelAction(`Roll ${model} back to the previous champion? Serving switches to it.`, "POST",
    "/v1/admin/models/rollback", undefined,
    (a) => `Rolled back: champion is now v${a.champion}${was(a)}.`);
});
$("run-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  startRun();
});
$("canary-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const version = $("canary-version").value.trim();
  const percent = parseInt($("canary-percent").value, 10);
  modelAction(`Send ${percent}% of chat traffic to v${version}?`, "PUT", "/v1/admin/models/canary",
    { version, percent, reason: "operator console" },
    (a) => (a.challenger ? `Canary: v${a.challenger} at ${a.canary_percent}%.` : "No canary."));
});
$("canary-clear").addEventListener("click", () => {
  modelAction("End the canary? All chat traffic goes to the champion.", "DELETE", "/v1/admin/models/canary",
    undefined, () => "Canary ended: the champion answers all chat traffic.");
});

setupSignIn({
  storageKey: STORAGE_KEY,
  check: (key) => call(key, "GET", "/v1/admin/console/config"),
  // An application key gets the API's 403 (operator_key_required): shown as it is, with what it means.
  explain: (err) => (err instanceof ApiError && err.status === 403
    ? `This key cannot open the console: it is not an operator key. ${describe(err)}` : describe(err)),
  onSignedIn: signedIn,
  onSignedOut: signedOut,
});
