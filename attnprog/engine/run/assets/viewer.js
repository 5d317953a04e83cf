/* The report's interactions: the grid's filters, the attention viewer (hover or pin a query
 * token; the head's attention, its program's, or their difference), the chosen head's section,
 * and the replacement charts. Data: the JSON in #attnprog-data (see attnprog/engine/run/viewer.py
 * for the matrices' layout). Inlined into report.html after chart.js. */

const PAGE = JSON.parse(document.getElementById("attnprog-data").textContent);
const COLOURS = {model: [31, 119, 180], program: [230, 110, 0]};
const TOP_KEYS = 3;

/* --- the matrices: one byte per causal cell, each row scaled to 255, decoded on first use --- */

const VIEW = PAGE.viewer;
const ROW_STARTS = [];  // per text: where it starts in a head's bytes
if (VIEW) {
  let start = 0;
  for (const text of VIEW.texts) {
    ROW_STARTS.push(start);
    start += text.tokens.length * (text.tokens.length + 1) / 2;
  }
}
const decoded = new Map();

function bytesOf(base64) {
  if (!decoded.has(base64)) {
    const binary = atob(base64);
    const bytes = new Uint8Array(binary.length);
    for (let k = 0; k < binary.length; k++) bytes[k] = binary.charCodeAt(k);
    decoded.set(base64, bytes);
  }
  return decoded.get(base64);
}

/* row ``query`` of text ``text``: the weights on keys 0..query, summing to 1 */
function attentionRow(base64, text, query) {
  const bytes = bytesOf(base64);
  const start = ROW_STARTS[text] + query * (query + 1) / 2;
  const row = Array.from(bytes.subarray(start, start + query + 1));
  const total = row.reduce((a, b) => a + b, 0) || 1;
  return row.map((q) => q / total);
}

/* --- the viewer's state and drawing --- */

const state = {head: null, text: 0, view: "model", query: null, pinned: null};
const viewer = document.getElementById("viewer");
const tokenBox = document.getElementById("tokens");
const rowInfo = document.getElementById("row-info");

function tokenText(index) {
  return VIEW.tokens[VIEW.texts[state.text].tokens[index]];
}

function drawTokens() {
  tokenBox.textContent = "";
  VIEW.texts[state.text].tokens.forEach((tokenIndex, position) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.dataset.tokenIndex = position;
    span.textContent = VIEW.tokens[tokenIndex];
    tokenBox.appendChild(span);
  });
}

function topKeys(weights) {
  return weights.map((w, k) => [w, k]).sort((a, b) => Math.abs(b[0]) - Math.abs(a[0])).slice(0, TOP_KEYS)
    .map(([w, k]) => `${JSON.stringify(tokenText(k))} (${k}) ${w.toFixed(3)}`).join(", ");
}

function rowIoU(model, program) {
  let low = 0, high = 0;
  model.forEach((m, k) => { low += Math.min(m, program[k]); high += Math.max(m, program[k]); });
  return high > 0 ? low / high : 0;
}

function shownWeights(model, program) {
  if (state.view === "model") return model;
  if (state.view === "program") return program;
  return program.map((p, k) => p - model[k]);
}

function keyColour(weight, scale) {
  const alpha = scale > 0 ? Math.abs(weight) / scale : 0;
  const [r, g, b] = state.view === "diff" ? (weight >= 0 ? COLOURS.program : COLOURS.model) : COLOURS[state.view];
  return `rgba(${r}, ${g}, ${b}, ${alpha.toFixed(3)})`;
}

function paint() {
  const spans = tokenBox.children;
  const query = state.pinned ?? state.query;
  viewer.dataset.query = query ?? "";
  if (query === null || query >= spans.length) {
    for (const span of spans) { span.style.backgroundColor = ""; span.className = "tok"; }
    rowInfo.textContent = "Hover a token (or click to pin one) to see where it attends.";
    return;
  }
  const head = VIEW.heads[state.head];
  const model = attentionRow(head.model, state.text, query);
  const program = attentionRow(VIEW.programs[head.program], state.text, query);
  const weights = shownWeights(model, program);
  const scale = Math.max(...weights.map(Math.abs));
  for (let k = 0; k < spans.length; k++) {
    const span = spans[k];
    span.className = "tok" + (k > query ? " after" : "") + (k === query ? " query" : "")
      + (k === state.pinned ? " pinned" : "") + (k <= query && Math.abs(weights[k]) > 0.6 * scale ? " strong" : "");
    span.style.backgroundColor = k <= query ? keyColour(weights[k], scale) : "";
    if (k <= query) span.dataset.weight = weights[k].toFixed(4); else delete span.dataset.weight;
  }
  rowInfo.innerHTML = "";
  rowInfo.append(`${state.head}, query ${query} ${JSON.stringify(tokenText(query))}`
    + (state.pinned !== null ? " (pinned)" : "") + ` \u00b7 row IoU ${rowIoU(model, program).toFixed(3)}`,
    document.createElement("br"), `head's top keys: ${topKeys(model)}`,
    document.createElement("br"), `program's top keys: ${topKeys(program)}`);
  rowInfo.dataset.iou = rowIoU(model, program).toFixed(4);
}

