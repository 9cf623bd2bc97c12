// The dev inbox's pages: they read the JSON API and read it again whenever
// /api/v1/stream says something moved. Everything from an email is put in the
// page as text (textContent), never as markup.
"use strict";

const STATES = ["pending", "sent", "delivered", "opened", "clicked", "bounced", "complained", "failed"];

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}

function when(iso) {
  const date = new Date(iso);
  return isNaN(date) ? iso : date.toLocaleString();
}

function stateBadge(tracking) {
  const state = STATES.includes(tracking.state) ? tracking.state : "pending";
  let label = state;
  if (tracking.open_count > 1) label += ` ×${tracking.open_count}`;
  return el("span", label, `state state-${state}`);
}

function messageRows(tbody, messages) {
  tbody.replaceChildren();
  for (const message of messages) {
    const row = el("tr");
    row.dataset.emailId = message.email_id;
    row.append(el("td", message.to));
    const subject = el("td");
    const link = el("a", message.subject || "(no subject)");
    link.href = `/messages/${encodeURIComponent(message.email_id)}`;
    subject.append(link);
    row.append(subject);
    const group = el("td");
    if (message.group_id) {
      const groupLink = el("a", message.group_id);
      groupLink.href = `/groups/${encodeURIComponent(message.group_id)}`;
      group.append(groupLink);
    }
    row.append(group);
    const time = el("td");
    const stamp = el("time", when(message.captured_at));
    stamp.dateTime = message.captured_at;
    time.append(stamp);
    row.append(time);
    const tracking = el("td");
    tracking.append(stateBadge(message.tracking));
    row.append(tracking);
    tbody.append(row);
  }
}

// Calls `refresh` now and after every change the stream reports (one read at a time).
function live(refresh) {
  const indicator = document.getElementById("live");
  let running = false;
  let again = false;
  async function run() {
    if (running) { again = true; return; }
    running = true;
    try {
      do { again = false; await refresh(); } while (again);
    } finally {
      running = false;
    }
  }
  const stream = new EventSource("/api/v1/stream");
  stream.addEventListener("hello", () => { indicator.textContent = "live"; indicator.classList.add("on"); run(); });
  stream.addEventListener("change", run);
  stream.onerror = () => { indicator.textContent = "reconnecting"; indicator.classList.remove("on"); };
  run();
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function listPage() {
  const search = document.getElementById("search");
  const tbody = document.querySelector("#messages tbody");
  const count = document.getElementById("count");
  const empty = document.getElementById("empty");
  search.value = new URLSearchParams(location.search).get("query") || "";
  async function refresh() {
    const query = search.value.trim();
    const body = await getJSON(`/api/v1/messages?limit=200&query=${encodeURIComponent(query)}`);
    messageRows(tbody, body.messages);
    count.textContent = query
      ? `${body.total} email(s) matching “${query}”`
      : `${body.total} email(s) captured, newest first`;
    empty.hidden = body.total > 0 || query !== "";
  }
  let typing;
  search.addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(() => {
      const url = new URL(location.href);
      if (search.value.trim()) url.searchParams.set("query", search.value.trim());
      else url.searchParams.delete("query");
      history.replaceState(null, "", url);
      refresh();
    }, 150);
  });
  document.getElementById("clear").addEventListener("click", async () => {
    if (!confirm("Delete every captured email from the state directory?")) return;
    await fetch("/api/v1/messages", { method: "DELETE" });
    refresh();
  });
  live(refresh);
}

function messagePage() {
  const id = document.body.dataset.emailId;
  const api = `/api/v1/messages/${encodeURIComponent(id)}`;
  const frame = document.getElementById("html-frame");
  const toggle = document.getElementById("remote-images");
  const status = document.getElementById("event-status");
  toggle.addEventListener("change", () => {
    const base = `/messages/${encodeURIComponent(id)}/html`;
    frame.src = toggle.checked ? `${base}?images=remote` : base;
  });
  for (const button of document.querySelectorAll("button[data-event]")) {
    button.addEventListener("click", async () => {
      const type = button.dataset.event;
      const response = await fetch(`${api}/events`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ type }),
      });
      status.textContent = response.status === 202
        ? `${type} event queued; the record below moves once the relay applied it`
        : `${type} event refused (HTTP ${response.status})`;
    });
  }
  async function refresh() {
    const body = await getJSON(api);
    const badge = stateBadge(body.tracking);
    badge.id = "state";
    document.getElementById("state").replaceWith(badge);
    document.getElementById("record").textContent =
      body.record ? JSON.stringify(body.record, null, 2) : "(none yet)";
  }
  live(refresh);
}

