// mnistflow page. Served as /app.js under a strict CSP: no inline code, and the
// DOM is built with createElement/textContent only (Trusted Types are required).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const el = (tag, props = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.includes("-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) if (c != null) node.append(c);
    return node;
  };

  const config = { admin: false, labeller: false, max_upload_bytes: 1048576, predict_timeout_ms: 5000 };

  // ---------------------------------------------------------------- drawing pad
  const pad = $("pad");
  const padCtx = pad.getContext("2d", { willReadFrequently: true });
  const strokes = [];
  let drawing = null;
  const LINE_WIDTH = 20;

  function padPoint(e) {
    const r = pad.getBoundingClientRect();
    return [((e.clientX - r.left) * pad.width) / r.width, ((e.clientY - r.top) * pad.height) / r.height];
  }

  function paintStroke(points) {
    padCtx.strokeStyle = "#fff";
    padCtx.fillStyle = "#fff";
    padCtx.lineWidth = LINE_WIDTH;
    padCtx.lineCap = "round";
    padCtx.lineJoin = "round";
    if (points.length === 1) {
      padCtx.beginPath();
      padCtx.arc(points[0][0], points[0][1], LINE_WIDTH / 2, 0, Math.PI * 2);
      padCtx.fill();
      return;
    }
    padCtx.beginPath();
    padCtx.moveTo(points[0][0], points[0][1]);
    for (let i = 1; i < points.length - 1; i++) {
      const mx = (points[i][0] + points[i + 1][0]) / 2;
      const my = (points[i][1] + points[i + 1][1]) / 2;
      padCtx.quadraticCurveTo(points[i][0], points[i][1], mx, my);
    }
    const last = points[points.length - 1];
    padCtx.lineTo(last[0], last[1]);
    padCtx.stroke();
  }

  function repaint() {
    padCtx.fillStyle = "#000";
    padCtx.fillRect(0, 0, pad.width, pad.height);
    for (const s of strokes) paintStroke(s);
    if (drawing) paintStroke(drawing.points);
    const empty = strokes.length === 0;
    $("undo").disabled = empty;
    $("clear").disabled = empty;
    $("predict-drawing").disabled = empty;
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.button !== 0 && e.pointerType === "mouse") return;
    e.preventDefault();
    pad.setPointerCapture(e.pointerId);
    // A new stroke supersedes the answer that was about to be asked for.
    clearTimeout(predictTimer);
    drawing = { id: e.pointerId, points: [padPoint(e)] };
    repaint();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!drawing || e.pointerId !== drawing.id) return;
    e.preventDefault();
    const events = typeof e.getCoalescedEvents === "function" ? e.getCoalescedEvents() : [];
    for (const c of events.length ? events : [e]) drawing.points.push(padPoint(c));
    repaint();
  });
  const endStroke = (e) => {
    if (!drawing || e.pointerId !== drawing.id) return;
    strokes.push(drawing.points);
    drawing = null;
    repaint();
    schedulePredictDrawing();
  };
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);
  pad.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
      e.preventDefault();
      undo();
    } else if (e.key === "Delete" || e.key === "Backspace") {
      e.preventDefault();
      clearPad();
    } else if (e.key === "Enter") {
      e.preventDefault();
      predictDrawing();
    }
  });

  function undo() {
    strokes.pop();
    repaint();
    if (strokes.length) schedulePredictDrawing();
    else clearResult();
  }
  function clearPad() {
    strokes.length = 0;
    repaint();
    clearResult();
  }
  $("undo").addEventListener("click", undo);
  $("clear").addEventListener("click", clearPad);
  $("predict-drawing").addEventListener("click", () => predictDrawing());

  let predictTimer = 0;
  function schedulePredictDrawing() {
    clearTimeout(predictTimer);
    predictTimer = setTimeout(predictDrawing, 200);
  }

  // The drawing as MNIST was made: the ink's bounding box scaled to fit 20×20,
  // placed in 28×28 with its centre of mass at the centre, white on black.
  function canvasOf(w, h) {
    const c = document.createElement("canvas");
    c.width = Math.max(1, Math.round(w));
    c.height = Math.max(1, Math.round(h));
    return c;
  }

  function mnistCanvas() {
    const w = pad.width;
    const h = pad.height;
    const data = padCtx.getImageData(0, 0, w, h).data;
    let minX = w, minY = h, maxX = -1, maxY = -1;
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        if (data[(y * w + x) * 4] > 24) {
          if (x < minX) minX = x;
          if (x > maxX) maxX = x;
          if (y < minY) minY = y;
          if (y > maxY) maxY = y;
        }
      }
    }
    if (maxX < 0) return null;
    const bw = maxX - minX + 1;
    const bh = maxY - minY + 1;
    const scale = 20 / Math.max(bw, bh);
    const sw = Math.max(1, Math.round(bw * scale));
    const sh = Math.max(1, Math.round(bh * scale));
    // Halve step by step: one big jump would alias thin strokes away.
    let cur = canvasOf(bw, bh);
    cur.getContext("2d").drawImage(pad, minX, minY, bw, bh, 0, 0, bw, bh);
    while (cur.width / 2 >= sw && cur.height / 2 >= sh) {
      const half = canvasOf(Math.ceil(cur.width / 2), Math.ceil(cur.height / 2));
      const hc = half.getContext("2d");
      hc.imageSmoothingQuality = "high";
      hc.drawImage(cur, 0, 0, half.width, half.height);
      cur = half;
    }
    const small = canvasOf(sw, sh);
    const sc = small.getContext("2d", { willReadFrequently: true });
    sc.imageSmoothingQuality = "high";
    sc.drawImage(cur, 0, 0, sw, sh);
    const sd = sc.getImageData(0, 0, sw, sh).data;
    let mass = 0, mx = 0, my = 0;
    for (let y = 0; y < sh; y++) {
      for (let x = 0; x < sw; x++) {
        const v = sd[(y * sw + x) * 4];
        mass += v;
        mx += v * (x + 0.5);
        my += v * (y + 0.5);
      }
    }
    const cx = mass ? mx / mass : sw / 2;
    const cy = mass ? my / mass : sh / 2;
    const ox = Math.min(28 - sw, Math.max(0, Math.round(14 - cx)));
    const oy = Math.min(28 - sh, Math.max(0, Math.round(14 - cy)));
    const out = canvasOf(28, 28);
    const oc = out.getContext("2d");
    oc.fillStyle = "#000";
    oc.fillRect(0, 0, 28, 28);
    oc.drawImage(small, ox, oy);
    return out;
  }

  function showSeen(source) {
    const seen = $("seen");
    const ctx = seen.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, 28, 28);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(source, 0, 0, 28, 28);
  }

  function predictDrawing() {
    clearTimeout(predictTimer);
    const img = mnistCanvas();
    if (!img) return;
    const strokeCount = strokes.length;
    img.toBlob((blob) => {
      if (!blob) return showError("The drawing could not be exported.");
      showSeen(img);
      predict(blob, "drawing", strokeCount);
    }, "image/png");
  }

  // ---------------------------------------------------------------- upload
  const fileInput = $("file");
  const drop = $("drop");
  const preview = $("upload-preview");
  let previewUrl = null;

  async function fitForUpload(file) {
    if (file.size <= config.max_upload_bytes) return file;
    // Too big to send as is (a phone photo): scale it down here; the model reads 28×28 anyway.
    const bitmap = await createImageBitmap(file);
    const k = Math.min(1, 280 / Math.max(bitmap.width, bitmap.height));
    const c = canvasOf(bitmap.width * k, bitmap.height * k);
    c.getContext("2d").drawImage(bitmap, 0, 0, c.width, c.height);
    return new Promise((resolve) => c.toBlob((b) => resolve(b || file), "image/png"));
  }

  async function uploadFile(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError(`“${file.name}” is not an image.`);
      return;
    }
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    preview.src = previewUrl;
    preview.alt = `Uploaded image ${file.name}`;
    preview.hidden = false;
    preview.decode().then(() => showSeen(preview)).catch(() => {});
    let body;
    try {
      body = await fitForUpload(file);
    } catch {
      body = file;
    }
    const form = new FormData();
    form.append("file", body, file.name || "upload.png");
    predict(form, "upload");
  }

  fileInput.addEventListener("change", () => {
    uploadFile(fileInput.files && fileInput.files[0]);
    fileInput.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "dragend"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const f = e.dataTransfer && e.dataTransfer.files && e.dataTransfer.files[0];
    uploadFile(f);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.type.startsWith("image/"));
    if (item) uploadFile(item.getAsFile());
  });

  // ---------------------------------------------------------------- predictions
  let predictSeq = 0;

  function clearResult() {
    predictSeq++;
    $("result-body").hidden = true;
    $("result-empty").hidden = false;
    $("quick-answer").hidden = true;
    $("predict-error").hidden = true;
    answered = null;
    $("feedback").hidden = true;
  }

  function showError(message) {
    const p = $("predict-error");
    p.textContent = message;
    p.hidden = false;
  }

  async function predict(body, source, strokeCount = 0) {
    const seq = ++predictSeq;
    const headers = body instanceof FormData ? {} : { "Content-Type": body.type || "image/png" };
    $("answer").setAttribute("aria-busy", "true");
    const t0 = performance.now();
    let res = null;
    let json = null;
    try {
      res = await fetch("/api/predict", { method: "POST", body, headers, cache: "no-store" });
      json = await res.json().catch(() => null);
    } catch {
      res = null;
    }
    const ms = performance.now() - t0;
    if (seq !== predictSeq) return;
    $("answer").removeAttribute("aria-busy");
    if (!res) return showError("The server cannot be reached.");
    if (!res.ok) {
      const msg = json && json.error && json.error.message ? json.error.message : `HTTP ${res.status}`;
      return showError(`${msg} (${res.status})`);
    }
    showResult(json, ms, source, strokeCount);
  }

  function showResult(p, ms, source, strokeCount) {
    $("predict-error").hidden = true;
    const probs = Array.isArray(p.probabilities) ? p.probabilities : [];
    const digit = Number(p.digit);
    $("digit").textContent = String(digit);
    const conf = probs[digit];
    $("confidence").textContent = conf != null ? `${(conf * 100).toFixed(1)} % sure` : "";
    $("model-version").textContent = String(p.model_version || "?");
    $("rtt").textContent = `${Math.round(ms)} ms`;
    const bars = $("bars");
    bars.replaceChildren();
    probs.forEach((v, i) => {
      const fill = el("span", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(1, v)) * 100}%`;
      const li = el(
        "li",
        { class: i === digit ? "best" : "", "data-digit": String(i) },
        el("span", { text: String(i) }),
        el("span", { class: "track", "aria-hidden": "true" }, fill),
        el("span", { class: "pct", text: `${(v * 100).toFixed(1)} %` }),
      );
      li.setAttribute("aria-label", `${i}: ${(v * 100).toFixed(1)} percent`);
      bars.append(li);
    });
    const body = $("result-body");
    body.setAttribute("data-digit", String(digit));
    body.setAttribute("data-source", source);
    body.setAttribute("data-strokes", String(strokeCount));
    body.hidden = false;
    $("result-empty").hidden = true;
    const quick = $("quick-answer");
    quick.textContent = `Answer: ${digit}${conf != null ? ` (${(conf * 100).toFixed(0)} %)` : ""}`;
    quick.hidden = source !== "drawing";
    offerFeedback(p, digit);
  }

  // ---------------------------------------------------------------- feedback
  // The answer on show, with the 28×28 image the model saw (the reply's `input`),
  // which is what feedback sends back: a fixed size, whatever was uploaded.
  let answered = null;
  const feedbackStatus = $("feedback-status");

  function offerFeedback(p, digit) {
    const input = typeof p.input === "string" && /^[0-9a-f]{1568}$/.test(p.input) ? p.input : null;
    answered = input ? { input, digit, version: String(p.model_version || ""), sent: false } : null;
    const box = $("feedback");
    box.hidden = !answered;
    if (!answered) return;
    box.removeAttribute("data-sent");
    $("feedback-right-digit").textContent = String(digit);
    for (const b of box.querySelectorAll("button")) b.disabled = false;
    feedbackStatus.textContent = "";
  }

  // The id the server answered with is the only key to this feedback: shown so
  // that the person can have it deleted (now, or later with DELETE /api/feedback/<id>).
  function offerDeletion(id) {
    const button = el("button", { type: "button", text: "Delete it", class: "feedback-delete" });
    const line = el(
      "span",
      { class: "feedback-id" },
      " Your feedback id is ",
      el("code", { text: id }),
      `; keep it to have this feedback deleted later (DELETE /api/feedback/${id}), or `,
      button,
      "."
    );
    button.addEventListener("click", async () => {
      button.disabled = true;
      let res = null;
      try {
        res = await fetch(`/api/feedback/${encodeURIComponent(id)}`, { method: "DELETE", cache: "no-store" });
      } catch {
        res = null;
      }
      if (res && res.ok) {
        line.textContent = ` Deletion of feedback ${id} requested.`;
        return;
      }
      button.disabled = false;
      line.append(` Not requested: ${res ? `HTTP ${res.status}` : "the server cannot be reached"}.`);
    });
    feedbackStatus.append(line);
  }

  async function sendFeedback(label) {
    if (!answered || answered.sent) return;
    const a = answered;
    a.sent = true;
    const box = $("feedback");
    for (const b of box.querySelectorAll("button")) b.disabled = true;
    const headers = { "Content-Type": "application/json" };
    const token = config.labeller ? $("labeller-token").value.trim() : "";
    if (token) headers.Authorization = `Bearer ${token}`;
    feedbackStatus.textContent = "Sending…";
    let res = null;
    let json = null;
    try {
      res = await fetch("/api/feedback", {
        method: "POST",
        headers,
        cache: "no-store",
        body: JSON.stringify({ model_version: a.version, predicted: a.digit, label, input: a.input }),
      });
      json = await res.json().catch(() => null);
    } catch {
      res = null;
    }
    if (a !== answered) return;
    if (res && res.ok) {
      box.setAttribute("data-sent", json && json.trusted ? "trusted" : "unverified");
      feedbackStatus.textContent =
        label === a.digit
          ? `Thanks: recorded that ${label} was right${json && json.trusted ? " (trusted labeller)" : " (unverified)"}.`
          : `Thanks: recorded that it was a ${label}, not a ${a.digit}${json && json.trusted ? " (trusted labeller)" : " (unverified)"}.`;
      if (json && json.event_id) offerDeletion(json.event_id);
      return;
    }
    a.sent = false;
    for (const b of box.querySelectorAll("button")) b.disabled = false;
    const msg = json && json.error && json.error.message ? json.error.message : res ? `HTTP ${res.status}` : "the server cannot be reached";
    feedbackStatus.textContent = `Feedback not sent: ${msg}.`;
  }

  {
    const digits = $("feedback-digits");
    for (let d = 0; d < 10; d++) {
      const b = el("button", { type: "button", class: "small", text: String(d), "data-label": String(d) });
      b.setAttribute("aria-label", `It was a ${d}`);
      b.setAttribute("aria-keyshortcuts", String(d));
      b.addEventListener("click", () => sendFeedback(d));
      digits.append(b);
    }
    $("feedback-right").addEventListener("click", () => answered && sendFeedback(answered.digit));
    document.addEventListener("keydown", (e) => {
      if (!answered || answered.sent || $("feedback").hidden || e.ctrlKey || e.metaKey || e.altKey) return;
      const t = e.target;
      if (t && (t.tagName === "INPUT" || t.tagName === "TEXTAREA" || t.isContentEditable)) return;
      if (e.key === "y" || e.key === "Y") {
        e.preventDefault();
        sendFeedback(answered.digit);
      } else if (/^[0-9]$/.test(e.key)) {
        e.preventDefault();
        sendFeedback(Number(e.key));
      }
    });
  }

  // ---------------------------------------------------------------- pipeline feed
  const seenEvents = new Set();
  const state = {
    dataset: null,
    runs: new Map(),
    currentRun: null,
    models: new Map(),
    current: null, // { version, at }
    instances: new Map(),
    live: new Map(), // version -> { set_version, accuracy }
  };
  const time = (s) => {
    const d = new Date(s);
    return Number.isNaN(d.getTime()) ? "" : d.toLocaleString();
  };
  const shortTime = (s) => {
    const d = new Date(s);
    return Number.isNaN(d.getTime()) ? "" : d.toLocaleTimeString();
  };
  const pct = (x) => (typeof x === "number" ? `${(x * 100).toFixed(2)} %` : "?");
  const later = (a, b) => !b || new Date(a) >= new Date(b);

  function setCurrent(version, at) {
    if (!version) return;
    if (!state.current || later(at, state.current.at)) state.current = { version, at };
  }

  function activity(at, text) {
    const log = $("activity");
    log.prepend(el("li", {}, el("time", { text: shortTime(at) }), text));
    while (log.children.length > 50) log.lastChild.remove();
  }

  const handlers = {
    "feedback.stored": (e) => {
      const had = state.live.get(e.model_version);
      if (!had || e.set_version > had.set_version) state.live.set(e.model_version, e);
    },
    "dataset.ready": (e) => {
      if (!state.dataset || later(e.created_at, state.dataset.created_at)) state.dataset = e;
      activity(e.created_at, `Data set ${e.dataset_id} ${e.reused ? "re-announced" : "ready"}.`);
    },
    "dataset.failed": (e) => activity(e.at, `Download failed: ${e.reason}${e.will_retry ? " (will retry)" : ""}.`),
    "train.progress": (e) => {
      let run = state.runs.get(e.run_id);
      if (!run) {
        run = { points: [], last: null, failed: null, published: null };
        state.runs.set(e.run_id, run);
      }
      const x = e.steps > 0 ? e.epoch - 1 + Math.min(1, e.step / e.steps) : run.points.length;
      if (typeof e.loss === "number" && Number.isFinite(e.loss) && e.phase !== "evaluating" && e.phase !== "exporting") {
        run.points.push([x, e.loss]);
      }
      if (!run.last || later(e.at, run.last.at)) run.last = e;
      const cur = state.currentRun && state.runs.get(state.currentRun);
      if (!cur || !cur.last || later(e.at, cur.last.at)) state.currentRun = e.run_id;
    },
    "train.failed": (e) => {
      if (e.run_id && state.runs.has(e.run_id)) state.runs.get(e.run_id).failed = e;
      activity(e.at, `Training failed: ${e.reason}${e.will_retry ? " (will retry)" : ""}.`);
    },
    "model.published": (e) => {
      state.models.set(e.version, e);
      if (e.run_id && state.runs.has(e.run_id)) state.runs.get(e.run_id).published = e;
      if (e.promoted) setCurrent(e.version, e.at);
      const acc = e.metrics ? pct(e.metrics.accuracy) : "?";
      activity(e.at, `Model ${e.version} published (accuracy ${acc})${e.promoted ? ", now served" : ""}.`);
    },
    "inference.loaded": (e) => {
      state.instances.set(e.instance, e);
      if (e.ok) setCurrent(e.version, e.at);
      activity(
        e.at,
        e.ok
          ? `Instance ${e.instance} serves ${e.version}.`
          : `Instance ${e.instance} refused ${e.refused || "a version"}: ${e.error || "no reason given"}.`,
      );
    },
  };

  let renderQueued = false;
  function render() {
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      renderDataset();
      renderTraining();
      renderModels();
      renderInstances();
    });
  }

  function renderDataset() {
    const d = state.dataset;
    if (!d) return;
    const p = $("dataset");
    p.className = "";
    p.setAttribute("data-dataset-id", d.dataset_id);
    p.replaceChildren(
      el("code", { text: d.dataset_id }),
      el("br"),
      `${Number(d.train_count).toLocaleString()} training and ${Number(d.test_count).toLocaleString()} test images`,
      el("br"),
      el("span", { class: "hint", text: `${d.source ? `from ${d.source}, ` : ""}${time(d.created_at)}` }),
    );
  }

  function renderTraining() {
    const run = state.currentRun && state.runs.get(state.currentRun);
    if (!run || !run.last) return;
    const e = run.last;
    const p = $("training");
    p.className = "";
    p.setAttribute("data-run-id", state.currentRun);
    let status;
    if (run.failed) status = `failed: ${run.failed.reason}`;
    else if (run.published) status = `finished: model ${run.published.version}`;
    else status = e.phase || "training";
    const parts = [
      `Run ${String(state.currentRun).slice(0, 8)} · ${status}`,
      el("br"),
      `epoch ${e.epoch}/${e.epochs}, step ${e.step}/${e.steps}`,
      el("br"),
      `loss ${Number(e.loss).toFixed(4)} · ${Math.round(e.examples_per_sec).toLocaleString()} images/s`,
    ];
    if (typeof e.eta_secs === "number" && !run.published && !run.failed) {
      parts.push(` · about ${Math.max(1, Math.round(e.eta_secs / 60))} min left`);
    }
    p.replaceChildren(...parts);
    const prog = $("train-progress");
    const done = e.epochs > 0 && e.steps > 0 ? (e.epoch - 1 + e.step / e.steps) / e.epochs : 0;
    prog.value = run.published ? 1 : Math.max(0, Math.min(1, done));
    prog.hidden = false;
    drawLoss(run.points);
  }

  function drawLoss(points) {
    const c = $("loss");
    if (points.length < 1) {
      c.hidden = true;
      return;
    }
    c.hidden = false;
    const dpr = window.devicePixelRatio || 1;
    const cssW = c.clientWidth || 480;
    const cssH = c.clientHeight || 160;
    if (c.width !== Math.round(cssW * dpr)) c.width = Math.round(cssW * dpr);
    if (c.height !== Math.round(cssH * dpr)) c.height = Math.round(cssH * dpr);
    const ctx = c.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const css = getComputedStyle(document.documentElement);
    const fg = css.getPropertyValue("--muted").trim() || "#666";
    const line = css.getPropertyValue("--accent").trim() || "#34f";
    ctx.clearRect(0, 0, cssW, cssH);
    const pad = { l: 44, r: 10, t: 10, b: 22 };
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]);
    const x0 = Math.min(...xs);
    const x1 = Math.max(...xs, x0 + 1e-9);
    const y1 = Math.max(...ys) * 1.05 || 1;
    const X = (x) => pad.l + ((x - x0) / (x1 - x0 || 1)) * (cssW - pad.l - pad.r);
    const Y = (y) => cssH - pad.b - (y / y1) * (cssH - pad.t - pad.b);
    ctx.strokeStyle = fg;
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(pad.l, pad.t);
    ctx.lineTo(pad.l, cssH - pad.b);
    ctx.lineTo(cssW - pad.r, cssH - pad.b);
    ctx.stroke();
    ctx.fillStyle = fg;
    ctx.font = "11px system-ui, sans-serif";
    ctx.textAlign = "right";
    ctx.fillText(y1.toFixed(2), pad.l - 4, pad.t + 8);
    ctx.fillText("0", pad.l - 4, cssH - pad.b);
    ctx.textAlign = "center";
    ctx.fillText(`epochs ${x0.toFixed(1)}–${x1.toFixed(1)}`, (pad.l + cssW - pad.r) / 2, cssH - 6);
    ctx.strokeStyle = line;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    if (points.length === 1) ctx.arc(X(points[0][0]), Y(points[0][1]), 2, 0, Math.PI * 2);
    ctx.stroke();
    const lastLoss = ys[ys.length - 1];
    c.setAttribute("aria-label", `Training loss curve, ${points.length} points, latest loss ${lastLoss.toFixed(4)}`);
  }

  function renderModels() {
    if (state.models.size === 0) return;
    $("models-empty").hidden = true;
    $("models").hidden = false;
    const body = $("models-body");
    const rows = [...state.models.values()].sort((a, b) => (a.version < b.version ? 1 : -1));
    const current = state.current && state.current.version;
    body.replaceChildren(
      ...rows.map((m) => {
        const isCurrent = m.version === current;
        const status = el("div", { class: "status" });
        if (isCurrent) status.append(el("span", { class: "badge current", text: "serving" }));
        else status.append(el("span", { class: "badge", text: m.promoted ? "was served" : "not promoted", title: m.promotion || "" }));
        if (config.admin && !isCurrent) {
          const b = el("button", { type: "button", class: "small", text: "Serve" });
          b.setAttribute("aria-label", `Serve version ${m.version}`);
          b.addEventListener("click", () => adminPromote(m.version));
          status.append(b);
        }
        const tr = el(
          "tr",
          { class: isCurrent ? "current" : "", "data-version": m.version },
          el("td", { "data-label": "Version" }, el("code", { text: m.version })),
          el("td", { "data-label": "Accuracy", text: m.metrics ? pct(m.metrics.accuracy) : "?" }),
          liveCell(m.version),
          el("td", { "data-label": "Published", text: time(m.at) }),
          el("td", { "data-label": "Status" }, status),
        );
        return tr;
      }),
    );
    $("versions").replaceChildren(...rows.map((m) => el("option", { value: m.version })));
  }

  // A version's accuracy as people judged it: trusted labellers' figure, and the
  // anonymous one marked unverified.
  function liveCell(version) {
    const td = el("td", { "data-label": "Live (feedback)", class: "live" });
    const live = state.live.get(version);
    const tally = (t) => (t && t.answers > 0 ? t : null);
    const trusted = live && tally(live.accuracy.trusted);
    const unverified = live && tally(live.accuracy.unverified);
    const share = (t) => `${((t.correct / t.answers) * 100).toFixed(1)} % of ${t.answers}`;
    if (trusted) {
      td.setAttribute("data-trusted", `${trusted.correct}/${trusted.answers}`);
      td.append(el("span", { class: "trusted", text: `${share(trusted)} trusted` }));
    }
    if (unverified) {
      td.setAttribute("data-unverified", `${unverified.correct}/${unverified.answers}`);
      if (trusted) td.append(el("br"));
      td.append(el("span", { class: "unverified", text: `${share(unverified)} unverified` }));
    }
    if (!trusted && !unverified) td.append(el("span", { class: "hint", text: "no feedback yet" }));
    return td;
  }

  function renderInstances() {
    if (state.instances.size === 0) return;
    $("instances-empty").hidden = true;
    const ul = $("instances");
    const items = [...state.instances.values()].sort((a, b) => (a.instance < b.instance ? -1 : 1));
    ul.replaceChildren(
      ...items.map((i) =>
        el(
          "li",
          { "data-instance": i.instance, "data-version": i.version || "" },
          el("code", { text: i.instance }),
          i.ok
            ? ` serves ${i.version}${i.load_ms ? ` (loaded in ${Math.round(i.load_ms)} ms)` : ""}`
            : ` refused ${i.refused || "a version"}: ${i.error || "no reason"}${i.version ? `; still serves ${i.version}` : ""}`,
          i.ok ? null : el("span", { class: "badge refused", text: " refused" }),
        ),
      ),
    );
  }

  const feedStatus = $("feed-status");
  function setFeed(stateName, text) {
    feedStatus.setAttribute("data-state", stateName);
    feedStatus.textContent = text;
  }

  function connectFeed() {
    const es = new EventSource("/api/events");
    es.addEventListener("open", () => setFeed("connecting", "Catching up with the pipeline…"));
    es.addEventListener("error", () => {
      setFeed("error", "Event stream lost; reconnecting…");
      // A refused stream (503: the server is full) is not retried by the browser itself.
      if (es.readyState === EventSource.CLOSED) {
        es.close();
        setTimeout(connectFeed, 5000 + Math.random() * 5000);
      }
    });
    es.addEventListener("live", () => setFeed("live", "Live"));
    es.addEventListener("feed.error", (m) => {
      let msg = "Events unavailable";
      try {
        msg = JSON.parse(m.data).message || msg;
      } catch {}
      setFeed("error", msg);
    });
    for (const name of Object.keys(handlers)) {
      es.addEventListener(name, (m) => {
        let payload;
        try {
          payload = JSON.parse(m.data);
        } catch {
          return;
        }
        if (payload.event_id) {
          if (seenEvents.has(payload.event_id)) return;
          seenEvents.add(payload.event_id);
        }
        handlers[name](payload);
        render();
      });
    }
  }

  // ---------------------------------------------------------------- admin
  const adminStatus = $("admin-status");
  async function adminPost(path, body, what) {
    const token = $("admin-token").value.trim();
    if (!token) {
      adminStatus.textContent = "Enter the admin token first.";
      $("admin-token").focus();
      return;
    }
    adminStatus.textContent = `Sending ${what}…`;
    try {
      const res = await fetch(`/api/admin/${path}`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${token}` },
        body: JSON.stringify(body),
        cache: "no-store",
      });
      const json = await res.json().catch(() => null);
      if (res.ok) adminStatus.textContent = `${what} sent (event ${json && json.event_id}). Watch the pipeline above.`;
      else adminStatus.textContent = `${what} refused: ${(json && json.error && json.error.message) || res.status}`;
    } catch {
      adminStatus.textContent = `${what} failed: the server cannot be reached.`;
    }
  }
  function adminPromote(version) {
    if (!version) {
      adminStatus.textContent = "Choose a version first.";
      return;
    }
    adminPost("promote", { version }, `Serve ${version}`);
  }

  function setUpAdmin() {
    $("admin").hidden = false;
    $("admin-form").addEventListener("submit", (e) => e.preventDefault());
    $("admin-download").addEventListener("click", () => adminPost("download", {}, "Download request"));
    $("admin-train").addEventListener("click", () => {
      const body = {};
      const epochs = $("admin-epochs").value.trim();
      const preset = $("admin-preset").value.trim();
      if (epochs) body.epochs = Number(epochs);
      if (preset) body.preset = preset;
      adminPost("train", body, "Training request");
    });
    $("admin-promote").addEventListener("click", () => adminPromote($("admin-version").value.trim()));
  }

  // ---------------------------------------------------------------- start
  repaint();
  fetch("/api/config", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : null))
    .then((c) => {
      if (c) Object.assign(config, c);
      if (config.labeller) $("labeller").hidden = false;
      if (config.admin) {
        setUpAdmin();
        render();
      }
    })
    .catch(() => {})
    .finally(() => document.documentElement.setAttribute("data-ready", "true"));
  connectFeed();
})();
