/* The replacement charts: a metric against the share of heads replaced, one line per order and
 * condition, interval bands where the sweep measured them, hover a point for its figures.
 * Inline SVG, no library; inlined into report.html by attnprog/engine/run/report.py. */
"use strict";

const CHART = {width: 700, height: 330, left: 62, right: 16, top: 14, bottom: 40, linthresh: 10};
const CONDITION_COLOURS = {programs: "#1f77b4", uniform: "#d62728", random: "#9467bd",
                           zero: "#7f7f7f", mean: "#2ca02c"};
const ORDER_DASHES = {iou: "", IoU: "", cost: "7 4"};
const SVG_NS = "http://www.w3.org/2000/svg";

function svgElement(name, attributes, parent) {
  const node = document.createElementNS(SVG_NS, name);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

/* y scale: symmetric log for perplexity (controls reach thousands of %), linear otherwise */
function yTransform(metric) {
  if (metric !== "ppl_increase") return (v) => v;
  return (v) => Math.sign(v) * Math.log10(1 + Math.abs(v) / CHART.linthresh);
}

function yTicks(metric, low, high) {
  if (metric === "ppl_increase") {
    const ticks = [0];
    for (let t = CHART.linthresh; t <= Math.max(Math.abs(low), Math.abs(high)) * 1.001; t *= 10) {
      if (t <= high * 1.001) ticks.push(t);
      if (-t >= low * 1.001) ticks.push(-t);
    }
    return ticks;
  }
  const step = Math.pow(10, Math.floor(Math.log10((high - low) || 1))) / 2;
  const ticks = [];
  for (let t = Math.ceil(low / step) * step; t <= high + 1e-12; t += step) ticks.push(+t.toFixed(10));
  return ticks.length > 12 ? ticks.filter((_, k) => k % 2 === 0) : ticks;
}

function formatValue(metric, value) {
  if (value === null || value === undefined) return "-";
  return metric === "ppl_increase" ? (value >= 0 ? "+" : "") + value.toFixed(1) + " %" : value.toFixed(4);
}

function chartRange(chart, paper) {
  const values = [0];
  for (const s of chart.series) for (const p of s.points) values.push(p[1], p[2] ?? p[1], p[3] ?? p[1]);
  if (chart.metric === "ppl_increase") values.push(paper.ppl_increase);
  return [Math.min(...values), Math.max(...values)];
}

function drawAxes(svg, chart, x, y, low, high) {
  const {width, height, left, right, top, bottom} = CHART;
  for (const share of [0, 0.25, 0.5, 0.75, 1]) {
    svgElement("line", {x1: x(share), x2: x(share), y1: top, y2: height - bottom, stroke: "#eee"}, svg);
    svgElement("text", {x: x(share), y: height - bottom + 14, "text-anchor": "middle"}, svg)
      .textContent = `${share * 100} %`;
  }
  for (const tick of yTicks(chart.metric, low, high)) {
    svgElement("line", {x1: left, x2: width - right, y1: y(tick), y2: y(tick),
                        stroke: tick === 0 ? "#999" : "#eee"}, svg);
    svgElement("text", {x: left - 5, y: y(tick) + 4, "text-anchor": "end"}, svg)
      .textContent = chart.metric === "ppl_increase" ? `${tick} %` : String(tick);
  }
  svgElement("text", {x: (left + width - right) / 2, y: height - 6, "text-anchor": "middle"}, svg)
    .textContent = "heads replaced (share of the explained heads)";
  svgElement("text", {x: 12, y: top + (height - top - bottom) / 2, "text-anchor": "middle",
                      transform: `rotate(-90 12 ${top + (height - top - bottom) / 2})`}, svg)
    .textContent = chart.label;
}

function drawSeries(svg, chart, s, x, y, readout) {
  const colour = CONDITION_COLOURS[s.condition] || "#8c564b";
  const group = svgElement("g", {"data-order": s.order, "data-condition": s.condition}, svg);
  const banded = s.points.filter((p) => p[2] !== null && p[3] !== null);
  if (banded.length) {
    const edge = banded.map((p) => `${x(p[0])},${y(p[3])}`)
      .concat(banded.slice().reverse().map((p) => `${x(p[0])},${y(p[2])}`));
    svgElement("polygon", {points: edge.join(" "), fill: colour, "fill-opacity": 0.13, stroke: "none",
                           class: "band"}, group);
  }
  svgElement("polyline", {points: s.points.map((p) => `${x(p[0])},${y(p[1])}`).join(" "), fill: "none",
                          stroke: colour, "stroke-width": 2, "stroke-dasharray": ORDER_DASHES[s.order] ?? "2 3"},
             group);
  for (const p of s.points) {
    const [fraction, value, low, high, heads] = p;
    const interval = low === null ? "" : ` [${formatValue(chart.metric, low)} to ${formatValue(chart.metric, high)}]`;
    const text = `${s.condition}, ${s.order} order: ${(fraction * 100).toFixed(0)} % of heads ` +
                 `(${heads} head${heads === 1 ? "" : "s"}) replaced: ${formatValue(chart.metric, value)}${interval}`;
    const dot = svgElement("circle", {cx: x(fraction), cy: y(value), r: 4, fill: colour, class: "point",
                                      "data-fraction": fraction, "data-heads": heads, "data-value": value}, group);
    svgElement("title", {}, dot).textContent = text;
    dot.addEventListener("mouseenter", () => { readout.textContent = text; dot.setAttribute("r", 7); });
    dot.addEventListener("mouseleave", () => dot.setAttribute("r", 4));
  }
  return group;
}

function drawLegend(box, chart, groups) {
  const legend = document.createElement("ul");
  legend.className = "legend";
  chart.series.forEach((s, k) => {
    const item = document.createElement("li");
    const swatch = document.createElement("i");
    swatch.style.borderTopColor = CONDITION_COLOURS[s.condition] || "#8c564b";
    swatch.style.borderTopStyle = (ORDER_DASHES[s.order] ?? "2 3") ? "dashed" : "solid";
    item.append(swatch, `${s.condition} (${s.order} order)`);
    item.title = "click to hide or show";
    item.addEventListener("click", () => {
      item.classList.toggle("hidden");
      groups[k].style.display = item.classList.contains("hidden") ? "none" : "";
    });
    legend.appendChild(item);
  });
  box.appendChild(legend);
}

/* One chart into ``box``: {metric, label, series: [{order, condition, points: [[x, y, lo, hi, heads]]}]}. */
function drawChart(box, chart, paper) {
  const {width, height, left, right, top, bottom} = CHART;
  const [low, high] = chartRange(chart, paper);
  const t = yTransform(chart.metric);
  const span = (t(high) - t(low)) || 1;
  const x = (share) => left + share * (width - left - right);
  const y = (value) => top + (t(high) - t(value)) / span * (height - top - bottom);
  const wrapper = document.createElement("div");
  wrapper.className = "chart";
  wrapper.dataset.metric = chart.metric;
  const svg = svgElement("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
                                 "aria-label": `${chart.label} against heads replaced`});
  const readout = document.createElement("p");
  readout.className = "readout";
  readout.textContent = "hover a point for its figures";
  drawAxes(svg, chart, x, y, low, high);
  const groups = chart.series.map((s) => drawSeries(svg, chart, s, x, y, readout));
  if (chart.metric === "ppl_increase") {
    const star = svgElement("text", {x: x(paper.fraction), y: y(paper.ppl_increase) + 5, "text-anchor": "middle",
                                     "font-size": 16, class: "paper"}, svg);
    star.textContent = "\u2605";
    svgElement("title", {}, star).textContent =
      `the paper: +${paper.ppl_increase} % with ${paper.fraction * 100} % of heads replaced by programs`;
  }
  wrapper.appendChild(svg);
  drawLegend(wrapper, chart, groups);
  wrapper.appendChild(readout);
  box.appendChild(wrapper);
}
