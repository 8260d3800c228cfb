// The desk's page: every value from the server is set as text (textContent),
// never as HTML. Live updates come from /api/events (server-sent events).
"use strict";

const $ = (id) => document.getElementById(id);
let session = null;   // {role, name, csrf}
let current = null;   // the last status
let stream = null;
let historyOf = null; // the release id and state the history was read for

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function seconds(s) {
  if (s < 60) return s.toFixed(1) + " s";
  return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
}

function notice(text, bad) {
  $("notice").textContent = text;
  $("notice").className = bad ? "bad" : "";
}

async function api(method, path, body) {
  const headers = { "Content-Type": "application/json" };
  if (session && method !== "GET") headers["X-CSRF-Token"] = session.csrf;
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json().catch(() => null);
  return { ok: response.ok, status: response.status, data };
}

function renderClusters(status) {
  const box = $("clusters");
  box.replaceChildren();
  for (const cluster of status.clusters) {
    const card = el("div", null, "cluster");
    const title = el("h3", "cluster " + cluster.name);
    card.append(title);
    if (cluster.qa_url) {
      const link = el("a", cluster.qa_url);
      link.href = cluster.qa_url;
      link.rel = "noopener noreferrer";
      const qa = el("p", "QA: ");
      qa.append(link);
      card.append(qa);
    }
    const table = el("table");
    const head = el("tr");
    for (const name of ["member", "admission", "health", "in flight"]) {
      const th = el("th", name); th.scope = "col"; head.append(th);
    }
    const thead = el("thead");
    thead.append(head);
    table.append(thead);
    const body = el("tbody");
    for (const m of cluster.members) {
      const row = el("tr");
      row.append(el("td", m.name), el("td", m.admission, m.admission),
        el("td", m.healthy ? "up" : "down", m.healthy ? "up" : "down"), el("td", m.in_flight));
      body.append(row);
    }
    table.append(body);
    card.append(table);
    box.append(card);
  }
  $("balancer-error").hidden = !status.balancer_error;
  $("balancer-error").textContent = status.balancer_error ? "balancer: " + status.balancer_error : "";
}

function stepTime(step, now) {
  if (step.started && step.finished) return "took " + seconds(step.finished - step.started);
  if (step.started && step.state === "running") return "running for " + seconds(now - step.started);
  return "";
}

function renderRelease(status) {
  const release = status.release;
  const steps = $("steps");
  const operator = session && session.role === "operator";
  steps.replaceChildren();
  $("approved").replaceChildren();
  if (!release) {
    $("release-title").textContent = "none";
    $("qa").hidden = true;
  } else {
    const done = release.steps.filter((s) => s.state === "done").length;
    $("release-title").textContent = "#" + release.id + " " + release.kind + " of " + release.version +
      " (from " + (release.previous_version || "-") + "): " + release.state + ", " + done + "/" +
      release.steps.length + " steps done" + (release.error ? "; " + release.error : "");
    $("release-title").className = release.state;
    const cluster = status.clusters.find((c) => c.name === release.cluster_under_test);
    $("qa").hidden = !(cluster && cluster.qa_url);
    if (cluster && cluster.qa_url) {
      $("qa-cluster").textContent = cluster.name;
      $("qa-link").textContent = cluster.qa_url;
      $("qa-link").href = cluster.qa_url;
    }
    for (const line of release.approved) $("approved").append(el("li", line, "done"));
    for (const a of release.actions) {
      $("approved").append(el("li", new Date(a.at * 1000).toLocaleTimeString() + " " + a.message));
    }
    const now = Date.now() / 1000;
    for (const step of release.steps) {
      const item = el("li", null, step.state);
      item.append(el("span", step.state === "running" && release.state === "awaiting-approval"
        ? "waiting for you" : step.state, "state"));
      item.append(el("span", step.description));
      const time = el("span", stepTime(step, now), "time");
      time.dataset.started = step.started || "";
      time.dataset.running = step.state === "running" ? "1" : "";
      item.append(time);
      if (step.detail) item.append(el("div", step.detail, "time"));
      steps.append(item);
    }
  }
  $("approve").disabled = !(operator && release && release.state === "awaiting-approval");
  $("abort").disabled = !(operator && release);
  // A release that stopped (failed, interrupted, aborted) stays resumable, and
  // a rollback supersedes it; only one still running refuses it.
  const running = release && ["running", "awaiting-approval"].includes(release.state);
  $("rollback").disabled = !(operator && !running);
}

async function renderHistory(status) {
  const key = status.release ? status.release.id + status.release.state : "none";
  if (key === historyOf) return;
  historyOf = key;
  const answer = await api("GET", "/api/history?limit=10");
  if (!answer.ok) return;
  const body = $("history").tBodies[0];
  body.replaceChildren();
  for (const r of answer.data) {
    const row = el("tr");
    row.append(el("td", r.id), el("td", r.version), el("td", r.kind), el("td", r.state, r.state),
      el("td", new Date(r.started * 1000).toLocaleString()),
      el("td", r.finished ? seconds(r.finished - r.started) : "-"), el("td", r.user + "@" + r.host));
    body.append(row);
  }
}

function render(status) {
  current = status;
  $("site").textContent = "- " + status.site;
  renderClusters(status);
  renderRelease(status);
  renderHistory(status);
}

function tick() {
  const now = Date.now() / 1000;
  for (const node of document.querySelectorAll(".steps .time[data-running='1']")) {
    node.textContent = "running for " + seconds(now - Number(node.dataset.started));
  }
}

function connect() {
  if (stream) stream.close();
  stream = new EventSource("/api/events");
  stream.addEventListener("status", (event) => render(JSON.parse(event.data)));
  stream.onerror = () => notice("live updates interrupted; reconnecting...", true);
  stream.onopen = () => { if ($("notice").className === "bad") notice(""); };
}

function show(loggedIn) {
  $("login").hidden = loggedIn;
  $("desk").hidden = !loggedIn;
  $("who").hidden = !loggedIn;
  if (loggedIn) {
    $("whoami").textContent = session.name + " (" + session.role + ")";
    connect();
  } else if (stream) {
    stream.close();
  }
}

const ACTIONS = {
  approve: { path: "/api/approve", ask: (r) => "Approve release #" + r.id + " (" + r.version + ") to go on?" },
  abort: { path: "/api/abort", ask: (r) => "Abort release #" + r.id + " at its next safe point?" },
  rollback: { path: "/api/rollback", ask: () => "Roll the site back to the previous version?" },
};

async function act(name) {
  const action = ACTIONS[name];
  if (!window.confirm(action.ask(current && current.release ? current.release : {}))) return;
  const answer = await api("POST", action.path, { name: session.name });
  if (answer.ok) notice(answer.data.message, false);
  else notice((answer.data && answer.data.error) || "refused (" + answer.status + ")", true);
}

document.addEventListener("DOMContentLoaded", async () => {
  $("login").addEventListener("submit", async (event) => {
    event.preventDefault();
    const answer = await api("POST", "/api/login", { name: $("name").value, token: $("token").value });
    $("token").value = "";
    if (!answer.ok) { notice((answer.data && answer.data.error) || "login refused", true); return; }
    session = answer.data;
    show(true);
  });
  $("logout").addEventListener("click", async () => {
    await api("POST", "/api/logout");
    session = null;
    show(false);
  });
  for (const name of Object.keys(ACTIONS)) $(name).addEventListener("click", () => act(name));
  setInterval(tick, 1000);
  const answer = await api("GET", "/api/session");
  session = answer.ok ? answer.data : null;
  show(!!session);
});
