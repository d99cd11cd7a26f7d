// Small line charts drawn as inline SVG: one line per model version over a range of days. Nothing is
// fetched for them; each line has its own colour and dash pattern, so colour is not the only cue.

const SVG = "http://www.w3.org/2000/svg";
const STYLES = [
  { color: "#1f5fbf", dash: "" },
  { color: "#b3261e", dash: "7 4" },
  { color: "#1b7a3a", dash: "2 3" },
  { color: "#7a3fb8", dash: "10 3 2 3" },
  { color: "#9a5200", dash: "4 2" },
  { color: "#00707a", dash: "1 2" },
];
const W = 640;
const H = 220;
const PAD = { left: 48, right: 14, top: 12, bottom: 30 };

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** The style a series gets, by its position among all series (stable across charts of one page). */
export function seriesStyle(i) {
  return STYLES[i % STYLES.length];
}

/** Every UTC day from `first` to `last` (YYYY-MM-DD strings), inclusive. */
export function dayRange(first, last) {
  const days = [];
  const d = new Date(`${first}T00:00:00Z`);
  const end = new Date(`${last}T00:00:00Z`);
  while (d <= end && days.length < 4000) {
    days.push(d.toISOString().slice(0, 10));
    d.setUTCDate(d.getUTCDate() + 1);
  }
  return days;
}

function niceMax(value) {
  if (value <= 0) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (step * power >= value) return step * power;
  return 10 * power;
}

/**
 * A <figure> with the chart and its legend.
 * @param {{id: string, title: string, days: string[],
 *   series: {name: string, style: {color: string, dash: string}, values: (number|null)[]}[],
 *   yMax?: number, format?: (v: number) => string}} spec
 */
export function lineChart({ id, title, days, series, yMax, format = String }) {
  const plotW = W - PAD.left - PAD.right;
  const plotH = H - PAD.top - PAD.bottom;
  const all = series.flatMap((s) => s.values.filter((v) => v !== null));
  const top = yMax ?? niceMax(Math.max(0, ...all));
  const x = (i) => PAD.left + (days.length > 1 ? (i * plotW) / (days.length - 1) : plotW / 2);
  const y = (v) => PAD.top + plotH * (1 - v / top);

  const summary = series.map((s) => {
    const last = [...s.values].reverse().find((v) => v !== null);
    return `${s.name}: ${last === undefined ? "no data" : `latest ${format(last)}`}`;
  }).join("; ");
  const root = svg("svg", {
    viewBox: `0 0 ${W} ${H}`, role: "img", "aria-labelledby": `${id}-t ${id}-d`, class: "chart",
  });
  root.append(svg("title", { id: `${id}-t` }, title), svg("desc", { id: `${id}-d` },
    `${days[0]} to ${days[days.length - 1]}. ${summary}.`));

  for (let t = 0; t <= 4; t++) {
    const v = (top * t) / 4;
    root.append(svg("line", { x1: PAD.left, x2: W - PAD.right, y1: y(v), y2: y(v), class: "grid" }));
    root.append(svg("text", { x: PAD.left - 6, y: y(v) + 4, "text-anchor": "end", class: "tick" }, format(v)));
  }
  const every = Math.max(1, Math.ceil(days.length / 6));
  days.forEach((day, i) => {
    if (i % every !== 0 && i !== days.length - 1) return;
    // The end labels lean inwards so that they stay inside the frame.
    let anchor = "middle";
    if (days.length > 1 && i === 0) anchor = "start";
    else if (days.length > 1 && i === days.length - 1) anchor = "end";
    root.append(svg("text", { x: x(i), y: H - 10, "text-anchor": anchor, class: "tick" }, day.slice(5)));
  });

  for (const s of series) {
    // A gap (null: nothing to show that day) breaks the line instead of drawing it down to zero.
    let run = [];
    const flush = () => {
      if (run.length > 1) {
        root.append(svg("polyline", { points: run.join(" "), fill: "none", stroke: s.style.color,
          "stroke-width": 2, "stroke-dasharray": s.style.dash }));
      }
      run = [];
    };
    s.values.forEach((v, i) => {
      if (v === null) return flush();
      run.push(`${x(i).toFixed(1)},${y(v).toFixed(1)}`);
      const dot = svg("circle", { cx: x(i), cy: y(v), r: 3, fill: s.style.color });
      dot.append(svg("title", {}, `${s.name}, ${days[i]}: ${format(v)}`));
      root.append(dot);
    });
    flush();
  }

  const legend = document.createElement("ul");
  legend.className = "legend";
  for (const s of series) {
    const item = document.createElement("li");
    const key = svg("svg", { viewBox: "0 0 28 10", width: 28, height: 10, "aria-hidden": "true" });
    key.append(svg("line", { x1: 0, x2: 28, y1: 5, y2: 5, stroke: s.style.color, "stroke-width": 2,
      "stroke-dasharray": s.style.dash }));
    item.append(key, ` ${s.name}`);
    legend.append(item);
  }
  const figure = document.createElement("figure");
  figure.className = "chart-figure";
  figure.id = id;
  const caption = document.createElement("figcaption");
  caption.textContent = title;
  figure.append(caption, root, legend);
  return figure;
}
