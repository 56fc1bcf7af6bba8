// Kiln's one script: the chat (jobs, live events, usage meter) and the admin dashboard (live charts).
// It calls the same /v1 endpoints as every other client, with the session cookie and a CSRF header.
"use strict";

const CSRF = document.querySelector('meta[name="csrf-token"]')?.content || "";
const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];

async function api(method, url, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(url, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (_) { /* empty or not JSON */ }
  return { ok: response.ok, status: response.status, data, retryAfter: Number(response.headers.get("Retry-After")) || null };
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 60) return `${minutes} min`;
  const hours = Math.floor(minutes / 60), rest = minutes % 60;
  return rest && hours < 10 ? `${hours} h ${rest} min` : `${Math.round(minutes / 60)} h`;
}

function clockAt(secondsFromNow) {
  return new Date(Date.now() + secondsFromNow * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

// ---------------------------------------------------------------------------------------------- chat

const TERMINAL = new Set(["succeeded", "completed", "failed", "cancelled", "missing"]);

function initChat() {
  const chat = $(".chat");
  const thread = $("#thread");
  const form = $("#composer");
  const prompt = $("#prompt");
  const notice = $("#notice");
  const template = $("#message-template");
  let conversationId = chat.dataset.conversationId || null;
  let usage = null;
  const relaxPlan = chat.dataset.relax === "true";  // past the quota, this plan waits in the slow lane
  const inSlowLane = () => Boolean(usage && usage.remaining === 0 && (usage.relax || relaxPlan));

  const toggle = $(".sidebar-toggle");
  const showSidebar = (open) => {
    document.body.classList.toggle("sidebar-open", open);
    toggle?.setAttribute("aria-expanded", String(open));
  };
  toggle?.addEventListener("click", () => showSidebar(!document.body.classList.contains("sidebar-open")));
  $(".thread-pane").addEventListener("click", () => showSidebar(false));  // a tap beside it closes it

  function say(text, tone = "info") {
    notice.textContent = text;
    notice.dataset.tone = tone;
    notice.hidden = !text;
  }

  // -- the usage meter: "2 of 3 images left today · resets in 5 h"
  async function refreshUsage() {
    const r = await api("GET", "/v1/usage");
    const meter = $("#usage");
    if (!r.ok || !r.data) { meter.hidden = true; return; }
    usage = r.data;
    meter.hidden = false;
    const resetsIn = usage.resets_at ? (Date.parse(usage.resets_at) - Date.now()) / 1000 : null;
    const resets = resetsIn !== null ? ` · resets in ${duration(resetsIn)}` : "";
    let text;
    let share = 1;
    if (usage.limit === null || usage.limit === undefined) {
      text = `Unlimited images on the ${usage.plan} plan`;
    } else {
      const left = Math.max(0, usage.remaining ?? usage.limit - usage.used);
      share = usage.limit ? left / usage.limit : 0;
      if (left > 0) text = `${left} of ${usage.limit} image${usage.limit === 1 ? "" : "s"} left today${resets}`;
      else if (inSlowLane()) text = `No images left today: you are in the slow lane${resets}`;
      else text = `No images left today${resets}`;
    }
    $(".meter-text", meter).textContent = text;
    $(".meter-fill", meter).style.width = `${Math.round(share * 100)}%`;
    meter.dataset.level = share === 0 ? "empty" : share < 0.34 ? "low" : "ok";
  }

  const nearBottom = () => thread.scrollHeight - thread.scrollTop - thread.clientHeight < 240;

  // -- one message's live state, from its job's events
  function setState(el, text, progress) {
    $(".pending", el).hidden = false;
    $(".state", el).textContent = text;
    if (progress !== undefined) $(".fill", el).style.width = `${Math.round(progress * 100)}%`;
  }

  function waitingText(d) {
    const position = d.queue_position ?? d.position;
    const eta = d.eta_s ?? d.eta;
    const parts = [];
    // queue_position counts the jobs ahead: 0 means this one is next
    if (position !== undefined && position !== null) parts.push(position < 1 ? "Next in line" : `${position} ahead in line`);
    else parts.push("Waiting in line");
    if (eta !== undefined && eta !== null) parts.push(`about ${duration(eta)}`);
    return parts.join(" · ");
  }

  function showImages(el, ids) {
    const id = ids[0];
    if (!id) return fail(el, "No image came back.");
    el.dataset.status = "succeeded";
    const img = $(".image", el);
    const atBottom = nearBottom();
    img.onload = () => {
      img.hidden = false;
      $(".preview", el).hidden = true;
      $(".placeholder", el).hidden = true;
      if (atBottom) thread.scrollTop = thread.scrollHeight;  // follow the newest picture, unless reading above
    };
    img.src = `/v1/images/${id}/content`;
    img.dataset.imageId = id;
    $(".pending", el).hidden = true;
    const download = $(".download", el);
    download.href = `/v1/images/${id}/content`;
    download.download = `${id}.png`;
    $(".actions", el).hidden = false;
    refreshUsage();
  }

  function fail(el, text, status = "failed") {
    el.dataset.status = status;
    $(".pending", el).hidden = true;
    $(".placeholder", el).hidden = true;
    const error = $(".error", el);
    error.textContent = text;
    error.hidden = false;
    refreshUsage();
  }

  function imageIds(d) {
    if (Array.isArray(d.image_ids)) return d.image_ids;
    const images = d.images || d.data || [];
    return images.map((i) => (typeof i === "string" ? i : i.id)).filter(Boolean);
  }

  function apply(el, type, d) {
    switch (type) {
      case "queued": case "position":
        return setState(el, waitingText(d));
      case "running": case "started":
        return setState(el, "Drawing…");
      case "requeued":
        return setState(el, "A worker stopped; trying again…");
      case "progress": {
        const total = d.total || d.steps || 1;
        setState(el, `Drawing · step ${d.step} of ${total}`, d.step / total);
        const preview = d.preview || d.preview_png || d.preview_b64;
        if (preview) {
          const img = $(".preview", el);
          img.src = preview.startsWith("data:") ? preview : `data:image/png;base64,${preview}`;
          img.hidden = false;
          $(".placeholder", el).hidden = true;
        }
        return;
      }
      case "completed": case "succeeded":
        return showImages(el, imageIds(d));
      case "failed":
        return fail(el, d.error?.message || d.message || "This image could not be made; it was not charged.");
      case "cancelled":
        return fail(el, "Cancelled; it was not charged.", "cancelled");
    }
  }

  const EVENTS = ["queued", "position", "running", "started", "requeued", "progress", "completed", "failed", "cancelled"];

  function follow(el, failures = 0) {
    const jobId = el.dataset.jobId;
    if (!jobId) return;
    const done = () => TERMINAL.has(el.dataset.status);
    const source = new EventSource(`/v1/jobs/${jobId}/events`);
    for (const type of EVENTS) {
      source.addEventListener(type, (event) => {
        let d = {};
        try { d = JSON.parse(event.data || "{}"); } catch (_) { /* keep {} */ }
        failures = 0;
        apply(el, type, d);
        if (done()) source.close();
      });
    }
    source.onerror = async () => {
      source.close();
      if (done()) return;
      const r = await api("GET", `/v1/jobs/${jobId}`);  // catch up, then listen again
      if (r.status === 404) return fail(el, "This job is gone.", "missing");
      if (r.ok && r.data) {
        const status = r.data.status;
        if (status === "succeeded" || status === "completed") return showImages(el, imageIds(r.data));
        if (status === "failed" || status === "cancelled") return apply(el, status, r.data);
        if (status === "queued") apply(el, "queued", r.data);
        if (status === "running") setState(el, "Drawing…");
      }
      if (failures > 30) return fail(el, "Lost touch with the server; reload the page.");
      setTimeout(() => follow(el, failures + 1), Math.min(500 * (failures + 1), 5000));
    };
  }

  // -- sending a sentence: a new picture, or an edit of the thread's last picture
  function lastImageId() {
    const images = $$(".msg .image", thread).filter((img) => img.dataset.imageId);
    return images.length ? images[images.length - 1].dataset.imageId : null;
  }

  function newMessageElement(text, kind, sourceImageId) {
    const el = template.content.firstElementChild.cloneNode(true);
    $(".text", el).textContent = text;
    $(".image", el).alt = text;
    el.dataset.kind = kind;
    el.dataset.sourceImage = sourceImageId || "";
    $(".kind-tag", el).hidden = kind !== "edit";
    $(".hello", thread)?.remove();
    thread.append(el);
    el.scrollIntoView({ block: "end", behavior: "smooth" });
    return el;
  }

  function refusal(r) {
    const error = r.data?.error || {};
    const wait = r.retryAfter;
    const when = wait ? `Come back in ${duration(wait)} (at ${clockAt(wait)}).` : "Please try again a little later.";
    if (error.code === "quota_exceeded") {
      const limit = usage?.limit;
      return `You have used all ${limit ?? "your"} images for today. ${when}`;
    }
    if (error.code === "rate_limit_exceeded") return `Your plan makes a limited number of pictures at once; wait for the one on its way${wait ? ` (about ${duration(wait)})` : ""}.`;
    if (error.code === "server_is_overloaded" || r.status === 503) return `Kiln is very busy right now. ${when}`;
    if (r.status === 401) return "You were signed out. Reload the page to sign in again.";
    return error.message || `Something went wrong (${r.status}).`;
  }

  // A new picture is an async job followed live; an edit goes through OpenAI's edits endpoint
  // (img2img on the thread's last picture), which answers when the picture is done.
  async function send(text, { kind, source, seed } = {}) {
    text = text.trim();
    if (!text) return false;
    say("");
    if (kind === undefined) {
      source = lastImageId();
      kind = source ? "edit" : "generate";
    }
    const wasInSlowLane = inSlowLane();
    const el = newMessageElement(text, kind, source);
    setState(el, kind === "edit" ? "Editing the last picture…" : "Sending…");
    const job = kind === "edit" ? await submitEdit(el, text, source, seed) : await submitJob(text, seed);
    if (!job.ok) {
      el.remove();
      say(refusal(job), "warn");
      refreshUsage();
      return false;
    }
    el.dataset.jobId = job.id;
    showPrompt(el, text, job.data?.prompt);
    if (!conversationId) {  // made only once something was admitted: no empty conversations
      const c = await api("POST", "/web/api/conversations", { title: text });
      if (!c.ok) { say(refusal(c), "warn"); return false; }
      conversationId = c.data.id;
      chat.dataset.conversationId = conversationId;
      history.replaceState(null, "", c.data.url);
      addToSidebar(c.data);
    }
    const saved = await api("POST", `/web/api/conversations/${conversationId}/messages`,
      { text, job_id: job.id, kind, source_image_id: kind === "edit" ? source : null });
    if (saved.ok) el.dataset.msgId = saved.data.id;
    if (job.data.relax || wasInSlowLane) say("You have used today's images, so this one waits in the slow lane: it starts when the GPUs are free.", "info");
    else if (job.data?.degraded) say("Kiln is busy, so this picture is drawn with fewer steps to keep your wait short.", "info");
    if (job.imageIds) showImages(el, job.imageIds);
    else { apply(el, "queued", job.data); follow(el); }
    refreshUsage();
    prompt.placeholder = "Change the picture…";
    return true;
  }

  async function submitJob(text, seed) {
    const body = { prompt: text, n: 1 };
    if (seed !== undefined) body.seed = seed;
    const r = await api("POST", "/v1/jobs", body);
    return r.ok ? { ...r, id: r.data.id } : r;
  }

  async function submitEdit(el, text, source, seed) {
    // An async edit job (followed live like any other) where POST /v1/jobs takes `image_id`;
    // otherwise OpenAI's edits endpoint, which answers once the picture is done.
    const body = { prompt: text, n: 1, image_id: source };
    if (seed !== undefined) body.seed = seed;
    const job = await api("POST", "/v1/jobs", body);
    if (job.ok) return { ...job, id: job.data.id };
    if (!(job.status === 400 && job.data?.error?.param === "image_id")) return job;
    const original = await fetch(`/v1/images/${source}/content`, { credentials: "same-origin" });
    if (!original.ok) return { ok: false, status: original.status, data: null };
    const form = new FormData();
    form.append("image", await original.blob(), `${source}.png`);
    form.append("prompt", text);
    form.append("n", "1");
    form.append("response_format", "url");
    if (seed !== undefined) form.append("seed", String(seed));
    const response = await fetch("/v1/images/edits", {
      method: "POST", body: form, credentials: "same-origin",
      headers: { Accept: "application/json", "X-CSRF-Token": CSRF },
    });
    let data = null;
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    const retryAfter = Number(response.headers.get("Retry-After")) || null;
    if (!response.ok) return { ok: false, status: response.status, data, retryAfter };
    return { ok: true, status: response.status, data, id: data.id, imageIds: imageIds(data) };
  }

  // A follow-up is drawn from a prompt composed from the whole thread: show it under the picture.
  function showPrompt(el, text, composed) {
    const shown = composed && composed !== text ? composed : "";
    $(".composed-text", el).textContent = shown;
    $(".composed", el).hidden = !shown;
  }

  function addToSidebar(c) {
    const nav = $(".conversations");
    $(".empty", nav)?.remove();
    $$("a[aria-current]", nav).forEach((a) => a.removeAttribute("aria-current"));
    const link = document.createElement("a");
    link.href = c.url;
    link.dataset.id = c.id;
    link.textContent = c.title;
    link.setAttribute("aria-current", "page");
    nav.prepend(link);
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = $(".send", form);
    button.disabled = true;
    try {
      if (await send(prompt.value)) { prompt.value = ""; grow(); }
    } finally {
      button.disabled = false;
      prompt.focus();
    }
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); form.requestSubmit(); }
  });
  const grow = () => { prompt.style.height = "auto"; prompt.style.height = `${Math.min(prompt.scrollHeight, 160)}px`; };
  prompt.addEventListener("input", grow);

  thread.addEventListener("click", async (event) => {
    const el = event.target.closest(".msg");
    if (!el) return;
    if (event.target.closest(".again")) {
      const seed = Math.floor(Math.random() * 2 ** 31);
      const source = el.dataset.kind === "edit" ? el.dataset.sourceImage : null;
      await send($(".text", el).textContent, { kind: source ? "edit" : "generate", source, seed });
    } else if (event.target.closest(".cancel")) {
      const r = await api("DELETE", `/v1/jobs/${el.dataset.jobId}`);
      if (!r.ok && r.status !== 404) say(r.data?.error?.message || "Could not cancel.", "warn");
    }
  });

  $$(".msg", thread).forEach((el) => { if (!TERMINAL.has(el.dataset.status)) follow(el); });
  refreshUsage();
  setInterval(() => { if (!document.hidden) refreshUsage(); }, 5000);
  thread.lastElementChild?.scrollIntoView({ block: "end" });
}