const SERIES = [
  ["sent", "sends"],
  ["delivered", "deliveries"],
  ["opened", "opens"],
  ["clicked", "clicks"],
];

// Bars side by side in each time bucket: sends, deliveries, opens, clicks.
function drawChart(svg, times) {
  const NS = "http://www.w3.org/2000/svg";
  const width = 640, height = 220, left = 36, bottom = 24, top = 10, right = 10, buckets = 12;
  const all = SERIES.flatMap(([name]) => times[name].map((t) => Date.parse(t)));
  svg.replaceChildren();
  if (all.length === 0) return;
  const start = Math.min(...all);
  const span = Math.max(Math.max(...all) - start + 1, 10000);
  const counts = SERIES.map(([name]) => {
    const bins = new Array(buckets).fill(0);
    for (const t of times[name]) {
      bins[Math.min(buckets - 1, Math.floor(((Date.parse(t) - start) / span) * buckets))] += 1;
    }
    return bins;
  });
  const peak = Math.max(1, ...counts.flat());
  const slot = (width - left - right) / buckets;
  const bar = slot / (SERIES.length + 1);
  const y = (v) => height - bottom - (v * (height - bottom - top)) / peak;
  const add = (tag, attributes, text, parent = svg) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attributes)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    parent.append(node);
    return node;
  };
  add("line", { x1: left, y1: height - bottom, x2: width - right, y2: height - bottom, class: "axis" });
  add("line", { x1: left, y1: top, x2: left, y2: height - bottom, class: "axis" });
  add("text", { x: left - 4, y: top + 8, "text-anchor": "end", class: "axis-label" }, String(peak));
  add("text", { x: left - 4, y: height - bottom, "text-anchor": "end", class: "axis-label" }, "0");
  add("text", { x: left, y: height - 6, "text-anchor": "start", class: "axis-label" },
    new Date(start).toLocaleTimeString());
  add("text", { x: width - right, y: height - 6, "text-anchor": "end", class: "axis-label" },
    new Date(start + span).toLocaleTimeString());
  counts.forEach((bins, n) => {
    bins.forEach((value, i) => {
      if (value === 0) return;
      const rect = add("rect", {
        x: left + i * slot + (n + 0.5) * bar,
        y: y(value),
        width: bar,
        height: height - bottom - y(value),
        class: `bar series-${SERIES[n][0]}`,
      });
      add("title", {}, `${value} ${SERIES[n][1]}`, rect);
    });
  });
}

function groupPage() {
  const id = document.body.dataset.groupId;
  const tbody = document.querySelector("#messages tbody");
  const analytics = document.getElementById("analytics");
  const problem = document.getElementById("problem");
  const legend = document.getElementById("legend");
  for (const [name, title] of SERIES) legend.append(el("span", title, `key series-${name}`));
  async function refresh() {
    let body;
    try {
      body = await getJSON(`/api/v1/groups/${encodeURIComponent(id)}`);
    } catch (error) {
      problem.textContent = String(error.message);
      problem.hidden = false;
      return;
    }
    problem.hidden = true;
    analytics.replaceChildren();
    for (const [name, value] of Object.entries(body.analytics)) {
      if (name === "group_id") continue;
      const item = el("div");
      item.append(el("dt", name.replace("_", " ")), el("dd", String(value)));
      analytics.append(item);
    }
    messageRows(tbody, body.messages);
    drawChart(document.getElementById("chart"), body.times);
  }
  live(refresh);
}

const pages = { list: listPage, message: messagePage, group: groupPage };
(pages[document.body.dataset.page] || (() => {}))();
