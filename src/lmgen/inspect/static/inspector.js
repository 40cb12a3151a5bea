// lmgen inspector: a view over the JSON API at /v1/inspect (same origin; nothing else is fetched).
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const CONTROLS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty"];
  const key = new URLSearchParams(location.hash.slice(1)).get("key");  // #key=... when the server needs an API key
  const state = { session: null, selected: null, info: null, filtering: false, filterAgain: false, lastRenderMs: null, renders: 0, errors: 0 };
  window.lmgenInspector = state;

  async function api(method, path, body) {
    const headers = { "Content-Type": "application/json" };
    if (key) headers["Authorization"] = "Bearer " + key;
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await r.json();
    if (!r.ok) throw new Error((data.error && data.error.message) || r.statusText);
    return data;
  }

  function status(text, isError) {
    const el = $("status");
    el.textContent = text;
    el.style.color = isError ? "#ff8080" : "";
  }

  function visible(text) {
    return text.replace(/ /g, "\u2423").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5") || "\u2205";
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function tokenChip(t, cls) {
    const chip = el("span", "tok" + (t.special ? " special" : "") + (cls ? " " + cls : ""));
    chip.appendChild(el("span", "t", visible(t.text)));
    chip.appendChild(el("small", null, String(t.id)));
    chip.title = `id ${t.id}  piece ${JSON.stringify(t.piece)}`;
    chip.dataset.id = t.id;
    return chip;
  }

  function params() {
    const p = {};
    for (const name of CONTROLS) p[name] = name === "top_k" ? parseInt($(name).value, 10) : parseFloat($(name).value);
    const seed = $("seed").value.trim();
    p.seed = seed === "" ? null : parseInt(seed, 10);
    return p;
  }

  function showControls(p) {
    for (const name of CONTROLS) {
      $(name).value = p[name];
      $(name + "-value").textContent = name === "top_k" && p[name] <= 0 ? "off" : String(p[name]);
    }
    $("seed").value = p.seed === null ? "" : p.seed;
  }

  // ---- rendering ------------------------------------------------------------------------------
  function renderSession(syncControls = true) {
    const s = state.session;
    $("prompt-count").textContent = `${s.prompt_token_count} tokens`;
    $("rendered").hidden = s.mode !== "chat";
    $("rendered").textContent = s.prompt_text;
    const pt = $("prompt-tokens");
    pt.replaceChildren(...s.prompt_tokens.map((t) => tokenChip(t)));
    const ot = $("output-tokens");
    ot.replaceChildren(...s.steps.filter((st) => !st.pending).map((st) => {
      const chip = tokenChip(st.chosen, "out" + (st.chosen.forced ? " forced" : "") +
                             (st.index === state.selected ? " selected" : ""));
      chip.dataset.step = st.index;
      chip.addEventListener("click", () => { state.selected = st.index; renderSession(); });
      return chip;
    }));
    const done = s.finished;
    $("step").disabled = $("run").disabled = done;
    $("beams").disabled = $("attention").disabled = false;
    if (syncControls) showControls(s.params);  // not while a control is moving
    renderStep(s.steps.find((st) => st.index === state.selected) || s.steps[s.steps.length - 1]);
    renderKV();
  }

  function verdictCell(v) {
    const label = v === null ? "\u2014" : v;
    return el("td", v === null ? "v-up" : "v-" + v, label);
  }

  function renderStep(st) {
    if (!st) return;
    $("step-title").textContent = `${st.index}${st.pending ? " (current)" : ""}`;
    const chosen = st.chosen;
    $("step-summary").textContent = (st.greedy ? "greedy: the argmax after penalties. " : "") +
      `${st.kept_count} token(s) of the vocabulary can be drawn (raw mass ${st.kept_raw_mass.toFixed(4)}); ` +
      (st.pending ? `the sampler draws ${JSON.stringify(st.sampler_token.text)} (id ${st.sampler_token.id})`
                  : `taken: ${JSON.stringify(chosen.text)} (id ${chosen.id})${chosen.forced ? ", forced" : ""}`);
    const body = $("candidates").tBodies[0];
    const rows = st.candidates.map((c, i) => {
      const tr = el("tr", "cand" + (c.id === chosen.id ? " chosen" : "") + (c.kept ? "" : " cut"));
      tr.dataset.id = c.id;
      tr.dataset.kept = c.kept ? "1" : "0";
      tr.appendChild(el("td", "num", String(i + 1)));
      tr.appendChild(el("td", "tokcell", visible(c.text)));
      tr.appendChild(el("td", "num", String(c.id)));
      for (const [value, cls] of [[c.raw_prob, "raw"], [c.adjusted_prob, "adj"]]) {
        const td = el("td", "num prob-" + cls);
        const bar = el("span", "bar " + cls);
        bar.style.width = Math.max(1, Math.round(value * 50)) + "px";
        td.appendChild(bar);
        td.appendChild(el("span", "p", value.toFixed(6)));
        tr.appendChild(td);
      }
      tr.appendChild(verdictCell(c.top_k));
      tr.appendChild(verdictCell(c.top_p));
      tr.appendChild(verdictCell(c.min_p));
      tr.appendChild(el("td", "num final", c.kept ? c.final_prob.toFixed(6) : "cut"));
      tr.addEventListener("click", () => force(st.index, c.id));
      return tr;
    });
    body.replaceChildren(...rows);
  }

  function renderKV() {
    const steps = state.session.steps;
    const body = $("kv-table").tBodies[0];
    body.replaceChildren(...steps.map((st) => {
      const tr = el("tr");
      const kv = st.kv;
      for (const v of [st.index, kv.context_tokens, kv.cached_tokens, kv.computed_tokens,
                       `${kv.kv_blocks_used} / ${kv.kv_blocks_total}`, st.timing.forward_ms.toFixed(1),
                       st.timing.filter_ms.toFixed(1)]) tr.appendChild(el("td", "num", String(v)));
      return tr;
    }));
    const last = steps[steps.length - 1];
    if (last) {
      const kv = last.kv;
      $("kv-summary").textContent = `prompt ${state.session.prompt_token_count} tokens, ` +
        `${state.session.output_tokens.length} generated; blocks of ${kv.block_size} tokens; ` +
        `prefix cache: ${kv.prefix_hits} hits / ${kv.prefix_queries} queries. Each step re-submits the sequence: ` +
        `full blocks come from the prefix cache, the rest is computed.`;
    }
  }

  // ---- actions --------------------------------------------------------------------------------
  async function timed(label, fn) {
    const t0 = performance.now();
    status(label + "\u2026");
    try {
      await fn();
      state.lastRenderMs = performance.now() - t0;
      state.renders += 1;
      status(`${label}: rendered in ${state.lastRenderMs.toFixed(0)} ms`);
    } catch (e) {
      state.errors += 1;
      status(`${label}: ${e.message}`, true);
    }
  }

  async function start() {
    await timed("start", async () => {
      const mode = $("mode-chat").checked ? "chat" : "completion";
      const text = $("prompt").value;
      const body = { params: params() };
      if (mode === "chat") {
        body.messages = [];
        if ($("system").value.trim()) body.messages.push({ role: "system", content: $("system").value });
        body.messages.push({ role: "user", content: text });
      } else {
        body.prompt = text;
      }
      state.session = await api("POST", "/v1/inspect/sessions", body);
      state.selected = null;
      renderSession();
    });
  }

  async function step(count) {
    if (!state.session) return;
    await timed(count === 1 ? "step" : `run ${count}`, async () => {
      state.session = await api("POST", `/v1/inspect/sessions/${state.session.id}/step`, { count });
      state.selected = null;
      renderSession();
    });
  }

  async function force(index, id) {
    await timed("force", async () => {
      state.session = await api("POST", `/v1/inspect/sessions/${state.session.id}/step`, { force: id, at: index });
      state.selected = null;
      renderSession();
    });
  }

  async function refilter() {
    for (const name of CONTROLS) {
      $(name + "-value").textContent = name === "top_k" && $(name).value <= 0 ? "off" : $(name).value;
    }
    if (!state.session) return;
    if (state.filtering) {  // a drag sends many events: one request at a time, the latest values next
      state.filterAgain = true;
      return;
    }
    state.filtering = true;
    try {
      await timed("filter", async () => {
        const r = await api("POST", `/v1/inspect/sessions/${state.session.id}/filter`, params());
        state.session.params = r.params;
        const steps = state.session.steps;
        steps[steps.length - 1] = r.step;
        state.selected = null;
        renderSession(false);
      });
    } finally {
      state.filtering = false;
    }
    if (state.filterAgain) {
      state.filterAgain = false;
      await refilter();
    }
  }

  async function beams() {
    await timed("beam search", async () => {
      const width = parseInt($("beam-width").value, 10);
      const tree = await api("POST", `/v1/inspect/sessions/${state.session.id}/beams`,
                             { beam_width: width, max_tokens: parseInt($("beam-tokens").value, 10) });
      $("beam-results").replaceChildren(...tree.results.map((r) => {
        const li = el("li", "beam-result", `${JSON.stringify(r.text)}  score ${r.score.toFixed(4)}  ` +
                      `(cumulative log-prob ${r.cumulative_logprob.toFixed(4)}, ${r.finish_reason})`);
        li.dataset.text = r.text;
        return li;
      }));
      const byId = new Map(tree.nodes.map((n) => [n.id, n]));
      $("beam-tree").replaceChildren(...tree.steps.map((st) => {
        const col = el("div", "beam-col");
        col.appendChild(el("b", null, `step ${st.index}`));
        let lastParent = null;
        for (const id of st.nodes) {
          const n = byId.get(id);
          if (n.parent !== lastParent && st.index > 0) {  // the beam these continuations extend
            const p = byId.get(n.parent);
            col.appendChild(el("div", "beam-parent", `after ${visible(p.text)}`));
            lastParent = n.parent;
          }
          const node = el("div", "beam-node " + n.status, `${visible(n.text)} ${n.cumulative_logprob.toFixed(2)}`);
          const parent = byId.get(n.parent);
          node.title = `${n.status}; after ${parent && parent.text !== null ? JSON.stringify(parent.text) : "the prompt"}; ` +
                       `log-prob ${n.logprob.toFixed(4)}`;
          node.dataset.status = n.status;
          col.appendChild(node);
        }
        return col;
      }));
    });
  }

  async function attention() {
    await timed("attention", async () => {
      const r = await api("POST", `/v1/inspect/sessions/${state.session.id}/attention`,
                          { layer: parseInt($("att-layer").value, 10), head: parseInt($("att-head").value, 10) });
      const max = Math.max(...r.weights);
      $("attention-note").textContent = `layer ${r.layer}, head ${r.head}, step ${r.step}: recomputed with plain ` +
        `PyTorch; its next-token probabilities are within ${r.check.max_abs_prob_diff.toExponential(1)} of the engine's`;
      $("attention-view").replaceChildren(...r.tokens.map((t, i) => {
        const chip = tokenChip(t);
        const w = r.weights[i];
        chip.style.backgroundColor = `rgba(220, 60, 60, ${(w / max).toFixed(3)})`;
        chip.title += `  weight ${w.toFixed(4)}`;
        chip.dataset.weight = w;
        return chip;
      }));
    });
  }

  async function init() {
    for (const name of CONTROLS) $(name).addEventListener("input", refilter);
    $("seed").addEventListener("change", refilter);
    $("start").addEventListener("click", start);
    $("step").addEventListener("click", () => step(1));
    $("run").addEventListener("click", () => step(Math.max(1, parseInt($("run-count").value, 10) || 1)));
    $("beams").addEventListener("click", beams);
    $("attention").addEventListener("click", attention);
    for (const radio of ["mode-completion", "mode-chat"]) {
      $(radio).addEventListener("change", () => { $("system").hidden = !$("mode-chat").checked; });
    }
    showControls({ temperature: 1, top_k: 0, top_p: 1, min_p: 0, repetition_penalty: 1, seed: 0 });
    try {
      state.info = await api("GET", "/v1/inspect/info");
      $("model-info").textContent = `${state.info.model}: ${state.info.num_layers} layers, ` +
        `${state.info.num_heads} heads, vocabulary ${state.info.vocab_size}`;
      const opts = (n) => Array.from({ length: n }, (_, i) => { const o = el("option", null, String(i)); o.value = i; return o; });
      $("att-layer").replaceChildren(...opts(state.info.num_layers));
      $("att-head").replaceChildren(...opts(state.info.num_heads));
      status("ready");
    } catch (e) {
      status(e.message, true);
    }
  }

  document.addEventListener("DOMContentLoaded", init);
})();