// ---------------------------------------------------------------------------------------- dashboard

const PALETTE = ["#e4572e", "#2e86ab", "#76b041", "#f3a712", "#8e5cc4", "#17bebb", "#d1495b", "#5c6b73"];
const WINDOW_S = 180;  // each chart shows the last three minutes
const RATE_WINDOW_S = 5;  // rates are averaged over a few seconds so one poll's jitter doesn't show

function colourOf(name, names) {
  const index = names.indexOf(name);
  return PALETTE[(index < 0 ? 0 : index) % PALETTE.length];
}

function niceMax(value) {
  if (!(value > 0)) return 1;
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

function drawChart(figure, times, series) {
  // series: [{name, values: (number|null)[], dashed?, colour}]
  const svg = $("svg", figure);
  const legend = $(".legend", figure);
  const W = 320, H = 140, L = 34, R = 6, T = 8, B = 18;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const all = series.flatMap((s) => s.values).filter((v) => v !== null && Number.isFinite(v));
  if (!all.length) {
    svg.setAttribute("viewBox", `0 0 ${W} 48`);  // a short card: there is nothing to draw yet
    svg.innerHTML = `<text x="${W / 2}" y="28" text-anchor="middle" class="nodata">no data</text>`;
    legend.replaceChildren();
    figure.dataset.empty = "true";
    return;
  }
  figure.dataset.empty = "false";
  const max = niceMax(Math.max(...all));
  const now = times[times.length - 1];
  const span = Math.min(WINDOW_S, Math.max(30, now - times[0]));  // fill the chart from the first poll
  const x = (i) => L + (W - L - R) * (1 - (now - times[i]) / span);
  const y = (v) => T + (H - T - B) * (1 - v / max);
  let out = "";
  for (const f of [0, 0.5, 1]) {
    const v = max * f;
    out += `<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/>`;
    out += `<text class="tick" x="${L - 4}" y="${y(v) + 3}" text-anchor="end">${+v.toFixed(2)}</text>`;
  }
  out += `<text class="tick" x="${L}" y="${H - 4}">${duration(span)} ago</text><text class="tick" x="${W - R}" y="${H - 4}" text-anchor="end">now</text>`;
  for (const s of series) {
    let d = "";
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) { pen = false; return; }
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    out += `<path d="${d}" fill="none" stroke="${s.colour}" stroke-width="2" ${s.dashed ? 'stroke-dasharray="4 3"' : ""} stroke-linejoin="round"/>`;
  }
  svg.innerHTML = out;
  legend.replaceChildren(...series.map((s) => {
    const last = [...s.values].reverse().find((v) => v !== null && Number.isFinite(v));
    const item = document.createElement("span");
    const swatch = document.createElement("i");
    swatch.style.background = s.colour;  // CSSOM, allowed by the page's style-src 'self'
    if (s.dashed) swatch.style.opacity = ".55";
    const value = document.createElement("b");
    value.textContent = last === undefined ? "–" : String(+last.toFixed(2));
    item.append(swatch, `${s.name} `, value);
    return item;
  }));
}

