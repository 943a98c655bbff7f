// The usage chart, drawn as SVG here (no chart library): tasks per day as bars on the
// left axis, credits per day as a line on the right one.

import { num, s } from "./dom.js";

const W = 960;
const H = 300;
const M = { top: 16, right: 60, bottom: 36, left: 52 };

/** A round axis maximum at or above `max`, and its tick step (4 steps). */
function scale(max) {
  if (max <= 0) return { top: 4, step: 1 };
  const raw = max / 4;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((v) => v >= raw);
  const rounded = Math.max(1, step);
  return { top: rounded * 4, step: rounded };
}

/**
 * days: ["2026-11-01", ...]; tasks and credits: numbers per day (same length).
 */
export function usageChart({ days, tasks, credits }) {
  const plotW = W - M.left - M.right;
  const plotH = H - M.top - M.bottom;
  const slot = plotW / Math.max(days.length, 1);
  const left = scale(Math.max(0, ...tasks));
  const right = scale(Math.max(0, ...credits));
  const y = (v, axis) => M.top + plotH - (v / axis.top) * plotH;
  const x = (i) => M.left + slot * i + slot / 2;
  const totalTasks = tasks.reduce((a, b) => a + b, 0);
  const totalCredits = credits.reduce((a, b) => a + b, 0);

  const svg = s("svg", {
    viewBox: `0 0 ${W} ${H}`,
    class: "chart",
    role: "img",
    "aria-label": `Tasks and credits per day, ${days[0]} to ${days[days.length - 1]}: ${num(totalTasks)} tasks, ${num(totalCredits)} credits`,
  });
  const grid = s("g", { class: "grid" });
  for (let i = 0; i <= 4; i++) {
    const gy = y(left.step * i, left);
    grid.append(
      s("line", { x1: M.left, x2: W - M.right, y1: gy, y2: gy }),
      s("text", { x: M.left - 8, y: gy + 4, "text-anchor": "end", class: "tick tasks-axis" }, num(left.step * i)),
      s("text", { x: W - M.right + 8, y: gy + 4, "text-anchor": "start", class: "tick credits-axis" }, num(right.step * i)),
    );
  }
  svg.append(grid);

  const bars = s("g", { class: "bars" });
  const barW = Math.max(2, Math.min(28, slot * 0.6));
  tasks.forEach((v, i) => {
    const top = y(v, left);
    bars.append(
      s("rect", { x: x(i) - barW / 2, y: top, width: barW, height: Math.max(0, M.top + plotH - top), rx: 2 }, s("title", {}, `${days[i]}: ${num(v)} tasks`)),
    );
  });
  svg.append(bars);

  const points = credits.map((v, i) => `${x(i).toFixed(1)},${y(v, right).toFixed(1)}`);
  const line = s("g", { class: "line" }, s("polyline", { points: points.join(" ") }));
  credits.forEach((v, i) => line.append(s("circle", { cx: x(i), cy: y(v, right), r: 3 }, s("title", {}, `${days[i]}: ${num(v)} credits`))));
  svg.append(line);

  const every = Math.ceil(days.length / 10);
  const labels = s("g", { class: "x-labels" });
  days.forEach((d, i) => {
    if (i % every === 0 || i === days.length - 1) {
      labels.append(s("text", { x: x(i), y: H - M.bottom + 18, "text-anchor": "middle", class: "tick" }, d.slice(5)));
    }
  });
  svg.append(
    labels,
    s("line", { class: "axis", x1: M.left, x2: W - M.right, y1: M.top + plotH, y2: M.top + plotH }),
    s("text", { x: 12, y: M.top + plotH / 2, class: "axis-title tasks-axis", transform: `rotate(-90 12 ${M.top + plotH / 2})`, "text-anchor": "middle" }, "tasks"),
    s("text", { x: W - 10, y: M.top + plotH / 2, class: "axis-title credits-axis", transform: `rotate(90 ${W - 10} ${M.top + plotH / 2})`, "text-anchor": "middle" }, "credits"),
  );
  return svg;
}
