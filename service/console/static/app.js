// The Tuneworks console: a single-page app on the same /v1 API the openai SDK uses.
// Everything the API returns reaches the DOM as text (createTextNode / textContent), never as HTML.
"use strict";

(() => {
  const KEY = "tuneworks.api_key";
  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const signOutButton = document.getElementById("sign-out");
  let cleanups = [];

  // --- DOM ------------------------------------------------------------------------------------------------
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "class") el.className = value;
      else if (name === "value") el.value = value;
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function field(label, input, hint) {
    const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
    input.id = id;
    return h("div", { class: "field" }, h("label", { for: id }, label), input, hint ? h("small", {}, hint) : null);
  }

  function badge(status) {
    return h("span", { class: `badge s-${String(status).replace(/[^a-z_]/g, "")}` }, status);
  }

  function when(seconds) {
    if (!seconds) return "";
    return new Date(seconds * 1000).toLocaleString(undefined, { dateStyle: "short", timeStyle: "medium" });
  }

  function bytes(n) {
    if (n === null || n === undefined) return "";
    const units = ["B", "KB", "MB", "GB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
  }

  function num(v) {
    if (typeof v !== "number") return String(v);
    return Number.isInteger(v) ? String(v) : v.toFixed(4);
  }

  function notice(text, kind = "error") {
    return h("p", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, text);
  }

  function page(title, ...children) {
    document.title = `${title} · Tuneworks`;
    main.replaceChildren(h("h1", {}, title), ...children);
    main.focus({ preventScroll: true });
  }

  function table(headers, rows, empty) {
    if (!rows.length) return h("p", { class: "empty" }, empty);
    for (const row of rows.flat(Infinity)) {  // labels for the stacked layout of narrow windows
      if (row.classList.contains("detail")) continue;
      [...row.children].forEach((cell, i) => headers[i] && cell.setAttribute("data-label", headers[i]));
    }
    return h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, headers.map((t) => h("th", { scope: "col" }, t)))),
      h("tbody", {}, rows)));
  }

  function actionsCell(...children) {
    return h("td", {}, h("div", { class: "actions" }, children));
  }

  function onCleanup(fn) { cleanups.push(fn); }

  // --- the API ----------------------------------------------------------------------------------------------
  class ApiError extends Error {
    constructor(status, body) {
      const error = (body && body.error) || {};
      super(error.message || `HTTP ${status}`);
      this.status = status;
      this.param = error.param;
    }
  }

  function authHeaders(extra) {
    return { Authorization: `Bearer ${sessionStorage.getItem(KEY) || ""}`, ...(extra || {}) };
  }

  async function api(path, { method = "GET", body, signal, raw = false } = {}) {
    const init = { method, headers: authHeaders(), signal };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers["content-type"] = "application/json";
    }
    const response = await fetch(`/v1${path}`, init);
    if (response.status === 401) {
      signOut("The API refused this key; sign in again.");
      throw new ApiError(401, null);
    }
    if (raw && response.ok) return response;
    const type = response.headers.get("content-type") || "";
    const data = type.includes("json") ? await response.json() : await response.text();
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }

  async function* serverSentEvents(response) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const message = { event: "message", data: "", id: null };
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (name === "data") message.data += (message.data ? "\n" : "") + text;
          else if (name === "event") message.event = text;
          else if (name === "id") message.id = text;
        }
        if (message.data) yield message;
      }
    }
  }

  async function allModels() {
    return (await api("/models")).data;
  }

  // --- sign-in --------------------------------------------------------------------------------------------
  function signOut(message) {
    sessionStorage.removeItem(KEY);
    if (location.hash && location.hash !== "#/signin") history.replaceState(null, "", "#/signin");
    renderSignIn(message);
  }

  function renderSignIn(message) {
    nav.hidden = true;
    signOutButton.hidden = true;
    const input = h("input", { name: "api_key", type: "password", autocomplete: "off", required: true,
      spellcheck: "false", placeholder: "sk-…" });
    const status = h("div", { "aria-live": "polite" }, message ? notice(message) : null);
    const form = h("form", { class: "card narrow", onsubmit: async (event) => {
      event.preventDefault();
      sessionStorage.setItem(KEY, input.value.trim());
      try {
        await allModels();
      } catch (error) {
        if (!(error instanceof ApiError && error.status === 401)) status.replaceChildren(notice(error.message));
        return;
      }
      if (location.hash === "#/files") route();
      else location.hash = "#/files";  // the hashchange renders it
    } },
    field("API key", input, ["Create one with ", h("code", {}, "tuneworks keys create --project NAME"),
      ". It is kept for this tab only and sent to the API, nowhere else."]),
    h("button", { type: "submit" }, "Sign in"), status);
    page("Sign in", h("p", { class: "lead" }, "Fine-tune and compare models with your project's API key."), form);
    input.focus();
  }

  // --- files ------------------------------------------------------------------------------------------------
  function upload(file, purpose, onProgress) {
    return new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("POST", "/v1/files");
      xhr.setRequestHeader("Authorization", authHeaders().Authorization);
      xhr.upload.onprogress = (event) => event.lengthComputable && onProgress(event.loaded / event.total);
      xhr.onload = () => {
        let body = null;
        try { body = JSON.parse(xhr.responseText); } catch { body = null; }
        if (xhr.status >= 200 && xhr.status < 300) resolve(body);
        else reject(new ApiError(xhr.status, body));
      };
      xhr.onerror = () => reject(new Error("The upload failed (network)."));
      const form = new FormData();
      form.append("purpose", purpose);
      form.append("file", file, file.name);
      xhr.send(form);
    });
  }

  function report(file) {
    if (file.status === "error") {
      return h("div", { class: "report bad", role: "status" }, h("strong", {}, "Invalid: "), file.status_details || "");
    }
    return h("div", { class: "report good", role: "status" }, h("strong", {}, `${file.status}: `),
      file.status_details || "the file is valid.");
  }

  async function preview(file, into) {
    into.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      const response = await api(`/files/${encodeURIComponent(file.id)}/content`, { raw: true });
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let text = "";
      while (text.split("\n").length <= 6 && text.length < 64 * 1024) {
        const { value, done } = await reader.read();
        if (done) break;
        text += value;
      }
      reader.cancel().catch(() => {});
      const lines = text.split("\n").slice(0, 5);
      into.replaceChildren(h("ol", { class: "lines" }, lines.map((line) => h("li", {}, h("code", {}, line)))));
    } catch (error) {
      into.replaceChildren(notice(error.message));
    }
  }

  async function renderFiles() {
    const input = h("input", { type: "file", accept: ".jsonl,.json,.csv,.txt", class: "visually-hidden", tabindex: -1 });
    const purpose = h("select", { name: "purpose" }, ["fine-tune", "batch", "assistants", "user_data"].map(
      (p) => h("option", { value: p }, p)));
    const bar = h("progress", { max: 1, value: 0, hidden: true, "aria-label": "Upload progress" });
    const result = h("div", { "aria-live": "polite" });
    const list = h("div", {}, h("p", { class: "muted" }, "Loading…"));
    const drop = h("label", { class: "dropzone", tabindex: 0, role: "button",
      "aria-label": "Upload a file: press Enter to choose one, or drop it here" },
    h("strong", {}, "Drop a JSONL file here"), h("span", {}, " or press to choose one"), input);

    async function send(file) {
      bar.hidden = false;
      bar.value = 0;
      result.replaceChildren(h("p", { class: "muted" }, `Uploading ${file.name}…`));
      try {
        const created = await upload(file, purpose.value, (share) => { bar.value = share; });
        bar.value = 1;
        await refresh();
        result.replaceChildren(h("p", {}, h("code", {}, created.id), ` ${created.filename}`), report(created));
      } catch (error) {
        result.replaceChildren(notice(error.message));
      }
    }

    input.addEventListener("change", () => input.files[0] && send(input.files[0]));
    drop.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); input.click(); }
    });
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
    }
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      drop.classList.remove("over");
      const file = event.dataTransfer.files[0];
      if (file) send(file);
    });

    async function refresh() {
      const files = (await api("/files?limit=100&order=desc")).data;
      const rows = files.map((file) => {
        const more = h("div", { class: "preview" });
        const row = h("tr", { "data-file": file.id },
          h("td", {}, h("div", { class: "name" }, file.filename), h("code", { class: "id" }, file.id)),
          h("td", {}, file.purpose), h("td", { class: "num" }, bytes(file.bytes)), h("td", {}, badge(file.status)),
          h("td", {}, when(file.created_at)),
          actionsCell(
            h("button", { type: "button", class: "ghost", onclick: () => preview(file, more) }, "First lines"),
            h("button", { type: "button", class: "danger", onclick: async () => {
              if (!confirm(`Delete ${file.filename}?`)) return;
              try { await api(`/files/${encodeURIComponent(file.id)}`, { method: "DELETE" }); await refresh(); }
              catch (error) { more.replaceChildren(notice(error.message)); }
            } }, "Delete")));
        const detail = h("tr", { class: "detail" }, h("td", { colspan: 6 },
          file.status === "error" || file.status_details ? report(file) : null, more));
        return [row, detail];
      });
      list.replaceChildren(table(["File", "Purpose", "Size", "Status", "Created", ""], rows.flat(),
        "No files yet: upload a JSONL training file above."));
    }

    page("Files", h("section", { class: "card" }, h("h2", {}, "Upload"),
      h("div", { class: "row" }, field("Purpose", purpose)), drop, bar, result),
    h("section", { class: "card" }, h("h2", {}, "Your files"), list));
    refresh().catch((error) => list.replaceChildren(notice(error.message)));
  }

  // --- jobs -------------------------------------------------------------------------------------------------
  const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
  const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

  function jobActions(job, after) {
    const act = (verb) => async () => {
      try { await api(`/fine_tuning/jobs/${encodeURIComponent(job.id)}/${verb}`, { method: "POST" }); }
      catch (error) { alert(error.message); }
      try { await after(); } catch { /* the list shows its own errors */ }
    };
    return [
      ["queued", "running", "paused", "validating_files"].includes(job.status)
        ? h("button", { type: "button", class: "danger", onclick: act("cancel") }, "Cancel") : null,
      ["queued", "running"].includes(job.status)
        ? h("button", { type: "button", class: "ghost", onclick: act("pause") }, "Pause") : null,
      job.status === "paused" ? h("button", { type: "button", class: "ghost", onclick: act("resume") }, "Resume") : null,
    ];
  }

  function numberOrAuto(value) {
    const text = value.trim();
    if (!text || text === "auto") return undefined;
    const number = Number(text);
    return Number.isFinite(number) ? number : text;
  }

  async function createForm(onCreated) {
    const [models, files] = await Promise.all([allModels(), api("/files?purpose=fine-tune&limit=100")]);
    const usable = files.data.filter((f) => f.status === "processed");
    const options = (items, label, optional) => [
      optional ? h("option", { value: "" }, "(none)") : null,
      ...items.map((item) => h("option", { value: item.id }, label(item)))];
    // A base model, or a fine-tuned model or checkpoint of the project to continue training from.
    const model = h("select", { name: "model", required: true },
      options(models.filter((m) => m.owned_by === "system"), (m) => m.id),
      options(models.filter((m) => m.owned_by !== "system"), (m) => `${m.id} (continue)`));
    const training = h("select", { name: "training_file", required: true },
      options(usable, (f) => `${f.filename} (${f.id})`));
    const validation = h("select", { name: "validation_file" }, options(usable, (f) => `${f.filename} (${f.id})`, true));
    const method = h("select", { name: "method" }, h("option", { value: "supervised" }, "supervised"),
      h("option", { value: "dpo" }, "dpo (preference pairs)"));
    const inputs = {
      n_epochs: h("input", { name: "n_epochs", inputmode: "numeric", placeholder: "auto" }),
      batch_size: h("input", { name: "batch_size", inputmode: "numeric", placeholder: "auto" }),
      learning_rate_multiplier: h("input", { name: "learning_rate_multiplier", inputmode: "decimal", placeholder: "auto" }),
      suffix: h("input", { name: "suffix", maxlength: 64, pattern: "[A-Za-z0-9_\\-]+", placeholder: "e.g. support" }),
      seed: h("input", { name: "seed", type: "number", min: 0, placeholder: "random" }),
      rank: h("input", { name: "lora_rank", type: "number", min: 1, placeholder: "16" }),
      alpha: h("input", { name: "lora_alpha", type: "number", min: 1, placeholder: "32" }),
      dropout: h("input", { name: "lora_dropout", type: "number", min: 0, max: 1, step: "0.01", placeholder: "0.05" }),
      beta: h("input", { name: "beta", inputmode: "decimal", placeholder: "auto (0.1)" }),
      patience: h("input", { name: "early_stopping_patience", type: "number", min: 1, placeholder: "off" }),
      min_delta: h("input", { name: "early_stopping_min_delta", type: "number", min: 0, step: "any", placeholder: "0" }),
    };
    const status = h("div", { "aria-live": "polite" });
    const form = h("form", { class: "card", onsubmit: async (event) => {
      event.preventDefault();
      const hyper = {};
      for (const name of ["n_epochs", "batch_size", "learning_rate_multiplier"]) {
        const value = numberOrAuto(inputs[name].value);
        if (value !== undefined) hyper[name] = value;
      }
      if (method.value === "dpo") {
        const beta = numberOrAuto(inputs.beta.value);
        if (beta !== undefined) hyper.beta = beta;
      }
      const body = { model: model.value, training_file: training.value,
        method: { type: method.value, [method.value]: { hyperparameters: hyper } } };
      if (inputs.patience.value) {
        body.early_stopping = { patience: Number(inputs.patience.value) };
        if (inputs.min_delta.value) body.early_stopping.min_delta = Number(inputs.min_delta.value);
      }
      if (validation.value) body.validation_file = validation.value;
      if (inputs.suffix.value.trim()) body.suffix = inputs.suffix.value.trim();
      if (inputs.seed.value) body.seed = Number(inputs.seed.value);
      const lora = {};
      if (inputs.rank.value) lora.rank = Number(inputs.rank.value);
      if (inputs.alpha.value) lora.alpha = Number(inputs.alpha.value);
      if (inputs.dropout.value) lora.dropout = Number(inputs.dropout.value);
      if (Object.keys(lora).length) body.lora = lora;
      try {
        const job = await api("/fine_tuning/jobs", { method: "POST", body });
        onCreated(job);
      } catch (error) {
        status.replaceChildren(notice(error.param ? `${error.param}: ${error.message}` : error.message));
      }
    } },
    h("h2", {}, "New fine-tuning job"),
    h("div", { class: "grid" }, field("Base model", model), field("Training file", training),
      field("Validation file", validation), field("Method", method)),
    h("fieldset", {}, h("legend", {}, "Hyperparameters"), h("div", { class: "grid" },
      field("Epochs", inputs.n_epochs), field("Batch size", inputs.batch_size),
      field("Learning rate multiplier", inputs.learning_rate_multiplier), field("DPO beta", inputs.beta))),
    h("fieldset", {}, h("legend", {}, "Early stopping (needs a validation file)"), h("div", { class: "grid" },
      field("Patience (evaluations)", inputs.patience), field("Minimum improvement", inputs.min_delta))),
    h("fieldset", {}, h("legend", {}, "LoRA"), h("div", { class: "grid" },
      field("Rank", inputs.rank), field("Alpha", inputs.alpha), field("Dropout", inputs.dropout))),
    h("div", { class: "grid" }, field("Suffix", inputs.suffix, "Part of the model name"), field("Seed", inputs.seed)),
    usable.length ? null : notice("Upload a valid fine-tune file first.", "info"),
    h("button", { type: "submit" }, "Create job"), status);
    return form;
  }

  async function renderJobs() {
    const cursors = [null];
    const statusFilter = h("select", { name: "status" }, h("option", { value: "" }, "any status"),
      STATUSES.map((s) => h("option", { value: s }, s)));
    const metaKey = h("input", { name: "metadata_key", placeholder: "key" });
    const metaValue = h("input", { name: "metadata_value", placeholder: "value" });
    const list = h("div", {}, h("p", { class: "muted" }, "Loading…"));
    const pager = h("div", { class: "pager" });
    const creating = h("div");

    async function load() {
      const params = new URLSearchParams({ limit: "10" });
      const after = cursors[cursors.length - 1];
      if (after) params.set("after", after);
      if (metaKey.value.trim()) params.set(`metadata[${metaKey.value.trim()}]`, metaValue.value);
      const result = await api(`/fine_tuning/jobs?${params}`);
      const shown = result.data.filter((job) => !statusFilter.value || job.status === statusFilter.value);
      list.replaceChildren(table(["Job", "Model", "Status", "Created", "Fine-tuned model", ""],
        shown.map((job) => h("tr", { "data-job": job.id },
          h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
          h("td", {}, job.model), h("td", {}, badge(job.status)), h("td", {}, when(job.created_at)),
          h("td", {}, h("code", { class: "id" }, job.fine_tuned_model || "")),
          actionsCell(jobActions(job, load)))),
        statusFilter.value ? "No job with this status on this page." : "No jobs yet."));
      pager.replaceChildren(
        h("button", { type: "button", class: "ghost", disabled: cursors.length === 1,
          onclick: () => { cursors.pop(); reload(); } }, "← Newer"),
        h("span", { class: "muted" }, `Page ${cursors.length}`),
        h("button", { type: "button", class: "ghost", disabled: !result.has_more,
          onclick: () => { cursors.push(result.data[result.data.length - 1].id); reload(); } }, "Older →"));
    }

    function reload() {
      return load().catch((error) => list.replaceChildren(notice(error.message)));
    }

    const filters = h("form", { class: "filters", role: "search", onsubmit: (event) => {
      event.preventDefault();
      cursors.splice(1);
      reload();
    } }, field("Status", statusFilter), field("Metadata key", metaKey), field("Metadata value", metaValue),
    h("button", { type: "submit", class: "ghost" }, "Filter"));
    statusFilter.addEventListener("change", reload);

    const newButton = h("button", { type: "button", onclick: async () => {
      try {
        creating.replaceChildren(await createForm((job) => { location.hash = `#/jobs/${encodeURIComponent(job.id)}`; }));
        creating.querySelector("select").focus();
      } catch (error) { creating.replaceChildren(notice(error.message)); }
    } }, "New job");
    page("Fine-tuning jobs", h("div", { class: "toolbar" }, newButton), creating,
      h("section", { class: "card" }, filters, list, pager));
    load().catch((error) => list.replaceChildren(notice(error.message)));
    const timer = setInterval(() => load().catch(() => {}), 10000);
    onCleanup(() => clearInterval(timer));
  }

  // --- charts (uPlot) ---------------------------------------------------------------------------------------
  const COLORS = ["#3b5bdb", "#e8590c", "#2b8a3e", "#ae3ec9"];

  function chart(title, seriesNames, { yLabel = "", thresholds = [], xTime = false, colors = COLORS } = {}) {
    const holder = h("figure", { class: "chart", "data-points": "0" }, h("figcaption", {}, title));
    const data = [[], ...seriesNames.map(() => [])];
    const series = [{ label: xTime ? "time" : "step" }, ...seriesNames.map((name, i) => ({
      label: name, stroke: colors[i % colors.length], width: 2, spanGaps: true, points: { show: true, size: 5 },
    }))];
    let plot = null;
    const tick = (v) => (v !== 0 && Math.abs(v) < 0.01 ? v.toExponential(1) : String(+v.toPrecision(3)));
    const width = () => Math.max(260, holder.clientWidth - 8);
    const limit = thresholds.reduce((m, t) => Math.max(m, t.value), -Infinity);
    // Thresholds are dashed lines across the plot, drawn on its canvas (a series needs two points to show).
    function drawThresholds(u) {
      const { ctx, bbox } = u;
      for (const t of thresholds) {
        const y = u.valToPos(t.value, "y", true);
        ctx.save();
        ctx.strokeStyle = "#c92a2a";
        ctx.fillStyle = "#c92a2a";
        ctx.setLineDash([6, 4]);
        ctx.lineWidth = devicePixelRatio;
        ctx.beginPath();
        ctx.moveTo(bbox.left, y);
        ctx.lineTo(bbox.left + bbox.width, y);
        ctx.stroke();
        ctx.font = `${11 * devicePixelRatio}px system-ui, sans-serif`;
        ctx.textAlign = "right";
        ctx.fillText(`${t.label} ${t.value}`, bbox.left + bbox.width - 4, y - 4 * devicePixelRatio);
        ctx.restore();
      }
    }
    function options() {
      const x = { time: xTime };
      const y = {};
      if (thresholds.length) y.range = (u, min, max) => [Math.min(0, min), Math.max(max, limit) * 1.15];
      return { width: width(), height: 220, series, scales: { x, y },
        axes: [xTime ? {} : { incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000] },
          { label: yLabel, size: 64, values: (u, ticks) => ticks.map(tick) }],
        legend: { live: false }, hooks: { draw: [drawThresholds] } };
    }
    function draw() {
      const points = data.slice(1).reduce((n, s) => n + s.filter((v) => v !== null).length, 0);
      holder.setAttribute("data-points", String(points));
      if (!data[0].length) return;
      if (!plot) plot = new uPlot(options(), data, holder);
      else plot.setData(data);
      if (xTime) {  // a few points of a recent history: show at least the last ten minutes around them
        const last = data[0][data[0].length - 1];
        plot.setScale("x", { min: Math.min(data[0][0], last - 600), max: last + 60 });
      }
    }
    const resize = new ResizeObserver(() => plot && plot.setSize({ width: width(), height: 220 }));
    resize.observe(holder);
    onCleanup(() => { resize.disconnect(); if (plot) plot.destroy(); });
    return {
      el: holder,
      add(x, values) {
        const at = data[0].indexOf(x);
        if (at >= 0) { values.forEach((v, i) => { if (v !== null && v !== undefined) data[i + 1][at] = v; }); }
        else {
          data[0].push(x);
          values.forEach((v, i) => data[i + 1].push(v === undefined ? null : v));
        }
        draw();
      },
      set(xs, columns) { data[0] = xs; columns.forEach((c, i) => { data[i + 1] = c; }); draw(); },
      draw,
    };
  }

  function learningRates(job, total) {
    // The schedule of the trainer (README "Hyperparameters"): 1e-3 x multiplier, 3% linear warm-up, linear decay.
    const hyper = (job.method && job.method.supervised && job.method.supervised.hyperparameters) || job.hyperparameters || {};
    const multiplier = typeof hyper.learning_rate_multiplier === "number" ? hyper.learning_rate_multiplier : 1;
    if (!total) return null;
    const peak = 1e-3 * multiplier;
    const warm = Math.max(1, Math.ceil(total * 0.03));
    const xs = [];
    const ys = [];
    for (let step = 1; step <= total; step++) {
      xs.push(step);
      ys.push(step <= warm ? peak * step / warm : peak * Math.max(0, total - step) / Math.max(1, total - warm));
    }
    return [xs, ys];
  }

  // --- one job ----------------------------------------------------------------------------------------------
  async function renderJob(id) {
    const abort = new AbortController();
    onCleanup(() => abort.abort());
    const path = `/fine_tuning/jobs/${encodeURIComponent(id)}`;
    const head = h("div", { class: "card" });
    const progress = h("div", { class: "card progress-card" });
    const loss = chart("Loss", ["train_loss", "valid_loss", "full_valid_loss"], { yLabel: "loss" });
    const accuracy = chart("Token accuracy", ["train_mean_token_accuracy", "valid_mean_token_accuracy"], { yLabel: "accuracy" });
    const rate = chart("Learning rate (the trainer's schedule)", ["learning_rate"], { yLabel: "lr" });
    const events = h("ol", { class: "events", "aria-live": "polite", "aria-label": "Events, newest first" });
    const checkpoints = h("div");
    const evaluation = h("div");
    const results = h("div");
    let job = null;
    let lastStep = 0;
    let totalSteps = 0;
    let drawnRate = 0;

    function showProgress() {
      const bar = progress.querySelector("progress");
      const label = progress.querySelector(".step");
      if (!bar || !job) return;
      bar.value = job.status === "succeeded" ? 1 : totalSteps ? lastStep / totalSteps : 0;
      label.textContent = totalSteps ? `step ${lastStep} of ${totalSteps}` : job.status;
      if (totalSteps && drawnRate !== totalSteps) {
        const lr = learningRates(job, totalSteps);
        rate.set(lr[0], [lr[1]]);
        drawnRate = totalSteps;
      }
    }

    async function refreshJob() {
      job = await api(path, { signal: abort.signal });
      head.replaceChildren(
        h("div", { class: "job-head" }, badge(job.status), h("code", {}, job.id),
          h("div", { class: "actions" }, jobActions(job, () => refreshJob().catch(() => {})))),
        h("dl", { class: "meta" },
          h("dt", {}, "Base model"), h("dd", {}, job.model),
          h("dt", {}, "Fine-tuned model"), h("dd", {}, job.fine_tuned_model
            ? [h("code", {}, job.fine_tuned_model), " ", h("a", { href: playgroundLink(job.fine_tuned_model) }, "Open in playground")]
            : "—"),
          h("dt", {}, "Training file"), h("dd", {}, h("code", {}, job.training_file)),
          h("dt", {}, "Validation file"), h("dd", {}, job.validation_file ? h("code", {}, job.validation_file) : "—"),
          h("dt", {}, "Hyperparameters"), h("dd", {}, JSON.stringify(job.hyperparameters || {})),
          h("dt", {}, "Seed"), h("dd", {}, job.seed ?? "—"),
          h("dt", {}, "Created"), h("dd", {}, when(job.created_at)),
          job.error && job.error.message ? [h("dt", {}, "Error"), h("dd", { class: "bad" },
            `${job.error.code}: ${job.error.message}${job.error.param ? ` (${job.error.param})` : ""}`)] : null));
      let eta = "";
      if (job.estimated_finish && !FINISHED.has(job.status)) {
        const seconds = Math.max(0, Math.round(job.estimated_finish - Date.now() / 1000));
        eta = `ETA ${new Date(job.estimated_finish * 1000).toLocaleTimeString()} (in ${seconds} s)`;
      }
      progress.replaceChildren(h("label", { for: "job-progress" }, "Progress"),
        h("progress", { id: "job-progress", max: 1, value: 0 }),
        h("span", { class: "muted" }, h("span", { class: "step" }), eta ? ` · ${eta}` : "",
          job.trained_tokens ? ` · ${job.trained_tokens} tokens trained` : ""));
      showProgress();
      if (FINISHED.has(job.status)) await finished();
    }

    async function finished() {
      const list = (await api(`${path}/checkpoints?limit=100`, { signal: abort.signal })).data;
      checkpoints.replaceChildren(table(["Step", "Model", "Metrics", ""], list.map((c) => h("tr", {},
        h("td", { class: "num" }, c.step_number), h("td", {}, h("code", { class: "id" }, c.fine_tuned_model_checkpoint)),
        h("td", {}, Object.entries(c.metrics || {}).filter(([, v]) => v !== null)
          .map(([k, v]) => `${k} ${num(v)}`).join(", ")),
        h("td", {}, h("a", { href: playgroundLink(c.fine_tuned_model_checkpoint) }, "Open in playground")))),
      "No checkpoints."));
      const ev = job.evaluation;
      evaluation.replaceChildren(ev && Object.keys(ev).length
        ? h("dl", { class: "meta" }, Object.entries(ev).map(([k, v]) => [h("dt", {}, k),
          h("dd", {}, typeof v === "number" ? num(v) : JSON.stringify(v))]))
        : h("p", { class: "empty" }, "No evaluation (it needs a validation file)."));
      const files = job.result_files || [];
      results.replaceChildren(files.length ? h("ul", {}, files.map((fileId) => {
        const box = h("div", { class: "preview" });
        return h("li", {}, h("code", {}, fileId), " ",
          h("button", { type: "button", class: "ghost", onclick: () => preview({ id: fileId }, box) }, "First lines"), " ",
          h("button", { type: "button", class: "ghost", onclick: () => download(fileId) }, "Download"), box);
      })) : h("p", { class: "empty" }, "No result file yet."));
    }

    function addEvent(event) {
      events.prepend(h("li", { class: `ev ${event.level}` }, h("time", {}, when(event.created_at)),
        h("span", { class: "level" }, event.level), h("span", { class: "msg" }, event.message)));
      const d = event.data;
      if (event.type === "metrics" && d && typeof d.step === "number") {
        lastStep = Math.max(lastStep, d.step);
        loss.add(d.step, [d.train_loss, d.valid_loss, d.full_valid_loss]);
        accuracy.add(d.step, [d.train_mean_token_accuracy, d.valid_mean_token_accuracy]);
        if (d.total_steps) totalSteps = d.total_steps;
        showProgress();
      }
    }

    let refreshTimer = null;
    function scheduleRefresh() {
      if (refreshTimer) return;
      refreshTimer = setTimeout(() => { refreshTimer = null; refreshJob().catch(() => {}); }, 400);
    }
    onCleanup(() => clearTimeout(refreshTimer));

    async function follow() {
      let lastId = null;
      let delay = 1000;
      while (!abort.signal.aborted) {
        let ended = false;
        try {
          const headers = authHeaders(lastId ? { "Last-Event-ID": lastId } : {});
          const response = await fetch(`/v1${path}/events?stream=true`, { headers, signal: abort.signal });
          if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
          delay = 1000;
          for await (const message of serverSentEvents(response)) {
            if (message.event === "end") { ended = true; break; }
            if (message.id) lastId = message.id;
            const event = JSON.parse(message.data);
            addEvent(event);
            if (event.type !== "metrics") scheduleRefresh();
          }
        } catch (error) {
          if (abort.signal.aborted) return;
          if (error instanceof ApiError && error.status === 404) { head.replaceChildren(notice(error.message)); return; }
        }
        if (ended) { await refreshJob(); document.body.setAttribute("data-job-done", job.status); return; }
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay = Math.min(delay * 2, 30000);
      }
    }

    page("Fine-tuning job", head, progress,
      h("section", { class: "card charts" }, h("h2", {}, "Training curves"), loss.el, accuracy.el, rate.el),
      h("section", { class: "card" }, h("h2", {}, "Events"), events),
      h("section", { class: "card" }, h("h2", {}, "Checkpoints"), checkpoints),
      h("section", { class: "card" }, h("h2", {}, "Evaluation"), evaluation),
      h("section", { class: "card" }, h("h2", {}, "Result file"), results));
    document.body.removeAttribute("data-job-done");
    const failed = (error) => { if (!abort.signal.aborted) head.replaceChildren(notice(error.message)); };
    try { await refreshJob(); } catch (error) { failed(error); return; }
    follow().catch(failed);
  }

  async function download(fileId) {
    await save(`/files/${encodeURIComponent(fileId)}/content`, `${fileId}.csv`);
  }

  async function save(path, filename) {
    const response = await api(path, { raw: true });
    const url = URL.createObjectURL(await response.blob());
    const link = h("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  // --- models -----------------------------------------------------------------------------------------------
  function playgroundLink(model) { return `#/playground?b=${encodeURIComponent(model)}`; }

  async function renderModels() {
    const list = h("div", {}, h("p", { class: "muted" }, "Loading…"));
    const drift = h("div");
    async function refresh() {
      const models = await allModels();
      list.replaceChildren(table(["Model", "Kind", "Created", ""], models.map((m) => {
        const kind = m.owned_by === "system" ? "base" : m.id.includes(":ckpt-step-") ? "checkpoint" : "fine-tuned";
        return h("tr", { "data-model": m.id }, h("td", {}, h("code", {}, m.id)), h("td", {}, kind),
          h("td", {}, when(m.created)),
          actionsCell(h("a", { class: "button ghost", href: playgroundLink(m.id) }, "Playground"),
            kind === "base" ? null : h("button", { type: "button", class: "ghost", onclick: () =>
              save(`/models/${encodeURIComponent(m.id)}/export?format=adapter`,
                `${m.id.replace(/[^A-Za-z0-9_.-]+/g, "_")}-adapter.tar`).catch((error) => alert(error.message)),
            }, "Export adapter"),
            kind === "base" ? null : h("button", { type: "button", class: "danger", onclick: async () => {
              if (!confirm(`Delete ${m.id}${kind === "fine-tuned" ? " and its checkpoints" : ""}?`)) return;
              try { await api(`/models/${encodeURIComponent(m.id)}`, { method: "DELETE" }); await refresh(); }
              catch (error) { alert(error.message); }
            } }, "Delete")));
      }), "No models."));
      const history = await api("/drift");
      const limits = history.thresholds;
      drift.replaceChildren(...(history.data.length ? history.data.filter((m) => !m.model.includes(":ckpt-step-")).map((m) => {
        const score = chart(m.model, ["drift_score", "out_of_distribution_ratio"], { xTime: true, yLabel: "share",
          colors: ["#3b5bdb", "#2b8a3e"], thresholds: [{ label: "drift threshold", value: limits.drift_score },
            { label: "OOD threshold", value: limits.out_of_distribution_ratio }] });
        const wrap = h("div", { class: "drift" }, score.el, m.points.length ? null
          : h("p", { class: "empty" }, "No traffic observed yet by this API process."));
        score.set(m.points.map((p) => p.t), [m.points.map((p) => p.drift_score), m.points.map((p) => p.out_of_distribution_ratio)]);
        return wrap;
      }) : [h("p", { class: "empty" }, "No fine-tuned models yet.")]),
      h("p", { class: "muted" }, `Alerts fire above a drift score of ${limits.drift_score} or an out-of-distribution share of ${limits.out_of_distribution_ratio}, on windows of at least ${limits.min_window_prompts} prompts.`));
    }
    page("Models", h("section", { class: "card" }, list),
      h("section", { class: "card" }, h("h2", {}, "Drift of live traffic"), drift));
    refresh().catch((error) => list.replaceChildren(notice(error.message)));
  }

  // --- playground -------------------------------------------------------------------------------------------
  async function renderPlayground(params) {
    const abort = new AbortController();
    onCleanup(() => abort.abort());
    const models = await allModels();
    const tuned = models.filter((m) => m.owned_by !== "system");
    const chosenB = params.get("b") || (tuned[0] && tuned[0].id) || models[0].id;
    const baseOf = (id) => { const m = /^ft:(.+?):[^:]+:[^:]*:[^:]+(:ckpt-step-\d+)?$/.exec(id); return m ? m[1] : id; };
    const chosenA = params.get("a") || baseOf(chosenB);
    const select = (name, chosen) => h("select", { name }, models.map((m) => h("option", { value: m.id, selected: m.id === chosen }, m.id)));
    const a = select("model_a", chosenA);
    const b = select("model_b", chosenB);
    const system = h("textarea", { name: "system", rows: 2, placeholder: "optional" });
    const prompt = h("textarea", { name: "prompt", rows: 4, required: true, placeholder: "Ask both models something" });
    const maxTokens = h("input", { name: "max_tokens", type: "number", min: 1, max: 2048, value: "64" });
    const temperature = h("input", { name: "temperature", type: "number", min: 0, max: 2, step: "0.1", value: "0" });
    const panes = [pane("A"), pane("B")];
    const send = h("button", { type: "submit" }, "Send to both");

    function pane(label) {
      const output = h("div", { class: "answer", "aria-live": "polite", "data-answer": label });
      const stats = h("p", { class: "stats muted" });
      const title = h("h2", {});
      return { el: h("section", { class: "card pane" }, title, output, stats), output, stats, title };
    }

    async function ask(model, target) {
      target.title.replaceChildren(h("code", {}, model));
      target.output.replaceChildren();
      target.stats.textContent = "waiting…";
      target.output.removeAttribute("data-done");
      const messages = [];
      if (system.value.trim()) messages.push({ role: "system", content: system.value });
      messages.push({ role: "user", content: prompt.value });
      const started = performance.now();
      let first = null;
      let tokens = 0;
      let chunks = 0;
      let text = "";
      try {
        const response = await api("/chat/completions", { method: "POST", raw: true, signal: abort.signal, body: {
          model, messages, stream: true, stream_options: { include_usage: true },
          max_tokens: Number(maxTokens.value) || 64, temperature: Number(temperature.value) || 0 } });
        for await (const message of serverSentEvents(response)) {
          if (message.data === "[DONE]") break;
          const chunk = JSON.parse(message.data);
          if (chunk.usage) tokens = chunk.usage.completion_tokens || tokens;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            text += delta.content;
            chunks += 1;
            target.output.textContent = text;
            target.output.setAttribute("data-chunks", String(chunks));
          }
        }
        const end = performance.now();
        const generating = first === null ? 0 : (end - first) / 1000;
        const rateText = tokens && generating > 0 ? `${(tokens / generating).toFixed(1)} tokens/s` : "";
        target.stats.textContent = [`first token ${first === null ? "—" : `${Math.round(first - started)} ms`}`,
          `total ${Math.round(end - started)} ms`, `${tokens} tokens`, rateText].filter(Boolean).join(" · ");
        target.output.setAttribute("data-done", "true");
      } catch (error) {
        if (abort.signal.aborted) return;
        target.stats.textContent = "";
        target.output.replaceChildren(notice(error.message));
        target.output.setAttribute("data-done", "error");
      }
    }

    const form = h("form", { class: "card", onsubmit: async (event) => {
      event.preventDefault();
      send.disabled = true;
      await Promise.all([ask(a.value, panes[0]), ask(b.value, panes[1])]);
      send.disabled = false;
    } },
    h("div", { class: "grid" }, field("Model A", a), field("Model B", b)),
    field("System message", system), field("Prompt", prompt, "Ctrl+Enter sends"),
    h("div", { class: "grid" }, field("Max tokens", maxTokens), field("Temperature", temperature)), send);
    prompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) { event.preventDefault(); form.requestSubmit(); }
    });
    page("Playground", form, h("div", { class: "panes" }, panes.map((p) => p.el)));
  }

  // --- routing ----------------------------------------------------------------------------------------------
  async function route() {
    for (const fn of cleanups.splice(0)) { try { fn(); } catch { /* already gone */ } }
    if (!sessionStorage.getItem(KEY)) { renderSignIn(); return; }
    nav.hidden = false;
    signOutButton.hidden = false;
    const [path, query] = (location.hash.slice(1) || "/files").split("?");
    const parts = path.split("/").filter(Boolean);
    const section = parts[0] || "files";
    for (const link of nav.querySelectorAll("a")) {
      if (link.dataset.section === section) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    try {
      if (section === "jobs" && parts[1]) await renderJob(decodeURIComponent(parts[1]));
      else if (section === "jobs") await renderJobs();
      else if (section === "models") await renderModels();
      else if (section === "playground") await renderPlayground(new URLSearchParams(query || ""));
      else await renderFiles();
    } catch (error) {
      if (!(error instanceof ApiError && error.status === 401)) page("Something went wrong", notice(error.message));
    }
  }

  signOutButton.addEventListener("click", () => signOut());
  window.addEventListener("hashchange", route);
  route();
})();
