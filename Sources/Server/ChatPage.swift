/// The chat page `GET /` serves: one self-contained HTML file (no scripts, styles or fonts from
/// anywhere else), built into the binary. It talks to the server's own /v1/chat/completions with
/// streaming; model text is only ever set as text (`textContent`), never parsed as HTML.
enum ChatPage {
    static let html = #"""
        <!doctype html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>strun chat</title>
        <style>
          :root { --bg: #f6f6f4; --fg: #1d1d1b; --muted: #6b6b66; --line: #d9d9d4; --user: #e3ecf7; --bot: #ffffff; --accent: #2f5d8a; --error: #a3262a; }
          @media (prefers-color-scheme: dark) {
            :root { --bg: #18181a; --fg: #e8e8e4; --muted: #9a9a94; --line: #34343a; --user: #24344a; --bot: #222226; --accent: #7fb0e0; --error: #ef8a8d; }
          }
          * { box-sizing: border-box; }
          html, body { height: 100%; margin: 0; }
          body { background: var(--bg); color: var(--fg); font: 16px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; display: flex; flex-direction: column; }
          header { display: flex; align-items: center; gap: .5rem; padding: .5rem .75rem; border-bottom: 1px solid var(--line); flex-wrap: wrap; }
          header h1 { font-size: 1rem; margin: 0; flex: 1; min-width: 8rem; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
          button { font: inherit; border: 1px solid var(--line); background: var(--bot); color: var(--fg); border-radius: .4rem; padding: .35rem .8rem; cursor: pointer; }
          button.primary { background: var(--accent); border-color: var(--accent); color: #fff; }
          button:disabled { opacity: .5; cursor: default; }
          main { flex: 1; overflow-y: auto; padding: .75rem; }
          #messages { max-width: 50rem; margin: 0 auto; display: flex; flex-direction: column; gap: .6rem; }
          .message { padding: .5rem .75rem; border-radius: .6rem; border: 1px solid var(--line); white-space: pre-wrap; overflow-wrap: anywhere; }
          .message.user { background: var(--user); align-self: flex-end; max-width: 85%; }
          .message.assistant { background: var(--bot); align-self: flex-start; max-width: 100%; }
          .message.error { color: var(--error); border-color: var(--error); background: transparent; }
          .stats { font-size: .8rem; color: var(--muted); margin-top: .3rem; white-space: normal; }
          .empty { color: var(--muted); text-align: center; margin-top: 3rem; }
          footer { border-top: 1px solid var(--line); padding: .6rem .75rem; }
          #composer { max-width: 50rem; margin: 0 auto; display: flex; gap: .5rem; align-items: flex-end; }
          #input { flex: 1; min-width: 0; resize: none; font: inherit; padding: .45rem .6rem; border-radius: .5rem; border: 1px solid var(--line); background: var(--bot); color: var(--fg); max-height: 12rem; }
          #settings { max-width: 50rem; margin: 0 auto .6rem; display: none; gap: .5rem .9rem; flex-wrap: wrap; }
          #settings.open { display: flex; }
          #settings label { display: flex; flex-direction: column; font-size: .85rem; color: var(--muted); }
          #settings input, #settings textarea { font: inherit; color: var(--fg); background: var(--bot); border: 1px solid var(--line); border-radius: .4rem; padding: .3rem .45rem; }
          #settings input[type=number] { width: 7rem; }
          #settings .wide { flex: 1 1 100%; }
          #settings textarea { width: 100%; resize: vertical; }
          #keyform { max-width: 50rem; margin: 0 auto .6rem; display: none; gap: .5rem; align-items: center; flex-wrap: wrap; }
          #keyform.open { display: flex; }
          #keyform input { flex: 1; min-width: 10rem; font: inherit; padding: .35rem .5rem; border-radius: .4rem; border: 1px solid var(--line); background: var(--bot); color: var(--fg); }
        </style>
        </head>
        <body>
        <header>
          <h1 id="title">strun chat</h1>
          <button id="settings-button" type="button" aria-expanded="false">Settings</button>
          <button id="new-chat" type="button">New chat</button>
        </header>
        <main id="scroller">
          <div id="messages"><p class="empty" id="empty">Type a message below. Enter sends; Shift+Enter starts a new line.</p></div>
        </main>
        <footer>
          <form id="keyform" autocomplete="off">
            <span>This server needs an API key:</span>
            <input id="key" type="password" placeholder="API key" aria-label="API key">
            <button id="save-key" class="primary" type="submit">Use key</button>
          </form>
          <div id="settings">
            <label class="wide">System prompt<textarea id="system" rows="2">You are a helpful assistant.</textarea></label>
            <label>Temperature<input id="temperature" type="number" min="0" max="2" step="0.05" placeholder="model's"></label>
            <label>Top-p<input id="top-p" type="number" min="0.01" max="1" step="0.01" placeholder="model's"></label>
            <label>Max tokens<input id="max-tokens" type="number" min="1" step="1" placeholder="context"></label>
            <label>Seed<input id="seed" type="number" step="1" placeholder="random"></label>
            <label class="wide">Extra request JSON (merged into each request, e.g. {"top_k": 40})<textarea id="extra" rows="1" placeholder="{}"></textarea></label>
          </div>
          <form id="composer">
            <textarea id="input" rows="1" placeholder="Message" aria-label="Message"></textarea>
            <button id="send" class="primary" type="submit">Send</button>
            <button id="stop" type="button" disabled>Stop</button>
          </form>
        </footer>
        <script>
        "use strict";
        const $ = (id) => document.getElementById(id);
        const state = { history: [], controller: null, key: sessionStorage.getItem("strun-key") || "", model: null };
        const fields = ["system", "temperature", "top-p", "max-tokens", "seed", "extra"];
        for (const id of fields) {
          const saved = localStorage.getItem("strun-" + id);
          if (saved !== null) $(id).value = saved;
          $(id).addEventListener("change", () => localStorage.setItem("strun-" + id, $(id).value));
        }

        function headers() {
          const h = { "Content-Type": "application/json" };
          if (state.key) h["Authorization"] = "Bearer " + state.key;
          return h;
        }

        function scrollDown() { $("scroller").scrollTop = $("scroller").scrollHeight; }

        function add(role, text) {
          $("empty")?.remove();
          const div = document.createElement("div");
          div.className = "message " + role;
          const body = document.createElement("div");
          body.className = "text";
          body.textContent = text;
          div.appendChild(body);
          $("messages").appendChild(div);
          scrollDown();
          return div;
        }

        function showError(message) { add("error", message); }

        async function errorMessage(response) {
          try {
            const body = await response.json();
            if (body && body.error && body.error.message) return body.error.message;
          } catch (_) {}
          return "The server answered " + response.status + ".";
        }

        function askForKey(message) {
          $("keyform").classList.add("open");
          $("key").focus();
          if (message) showError(message);
        }

        async function loadModel() {
          try {
            const response = await fetch("/v1/models", { headers: headers() });
            if (response.status === 401) return askForKey(await errorMessage(response));
            if (!response.ok) return showError(await errorMessage(response));
            const body = await response.json();
            state.model = body.data[0].id;
            $("title").textContent = "strun chat: " + state.model;
            document.title = state.model + " - strun chat";
            $("keyform").classList.remove("open");
          } catch (error) {
            showError("Cannot reach the server: " + error.message);
          }
        }

        function number(id) {
          const text = $(id).value.trim();
          return text === "" ? undefined : Number(text);
        }

        function requestBody() {
          const messages = [];
          const system = $("system").value;
          if (system.trim() !== "") messages.push({ role: "system", content: system });
          for (const m of state.history) messages.push(m);
          const body = { messages, stream: true, stream_options: { include_usage: true } };
          if (state.model) body.model = state.model;
          const options = { temperature: number("temperature"), top_p: number("top-p"), max_tokens: number("max-tokens"), seed: number("seed") };
          for (const [name, value] of Object.entries(options)) if (value !== undefined) body[name] = value;
          const extra = $("extra").value.trim();
          if (extra !== "") Object.assign(body, JSON.parse(extra));
          return body;
        }

        function setBusy(busy) {
          $("send").disabled = busy;
          $("stop").disabled = !busy;
        }

        async function send(text) {
          let body;
          state.history.push({ role: "user", content: text });
          try {
            body = requestBody();
          } catch (error) {
            state.history.pop();
            return showError("The extra request JSON is not valid: " + error.message);
          }
          const question = add("user", text);
          const reply = add("assistant", "");
          reply.dataset.state = "waiting";
          const textNode = reply.querySelector(".text");
          const controller = new AbortController();
          state.controller = controller;
          setBusy(true);
          const started = performance.now();
          let first = null, last = null, pieces = 0, content = "", usage = null, timings = null, finish = null;
          try {
            const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
            if (!response.ok) {
              // Refused: the message goes back into the box, to be sent again or changed.
              const message = await errorMessage(response);
              reply.remove();
              question.remove();
              state.history.pop();
              if ($("input").value === "") $("input").value = text;
              if (response.status === 401) askForKey(message); else showError(message);
              return;
            }
            reply.dataset.state = "streaming";
            const reader = response.body.getReader();
            const decoder = new TextDecoder();
            let buffered = "";
            for (;;) {
              const { value, done } = await reader.read();
              if (done) break;
              buffered += decoder.decode(value, { stream: true });
              let cut;
              while ((cut = buffered.indexOf("\n\n")) >= 0) {
                const event = buffered.slice(0, cut);
                buffered = buffered.slice(cut + 2);
                for (const line of event.split("\n")) {
                  if (!line.startsWith("data: ")) continue;
                  const data = line.slice(6);
                  if (data === "[DONE]") continue;
                  const chunk = JSON.parse(data);
                  if (chunk.error) throw new Error(chunk.error.message);
                  if (chunk.usage) usage = chunk.usage;
                  if (chunk.timings) timings = chunk.timings;
                  for (const choice of chunk.choices || []) {
                    if (choice.delta && choice.delta.content) {
                      if (first === null) first = performance.now();
                      last = performance.now();
                      pieces += 1;
                      content += choice.delta.content;
                      textNode.textContent = content;
                      scrollDown();
                    }
                    if (choice.finish_reason) finish = choice.finish_reason;
                  }
                }
              }
            }
            reply.dataset.state = "done";
          } catch (error) {
            if (error.name === "AbortError") {
              reply.dataset.state = "stopped";
              finish = "stopped";
            } else {
              reply.dataset.state = "failed";
              showError(error.message);
            }
          } finally {
            state.controller = null;
            setBusy(false);
          }
          state.history.push({ role: "assistant", content });
          const stats = document.createElement("div");
          stats.className = "stats";
          // The server's counts when the reply ended normally; after Stop, what arrived (a streamed
          // piece is about a token).
          const tokens = usage ? usage.completion_tokens : (timings ? timings.predicted_n : null);
          const ttft = timings ? timings.time_to_first_token_ms : (first !== null ? first - started : null);
          const rate = timings ? timings.predicted_per_second : (pieces > 1 && last > first ? (pieces - 1) * 1000 / (last - first) : null);
          const parts = [];
          if (tokens !== null && tokens !== undefined) parts.push(tokens + " tokens"); else if (pieces > 0) parts.push("about " + pieces + " tokens");
          if (ttft !== null && ttft !== undefined) parts.push("first token " + (ttft / 1000).toFixed(2) + " s");
          if (rate) parts.push(rate.toFixed(1) + " tokens/s");
          if (finish) parts.push(finish === "length" ? "stopped at the token limit" : finish === "stopped" ? "stopped" : "done");
          stats.textContent = parts.join(" · ");
          reply.appendChild(stats);
          scrollDown();
        }

        $("composer").addEventListener("submit", (event) => {
          event.preventDefault();
          const text = $("input").value;
          if (text.trim() === "" || state.controller) return;
          $("input").value = "";
          send(text);
        });
        $("input").addEventListener("keydown", (event) => {
          if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
            event.preventDefault();
            $("composer").requestSubmit();
          }
        });
        $("stop").addEventListener("click", () => state.controller && state.controller.abort());
        $("new-chat").addEventListener("click", () => {
          if (state.controller) state.controller.abort();
          state.history = [];
          $("messages").replaceChildren();
          const empty = document.createElement("p");
          empty.className = "empty";
          empty.id = "empty";
          empty.textContent = "New chat. Type a message below.";
          $("messages").appendChild(empty);
          $("input").focus();
        });
        $("settings-button").addEventListener("click", () => {
          const open = $("settings").classList.toggle("open");
          $("settings-button").setAttribute("aria-expanded", String(open));
        });
        $("keyform").addEventListener("submit", (event) => {
          event.preventDefault();
          state.key = $("key").value.trim();
          sessionStorage.setItem("strun-key", state.key);
          loadModel();
        });
        loadModel();
        $("input").focus();
        </script>
        </body>
        </html>
        """#
}
