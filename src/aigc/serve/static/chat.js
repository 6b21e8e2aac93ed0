// The playground's chat tab: keeps the conversation, streams /v1/chat/completions (`delta` chunks) and
// lets the user stop an answer. Uses the sliders and seed of the completion form; loads after app.js
// (shares its `$`, `modelName`, `loadSummary` and `authHeaders`).
"use strict";

const chatHistory = []; // {role, content}: the turns sent with every request
let chatController = null; // AbortController of the running answer

function showTab(name) {
  const chat = name === "chat";
  document.body.classList.toggle("mode-chat", chat);
  $("chat").hidden = !chat;
  $("tab-chat").classList.toggle("active", chat);
  $("tab-completion").classList.toggle("active", !chat);
  $("tab-chat").setAttribute("aria-selected", String(chat));
  $("tab-completion").setAttribute("aria-selected", String(!chat));
}

function chatStatus(text, isError = false) {
  $("chat-status").textContent = text;
  $("chat-status").classList.toggle("error", isError);
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "role";
  who.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  box.append(who, body);
  $("chat-history").append(box);
  $("chat-history").scrollTop = $("chat-history").scrollHeight;
  return body;
}

function chatBody() {
  const messages = [];
  const system = $("chat-system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...chatHistory);
  const body = {
    model: modelName,
    messages,
    max_tokens: Number($("max-tokens").value),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    stream: true,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  return body;
}

// Read chat.completion.chunk events into `target`; returns the finish reason.
async function readChat(res, target, stats) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return stats.finish;
    buffer += value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.startsWith("data: ") ? event.slice(6) : "";
      if (data === "[DONE]") return stats.finish;
      if (!data) continue;
      const message = JSON.parse(data);
      if (message.error) throw new Error(message.error.message);
      for (const choice of message.choices) {
        if (choice.finish_reason) stats.finish = choice.finish_reason;
        if (choice.delta && choice.delta.content) {
          target.textContent += choice.delta.content;
          stats.tokens += 1;
        }
      }
    }
    $("chat-history").scrollTop = $("chat-history").scrollHeight;
    chatStatus(`${stats.tokens} tokens…`);
  }
}

async function sendChat(event) {
  event.preventDefault();
  if (chatController) return;
  if (!modelName) await loadSummary();
  const text = $("chat-input").value.trim();
  if (!modelName || !text) return;
  $("chat-input").value = "";
  chatHistory.push({ role: "user", content: text });
  const userBox = addMessage("user", text);
  const reply = addMessage("assistant", "");
  chatController = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  const stats = { tokens: 0, finish: null };
  chatStatus("Answering…");
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify(chatBody()),
      signal: chatController.signal,
    });
    if (!res.ok) {
      const body = await res.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
    }
    const finish = await readChat(res, reply, stats);
    chatHistory.push({ role: "assistant", content: reply.textContent });
    chatStatus(`Done: ${stats.tokens} tokens, finish reason: ${finish}.`);
  } catch (error) {
    if (error.name === "AbortError") {
      chatHistory.push({ role: "assistant", content: reply.textContent }); // what was shown stays
      chatStatus(`Stopped after ${stats.tokens} tokens.`);
    } else {
      chatHistory.pop(); // the message was not answered: take it back so it can be sent again
      userBox.parentElement.remove();
      reply.parentElement.remove();
      $("chat-input").value = text;
      chatStatus(`Error: ${error.message}`, true);
    }
  } finally {
    chatController = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
  }
}

function resetChat() {
  if (chatController) chatController.abort();
  chatHistory.length = 0;
  $("chat-history").replaceChildren();
  chatStatus("Conversation cleared.");
}

$("tab-chat").addEventListener("click", () => showTab("chat"));
$("tab-completion").addEventListener("click", () => showTab("completion"));
$("chat-form").addEventListener("submit", sendChat);
$("chat-stop").addEventListener("click", () => chatController && chatController.abort());
$("chat-reset").addEventListener("click", resetChat);
$("chat-input").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("chat-form").requestSubmit();
  }
});
