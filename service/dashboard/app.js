// bird dashboard: a single page over the bird REST API.
//
// Plain ES2020, no framework, no build step, nothing fetched from outside this origin: the
// charts are inline SVG drawn by the small helpers below. Routing is by location.hash:
//   #/jobs[?state=..&offset=..]   the jobs list (polled every 2 s)
//   #/jobs/<id>                   one job: header, live curves, groups, trials, events, checkpoints
//   #/new                         the submit form
//   #/datasets                    your datasets and the shared ones; upload one
//   #/datasets/<name>             one dataset: rows per split × class × group; delete
// The API key is asked for once, kept in localStorage and sent as "Authorization: Bearer <key>";
// any 401 forgets it and brings the key screen back with a message.
"use strict";

(() => {
  const KEY_STORAGE = "bird.apiKey";
  const POLL_MS = 2000;
  const PAGE_SIZE = 50;
  const STATES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const CANCELLABLE = new Set(["queued", "running"]);
  const METHODS = ["bird", "bkd", "fitnet", "at", "ad", "mfd", "none"];
  // BIRD's per-epoch gate statistics (train split): plotted on their own chart.
  const GATE_QUANTILES = [
    ["gate_min", "min"],
    ["gate_p10", "10th percentile"],
    ["gate_median", "median"],
    ["gate_p90", "90th percentile"],
    ["gate_max", "max"],
  ];
  const GATE_METRICS = new Set([
    ...GATE_QUANTILES.map(([name]) => name),
    "gate_mean",
    "gate_below_half",
    "phi_grad_norm",
  ]);
  const PALETTE = [
    "#2563eb",
    "#dc2626",
    "#059669",
    "#d97706",
    "#7c3aed",
    "#db2777",
    "#0891b2",
    "#4b5563",
    "#65a30d",
    "#9333ea",
  ];
  const SVG_NS = "http://www.w3.org/2000/svg";

  // ------------------------------------------------------------------------------------------
  // DOM helpers
  // ------------------------------------------------------------------------------------------

  // Append children (strings, nodes, arrays, null) to an element.
  function append(el, children) {
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.appendChild(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  // Set attributes; "on*" keys with function values become event listeners.
  function setAttrs(el, attrs) {
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on") && typeof value === "function") {
        el.addEventListener(name.slice(2), value);
      } else if (name === "value" && "value" in el) {
        el.value = value;
      } else if (name === "checked" && "checked" in el) {
        el.checked = Boolean(value);
      } else {
        el.setAttribute(name, value === true ? "" : String(value));
      }
    }
    return el;
  }

  // h("div", {class: "x"}, "text", child, ...) builds an HTML element.
  function h(tag, attrs, ...children) {
    return append(setAttrs(document.createElement(tag), attrs), children);
  }

  // svg("path", {d: ...}) builds an SVG element.
  function svg(tag, attrs, ...children) {
    return append(setAttrs(document.createElementNS(SVG_NS, tag), attrs), children);
  }

  // Replace el's children; like h(), null/false children are skipped (replaceChildren would
  // print them as "null").
  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, children);
  }

  const $ = (selector, root = document) => root.querySelector(selector);

  // ------------------------------------------------------------------------------------------
  // Formatting
  // ------------------------------------------------------------------------------------------

  const pad2 = (n) => String(n).padStart(2, "0");

  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    return (
      `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ` +
      `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`
    );
  }

  function fmtDuration(ms) {
    if (!Number.isFinite(ms) || ms < 0) return "—";
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${pad2(s % 60)}s`;
    return `${Math.floor(s / 3600)}h ${pad2(Math.floor((s % 3600) / 60))}m`;
  }

  function fmtNum(v, digits = 4) {
    if (v === null || v === undefined) return "—";
    if (typeof v !== "number") return String(v);
    if (!Number.isFinite(v)) return v > 0 ? "∞" : v < 0 ? "−∞" : "NaN";
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return String(Number(v.toFixed(digits)));
  }

  function fmtBytes(n) {
    if (!Number.isFinite(n)) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return `${i === 0 ? n : n.toFixed(1)} ${units[i]}`;
  }

  function badge(state) {
    return h("span", { class: `badge state-${state}`, "data-state": state }, state || "—");
  }

  function progressBar(progress, stage, attrs = {}) {
    const p = Math.max(0, Math.min(1, Number(progress) || 0));
    return h(
      "div",
      { class: "progress", "data-progress": p.toFixed(3), ...attrs },
      h(
        "div",
        { class: "progress-track" },
        h("div", { class: "progress-fill", style: `width:${(p * 100).toFixed(1)}%` }),
      ),
      h("span", { class: "progress-text" }, `${Math.round(p * 100)}%${stage ? ` · ${stage}` : ""}`),
    );
  }

  // ------------------------------------------------------------------------------------------
  // API access
  // ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(typeof detail === "string" ? detail : `HTTP ${status}`);
      this.status = status;
      this.detail = detail;
    }
  }

  class AuthError extends Error {}

  const getKey = () => localStorage.getItem(KEY_STORAGE);

  // One JSON request with the bearer key. 401 → forget the key, show the key screen, throw.
  async function api(path, { method = "GET", body } = {}) {
    const headers = { Accept: "application/json", Authorization: `Bearer ${getKey() || ""}` };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const res = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
    });
    if (res.status === 401) {
      signOut("The server rejected the API key (401 Unauthorized). Enter a valid key.");
      throw new AuthError("unauthorized");
    }
    let data = null;
    const text = await res.text();
    if (text) {
      try {
        data = JSON.parse(text);
      } catch {
        data = text;
      }
    }
    if (!res.ok) {
      const detail = data && typeof data === "object" && "detail" in data ? data.detail : data;
      throw new ApiError(res.status, detail || res.statusText);
    }
    return data;
  }

  // ------------------------------------------------------------------------------------------
  // Routing and polling
  // ------------------------------------------------------------------------------------------

  // Every route change bumps the token; async work of an older route checks it and stops.
  let routeToken = 0;
  const isCurrent = (token) => token === routeToken;

  // Run fn now and every POLL_MS until it returns false or the route changes. Calls never
  // overlap: the next one is scheduled when the previous one has finished.
  function poll(token, fn) {
    const tick = async () => {
      if (!isCurrent(token)) return;
      let again = true;
      if (document.hidden) {
        // Do not hammer the API from a background tab; look again later.
      } else {
        try {
          again = (await fn()) !== false;
          setBanner(null);
        } catch (err) {
          if (err instanceof AuthError) return;
          setBanner(`Could not refresh: ${err.message || err}. Retrying…`);
        }
      }
      if (again && isCurrent(token)) setTimeout(tick, POLL_MS);
    };
    tick();
  }

  function parseHash() {
    const raw = location.hash.replace(/^#/, "") || "/jobs";
    const [path, query = ""] = raw.split("?");
    return { parts: path.split("/").filter(Boolean), params: new URLSearchParams(query) };
  }

  function route() {
    routeToken += 1;
    const token = routeToken;
    if (!getKey()) {
      showKeyScreen(null);
      return;
    }
    $("#key-screen").hidden = true;
    $("#nav").hidden = false;
    const view = $("#view");
    view.hidden = false;
    view.replaceChildren();
    const { parts, params } = parseHash();
    document.querySelectorAll("#nav a").forEach((a) => a.classList.remove("active"));
    if (parts[0] === "new") {
      $("#nav-new").classList.add("active");
      renderNewJob(view, token);
    } else if (parts[0] === "datasets") {
      $("#nav-datasets").classList.add("active");
      if (parts[1]) renderDataset(view, token, decodeURIComponent(parts[1]));
      else renderDatasets(view, token);
    } else if (parts[0] === "jobs" && parts[1]) {
      $("#nav-jobs").classList.add("active");
      renderJob(view, token, parts[1]);
    } else {
      $("#nav-jobs").classList.add("active");
      renderJobs(view, token, params);
    }
  }

  // A one-line banner for transient trouble (API unreachable, ...); null hides it.
  function setBanner(message) {
    let el = $("#banner");
    if (!message) {
      if (el) el.remove();
      return;
    }
    if (!el) {
      el = h("div", { id: "banner", class: "banner", role: "status" });
      $("#view").prepend(el);
    }
    el.textContent = message;
  }

  // ------------------------------------------------------------------------------------------
  // Key screen
  // ------------------------------------------------------------------------------------------

  function showKeyScreen(message) {
    routeToken += 1; // stops every poller
    $("#view").hidden = true;
    $("#view").replaceChildren();
    $("#nav").hidden = true;
    $("#key-screen").hidden = false;
    const err = $("#key-error");
    err.hidden = !message;
    err.textContent = message || "";
    $("#key-input").value = "";
    $("#key-input").focus();
  }

  function signOut(message) {
    localStorage.removeItem(KEY_STORAGE);
    showKeyScreen(message);
  }

  async function onKeySubmit(event) {
    event.preventDefault();
    const key = $("#key-input").value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORAGE, key);
    const button = $("#key-submit");
    button.disabled = true;
    try {
      await api("/jobs?limit=1"); // check the key once before showing anything
      $("#key-error").hidden = true;
      if (!location.hash || location.hash === "#") {
        location.hash = "#/jobs"; // the hashchange routes
      } else {
        route();
      }
    } catch (err) {
      if (!(err instanceof AuthError)) {
        // Keep the key (the server may just be down) but say what happened.
        const el = $("#key-error");
        el.hidden = false;
        el.textContent = `Could not check the key: ${err.message || err}`;
      }
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Jobs list
  // ------------------------------------------------------------------------------------------

  function renderJobs(view, token, params) {
    const state = params.get("state") || "";
    const offset = Math.max(0, Number(params.get("offset")) || 0);
    const filter = h(
      "select",
      {
        id: "state-filter",
        "data-testid": "state-filter",
        onchange: (e) => {
          location.hash = e.target.value ? `#/jobs?state=${e.target.value}` : "#/jobs";
        },
      },
      h("option", { value: "" }, "all states"),
      STATES.map((s) => h("option", { value: s }, s)),
    );
    filter.value = state;
    const tbody = h("tbody");
    const pager = h("div", { class: "pager", id: "jobs-pager" });
    view.append(
      h(
        "section",
        { class: "card" },
        h(
          "div",
          { class: "card-head" },
          h("h1", {}, "Jobs"),
          h("label", { class: "inline" }, "State ", filter),
          h("a", { class: "button", href: "#/new", id: "new-job-link" }, "+ New job"),
        ),
        h(
          "table",
          { id: "jobs-table", "data-testid": "jobs-table", class: "table" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["id", "state", "method", "dataset", "progress", "created"].map((c) =>
                h("th", {}, c),
              ),
            ),
          ),
          tbody,
        ),
        pager,
      ),
    );

    poll(token, async () => {
      const query = new URLSearchParams({ limit: String(PAGE_SIZE), offset: String(offset) });
      if (state) query.set("state", state);
      const page = await api(`/jobs?${query}`);
      if (!isCurrent(token)) return false;
      const rows = (page.items || []).map((job) =>
        h(
          "tr",
          { "data-job-id": job.id, "data-state": job.state },
          h("td", {}, h("a", { class: "job-link", href: `#/jobs/${job.id}` }, `#${job.id}`)),
          h("td", {}, badge(job.state)),
          h("td", {}, job.method || "—"),
          h("td", { class: "mono ellipsis", title: job.dataset || "" }, job.dataset || "—"),
          h("td", {}, progressBar(job.progress, job.stage)),
          h("td", { class: "nowrap" }, fmtTime(job.created_at)),
        ),
      );
      if (!rows.length) {
        rows.push(
          h(
            "tr",
            { class: "empty" },
            h(
              "td",
              { colspan: 6 },
              state ? `No ${state} jobs.` : "No jobs yet. ",
              state ? null : h("a", { href: "#/new" }, "Submit one."),
            ),
          ),
        );
      }
      fill(tbody, rows);
      // Pagination: prev/next links within the current filter.
      const total = Number(page.total) || 0;
      const link = (off, text) => {
        const q = new URLSearchParams();
        if (state) q.set("state", state);
        if (off) q.set("offset", String(off));
        const qs = q.toString();
        return h("a", { href: `#/jobs${qs ? `?${qs}` : ""}` }, text);
      };
      fill(
        pager,
        h(
          "span",
          { class: "muted" },
          total ? `${offset + 1}–${Math.min(offset + PAGE_SIZE, total)} of ${total}` : "",
        ),
        offset > 0 ? link(Math.max(0, offset - PAGE_SIZE), "← newer") : null,
        offset + PAGE_SIZE < total ? link(offset + PAGE_SIZE, "older →") : null,
      );
      return true;
    });
  }

  // ------------------------------------------------------------------------------------------
  // Datasets: list, upload, describe, delete
  // ------------------------------------------------------------------------------------------

  const DATASET_NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

  function renderDatasets(view, token) {
    const tbody = h("tbody");
    const status = h("p", { id: "upload-status", "data-testid": "upload-status", role: "status" });
    const nameInput = h("input", {
      id: "upload-name",
      "data-testid": "upload-name",
      placeholder: "fmnist",
      pattern: DATASET_NAME.source,
      required: true,
    });
    const filesInput = h("input", {
      id: "upload-files",
      "data-testid": "upload-files",
      type: "file",
      multiple: true,
      required: true,
    });
    const form = h(
      "form",
      {
        id: "upload-form",
        class: "upload",
        onsubmit: (event) => onUpload(event, token, nameInput, filesInput, status),
      },
      h("label", { for: "upload-name" }, "Name "),
      nameInput,
      h("label", { for: "upload-files" }, " Files (manifest.json and the Parquet parts) "),
      filesInput,
      h(
        "button",
        { type: "submit", id: "upload-submit", "data-testid": "upload-submit" },
        "Upload",
      ),
    );
    view.append(
      h(
        "section",
        { class: "card" },
        h("div", { class: "card-head" }, h("h1", {}, "Datasets")),
        h(
          "p",
          { class: "muted" },
          "Jobs name yours datasets/<name> and the shared ones shared/datasets/<name>. ",
          "Another tenant never sees yours.",
        ),
        h(
          "table",
          { id: "datasets-table", "data-testid": "datasets-table", class: "table" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["dataset", "task", "classes × groups", "files", "size", "created"].map((c) =>
                h("th", {}, c),
              ),
            ),
          ),
          tbody,
        ),
      ),
      h(
        "section",
        { class: "card" },
        h("h2", {}, "Upload a dataset"),
        h(
          "p",
          { class: "muted" },
          "Select every file of a dataset directory (bird datasets prepare --out DIR). ",
          "The manifest is sent last, so the dataset appears only once complete.",
        ),
        form,
        status,
      ),
    );
    poll(token, async () => {
      const page = await api("/datasets");
      if (!isCurrent(token)) return false;
      const rows = (page.items || []).map((d) => {
        const info = d.description || {};
        return h(
          "tr",
          { "data-dataset": d.uri },
          h(
            "td",
            { class: "mono" },
            d.shared
              ? d.uri
              : h(
                  "a",
                  { class: "dataset-link", href: `#/datasets/${encodeURIComponent(d.name)}` },
                  d.uri,
                ),
          ),
          h("td", {}, info.task || "—"),
          h("td", {}, info.num_classes != null ? `${info.num_classes} × ${info.num_groups}` : "—"),
          h("td", {}, String(d.files)),
          h("td", { class: "nowrap" }, fmtBytes(d.size)),
          h("td", { class: "nowrap" }, fmtTime(d.created_at)),
        );
      });
      if (!rows.length) {
        rows.push(h("tr", { class: "empty" }, h("td", { colspan: 6 }, "No datasets yet.")));
      }
      fill(tbody, rows);
      return true;
    });
  }

  // POST /datasets, then PUT every file to its URL (the manifest last). The key goes only to
  // this origin: a presigned S3 URL carries its own signature.
  async function onUpload(event, token, nameInput, filesInput, status) {
    event.preventDefault();
    const name = nameInput.value.trim();
    const files = Array.from(filesInput.files || []);
    if (!DATASET_NAME.test(name)) {
      fill(
        status,
        "The name takes a-z, 0-9, '.', '_' and '-' (at most 63, starting with a letter or digit).",
      );
      status.className = "error";
      return;
    }
    const byPath = new Map(
      files.map((f) => [
        f.webkitRelativePath
          ? f.webkitRelativePath.split("/").slice(1).join("/") || f.name
          : f.name,
        f,
      ]),
    );
    if (!byPath.has("manifest.json")) {
      fill(status, "Select manifest.json too: a dataset exists once its manifest is uploaded.");
      status.className = "error";
      return;
    }
    status.className = "muted";
    fill(status, `Registering ${name}…`);
    try {
      const upload = await api("/datasets", {
        method: "POST",
        body: { name, files: Array.from(byPath, ([path, f]) => ({ path, size: f.size })) },
      });
      let done = 0;
      for (const item of upload.uploads) {
        const url = new URL(item.url, location.origin);
        const headers =
          url.origin === location.origin ? { Authorization: `Bearer ${getKey() || ""}` } : {};
        const res = await fetch(url.href, {
          method: item.method,
          headers,
          body: byPath.get(item.path),
        });
        if (!res.ok) throw new ApiError(res.status, `${item.path}: HTTP ${res.status}`);
        done += 1;
        if (isCurrent(token)) fill(status, `Uploaded ${done} of ${upload.uploads.length} files…`);
      }
      if (!isCurrent(token)) return;
      fill(status, `Uploaded ${upload.uri}.`);
      location.hash = `#/datasets/${encodeURIComponent(name)}`;
    } catch (err) {
      if (err instanceof AuthError) return;
      status.className = "error";
      fill(
        status,
        `Upload failed: ${describeDetail(err.detail !== undefined ? err.detail : err.message)}`,
      );
    }
  }

  function renderDataset(view, token, name) {
    const body = h("div", { id: "dataset-body", "data-testid": "dataset-body" }, "Loading…");
    const remove = h(
      "button",
      {
        id: "dataset-delete",
        "data-testid": "dataset-delete",
        class: "danger",
        onclick: async () => {
          if (!confirm(`Delete datasets/${name}? Jobs can no longer name it.`)) return;
          try {
            await api(`/datasets/${encodeURIComponent(name)}`, { method: "DELETE" });
            location.hash = "#/datasets";
          } catch (err) {
            if (!(err instanceof AuthError))
              fill(body, h("p", { class: "error" }, describeDetail(err.detail)));
          }
        },
      },
      "Delete",
    );
    view.append(
      h(
        "section",
        { class: "card" },
        h(
          "div",
          { class: "card-head" },
          h("h1", { class: "mono" }, `datasets/${name}`),
          h("a", { href: "#/datasets" }, "← all datasets"),
          remove,
        ),
        body,
      ),
    );
    (async () => {
      try {
        const d = await api(`/datasets/${encodeURIComponent(name)}`);
        if (!isCurrent(token)) return;
        fill(
          body,
          h(
            "p",
            { class: "muted" },
            `${d.name}: ${d.task}, ${d.rows} rows, ${d.num_classes} classes, ${d.num_groups} groups`,
          ),
          h("pre", { id: "dataset-table", "data-testid": "dataset-table", class: "mono" }, d.table),
        );
      } catch (err) {
        if (err instanceof AuthError || !isCurrent(token)) return;
        fill(
          body,
          h("p", { class: "error", "data-testid": "dataset-error" }, describeDetail(err.detail)),
        );
      }
    })();
  }

  // ------------------------------------------------------------------------------------------
  // Job page
  // ------------------------------------------------------------------------------------------

  // Metric series kept in memory and extended with every ?since= poll.
  function newMetricStore() {
    return {
      since: 0,
      seen: new Set(),
      series: new Map(),
      latest: {},
      groups: {},
      trialsSeen: new Set(),
    };
  }

  const seriesKey = (trial, split, name) =>
    `${trial === null || trial === undefined ? "" : trial}|${split}|${name}`;

  // Returns how many new points arrived.
  function ingestMetrics(store, resp) {
    let order = store.seen.size;
    let added = 0;
    for (const row of resp.series || []) {
      if (row.id !== undefined && row.id !== null) {
        if (store.seen.has(row.id)) continue;
        store.seen.add(row.id);
      }
      order += 1;
      const trial = row.trial === undefined ? null : row.trial;
      store.trialsSeen.add(trial);
      const key = seriesKey(trial, row.split, row.name);
      if (!store.series.has(key)) store.series.set(key, []);
      // x: the epoch when there is one, else the step, else arrival order.
      const x = row.epoch ?? row.step ?? order;
      store.series.get(key).push({ x, y: row.value === undefined ? null : row.value, order });
      added += 1;
    }
    for (const [split, values] of Object.entries(resp.latest || {})) {
      store.latest[split] = { ...(store.latest[split] || {}), ...values };
    }
    for (const [split, rows] of Object.entries(resp.groups || {})) {
      if (Array.isArray(rows) && rows.length) store.groups[split] = rows;
    }
    if (resp.next_since !== undefined && resp.next_since !== null) store.since = resp.next_since;
    return added;
  }

  // The points of one series, sorted by x, one point per x (the latest arrival wins).
  function seriesPoints(store, trial, split, name) {
    const raw = store.series.get(seriesKey(trial, split, name)) || [];
    const byX = new Map();
    for (const p of raw) byX.set(p.x, p);
    return [...byX.values()].sort((a, b) => a.x - b.x).map((p) => [p.x, p.y]);
  }

  function seriesNames(store, trial, split) {
    const prefix = `${trial === null ? "" : trial}|${split}|`;
    return [...store.series.keys()]
      .filter((k) => k.startsWith(prefix))
      .map((k) => k.slice(prefix.length));
  }

  // Per-group rows for a split: the latest group/<g>/<metric> points of the drawn trial's
  // series, else the server's summary (which may be of another trial).
  function groupRows(store, trial, split) {
    const rows = new Map();
    for (const name of seriesNames(store, trial, split)) {
      const m = /^group\/(.+)\/(count|accuracy|tpr|fpr)$/.exec(name);
      if (!m) continue;
      const pts = seriesPoints(store, trial, split, name);
      if (!pts.length) continue;
      if (!rows.has(m[1])) rows.set(m[1], { group: m[1] });
      rows.get(m[1])[m[2]] = pts[pts.length - 1][1];
    }
    if (!rows.size) return store.groups[split] || [];
    return [...rows.values()].sort((a, b) =>
      String(a.group).localeCompare(String(b.group), undefined, { numeric: true }),
    );
  }

  // Trials that no other trial beats on both axes: max AUROC (y), min Δ_mean-DEO (x).
  function paretoFront(points) {
    const sorted = points
      .filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y))
      .sort((a, b) => a.x - b.x || b.y - a.y);
    const front = [];
    let bestY = -Infinity;
    for (const p of sorted) {
      if (p.y > bestY) {
        front.push(p);
        bestY = p.y;
      }
    }
    return front;
  }

  // The best trial by the search's own objective (see service/spec.py ObjectiveSpec).
  function bestTrial(trials, spec) {
    const objective = (spec && spec.search && spec.search.objective) || {};
    const scored = trials.filter(
      (t) => Number.isFinite(t.metrics?.auroc) && Number.isFinite(t.metrics?.delta_mean_deo),
    );
    if (!scored.length) return null;
    const by = (score) => scored.reduce((best, t) => (score(t) > score(best) ? t : best));
    if ((objective.kind || "constrained") === "weighted") {
      const w = objective.fairness_weight ?? 1;
      return by((t) => t.metrics.auroc - w * t.metrics.delta_mean_deo);
    }
    const bound = objective.max_delta_mean_deo ?? 10;
    const ok = scored.filter((t) => t.metrics.delta_mean_deo <= bound);
    if (ok.length) return ok.reduce((best, t) => (t.metrics.auroc > best.metrics.auroc ? t : best));
    return by((t) => -t.metrics.delta_mean_deo); // nothing meets the bound: the fairest
  }

  function renderJob(view, token, jobId) {
    const ctx = {
      token,
      view,
      jobId,
      job: null,
      metrics: newMetricStore(),
      trials: [],
      checkpoints: [],
      trial: undefined, // which trial's curves are drawn (null: the run outside any search)
      trialChosen: false,
      finalDone: false,
    };
    const section = (id, title, ...body) =>
      h("section", { class: "card", id, "data-testid": id }, h("h2", {}, title), ...body);

    const header = h(
      "section",
      { class: "card", id: "job-header", "data-testid": "job-header" },
      h("p", { class: "muted" }, "Loading…"),
    );
    const summary = h("div", { id: "summary" });
    const trialPicker = h("div", { id: "trial-picker", class: "inline" });
    const valChart = h("div", { id: "chart-val", class: "chart", "data-testid": "chart-val" });
    const trainChart = h("div", {
      id: "chart-train",
      class: "chart",
      "data-testid": "chart-train",
    });
    // BIRD's gate sigmoid(φ) over epochs; shown only for jobs that report it.
    const gateChart = h("div", { id: "chart-gate", class: "chart", "data-testid": "chart-gate" });
    const gateFigure = h(
      "figure",
      { id: "gate-figure" },
      h("figcaption", {}, "BIRD's gate sigmoid(φ) per epoch: quantiles over the dimensions"),
      gateChart,
    );
    gateFigure.hidden = true;
    const groups = h("div", { id: "groups-body" });
    const trialsBody = h("div", { id: "trials-body" });
    const trialsSection = section("trials", "Search trials", trialsBody);
    trialsSection.hidden = true;
    const eventsBody = h("div", { id: "events-body" });
    const checkpointsBody = h("div", { id: "checkpoints", "data-testid": "checkpoints" });
    const spec = h(
      "details",
      { id: "job-spec" },
      h("summary", {}, "Job spec (JSON)"),
      h("pre", { class: "mono" }),
    );

    view.append(
      h("p", { class: "crumbs" }, h("a", { href: "#/jobs" }, "← all jobs")),
      header,
      section(
        "metrics",
        "Metrics",
        h("div", { class: "card-head" }, summary, trialPicker),
        h(
          "div",
          { class: "charts" },
          h(
            "figure",
            {},
            h("figcaption", {}, "Validation: AUROC and Δ_mean-DEO per epoch"),
            valChart,
          ),
          h("figure", {}, h("figcaption", {}, "Training loss parts per epoch"), trainChart),
          gateFigure,
        ),
      ),
      section("groups", "Per-group results (latest)", groups),
      trialsSection,
      section(
        "checkpoints-card",
        "Checkpoints",
        checkpointsBody,
        h("p", { id: "checkpoint-error", class: "error", hidden: true }),
      ),
      section("events", "Events", eventsBody),
      h("section", { class: "card" }, spec),
    );

    ctx.els = {
      header,
      summary,
      trialPicker,
      valChart,
      trainChart,
      gateChart,
      gateFigure,
      groups,
      trialsSection,
      trialsBody,
      eventsBody,
      checkpointsBody,
      spec,
    };

    poll(token, async () => {
      if ((await refreshJob(ctx)) === false) return false; // 404: nothing more to poll
      if (!isCurrent(token)) return false;
      if (TERMINAL.has(ctx.job.state)) {
        // One last full refresh after the job ended: everything it recorded is in by now.
        if (!ctx.finalDone) {
          ctx.finalDone = true;
          await refreshJob(ctx, true);
        }
        return false;
      }
      return true;
    });
  }

  async function refreshJob(ctx, drain = false) {
    const id = encodeURIComponent(ctx.jobId);
    let job;
    try {
      job = await api(`/jobs/${id}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 404) {
        // Nothing to show but the message: drop the empty sections below the header.
        for (const el of [...ctx.view.children]) {
          if (el !== ctx.els.header && !el.classList.contains("crumbs")) el.remove();
        }
        fill(
          ctx.els.header,
          h("h1", {}, `Job ${ctx.jobId}`),
          h(
            "p",
            { class: "error", id: "job-not-found" },
            "No such job (or it belongs to another tenant).",
          ),
        );
        return false;
      }
      throw err;
    }
    // Metrics incrementally; when draining, keep asking until nothing new comes.
    const metricsPages = async () => {
      for (let i = 0; i < (drain ? 50 : 1); i += 1) {
        const resp = await api(
          `/jobs/${id}/metrics?since=${encodeURIComponent(ctx.metrics.since)}`,
        );
        if (!ingestMetrics(ctx.metrics, resp)) break;
      }
    };
    const [, trials, events, checkpoints] = await Promise.all([
      metricsPages(),
      api(`/jobs/${id}/trials`),
      api(`/jobs/${id}/events`),
      api(`/jobs/${id}/checkpoints`),
    ]);
    if (!isCurrent(ctx.token)) return;
    ctx.job = job;
    ctx.trials = Array.isArray(trials) ? trials : trials?.items || [];
    ctx.checkpoints = Array.isArray(checkpoints) ? checkpoints : checkpoints?.items || [];
    drawHeader(ctx);
    chooseTrial(ctx);
    drawMetrics(ctx);
    drawGroups(ctx);
    drawTrials(ctx);
    drawEvents(ctx, Array.isArray(events) ? events : events?.items || []);
    drawCheckpoints(ctx);
    const pre = $("pre", ctx.els.spec);
    const specText = JSON.stringify(job.spec, null, 2);
    if (pre.textContent !== specText) pre.textContent = specText;
  }

  function drawHeader(ctx) {
    const job = ctx.job;
    const started = job.started_at ? new Date(job.started_at) : null;
    const ended = job.finished_at ? new Date(job.finished_at) : new Date();
    const done = TERMINAL.has(job.state);
    // Cancel asks for a second click within 4 s instead of confirm(): dialogs block the page.
    const confirming = ctx.cancelConfirmUntil > Date.now();
    const cancel = CANCELLABLE.has(job.state)
      ? h(
          "button",
          {
            id: "cancel-btn",
            "data-testid": "cancel-btn",
            class: "danger",
            onclick: () => onCancel(ctx),
          },
          confirming ? "Click again to cancel" : "Cancel job",
        )
      : null;
    const items = [
      ["state", badge(job.state), "job-state"],
      // A finished job keeps the stage it was in; say so rather than look busy.
      [
        "stage",
        !job.stage ? "—" : done ? h("span", { class: "muted" }, `${job.stage} (last)`) : job.stage,
        "job-stage",
      ],
      ["progress", progressBar(job.progress, done ? null : job.stage), "job-progress", "wide"],
      ["attempts", `${job.attempts} / ${job.max_attempts}`, "job-attempts"],
      ["method", job.method || job.spec?.method?.name || "—", "job-method"],
      [
        "dataset",
        h("span", { class: "mono" }, job.dataset || job.spec?.dataset?.uri || "—"),
        "job-dataset",
      ],
      ["created", fmtTime(job.created_at), "job-created"],
      ["started", fmtTime(job.started_at), "job-started"],
      ["finished", fmtTime(job.finished_at), "job-finished"],
      ["run time", started ? fmtDuration(ended - started) : "—", "job-runtime"],
    ];
    fill(
      ctx.els.header,
      h(
        "div",
        { class: "card-head" },
        h("h1", { id: "job-title" }, `Job #${job.id}`),
        h("div", { class: "job-actions" }, cancel),
      ),
      h(
        "dl",
        { class: "facts" },
        items.map(([label, value, id, cls]) =>
          h(
            "div",
            { class: cls || null },
            h("dt", {}, label),
            h("dd", { id, "data-testid": id }, value),
          ),
        ),
      ),
      job.cancel_requested && !done
        ? h("p", { class: "muted" }, "Cancellation requested; the worker is winding down.")
        : null,
      job.error
        ? h("p", { id: "job-error", "data-testid": "job-error", class: "error" }, job.error)
        : null,
    );
    // Let the test (and a person) see the job state in the document title too.
    document.title = `#${job.id} ${job.state} — bird`;
  }

  async function onCancel(ctx) {
    if (!(ctx.cancelConfirmUntil > Date.now())) {
      ctx.cancelConfirmUntil = Date.now() + 4000;
      drawHeader(ctx);
      setTimeout(() => isCurrent(ctx.token) && drawHeader(ctx), 4100);
      return;
    }
    ctx.cancelConfirmUntil = 0;
    const button = $("#cancel-btn");
    if (button) button.disabled = true;
    try {
      ctx.job = await api(`/jobs/${encodeURIComponent(ctx.jobId)}/cancel`, { method: "POST" });
    } catch (err) {
      if (err instanceof AuthError) return;
      setBanner(`Cancel failed: ${describeDetail(err.detail) || err.message}`);
    }
    if (isCurrent(ctx.token)) drawHeader(ctx);
  }

  // Which trial's curves to draw: the run outside any search when it has points, else the
  // best trial by the search objective, else the first trial seen. The user can pick another.
  function chooseTrial(ctx) {
    const seen = [...ctx.metrics.trialsSeen];
    const numbered = seen.filter((t) => t !== null).sort((a, b) => a - b);
    const best = bestTrial(ctx.trials, ctx.job.spec);
    if (!ctx.trialChosen) {
      if (seen.includes(null) || !seen.length) ctx.trial = null;
      else if (best && numbered.includes(best.trial_index)) ctx.trial = best.trial_index;
      else ctx.trial = numbered[0];
    }
    const options = [...(seen.includes(null) ? [null] : []), ...numbered];
    const picker = ctx.els.trialPicker;
    const signature = options.join(",") + (best ? `|${best.trial_index}` : "");
    if (options.length <= 1) {
      picker.replaceChildren();
      picker.dataset.signature = "";
      return;
    }
    if (picker.dataset.signature === signature) {
      $("select", picker).value = String(ctx.trial);
      return;
    }
    picker.dataset.signature = signature;
    const select = h(
      "select",
      {
        id: "trial-select",
        onchange: (e) => {
          ctx.trialChosen = true;
          ctx.trial = e.target.value === "null" ? null : Number(e.target.value);
          drawMetrics(ctx);
          drawGroups(ctx);
        },
      },
      options.map((t) =>
        h(
          "option",
          { value: String(t) },
          t === null ? "final run" : `trial ${t}${best && best.trial_index === t ? " (best)" : ""}`,
        ),
      ),
    );
    select.value = String(ctx.trial);
    fill(picker, h("label", {}, "Curves of ", select));
  }

  const VAL_SUMMARY = [
    ["auroc", "AUROC"],
    ["f1", "F1"],
    ["accuracy", "accuracy"],
    ["delta_mean_deo", "Δ_mean-DEO"],
    ["delta_max_deo", "Δ_max-DEO"],
  ];

  function drawMetrics(ctx) {
    const m = ctx.metrics;
    const trial = ctx.trial === undefined ? null : ctx.trial;
    // Latest val/test summary (from the server's "latest", which covers every split).
    const splits = ["val", "test"].filter((s) => m.latest[s] && Object.keys(m.latest[s]).length);
    fill(
      ctx.els.summary,
      splits.length
        ? h(
            "table",
            { class: "table compact", id: "latest-table" },
            h(
              "thead",
              {},
              h(
                "tr",
                {},
                h("th", {}, "latest"),
                VAL_SUMMARY.map(([, label]) => h("th", {}, label)),
              ),
            ),
            h(
              "tbody",
              {},
              splits.map((s) =>
                h(
                  "tr",
                  { "data-split": s },
                  h("th", {}, s),
                  VAL_SUMMARY.map(([name]) =>
                    h("td", { "data-metric": name }, fmtNum(m.latest[s][name])),
                  ),
                ),
              ),
            ),
          )
        : h("p", { class: "muted" }, "No metrics yet."),
    );

    const auroc = seriesPoints(m, trial, "val", "auroc");
    const deo = seriesPoints(m, trial, "val", "delta_mean_deo");
    fill(
      ctx.els.valChart,
      lineChart({
        id: "svg-val",
        xLabel: "epoch",
        leftLabel: "val AUROC",
        rightLabel: "val Δ_mean-DEO",
        series: [
          {
            name: "auroc",
            label: "AUROC (left axis)",
            color: PALETTE[0],
            axis: "left",
            points: auroc,
          },
          {
            name: "delta_mean_deo",
            label: "Δ_mean-DEO (right axis, lower is fairer)",
            color: PALETTE[1],
            axis: "right",
            points: deo,
            dashed: true,
          },
        ],
      }),
    );

    // Every train loss part, "loss" (the total) first; the gate's statistics have their chart.
    const names = seriesNames(m, trial, "train")
      .filter((n) => !n.startsWith("group/") && !GATE_METRICS.has(n))
      .sort((a, b) => (a === "loss" ? -1 : b === "loss" ? 1 : a.localeCompare(b)));
    fill(
      ctx.els.trainChart,
      lineChart({
        id: "svg-train",
        xLabel: "epoch",
        leftLabel: "loss",
        series: names.map((name, i) => ({
          name,
          label: name,
          color: PALETTE[i % PALETTE.length],
          axis: "left",
          points: seriesPoints(m, trial, "train", name),
        })),
      }),
    );
    drawGate(ctx, m, trial);
  }

  // The gate's quantiles on the left axis (0 to 1), dimensions below 0.5 on the right.
  function drawGate(ctx, m, trial) {
    const quantiles = GATE_QUANTILES.map(([name, label], i) => ({
      name,
      label,
      color: PALETTE[i % PALETTE.length],
      axis: "left",
      points: seriesPoints(m, trial, "train", name),
    }));
    const below = {
      name: "gate_below_half",
      label: "dimensions below 0.5 (right axis)",
      color: PALETTE[GATE_QUANTILES.length % PALETTE.length],
      axis: "right",
      points: seriesPoints(m, trial, "train", "gate_below_half"),
      dashed: true,
    };
    const present = [...quantiles, below].filter((s) => s.points.length);
    ctx.els.gateFigure.hidden = present.length === 0;
    if (!present.length) return;
    fill(
      ctx.els.gateChart,
      lineChart({
        id: "svg-gate",
        xLabel: "epoch",
        leftLabel: "sigmoid(φ)",
        rightLabel: below.points.length ? "dimensions < 0.5" : undefined,
        leftDomain: [0, 1],
        series: present,
      }),
    );
  }

  function drawGroups(ctx) {
    const trial = ctx.trial === undefined ? null : ctx.trial;
    const blocks = [];
    for (const split of ["val", "test"]) {
      const rows = groupRows(ctx.metrics, trial, split);
      if (!rows.length) continue;
      blocks.push(
        h(
          "div",
          { class: "groups-split", "data-split": split, id: `groups-${split}` },
          h("h3", {}, split === "val" ? "validation" : "test"),
          h(
            "div",
            { class: "groups-grid" },
            h(
              "table",
              {
                class: "table compact groups-table",
                id: `groups-table-${split}`,
                "data-testid": `groups-table-${split}`,
              },
              h(
                "thead",
                {},
                h(
                  "tr",
                  {},
                  ["group", "count", "accuracy", "TPR", "FPR"].map((c) => h("th", {}, c)),
                ),
              ),
              h(
                "tbody",
                {},
                rows.map((r) =>
                  h(
                    "tr",
                    { "data-group": r.group },
                    h("td", {}, String(r.group)),
                    h("td", {}, fmtNum(r.count)),
                    h("td", {}, fmtNum(r.accuracy)),
                    h("td", {}, fmtNum(r.tpr)),
                    h("td", {}, fmtNum(r.fpr)),
                  ),
                ),
              ),
            ),
            h(
              "div",
              {
                class: "chart",
                id: `chart-groups-${split}`,
                "data-testid": `chart-groups-${split}`,
              },
              barChart({
                groups: rows.map((r) => String(r.group)),
                metrics: [
                  { name: "tpr", label: "TPR", color: PALETTE[0] },
                  { name: "accuracy", label: "accuracy", color: PALETTE[2] },
                ],
                values: Object.fromEntries(rows.map((r) => [String(r.group), r])),
              }),
            ),
          ),
        ),
      );
    }
    fill(
      ctx.els.groups,
      ...(blocks.length
        ? blocks
        : [
            h(
              "p",
              { class: "muted" },
              "No per-group results yet (they come with the first validation).",
            ),
          ]),
    );
  }

  function drawTrials(ctx) {
    const trials = ctx.trials;
    ctx.els.trialsSection.hidden = !trials.length;
    if (!trials.length) return;
    const best = bestTrial(trials, ctx.job.spec);
    const points = trials.map((t) => ({
      x: t.metrics?.delta_mean_deo,
      y: t.metrics?.auroc,
      trial: t.trial_index,
      state: t.state,
    }));
    const front = paretoFront(points);
    const onFront = new Set(front.map((p) => p.trial));
    const paramNames = [...new Set(trials.flatMap((t) => Object.keys(t.params || {})))].sort();
    fill(
      ctx.els.trialsBody,
      h(
        "div",
        { class: "groups-grid" },
        h(
          "div",
          { class: "chart", id: "chart-trials", "data-testid": "chart-trials" },
          scatterChart({ points, front, best: best ? best.trial_index : null }),
        ),
        h(
          "table",
          { class: "table compact", id: "trials-table" },
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              ["trial", "state", ...paramNames, "AUROC", "Δ_mean-DEO", ""].map((c) =>
                h("th", {}, c),
              ),
            ),
          ),
          h(
            "tbody",
            {},
            [...trials]
              .sort((a, b) => a.trial_index - b.trial_index)
              .map((t) =>
                h(
                  "tr",
                  {
                    "data-trial": t.trial_index,
                    class: best && best.trial_index === t.trial_index ? "best" : "",
                  },
                  h("td", {}, String(t.trial_index)),
                  h("td", {}, t.state),
                  paramNames.map((p) => h("td", {}, fmtNum(t.params?.[p], 3))),
                  h("td", {}, fmtNum(t.metrics?.auroc)),
                  h("td", {}, fmtNum(t.metrics?.delta_mean_deo)),
                  h(
                    "td",
                    {},
                    [
                      best && best.trial_index === t.trial_index ? "★ best " : "",
                      onFront.has(t.trial_index) ? "Pareto" : "",
                    ]
                      .join("")
                      .trim(),
                  ),
                ),
              ),
          ),
        ),
      ),
    );
  }

  function drawEvents(ctx, events) {
    fill(
      ctx.els.eventsBody,
      h(
        "table",
        { class: "table compact", id: "events-table", "data-testid": "events-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["at", "transition", "from → to", "message", "worker"].map((c) => h("th", {}, c)),
          ),
        ),
        h(
          "tbody",
          {},
          events.map((e) =>
            h(
              "tr",
              { "data-transition": e.transition },
              h("td", { class: "nowrap" }, fmtTime(e.at)),
              h("td", {}, e.transition),
              h(
                "td",
                { class: "nowrap" },
                e.from_state ? badge(e.from_state) : "·",
                " → ",
                badge(e.to_state),
              ),
              h("td", {}, e.message || ""),
              h("td", { class: "mono" }, e.worker || ""),
            ),
          ),
        ),
      ),
    );
  }

  function checkpointFileName(jobId, name) {
    const base = `job-${jobId}-${String(name).replace(/[^A-Za-z0-9._-]+/g, "_")}`;
    return base.endsWith(".tar") ? base : `${base}.tar`;
  }

  function drawCheckpoints(ctx) {
    const list = ctx.checkpoints;
    if (!list.length) {
      fill(
        ctx.els.checkpointsBody,
        h(
          "p",
          { class: "muted" },
          TERMINAL.has(ctx.job.state) ? "This job wrote no checkpoint." : "No checkpoint yet.",
        ),
      );
      return;
    }
    fill(
      ctx.els.checkpointsBody,
      h(
        "table",
        { class: "table compact", id: "checkpoints-table" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ["name", "size", "sha256", "created", ""].map((c) => h("th", {}, c)),
          ),
        ),
        h(
          "tbody",
          {},
          list.map((c) => {
            const url = new URL(c.url || "", location.href);
            const sameOrigin = url.origin === location.origin;
            const link = h(
              "a",
              {
                class: "download",
                "data-name": c.name,
                // Cross-origin (presigned S3) URLs carry their own credential: a plain link works.
                // Same-origin ones need the Authorization header, so the click handler fetches them.
                href: sameOrigin ? "#" : url.href,
                download: checkpointFileName(ctx.jobId, c.name),
                rel: "noopener",
                onclick: (e) => {
                  e.preventDefault();
                  downloadCheckpoint(ctx, c.name);
                },
              },
              "download",
            );
            return h(
              "tr",
              { "data-name": c.name },
              h("td", {}, c.name),
              h("td", { class: "nowrap" }, fmtBytes(c.size)),
              h(
                "td",
                { class: "mono", title: c.sha256 || "" },
                (c.sha256 || "").slice(0, 12) + "…",
              ),
              h("td", { class: "nowrap" }, fmtTime(c.created_at)),
              h("td", {}, link),
            );
          }),
        ),
      ),
    );
  }

  // Click a temporary <a download> (the way to save a Blob or start a plain download from JS).
  function clickLink(href, filename) {
    const a = h("a", { href, download: filename, rel: "noopener", style: "display:none" });
    document.body.appendChild(a);
    a.click();
    a.remove();
  }

  async function downloadCheckpoint(ctx, name) {
    const errorEl = $("#checkpoint-error");
    errorEl.hidden = true;
    const id = encodeURIComponent(ctx.jobId);
    try {
      // Presigned URLs expire: ask for a fresh one at click time (fall back to the one shown).
      let entry = ctx.checkpoints.find((c) => c.name === name);
      try {
        const fresh = await api(`/jobs/${id}/checkpoints`);
        entry =
          (Array.isArray(fresh) ? fresh : fresh?.items || []).find((c) => c.name === name) || entry;
      } catch (err) {
        if (err instanceof AuthError) return;
      }
      if (!entry || !entry.url) throw new Error(`checkpoint ${name} has no download URL`);
      const url = new URL(entry.url, location.href);
      const filename = checkpointFileName(ctx.jobId, name);
      if (url.origin !== location.origin) {
        clickLink(url.href, filename);
        return;
      }
      // Same origin (/files/..., /jobs/...): fetch with the key, save through a Blob URL.
      const res = await fetch(url.href, { headers: { Authorization: `Bearer ${getKey() || ""}` } });
      if (res.status === 401) {
        signOut("The server rejected the API key (401 Unauthorized). Enter a valid key.");
        return;
      }
      if (!res.ok) throw new Error(`HTTP ${res.status} ${res.statusText}`);
      const blobUrl = URL.createObjectURL(await res.blob());
      clickLink(blobUrl, filename);
      setTimeout(() => URL.revokeObjectURL(blobUrl), 60_000);
    } catch (err) {
      errorEl.hidden = false;
      errorEl.textContent = `Download of ${name} failed: ${err.message || err}`;
    }
  }

  // ------------------------------------------------------------------------------------------
  // Submit form
  // ------------------------------------------------------------------------------------------

  // Where a server error's loc (after "body") is shown: the form field it belongs to.
  const FIELD_FOR_LOC = [
    ["dataset", "f-dataset"],
    ["method", "f-method"],
    ["training.epochs", "f-epochs"],
    ["training.batch_size", "f-batch-size"],
    ["seed", "f-seed"],
    ["search.num_samples", "f-num-samples"],
    ["search", "f-search"],
  ];

  function describeDetail(detail) {
    if (!detail) return "";
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) return detail.map((d) => `${locText(d.loc)}: ${d.msg}`).join("; ");
    return JSON.stringify(detail);
  }

  function locText(loc) {
    const parts = (loc || []).filter((p, i) => !(i === 0 && p === "body"));
    return parts.length ? parts.join(".") : "spec";
  }

  function renderNewJob(view, token) {
    const field = (id, label, input, hint) =>
      h(
        "div",
        { class: "field", "data-field": id },
        h("label", { for: id }, label),
        input,
        hint ? h("small", { class: "muted" }, hint) : null,
        h("div", { class: "field-error", id: `${id}-error`, "data-for": id, role: "alert" }),
      );

    const searchBox = h("input", { id: "f-search", type: "checkbox", "data-testid": "f-search" });
    const samples = h("input", {
      id: "f-num-samples",
      type: "number",
      value: "4",
      step: "1",
      disabled: true,
    });
    searchBox.addEventListener("change", () => {
      samples.disabled = !searchBox.checked;
    });

    const form = h(
      "form",
      { id: "job-form", "data-testid": "job-form", novalidate: true },
      h(
        "div",
        { class: "form-grid" },
        field(
          "f-dataset",
          "Dataset URI",
          h("input", {
            id: "f-dataset",
            "data-testid": "f-dataset",
            type: "text",
            placeholder: "s3://bucket/datasets/fmnist-s or datasets/fmnist-s",
          }),
          "A prepared Parquet dataset (bird datasets prepare …).",
        ),
        field(
          "f-method",
          "Method",
          h(
            "select",
            { id: "f-method", "data-testid": "f-method" },
            METHODS.map((m) => h("option", { value: m }, m)),
          ),
        ),
        field(
          "f-epochs",
          "Epochs",
          h("input", {
            id: "f-epochs",
            "data-testid": "f-epochs",
            type: "number",
            value: "3",
            step: "1",
          }),
        ),
        field(
          "f-batch-size",
          "Batch size",
          h("input", { id: "f-batch-size", type: "number", value: "128", step: "1" }),
        ),
        field(
          "f-seed",
          "Seed",
          h("input", { id: "f-seed", type: "number", value: "0", step: "1" }),
        ),
        field(
          "f-search",
          "Hyper-parameter search",
          h("label", { class: "inline" }, searchBox, " run a search with ", samples, " trials"),
          "The default space tunes BIRD's φ learning rate and loss weights; for other methods paste a spec with a space.",
        ),
      ),
      h(
        "details",
        { id: "json-alt" },
        h("summary", {}, "…or paste a full spec (JSON)"),
        h(
          "p",
          { class: "muted" },
          "When this box is not empty it is sent as is and the fields above are ignored.",
        ),
        h("textarea", {
          id: "f-spec-json",
          "data-testid": "f-spec-json",
          rows: 12,
          spellcheck: "false",
          placeholder:
            '{"dataset": {"uri": "datasets/fmnist-s"}, "method": {"name": "bird", "options": {"phi_lr": 100}}}',
        }),
        h("div", { class: "field-error", id: "f-spec-json-error", "data-for": "f-spec-json" }),
        h(
          "button",
          {
            type: "button",
            id: "spec-from-form",
            class: "secondary",
            onclick: () => {
              $("#f-spec-json").value = JSON.stringify(specFromForm(), null, 2);
            },
          },
          "Fill from the fields above",
        ),
      ),
      h("div", {
        id: "form-errors",
        "data-testid": "form-errors",
        class: "error",
        role: "alert",
        hidden: true,
      }),
      h(
        "div",
        { class: "form-actions" },
        h(
          "button",
          { type: "submit", id: "submit-job", "data-testid": "submit-job" },
          "Submit job",
        ),
        h("span", { id: "submit-status", class: "muted" }),
      ),
    );
    form.addEventListener("submit", (e) => onSubmitJob(e, token));
    view.append(h("section", { class: "card" }, h("h1", {}, "New distillation job"), form));
    $("#f-dataset").focus();
  }

  // The JobSpec from the simple fields; empty numbers are left out (the server's defaults).
  function specFromForm() {
    const num = (id) => {
      const raw = $(`#${id}`).value.trim();
      return raw === "" ? undefined : Number(raw);
    };
    const spec = {
      dataset: { uri: $("#f-dataset").value.trim() },
      method: { name: $("#f-method").value },
      training: {},
    };
    const epochs = num("f-epochs");
    const batch = num("f-batch-size");
    const seed = num("f-seed");
    if (epochs !== undefined) spec.training.epochs = epochs;
    if (batch !== undefined) spec.training.batch_size = batch;
    if (seed !== undefined) spec.seed = seed;
    if ($("#f-search").checked) {
      spec.search = {};
      const n = num("f-num-samples");
      if (n !== undefined) spec.search.num_samples = n;
    }
    return spec;
  }

  function clearFormErrors() {
    document.querySelectorAll("#job-form .field-error").forEach((el) => (el.textContent = ""));
    document
      .querySelectorAll("#job-form .field.invalid")
      .forEach((el) => el.classList.remove("invalid"));
    const general = $("#form-errors");
    general.hidden = true;
    general.replaceChildren();
  }

  // Put each error next to its field when there is one, else in the general list.
  function showFormErrors(detail, fromJson) {
    const general = [];
    const items = Array.isArray(detail) ? detail : [{ loc: [], msg: describeDetail(detail) }];
    for (const item of items) {
      const path = locText(item.loc);
      const match = fromJson
        ? null
        : FIELD_FOR_LOC.find(([prefix]) => path === prefix || path.startsWith(`${prefix}.`));
      const target = match ? $(`#${match[1]}-error`) : null;
      if (target) {
        target.textContent = (target.textContent ? `${target.textContent} ` : "") + item.msg;
        target.closest(".field")?.classList.add("invalid");
      } else {
        general.push(h("li", { "data-loc": path }, h("code", {}, path), ": ", item.msg));
      }
    }
    const el = $("#form-errors");
    if (general.length) {
      fill(el, h("strong", {}, "The server rejected the spec:"), h("ul", {}, general));
      el.hidden = false;
    }
  }

  async function onSubmitJob(event, token) {
    event.preventDefault();
    clearFormErrors();
    const raw = $("#f-spec-json").value.trim();
    let spec;
    if (raw) {
      try {
        spec = JSON.parse(raw);
      } catch (err) {
        $("#f-spec-json-error").textContent = `Not valid JSON: ${err.message}`;
        return;
      }
    } else {
      spec = specFromForm();
    }
    const button = $("#submit-job");
    const status = $("#submit-status");
    button.disabled = true;
    status.textContent = "Submitting…";
    try {
      const job = await api("/jobs", { method: "POST", body: spec });
      if (!isCurrent(token)) return;
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (err instanceof AuthError || !isCurrent(token)) return;
      status.textContent = "";
      if (err instanceof ApiError) {
        showFormErrors(err.detail, Boolean(raw));
      } else {
        showFormErrors(`Could not reach the API: ${err.message || err}`, true);
      }
    } finally {
      button.disabled = false;
      if (status.textContent === "Submitting…") status.textContent = "";
    }
  }

  // ------------------------------------------------------------------------------------------
  // SVG charts
  // ------------------------------------------------------------------------------------------

  // About `count` round tick values covering [lo, hi].
  function niceTicks(lo, hi, count = 5) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count;
    const mag = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step)
      ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  // [min, max] of the finite values, widened a little (and made non-empty).
  function domain(values, { pad = 0.05, includeZero = false } = {}) {
    const finite = values.filter(Number.isFinite);
    if (!finite.length) return [0, 1];
    let lo = Math.min(...finite);
    let hi = Math.max(...finite);
    if (includeZero) {
      lo = Math.min(lo, 0);
      hi = Math.max(hi, 0);
    }
    if (lo === hi) {
      const d = lo === 0 ? 1 : Math.abs(lo) * 0.1;
      return [lo - d, hi + d];
    }
    const d = (hi - lo) * pad;
    return [lo - d, hi + d];
  }

  const scale =
    ([d0, d1], [r0, r1]) =>
    (v) =>
      r0 + ((v - d0) / (d1 - d0 || 1)) * (r1 - r0);

  function chartFrame(width, height, id, label) {
    return svg("svg", {
      id,
      class: "chart-svg",
      viewBox: `0 0 ${width} ${height}`,
      preserveAspectRatio: "xMidYMid meet",
      role: "img",
      "aria-label": label,
    });
  }

  function legend(items) {
    return h(
      "div",
      { class: "legend" },
      items.map((it) =>
        h(
          "span",
          { class: "legend-item", "data-series": it.name },
          h("i", { class: `swatch${it.dashed ? " dashed" : ""}`, style: `--c:${it.color}` }),
          it.label,
        ),
      ),
    );
  }

  function emptyChart(el, W, H, text) {
    el.append(
      svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty-text" }, text),
    );
    return el;
  }

  // Line chart with a left axis and an optional right axis; nulls (NaN) break the line.
  function lineChart({ id, series, xLabel, leftLabel, rightLabel, leftDomain }) {
    const W = 640;
    const H = 280;
    const M = { top: 14, right: rightLabel ? 64 : 20, bottom: 44, left: 64 };
    const root = chartFrame(
      W,
      H,
      id,
      `${leftLabel}${rightLabel ? ` and ${rightLabel}` : ""} by ${xLabel}`,
    );
    const wrap = h("div", { class: "chart-wrap" }, root);
    const all = series.flatMap((s) => s.points);
    if (!all.some(([, y]) => Number.isFinite(y))) {
      emptyChart(root, W, H, "waiting for the first epoch…");
      return wrap;
    }
    const xs = all.map(([x]) => x);
    let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
    if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
    const X = scale([x0, x1], [M.left, W - M.right]);
    const axes = {};
    for (const side of ["left", "right"]) {
      const ys = series.filter((s) => s.axis === side).flatMap((s) => s.points.map(([, y]) => y));
      if (!ys.length) continue;
      const dom = side === "left" && leftDomain ? leftDomain : domain(ys);
      axes[side] = { dom, Y: scale(dom, [H - M.bottom, M.top]) };
    }
    const g = svg("g", { class: "axes" });
    // x axis: integer ticks when the x values are integers (epochs).
    const intX = xs.every(Number.isInteger);
    const xticks = niceTicks(x0, x1, Math.min(8, Math.max(2, x1 - x0))).filter(
      (t) => !intX || Number.isInteger(t),
    );
    g.append(
      svg("line", {
        x1: M.left,
        x2: W - M.right,
        y1: H - M.bottom,
        y2: H - M.bottom,
        class: "axis",
      }),
    );
    for (const t of xticks) {
      g.append(
        svg("line", { x1: X(t), x2: X(t), y1: H - M.bottom, y2: H - M.bottom + 4, class: "axis" }),
        svg(
          "text",
          { x: X(t), y: H - M.bottom + 16, "text-anchor": "middle", class: "tick" },
          fmtNum(t, 3),
        ),
      );
    }
    g.append(
      svg(
        "text",
        { x: (M.left + W - M.right) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" },
        xLabel,
      ),
    );
    for (const [side, label] of [
      ["left", leftLabel],
      ["right", rightLabel],
    ]) {
      const ax = axes[side];
      if (!ax) continue;
      const xPos = side === "left" ? M.left : W - M.right;
      const color = series.find(
        (s) => s.axis === side && series.filter((q) => q.axis === side).length === 1,
      )?.color;
      g.append(svg("line", { x1: xPos, x2: xPos, y1: M.top, y2: H - M.bottom, class: "axis" }));
      for (const t of niceTicks(ax.dom[0], ax.dom[1], 5)) {
        const y = ax.Y(t);
        if (side === "left")
          g.append(svg("line", { x1: M.left, x2: W - M.right, y1: y, y2: y, class: "grid" }));
        g.append(
          svg(
            "text",
            {
              x: side === "left" ? xPos - 6 : xPos + 6,
              y: y + 4,
              "text-anchor": side === "left" ? "end" : "start",
              class: "tick",
              fill: color || null,
            },
            fmtNum(t, 3),
          ),
        );
      }
      const lx = side === "left" ? 14 : W - 10;
      g.append(
        svg(
          "text",
          {
            x: lx,
            y: (M.top + H - M.bottom) / 2,
            transform: `rotate(-90 ${lx} ${(M.top + H - M.bottom) / 2})`,
            "text-anchor": "middle",
            class: "axis-label",
            fill: color || null,
          },
          label,
        ),
      );
    }
    root.append(g);
    // One path per series; a null value starts a new segment.
    for (const s of series) {
      const ax = axes[s.axis];
      if (!ax) continue;
      let d = "";
      let pen = false;
      const dots = svg("g", { class: "points" });
      for (const [x, y] of s.points) {
        if (!Number.isFinite(y)) {
          pen = false;
          continue;
        }
        const px = X(x).toFixed(1);
        const py = ax.Y(y).toFixed(1);
        d += `${pen ? "L" : "M"}${px},${py} `;
        pen = true;
        dots.append(
          svg(
            "circle",
            { cx: px, cy: py, r: 3, class: "point", fill: s.color },
            svg("title", {}, `${s.name} @ ${xLabel} ${x}: ${fmtNum(y)}`),
          ),
        );
      }
      root.append(
        svg("path", {
          d: d.trim(),
          class: "series",
          "data-series": s.name,
          "data-points": String(s.points.filter(([, y]) => Number.isFinite(y)).length),
          stroke: s.color,
          "stroke-dasharray": s.dashed ? "6 4" : null,
          fill: "none",
        }),
        dots,
      );
    }
    wrap.append(legend(series));
    return wrap;
  }

  // Grouped bars: one cluster per group, one bar per metric, y from 0 to 1.
  function barChart({ groups, metrics, values }) {
    const W = 520;
    const H = 240;
    const M = { top: 12, right: 12, bottom: 40, left: 48 };
    const root = chartFrame(W, H, null, "per-group TPR and accuracy");
    const wrap = h("div", { class: "chart-wrap" }, root);
    const ys = groups
      .flatMap((g) => metrics.map((m) => values[g]?.[m.name]))
      .filter(Number.isFinite);
    const top = Math.max(1, ...ys);
    const Y = scale([0, top], [H - M.bottom, M.top]);
    const band = (W - M.left - M.right) / Math.max(1, groups.length);
    const barW = Math.min(36, (band * 0.7) / metrics.length);
    for (const t of niceTicks(0, top, 5)) {
      root.append(
        svg("line", { x1: M.left, x2: W - M.right, y1: Y(t), y2: Y(t), class: "grid" }),
        svg(
          "text",
          { x: M.left - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" },
          fmtNum(t, 2),
        ),
      );
    }
    root.append(svg("line", { x1: M.left, x2: W - M.right, y1: Y(0), y2: Y(0), class: "axis" }));
    groups.forEach((g, gi) => {
      const cx = M.left + band * (gi + 0.5);
      const startX = cx - (barW * metrics.length) / 2;
      metrics.forEach((m, mi) => {
        const v = values[g]?.[m.name];
        if (!Number.isFinite(v)) return;
        root.append(
          svg(
            "rect",
            {
              x: (startX + mi * barW).toFixed(1),
              y: Y(Math.max(0, v)).toFixed(1),
              width: (barW - 2).toFixed(1),
              height: Math.max(0, Y(0) - Y(Math.max(0, v))).toFixed(1),
              fill: m.color,
              class: "bar",
              "data-group": g,
              "data-metric": m.name,
            },
            svg("title", {}, `group ${g} ${m.label}: ${fmtNum(v)}`),
          ),
        );
      });
      root.append(
        svg(
          "text",
          { x: cx, y: H - M.bottom + 16, "text-anchor": "middle", class: "tick" },
          `group ${g}`,
        ),
      );
    });
    wrap.append(legend(metrics));
    return wrap;
  }

  // Trials: AUROC (y) against Δ_mean-DEO (x); the Pareto front ringed and connected.
  function scatterChart({ points, front, best }) {
    const W = 520;
    const H = 300;
    const M = { top: 14, right: 16, bottom: 44, left: 60 };
    const root = chartFrame(W, H, "svg-trials", "trials: AUROC against Δ_mean-DEO");
    const wrap = h("div", { class: "chart-wrap" }, root);
    const ok = points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y));
    if (!ok.length) {
      emptyChart(root, W, H, "no trial has finished yet");
      return wrap;
    }
    const xd = domain(
      ok.map((p) => p.x),
      { pad: 0.1 },
    );
    const yd = domain(
      ok.map((p) => p.y),
      { pad: 0.1 },
    );
    const X = scale(xd, [M.left, W - M.right]);
    const Y = scale(yd, [H - M.bottom, M.top]);
    for (const t of niceTicks(yd[0], yd[1], 5)) {
      root.append(
        svg("line", { x1: M.left, x2: W - M.right, y1: Y(t), y2: Y(t), class: "grid" }),
        svg(
          "text",
          { x: M.left - 6, y: Y(t) + 4, "text-anchor": "end", class: "tick" },
          fmtNum(t, 3),
        ),
      );
    }
    for (const t of niceTicks(xd[0], xd[1], 5)) {
      root.append(
        svg(
          "text",
          { x: X(t), y: H - M.bottom + 16, "text-anchor": "middle", class: "tick" },
          fmtNum(t, 3),
        ),
      );
    }
    root.append(
      svg("line", {
        x1: M.left,
        x2: W - M.right,
        y1: H - M.bottom,
        y2: H - M.bottom,
        class: "axis",
      }),
      svg("line", { x1: M.left, x2: M.left, y1: M.top, y2: H - M.bottom, class: "axis" }),
      svg(
        "text",
        { x: (M.left + W - M.right) / 2, y: H - 6, "text-anchor": "middle", class: "axis-label" },
        "Δ_mean-DEO (lower is fairer) →",
      ),
      svg(
        "text",
        {
          x: 14,
          y: (M.top + H - M.bottom) / 2,
          transform: `rotate(-90 14 ${(M.top + H - M.bottom) / 2})`,
          "text-anchor": "middle",
          class: "axis-label",
        },
        "AUROC (higher is better) →",
      ),
    );
    // The front as a line through its points, in order of Δ-DEO.
    if (front.length) {
      const d = front
        .map((p, i) => `${i ? "L" : "M"}${X(p.x).toFixed(1)},${Y(p.y).toFixed(1)}`)
        .join(" ");
      root.append(
        svg("path", {
          d,
          class: "pareto-front series",
          "data-series": "pareto",
          "data-points": String(front.length),
          fill: "none",
        }),
      );
    }
    const onFront = new Set(front.map((p) => p.trial));
    for (const p of ok) {
      const cx = X(p.x).toFixed(1);
      const cy = Y(p.y).toFixed(1);
      const cls = ["trial", onFront.has(p.trial) ? "pareto" : "", p.trial === best ? "best" : ""]
        .join(" ")
        .trim();
      root.append(
        svg(
          "circle",
          { cx, cy, r: onFront.has(p.trial) ? 7 : 5, class: cls, "data-trial": p.trial },
          svg(
            "title",
            {},
            `trial ${p.trial} (${p.state}): AUROC ${fmtNum(p.y)}, Δ_mean-DEO ${fmtNum(p.x)}${onFront.has(p.trial) ? " · Pareto" : ""}${p.trial === best ? " · best" : ""}`,
          ),
        ),
        svg(
          "text",
          { x: Number(cx) + 9, y: Number(cy) - 7, class: "point-label" },
          `${p.trial}${p.trial === best ? "★" : ""}`,
        ),
      );
    }
    wrap.append(
      legend([
        { name: "trial", label: "trial", color: "#94a3b8" },
        { name: "pareto", label: "Pareto front (max AUROC, min Δ-DEO)", color: "#dc2626" },
        { name: "best", label: "★ best by the search objective", color: "#d97706" },
      ]),
    );
    return wrap;
  }

  // ------------------------------------------------------------------------------------------
  // Start
  // ------------------------------------------------------------------------------------------

  $("#key-form").addEventListener("submit", onKeySubmit);
  $("#sign-out").addEventListener("click", (e) => {
    e.preventDefault();
    signOut("Signed out.");
  });
  window.addEventListener("hashchange", route);
  route();

  // Small hooks for tests and the curious: the pure helpers, no state.
  window.bird = { paretoFront, bestTrial, niceTicks };
})();
