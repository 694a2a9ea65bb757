// The chat page: the conversation lives in this page; each turn is one streamed /v1/chat/completions request.
"use strict";

const MODELS_RETRY_MS = 3000;  // while no model has a full chain, look again this often
const $ = (id) => document.getElementById(id);
const history = [];  // {role, content} of the turns so far, sent with every request
let controller = null;  // aborts the running request (Stop): the server then closes its session

function bubble(role, text) {
  $("empty")?.remove();
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function loadModels() {
  const select = $("model");
  const chosen = select.value;
  let ids = [];
  try {
    const response = await fetch("/v1/models");
    ids = (await response.json()).data.map((m) => m.id);
  } catch (e) { /* the server is restarting: retry below */ }
  select.replaceChildren(...ids.map((id) => new Option(id, id, false, id === chosen)));
  if (!ids.length) {
    select.appendChild(new Option("no model has a full chain of workers yet", ""));
    setTimeout(loadModels, MODELS_RETRY_MS);
  }
  setBusy(false);
}

function setBusy(busy) {
  $("send").disabled = busy || !$("model").value;
  $("stop").hidden = !busy;
}

// Server-sent events arrive in arbitrary pieces: yield each complete `data:` payload.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(text) {
  history.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant streaming", "");
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  let content = "";
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      signal: controller.signal,
      body: JSON.stringify({
        model: $("model").value, messages: history, stream: true, stream_options: { include_usage: true },
        temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
      }),
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error(body.error?.message || `HTTP ${response.status}`);
    }
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        content += delta;
        reply.textContent = content;
        reply.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      if (!content) { reply.remove(); history.pop(); }
      bubble("error", `Error: ${e.message}`);
    }
  } finally {
    reply.classList.remove("streaming");
    if (content) {
      history.push({ role: "assistant", content });
      const seconds = (performance.now() - started) / 1000;
      const meta = document.createElement("span");
      meta.className = "meta";
      meta.textContent = usage
        ? `${usage.completion_tokens} tokens in ${seconds.toFixed(1)} s (${(usage.completion_tokens / seconds).toFixed(1)} tokens/s)`
        : `stopped after ${seconds.toFixed(1)} s`;
      reply.appendChild(meta);
    }
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("message").value.trim();
  if (!text || controller || !$("model").value) return;
  $("message").value = "";
  send(text);
});
$("message").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("new-chat").addEventListener("click", () => {
  controller?.abort();
  history.length = 0;
  $("conversation").replaceChildren();
});
$("model").addEventListener("change", () => setBusy(false));
loadModels();
