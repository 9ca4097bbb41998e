// my3dgen view: the page asks the local server for frames; nothing here renders.
// One frame request is in flight at a time and only the latest settings are sent next (newest
// wins); previews (the raw volume render) while something moves, the full frame once it rests.
"use strict";

(() => {
  const REST_MS = 250;  // no movement for this long: ask for the full frame
  const token = new URLSearchParams(location.search).get("token") || "";
  const client = "p" + Math.random().toString(36).slice(2, 12);
  const $ = (id) => document.getElementById(id);
  const img = $("frame");
  const state = { yaw: 0, pitch: 0, mix: 0, truncation: 0.7, mode: "rgb" };
  let seq = 0;
  let shownSeq = 0;
  let inFlight = false;
  let wanted = null;  // the quality to ask for next, or null
  let restTimer = null;
  let shownUrl = null;

  const query = (extra) => new URLSearchParams({
    token, yaw: state.yaw, pitch: state.pitch, mix: state.mix, truncation: state.truncation,
    mode: state.mode, ...extra,
  }).toString();

  function say(text) { $("status").textContent = text; }

  async function errorOf(response) {
    try { return (await response.json()).error || response.statusText; } catch { return response.statusText; }
  }

  function show(blob, quality, shownState, seqShown, renderMs, tripMs) {
    const url = URL.createObjectURL(blob);
    img.onload = () => {
      if (shownUrl) URL.revokeObjectURL(shownUrl);
      shownUrl = url;
      img.dataset.quality = quality;
      img.dataset.yaw = String(shownState.yaw);  // what is on screen, for scripts and tests
      img.dataset.mix = String(shownState.mix);
      img.dataset.seq = String(seqShown);
      $("caption").textContent = `${quality} · ${img.naturalWidth}×${img.naturalHeight} px · ` +
        `render ${Math.round(renderMs)} ms · round trip ${Math.round(tripMs)} ms`;
    };
    img.src = url;
  }

  async function pump() {
    if (inFlight || wanted === null) return;
    const quality = wanted;
    wanted = null;
    inFlight = true;
    const mine = ++seq;
    const asked = { ...state };
    const started = performance.now();
    try {
      const response = await fetch(`/api/frame?${query({ quality, client, seq: mine })}`, { cache: "no-store" });
      if (response.status === 200 && mine > shownSeq) {
        shownSeq = mine;
        const blob = await response.blob();
        show(blob, quality, asked, mine, Number(response.headers.get("X-Render-Ms")), performance.now() - started);
      } else if (response.status !== 200 && response.status !== 204) {
        say(`frame refused: ${await errorOf(response)}`);
      }
    } catch (err) {
      say(`the server does not answer (${err}); is \`my3dgen view\` still running?`);
    } finally {
      inFlight = false;
      pump();
    }
  }

  function ask(quality) { wanted = quality; pump(); }

  function moved() {
    ask("preview");
    clearTimeout(restTimer);
    restTimer = setTimeout(() => ask("full"), REST_MS);
  }

  function settled() { clearTimeout(restTimer); ask("full"); }

  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

  function sync() {
    for (const key of ["yaw", "pitch"]) {
      $(key).value = state[key];
      $(`${key}-out`).textContent = `${state[key]}°`;
    }
    $("mix").value = state.mix;
    $("mix-out").textContent = state.mix.toFixed(2);
    $("truncation").value = state.truncation;
    $("truncation-out").textContent = state.truncation.toFixed(2);
  }

  for (const key of ["yaw", "pitch", "mix", "truncation"]) {
    $(key).addEventListener("input", () => { state[key] = Number($(key).value); sync(); moved(); });
    $(key).addEventListener("change", settled);
  }
  for (const radio of document.querySelectorAll("input[name=mode]")) {
    radio.addEventListener("change", () => { state.mode = radio.value; settled(); });
  }
  $("reset").addEventListener("click", () => { state.yaw = 0; state.pitch = 0; sync(); settled(); });

  let drag = null;
  img.addEventListener("pointerdown", (e) => {
    drag = { x: e.clientX, y: e.clientY, yaw: state.yaw, pitch: state.pitch };
    img.setPointerCapture(e.pointerId);
    img.classList.add("dragging");
  });
  img.addEventListener("pointermove", (e) => {
    if (!drag) return;
    state.yaw = clamp(Math.round(drag.yaw + (e.clientX - drag.x) * 0.35), -90, 90);
    state.pitch = clamp(Math.round(drag.pitch + (e.clientY - drag.y) * 0.25), -45, 45);
    sync();
    moved();
  });
  const release = () => { if (drag) { drag = null; img.classList.remove("dragging"); settled(); } };
  img.addEventListener("pointerup", release);
  img.addEventListener("pointercancel", release);

  async function save(what, button) {
    button.disabled = true;
    say(what === "orbit" ? "rendering the orbit…" : "saving…");
    try {
      const response = await fetch(`/api/save/${what}?${query({})}`, { method: "POST" });
      say(response.ok ? `saved ${(await response.json()).saved}` : `not saved: ${await errorOf(response)}`);
    } catch (err) {
      say(`not saved: ${err}`);
    } finally {
      button.disabled = false;
    }
  }
  $("save-png").addEventListener("click", (e) => save("png", e.currentTarget));
  $("save-orbit").addEventListener("click", (e) => save("orbit", e.currentTarget));

  async function start() {
    const response = await fetch(`/api/info?${new URLSearchParams({ token })}`, { cache: "no-store" });
    if (!response.ok) { say(`refused: ${await response.text()}`); return; }
    const info = await response.json();
    $("title").textContent = info.title;
    document.title = `${info.title} · my3dgen view`;
    if (info.sources.length === 2) {
      $("mix-names").textContent = `${info.sources[0]} ↔ ${info.sources[1]}`;
      $("mix-row").hidden = false;
    }
    if (info.seeds) {
      state.truncation = info.truncation;
      $("truncation-row").hidden = false;
    }
    sync();
    ask("full");
  }
  start();
})();