function initAdmin() {
  const snapshots = [];

  const seriesOf = (names, pick) =>
    names.map((name) => ({ name, colour: colourOf(name, names), values: snapshots.map((s) => pick(s, name)) }));

  function rate(i, get) {
    const b = snapshots[i];
    let j = i - 1;
    while (j > 0 && b.time - snapshots[j - 1].time <= RATE_WINDOW_S) j--;
    if (j < 0 || b.time - snapshots[j].time < RATE_WINDOW_S / 2) return null;  // too short to say
    const a = snapshots[j];
    const va = get(a), vb = get(b);
    if (va === undefined || vb === undefined || va === null || vb === null) return null;
    return Math.max(0, (vb - va) / Math.max(0.001, b.time - a.time));
  }

  function render() {
    const times = snapshots.map((s) => s.time);
    const latest = snapshots[snapshots.length - 1];
    const plans = latest.plans || Object.keys(latest.queue_depth || {});
    const fig = (name) => $(`.chart[data-chart="${name}"]`);
    drawChart(fig("queue_depth"), times, seriesOf(plans, (s, p) => s.queue_depth?.[p] ?? 0));
    drawChart(fig("images_rate"), times, [{
      name: "images/s", colour: PALETTE[1],
      values: snapshots.map((_, i) => rate(i, (s) => s.images_total)),  // counted, not smoothed
    }]);
    const waitNames = plans.flatMap((p) => [`${p} p50`, `${p} p95`]);
    drawChart(fig("wait"), times, waitNames.map((n) => {
      const [plan, q] = n.split(" ");
      return { name: n, colour: colourOf(plan, plans), dashed: q === "p95", values: snapshots.map((s) => s.wait_s?.[plan]?.[q] ?? null) };
    }));
    const reasons = [...new Set(snapshots.flatMap((s) => Object.keys(s.refusals_total || {})))];
    drawChart(fig("refusals"), times, reasons.map((reason) => ({
      name: reason, colour: colourOf(reason, reasons),
      values: snapshots.map((_, i) => { const r = rate(i, (s) => s.refusals_total?.[reason] ?? 0); return r === null ? null : r * 60; }),
    })));
    const gpus = [...new Set(snapshots.flatMap((s) => (s.gpus || []).map((g) => g.name)))];
    drawChart(fig("gpu"), times, gpus.flatMap((g) => [
      { name: `GPU ${g} °C`, colour: colourOf(g, gpus), values: snapshots.map((s) => s.gpus?.find((x) => x.name === g)?.temperature_c ?? null) },
      { name: `GPU ${g} %`, colour: colourOf(g, gpus), dashed: true, values: snapshots.map((s) => s.gpus?.find((x) => x.name === g)?.utilization ?? null) },
    ]));
  }

  function cells(row, values) {
    row.replaceChildren(...values.map((v) => { const td = document.createElement("td"); td.textContent = v ?? "–"; return td; }));
    return row;
  }

  function renderThermal(latest) {
    const rows = $("#gpu-rows"), guard = latest.thermal;
    if (rows && guard && guard.gpus.length) {
      rows.replaceChildren(...guard.gpus.map((g) => {
        const row = cells(document.createElement("tr"), [
          `GPU ${g.gpu}`, g.workers.join(", "), g.temp_c, g.power_w, g.sm_clock_mhz, g.util,
          g.throttle_reasons.join(", ") || "none", g.state === "hot" ? (g.cooling ? "hot (cooling)" : "hot") : "ok",
          `${Math.round(g.capacity_factor * 100)}%`,
        ]);
        row.dataset.gpu = g.gpu; row.dataset.state = g.state; row.title = g.why.join("; ");
        return row;
      }));
      $("#thermal-note").textContent = guard.limits_held ? "thermal limits in force" : `limit ${guard.limit_c} °C`;
    }
    const audit = $("#audit-rows");
    if (audit && latest.audit?.length) {
      audit.replaceChildren(...latest.audit.map((e) => cells(document.createElement("tr"),
        [e.at.slice(0, 19).replace("T", " "), e.actor, e.action, e.target, e.change])));
    }
  }

  async function poll() {
    const r = await api("GET", "/admin/api/stats");
    $("#live-dot")?.classList.toggle("stale", !r.ok);
    if (r.ok) {
      snapshots.push(r.data);
      while (snapshots.length > 2 && r.data.time - snapshots[0].time > WINDOW_S) snapshots.shift();
      render();
      renderThermal(r.data);
      document.body.dataset.statsPolls = String(Number(document.body.dataset.statsPolls || 0) + 1);
    }
  }
  const every = Math.max(0.25, Number(new URLSearchParams(location.search).get("every")) || 2);
  poll();
  setInterval(() => { if (!document.hidden) poll(); }, every * 1000);

  // plans save in place, so the charts keep their history
  $$("form[data-ajax]").forEach((form) => form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const saved = $(".saved", form);
    const response = await fetch(form.action, { method: "POST", body: new FormData(form), headers: { Accept: "application/json" }, credentials: "same-origin" });
    let data = {};
    try { data = await response.json(); } catch (_) { /* not JSON */ }
    saved.textContent = response.ok ? "Saved" : (data.error?.message || `Error ${response.status}`);
    saved.dataset.tone = response.ok ? "ok" : "warn";
  }));
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "chat") initChat();
  if (page === "admin") initAdmin();
});
