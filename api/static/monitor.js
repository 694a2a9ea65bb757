// The swarm monitor: redraws /api/swarm every REFRESH_MS. Everything shown came from gossip, so it is
// written with textContent only, never parsed as HTML.
"use strict";

const REFRESH_MS = 1000;

function el(tag, { dataset = {}, ...props } = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  Object.assign(node.dataset, dataset);
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

function strip(numBlocks, cellClass, title, small = false) {
  const cells = [];
  for (let b = 0; b < numBlocks; b++) cells.push(el("span", { className: `cell ${cellClass(b)}`, title: title(b) }));
  return el("div", { className: small ? "strip small" : "strip" }, ...cells);
}

function spans(ranges) {
  return ranges.map(([a, b]) => `${a}:${b}`).join(", ");
}

function cache(worker) {
  if (worker.cache_tokens_total === null) return el("span", { textContent: `${worker.cache_tokens_free} free` });
  const used = worker.cache_tokens_used;
  const share = worker.cache_tokens_total ? used / worker.cache_tokens_total : 0;
  const bar = el("span", { className: "bar" }, el("span", { style: `width: ${(100 * share).toFixed(1)}%` }));
  return el("span", {}, bar, `${used.toLocaleString()} / ${worker.cache_tokens_total.toLocaleString()}`);
}

function health(worker) {
  const text = worker.health === "ok" ? `ok ${worker.rtt_ms.toFixed(1)} ms` : worker.health;
  return el("span", { className: `badge ${worker.health}`, textContent: text });
}

function workerRow(model, worker) {
  const span = strip(model.num_blocks, (b) => (worker.start <= b && b < worker.end ? "on" : ""),
                     (b) => `block ${b}`, true);
  return el("tr", { className: "worker" },
    el("td", { className: "mono", textContent: worker.peer_id }),
    el("td", {}, span),
    el("td", { className: "mono", textContent: `${worker.start}:${worker.end}` }),
    el("td", { className: "mono", textContent: worker.endpoint }),
    el("td", { textContent: worker.throughput ? `${worker.throughput.toFixed(0)} tok/s` : "?" }),
    el("td", {}, cache(worker)),
    el("td", { className: "mono", textContent: worker.adapters.join(", ") || "—" }),
    el("td", {}, health(worker)));
}

function modelCard(model) {
  const chain = model.full_chain
    ? el("span", { className: "chain yes", textContent: "full chain: yes" })
    : el("span", { className: "chain no", textContent: `full chain: NO, missing blocks ${spans(model.missing)}` });
  const coverage = strip(model.num_blocks, (b) => `c${Math.min(model.coverage[b], 3)}`,
                         (b) => `block ${b}: ${model.coverage[b]} worker(s)`);
  const head = el("tr", {}, ...["worker", "span", "blocks", "endpoint", "throughput per block", "cache in use", "adapters", "health"]
    .map((h) => el("th", { textContent: h })));
  return el("section", { className: "card model", dataset: { model: model.id } },
    el("h2", { textContent: model.id }),
    el("div", {}, chain, ` · ${model.num_blocks} blocks · ${model.workers.length} worker(s)`),
    coverage,
    el("div", { className: "axis" }, el("span", { textContent: "block 0" }),
       el("span", { textContent: `block ${model.num_blocks - 1}` })),
    el("table", {}, el("thead", {}, head), el("tbody", {}, ...model.workers.map((w) => workerRow(model, w)))));
}

async function refresh() {
  try {
    const response = await fetch("/api/swarm", { cache: "no-store" });
    const swarm = await response.json();
    document.getElementById("models").replaceChildren(...swarm.models.map(modelCard));
    const workers = swarm.models.reduce((n, m) => n + m.workers.length, 0);
    document.getElementById("status").textContent = swarm.models.length
      ? `${swarm.models.length} model(s), ${workers} worker(s); updated ${new Date().toLocaleTimeString()}`
      : `No workers found yet; updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById("status").textContent = `The API does not answer (${e.message}); retrying ...`;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