function setView(view) {
  state.view = view;
  viewer.dataset.view = view;
  for (const button of viewer.querySelectorAll("[data-view-button]")) {
    button.classList.toggle("on", button.dataset.viewButton === view);
  }
  paint();
}

function setText(text) {
  state.text = text;
  viewer.dataset.text = text;
  document.getElementById("text-select").value = String(text);
  const n = VIEW.texts[text].tokens.length;
  if (state.pinned !== null && state.pinned >= n) state.pinned = null;
  if (state.query !== null && state.query >= n) state.query = null;
  viewer.dataset.pinned = state.pinned ?? "";
  drawTokens();
  paint();
}

/* the chosen head: the viewer, its section and its grid cell; text and pinned token stay */
function selectHead(label) {
  if (!document.getElementById(label)) return false;
  state.head = label;
  for (const node of document.querySelectorAll(".head.on, .grid td.sel")) node.classList.remove("on", "sel");
  document.getElementById(label).classList.add("on");
  const cell = document.querySelector(`.grid td[data-head="${label}"]`);
  if (cell) cell.classList.add("sel");
  if (viewer && VIEW && VIEW.heads[label]) {
    viewer.dataset.head = label;
    document.getElementById("head-select").value = label;
    paint();
  }
  return true;
}

function openHead(label) {
  if (!selectHead(label)) return;
  history.replaceState(null, "", "#" + label);
  (viewer || document.getElementById(label)).scrollIntoView({block: "start"});
}

function setUpViewer() {
  tokenBox.addEventListener("mouseover", (event) => {
    const index = event.target.dataset && event.target.dataset.tokenIndex;
    if (index === undefined || state.pinned !== null) return;
    state.query = Number(index);
    paint();
  });
  tokenBox.addEventListener("click", (event) => {
    const index = event.target.dataset && event.target.dataset.tokenIndex;
    if (index === undefined) return;
    state.pinned = state.pinned === Number(index) ? null : Number(index);
    state.query = Number(index);
    viewer.dataset.pinned = state.pinned ?? "";
    paint();
  });
  document.getElementById("head-select").addEventListener("change", (event) => openHead(event.target.value));
  document.getElementById("text-select").addEventListener("change", (event) => setText(Number(event.target.value)));
  for (const button of viewer.querySelectorAll("[data-view-button]")) {
    button.addEventListener("click", () => setView(button.dataset.viewButton));
  }
  drawTokens();
  setView("model");
}

/* --- the grid's filters --- */

function filterGrid() {
  const type = document.getElementById("type-filter").value;
  const low = Number(document.getElementById("iou-min").value || 0);
  const high = Number(document.getElementById("iou-max").value || 1);
  const words = document.getElementById("grid-search").value.trim().toLowerCase();
  const cells = document.querySelectorAll(".grid td[data-head]");
  let shown = 0;
  for (const cell of cells) {
    const iou = Number(cell.dataset.iou);
    const about = `${cell.dataset.head} ${cell.dataset.type} ${cell.dataset.name}`.toLowerCase();
    const match = (!type || cell.dataset.type === type) && iou >= low && iou <= high
      && (!words || about.includes(words));
    cell.classList.toggle("off", !match);
    cell.dataset.match = match ? "1" : "0";
    shown += match;
  }
  document.getElementById("grid-count").textContent = `${shown} of ${cells.length} heads`;
}

function setUpGrid() {
  for (const id of ["type-filter", "iou-min", "iou-max", "grid-search"]) {
    document.getElementById(id).addEventListener("input", filterGrid);
  }
  filterGrid();
  document.addEventListener("click", (event) => {
    const cell = event.target.closest(".grid td[data-head]");
    const link = event.target.closest("a[href^='#L']");
    const label = cell ? cell.dataset.head : link && link.getAttribute("href").slice(1);
    if (label && document.getElementById(label)) {
      event.preventDefault();
      openHead(label);
    }
  });
}

function setUp() {
  if (document.getElementById("grid-filters")) setUpGrid();
  if (viewer && VIEW) setUpViewer();
  const first = document.querySelector(".head");
  const wanted = decodeURIComponent(location.hash.slice(1));
  if (!selectHead(wanted) && first) selectHead(first.id);
  const box = document.getElementById("replacement");
  if (box) for (const chart of PAGE.charts) drawChart(box, chart, PAGE.paper);
  // time to first render, for people and tests: milliseconds from navigation start to the
  // frame after the first screen was laid out
  requestAnimationFrame(() => setTimeout(() => {
    document.body.dataset.rendered = performance.now().toFixed(1);
  }, 0));
}

setUp();
