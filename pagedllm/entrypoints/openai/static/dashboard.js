// The /dashboard page: polls dashboard/data every second (the numbers /metrics exposes) and
// draws tiles, uPlot time series and histogram bars. No network access beyond this server.
"use strict";

const HISTORY = 300;  // points kept per series (5 minutes at 1 s)
// Resolved against the page's own path (works under --root-path) and location.origin, which
// carries no user:password even if the page URL did (fetch rejects URLs with credentials).
const BASE = location.origin + location.pathname.replace(/\/?$/, "/");
const DATA_URL = BASE + "data";

const TILES = [
  ["vllm:num_requests_running", "Running requests", v => v.toFixed(0)],
  ["vllm:num_requests_waiting", "Waiting requests", v => v.toFixed(0)],
  ["vllm:num_requests_swapped", "Swapped requests", v => v.toFixed(0)],
  ["vllm:gpu_cache_usage_perc", "KV-cache use", v => (100 * v).toFixed(1) + " %"],
  ["vllm:gpu_prefix_cache_hit_rate", "Prefix-cache hit rate", v => (100 * v).toFixed(1) + " %"],
  ["vllm:avg_prompt_throughput_toks_per_s", "Prompt tokens/s", v => v.toFixed(1)],
  ["vllm:avg_generation_throughput_toks_per_s", "Generation tokens/s", v => v.toFixed(1)],
  ["vllm:prompt_tokens_total", "Prompt tokens (total)", v => v.toFixed(0)],
  ["vllm:generation_tokens_total", "Generation tokens (total)", v => v.toFixed(0)],
  ["vllm:request_success_total", "Finished requests", v => v.toFixed(0)],
  ["vllm:num_preemptions_total", "Preemptions", v => v.toFixed(0)],
  ["vllm:spec_decode_draft_acceptance_rate", "Spec-decode acceptance", v => (100 * v).toFixed(1) + " %"],
];

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  Object.entries(attrs || {}).forEach(([k, v]) => node.setAttribute(k, v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function makeTiles() {
  const box = document.getElementById("tiles");
  for (const [name, label] of TILES) {
    const tile = el("div", {class: "tile"});
    tile.append(el("div", {class: "label"}, label), el("div", {class: "value", "data-metric": name}, "–"));
    box.append(tile);
  }
}

function makeChart(id, labels, colors) {
  const node = document.getElementById(id);
  const series = [{}].concat(labels.map((label, i) => ({label, stroke: colors[i], width: 2})));
  const data = [[]].concat(labels.map(() => []));
  const chart = new uPlot({width: Math.max(node.clientWidth, 420), height: 200, series,
                           axes: [{}, {size: 60}]}, data, node);
  return {chart, data};
}

function push(entry, time, values) {
  entry.data[0].push(time);
  values.forEach((v, i) => entry.data[i + 1].push(v));
  if (entry.data[0].length > HISTORY) entry.data.forEach(s => s.shift());
  entry.chart.setData(entry.data);
}

function drawHistogram(id, hist, previous) {
  const node = document.getElementById(id);
  node.textContent = "";
  if (!hist) return;
  const counts = hist.counts.map((c, i) => c - (i ? hist.counts[i - 1] : 0));  // de-cumulate
  const most = Math.max(1, ...counts);
  hist.le.forEach((le, i) => {
    const row = el("div", {class: "bar"});
    const bar = el("div");
    bar.style.width = (200 * counts[i] / most) + "px";
    row.append(el("span", {}, le === null ? "+Inf" : "≤ " + le), bar, el("em", {}, String(counts[i])));
    node.append(row);
  });
}

function meanOverInterval(now, before, base) {
  if (!before) return null;
  const count = now[base + "_count"] - before[base + "_count"];
  return count > 0 ? 1000 * (now[base + "_sum"] - before[base + "_sum"]) / count : null;
}

let charts = null;
let previous = null;

function render(snap) {
  const m = snap.metrics;
  document.getElementById("model").textContent = "· " + snap.model_name;
  for (const [name, , format] of TILES) {
    const node = document.querySelector(`[data-metric="${name}"]`);
    const known = m[name] !== undefined && m[name] !== null;
    node.textContent = known ? format(m[name]) : "n/a";
    node.dataset.value = known ? String(m[name]) : "";
  }
  const t = snap.time;
  push(charts.requests, t, [m["vllm:num_requests_running"], m["vllm:num_requests_waiting"],
                            m["vllm:num_requests_swapped"]]);
  push(charts.cache, t, [100 * m["vllm:gpu_cache_usage_perc"], 100 * m["vllm:gpu_prefix_cache_hit_rate"]]);
  push(charts.tokens, t, [m["vllm:avg_prompt_throughput_toks_per_s"],
                          m["vllm:avg_generation_throughput_toks_per_s"]]);
  push(charts.latency, t, ["vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
                           "vllm:e2e_request_latency_seconds"].map(b => meanOverInterval(m, previous, b)));
  drawHistogram("hist-ttft", snap.histograms["vllm:time_to_first_token_seconds"]);
  drawHistogram("hist-tpot", snap.histograms["vllm:time_per_output_token_seconds"]);
  drawHistogram("hist-e2e", snap.histograms["vllm:e2e_request_latency_seconds"]);
  const table = document.getElementById("finished");
  table.textContent = "";
  for (const [labels, value] of snap.labelled["vllm:request_success_total"] || []) {
    const row = el("tr");
    row.append(el("td", {}, snap.model_name), el("td", {}, labels.finished_reason), el("td", {}, value.toFixed(0)));
    table.append(row);
  }
  drawPerModel(snap);
  previous = m;
}

function drawPerModel(snap) {
  // requests per served model (the base model or a LoRA adapter): started, ended, in flight
  const rows = {};
  for (const [key, field] of [["pagedllm:model_requests_started_total", "started"],
                              ["pagedllm:model_requests_ended_total", "ended"]]) {
    for (const [labels, value] of snap.labelled[key] || []) {
      const row = rows[labels.served_model_name] || (rows[labels.served_model_name] = {started: 0, ended: 0});
      row[field] = value;
    }
  }
  const table = document.getElementById("per-model");
  table.textContent = "";
  for (const [name, row] of Object.entries(rows).sort()) {
    const tr = el("tr", {"data-model": name});
    tr.append(el("td", {}, name), el("td", {}, row.started.toFixed(0)),
              el("td", {}, row.ended.toFixed(0)), el("td", {}, (row.started - row.ended).toFixed(0)));
    table.append(tr);
  }
}

async function poll() {
  const status = document.getElementById("status");
  try {
    const resp = await fetch(DATA_URL, {credentials: "same-origin", cache: "no-store"});
    if (resp.status === 401) {
      status.textContent = "unauthorized: reload the page and give the API key as the password";
    } else {
      const snap = await resp.json();
      render(snap);
      status.textContent = "updated " + new Date(snap.time * 1000).toLocaleTimeString();
      status.dataset.updates = String(Number(status.dataset.updates || 0) + 1);
    }
  } catch (err) {
    status.textContent = "server unreachable: " + err;
  }
  setTimeout(poll, 1000);
}

function main() {
  makeTiles();
  charts = {
    requests: makeChart("chart-requests", ["running", "waiting", "swapped"], ["#2a9d8f", "#e9c46a", "#e76f51"]),
    cache: makeChart("chart-cache", ["KV-cache use %", "prefix hit %"], ["#264653", "#8ab17d"]),
    tokens: makeChart("chart-tokens", ["prompt tok/s", "generation tok/s"], ["#f4a261", "#4a7fd6"]),
    latency: makeChart("chart-latency", ["TTFT", "TPOT", "e2e"], ["#9b5de5", "#00bbf9", "#f15bb5"]),
  };
  poll();
}

main();
