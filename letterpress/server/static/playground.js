// letterpress playground: a client of the server's public API, nothing else.
// Chat streams /v1/chat/completions with `denoising_preview` events and draws each draft on the canvas view;
// infill and edit call /v1/completions (with `suffix`) and /v1/edits; the Sudoku board streams
// /v1/completions with the Sudoku model's prompt (one word per cell) and fills in from the drafts: with
// "use the Sudoku rules" the request carries letterpress's `rule_mask: "sudoku"` (the rule-mask search; each
// preview is then the board after one decoder pass), without it the plain sampler's drafts.
"use strict";

const $ = (id) => document.getElementById(id);
// reply: the AbortController of the chat reply in flight, null when none (one at a time: each request sends the
// whole history)
const page = { model: null, root: "", messages: [], frames: new Set(), reply: null };

// ---------------------------------------------------------------------------------------------- HTTP
// status and code: the server's answer (0 and null when there was none); network: the server did not answer
class ApiError extends Error {
  constructor(message, { status = 0, code = null, network = false } = {}) {
    super(message);
    Object.assign(this, { status, code, network });
  }
}

// fetch says only "Failed to fetch" (a TypeError) when nothing answers; an abort stays an AbortError
async function call(path, init) {
  try {
    return await fetch(path, { headers: headers(), ...init });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("The server did not answer (is it running?)", { network: true });
  }
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function failure(response) {
  const body = await response.json().catch(() => ({}));
  const message = body.error ? body.error.message : response.statusText;
  return new ApiError(`${response.status}: ${message}`, { status: response.status, code: body.error?.code ?? null });
}

async function postJson(path, body) {
  const response = await call(path, { method: "POST", body: JSON.stringify(body) });
  if (!response.ok) throw await failure(response);
  return response.json();
}

// A streaming POST: calls onEvent(eventName, data) for each server-sent event until `data: [DONE]`.
// signal: an AbortSignal that ends the request (an AbortError is thrown then).
async function stream(path, body, onEvent, signal = undefined) {
  const response = await call(path, { method: "POST", body: JSON.stringify(body), signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read().catch((e) => {
      if (e.name === "AbortError") throw e;
      throw new ApiError("The server stopped answering (is it running?)", { network: true });
    });
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let name = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data += line.slice(5).trimStart();
      }
      if (data === "[DONE]") return;
      if (!data) continue;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.message); // an error after the stream started
      onEvent(name, event);
    }
  }
}

// "12 tokens · 1 canvas · 9 denoising steps · 1.33 tokens/forward · 25.1 tokens/s" from a reply's usage
function figures(usage, seconds) {
  if (!usage) return "";
  const stats = usage.letterpress || {};
  const parts = [`${usage.completion_tokens} tokens`];
  if (stats.canvases !== undefined) parts.push(`${stats.canvases} canvas${stats.canvases === 1 ? "" : "es"}`);
  if (stats.denoising_steps !== undefined) parts.push(`${stats.denoising_steps} denoising steps`);
  if (stats.rule_mask) parts.push(`rule mask: ${stats.rule_mask.backtracks} backtracks`);
  if (stats.tokens_per_forward !== undefined) parts.push(`${stats.tokens_per_forward.toFixed(2)} tokens/forward`);
  parts.push(`${(usage.completion_tokens / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s (${seconds.toFixed(2)} s)`);
  return parts.join(" · ");
}

function setBusy(buttons, busy) {
  for (const id of buttons) $(id).disabled = busy;
}

// ------------------------------------------------------------------------------------------ the model
// Looks up the served model; on failure page.model is null and the notice says why, which is also returned
// ("" when the lookup worked), for Send to repeat.
async function loadModel() {
  const notice = $("server-notice");
  const fail = (why) => {
    page.model = null;
    notice.textContent = why;
    notice.hidden = false;
    return why;
  };
  try {
    const response = await call("/v1/models", {});
    if (response.status === 401) {
      $("key-box").closest("details").open = true;
      return fail($("api-key").value.trim()
        ? "The server refused this API key: check it under \u201cAPI key\u201d."
        : "This server needs an API key: enter it under \u201cAPI key\u201d.");
    }
    if (!response.ok) throw await failure(response);
    const card = (await response.json()).data[0];
    page.model = card.id;
    page.root = card.root || "";
    $("model-name").textContent = card.id;
    const folder = page.root.split(/[\\/]/).filter(Boolean).pop() || ""; // a local path's last folder
    $("model-root").textContent = folder && folder !== card.id ? `(${folder})` : "";
    $("model-root").title = page.root;
    notice.hidden = true;
    const sudoku = /sudoku/i.test(card.id + " " + folder); // the folder, not the whole path (a parent may say sudoku)
    $("sudoku-notice").hidden = sudoku;
    $("sudoku-notice").textContent = sudoku ? "" : "The served model does not look like a Sudoku model: the board " +
      "needs one (letterpress serve letterpress/assets/sudoku). Any answer is checked against the rules first.";
    // The shipped task models were trained for one job each: say so rather than let the panel's example look broken.
    const infillNotice = /tiny[_-]?tasks/i.test(folder)
      ? "The served model, tiny-tasks (the embedded default), was trained on short reformatting requests in chat, " +
        "not on code: for this panel's example serve the code model (letterpress serve letterpress/assets/tiny_code)."
      : sudoku ? "The served model fills Sudoku boards, not text: serve a text model for this panel." : "";
    $("infill-notice").hidden = !infillNotice;
    $("infill-notice").textContent = infillNotice;
    return "";
  } catch (e) {
    return fail(e.network ? e.message : `Cannot reach the server: ${e.message}`);
  }
}

// After a failed request: the server may be down, or have restarted with another model (404 model_not_found)
// or key (401). Look the model up again, so that the next try uses what the server serves now; returns a hint
// to add to the error when the model has changed.
async function recover(e) {
  if (!(e.network || e.status === 401 || (e.status === 404 && e.code === "model_not_found"))) return "";
  const before = page.model;
  await loadModel();
  return page.model && page.model !== before ? ` The server now serves \u201c${page.model}\u201d: try again.` : "";
}

// ---------------------------------------------------------------------------------------- canvas view
// Each position of the newest draft is one cell. accepted: this step kept the token (accepted_mask);
// proposed: not accepted, but the same argmax as the step before; noise: the guess is still changing.
let lastDraft = null; // {canvas, ids} of the previous preview

function cellState(preview, previousIds, i) {
  if (preview.accepted_mask && preview.accepted_mask[i]) return "accepted";
  return previousIds && previousIds[i] === preview.token_ids[i] ? "proposed" : "noise";
}

function visible(text) {
  return text === "" ? "\u25e6" : text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192");
}

function countFrame(preview) {
  page.frames.add(`${preview.index}/${preview.canvas}/${preview.token_ids}/${preview.accepted_mask}`);
  const out = $("canvas-frames");
  out.value = String(page.frames.size);
  out.dataset.count = String(page.frames.size);
}

function showPreview(preview) {
  const previous = lastDraft && lastDraft.canvas === preview.canvas ? lastDraft.ids : null;
  const view = $("canvas");
  view.classList.remove("committed");
  view.replaceChildren(...preview.tokens.map((text, i) => {
    const cell = document.createElement("span");
    cell.className = "tok " + cellState(preview, previous, i);
    cell.textContent = visible(text);
    return cell;
  }));
  // `accepted` counts the whole canvas, while the draft (and its mask) is cut at EOS and max_tokens: the count
  // shown is the mask's, with the canvas's beside it when positions past the cut were accepted too
  const shown = preview.accepted_mask ? preview.accepted_mask.filter(Boolean).length : 0;
  const beyond = preview.accepted > shown ? `; ${preview.accepted} in the whole canvas` : "";
  $("canvas-status").textContent = `(canvas ${preview.canvas}, step ${preview.step}: ${shown} of ` +
    `${preview.tokens.length} positions accepted${beyond})`;
  lastDraft = { canvas: preview.canvas, ids: preview.token_ids };
  countFrame(preview);
}

// --------------------------------------------------------------------------------------------- chat
function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "model";
  const reasoning = document.createElement("span");
  reasoning.className = "reasoning";
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  const draft = document.createElement("span");
  draft.className = "draft";
  draft.setAttribute("aria-hidden", "true"); // provisional: screen readers get the committed text only
  el.append(who, reasoning, body, draft);
  $("chat-log").append(el);
  el.scrollIntoView({ block: "nearest" });
  return { el, reasoning, body, draft };
}

// Send while no reply runs; Stop while one does
function showReplyRunning(running) {
  $("chat-send").disabled = running;
  $("chat-stop").hidden = !running;
}

async function sendChat(event) {
  event.preventDefault();
  // Enter submits the form even while Send is disabled: a second request would interleave two replies
  if (page.reply) return;
  if (!page.model) { // not looked up yet, or the lookup failed (a key needed or refused, the server down): again
    const why = await loadModel();
    $("chat-notice").textContent = why && `Not sent: ${why}`;
    $("chat-notice").hidden = !why;
    if (why || page.reply) return; // (another Send went first while the model was looked up)
  }
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-input").value = "";
  $("chat-notice").hidden = true;
  // the conversation this reply belongs to: New chat starts another array, so a late reply cannot land there
  const messages = page.messages;
  const turn = { role: "user", content: text };
  messages.push(turn);
  addMessage("user", text);
  const reply = addMessage("assistant", "");
  reply.el.dataset.state = "streaming";
  const controller = new AbortController(); // Stop and New chat abort it; the server frees the row on disconnect
  page.reply = controller;
  showReplyRunning(true);
  $("chat-figures").textContent = "";
  lastDraft = null;
  const started = performance.now();
  let content = "", usage = null;
  const calls = [];
  try {
    await stream("/v1/chat/completions", {
      model: page.model, messages, stream: true,
      max_tokens: Number($("chat-max-tokens").value), temperature: Number($("chat-temperature").value),
      stream_options: { include_usage: true, denoising_preview: true },
    }, (name, chunk) => {
      if (name === "denoising_preview") {
        showPreview(chunk.denoising_preview);
        reply.draft.textContent = chunk.denoising_preview.text;
        return;
      }
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const thought = delta.reasoning ?? delta.reasoning_content;
        if (thought) reply.reasoning.textContent += thought;
        if (delta.content) content += delta.content;
        for (const call of delta.tool_calls || []) {
          const c = (calls[call.index] ??= { name: "", arguments: "" });
          if (call.function?.name) c.name += call.function.name;
          if (call.function?.arguments) c.arguments += call.function.arguments;
        }
        if (thought || delta.content || delta.tool_calls) { // a canvas was committed: its draft is replaced
          reply.draft.textContent = "";
          $("canvas").classList.add("committed");
        }
      }
      reply.body.textContent = content + calls.map((c) => `\n\u2192 ${c.name}(${c.arguments})`).join("");
    }, controller.signal);
    reply.draft.textContent = "";
    $("canvas").classList.add("committed");
    $("canvas-status").textContent = "(committed)";
    messages.push({ role: "assistant", content });
    $("chat-figures").textContent = figures(usage, (performance.now() - started) / 1000);
    reply.el.dataset.state = "done";
  } catch (e) {
    messages.splice(messages.indexOf(turn), 1); // the turn that failed or was stopped is not part of the conversation
    reply.draft.textContent = "";
    if (e.name === "AbortError") { // Stop (after New chat this reply is no longer on the page)
      reply.body.textContent = content + (content ? "\n" : "") + "[stopped: left out of the conversation]";
      reply.el.dataset.state = "stopped";
      if (messages === page.messages) $("canvas-status").textContent = "(stopped)";
    } else {
      const hint = await recover(e);
      reply.el.classList.add("error");
      reply.body.textContent = e.message + hint;
      reply.el.dataset.state = "error";
    }
  } finally {
    if (page.reply === controller) { // (not a reply sent since this one was aborted)
      page.reply = null;
      showReplyRunning(false);
    }
  }
}

function resetChat() {
  if (page.reply) page.reply.abort();
  page.messages = [];
  $("chat-log").replaceChildren();
  $("chat-figures").textContent = "";
  $("canvas").replaceChildren();
  $("canvas").classList.remove("committed");
  $("canvas-status").textContent = "(idle)";
}

// ------------------------------------------------------------------------------------ infill and edit
const codePoints = (s) => Array.from(s).length; // the server counts characters as Python does

function showResult(parts) { // parts: [text, highlighted?] pairs
  $("infill-result").replaceChildren(...parts.map(([text, marked]) => {
    if (!marked) return document.createTextNode(text);
    const mark = document.createElement("mark");
    mark.textContent = text;
    return mark;
  }));
}

async function runInfillOrEdit(kind) {
  const area = $("infill-text");
  const text = area.value, start = area.selectionStart, end = area.selectionEnd;
  $("infill-figures").textContent = "";
  if (kind === "edit" && start === end) {
    showResult([["Select the text to rewrite first.", false]]);
    return;
  }
  setBusy(["infill-run", "edit-run"], true);
  const started = performance.now();
  try {
    let data;
    if (kind === "infill") {
      const prefix = text.slice(0, start), suffix = text.slice(end);
      data = await postJson("/v1/completions", { model: page.model, prompt: prefix, suffix, seed: 0,
        temperature: 0, max_tokens: Number($("infill-max-tokens").value) });
      showResult([[prefix, false], [data.choices[0].text, true], [suffix, false]]);
    } else {
      const span = [codePoints(text.slice(0, start)), codePoints(text.slice(0, end))];
      const instruction = $("edit-instruction").value;
      data = await postJson("/v1/edits", { model: page.model, input: text, spans: [span], seed: 0,
        temperature: 0, ...(instruction ? { instruction } : {}) });
      const chars = Array.from(text), parts = [];
      let at = 0;
      for (const r of data.choices[0].replacements) {
        parts.push([chars.slice(at, r.start).join(""), false], [r.new, true]);
        at = r.end;
      }
      parts.push([chars.slice(at).join(""), false]);
      showResult(parts);
    }
    $("infill-figures").textContent = figures(data.usage, (performance.now() - started) / 1000);
  } catch (e) {
    showResult([[e.message + await recover(e), false]]);
  } finally {
    setBusy(["infill-run", "edit-run"], false);
  }
}

// ------------------------------------------------------------------------------------------- Sudoku
const CELL_LETTERS = "abcdefghi"; // as letterpress.apps.sudoku: "ae0" = row a, column e, blank
const EXAMPLE = "794003800000040359560900017009021673307695048410007090648059731901008520200174086";
const FRAME_MS = 250; // the board's pace when the steps come faster than that
const cells = [];

function buildBoard() {
  for (let i = 0; i < 81; i++) {
    const input = document.createElement("input");
    const row = Math.floor(i / 9), col = i % 9;
    input.className = `c${col} r${row}`;
    // no maxLength: a full cell would refuse a typed digit, which is meant to replace the cell's
    input.inputMode = "numeric";
    input.setAttribute("aria-label", `row ${row + 1}, column ${col + 1}`);
    input.addEventListener("beforeinput", (e) => {
      if (e.inputType !== "insertText" || !e.data) return;
      e.preventDefault();
      const digit = e.data.replace(/[^1-9]/g, "").slice(-1);
      if (digit) { input.value = digit; edited(input); }
    });
    input.addEventListener("input", () => { // a paste, a deletion
      input.value = input.value.replace(/[^1-9]/g, "").slice(-1);
      edited(input);
    });
    cells.push(input);
  }
  $("sudoku-board").append(...cells);
}

// The user's cells are the givens (class "given"); the model's answer fills the others (accepted, kept).
// An edited cell becomes a given (or a blank); the model's answer, to a puzzle that is no longer the board's,
// is cleared, with the status of that solve.
function edited(input) {
  input.classList.toggle("given", input.value !== "");
  setBoard(readPuzzle());
  $("sudoku-status").textContent = "";
  showNote("");
}

function setBoard(puzzle, answer = null) {
  cells.forEach((input, i) => {
    const given = puzzle[i] !== "0";
    input.value = given ? puzzle[i] : answer ? answer[i] : "";
    input.className = `c${i % 9} r${Math.floor(i / 9)}` + (given ? " given" : answer ? " accepted" : "");
  });
}

// the givens only: not the digits the model filled in
const readPuzzle = () => cells.map((c) => (c.classList.contains("given") && /^[1-9]$/.test(c.value) ? c.value : "0"))
  .join("");
const peers = (i, j) => i !== j && (Math.floor(i / 9) === Math.floor(j / 9) || i % 9 === j % 9 ||
  (Math.floor(i / 27) === Math.floor(j / 27) && Math.floor((i % 9) / 3) === Math.floor((j % 9) / 3)));

function conflicts(grid) { // cells whose digit repeats in a row, column or box
  const bad = [];
  for (let i = 0; i < 81; i++) {
    if (grid[i] === "0") continue;
    for (let j = 0; j < 81; j++) if (grid[j] === grid[i] && peers(i, j)) { bad.push(i); break; }
  }
  return bad;
}

const isSolution = (answer, puzzle) => /^[1-9]{81}$/.test(answer) && conflicts(answer).length === 0 &&
  [...puzzle].every((ch, i) => ch === "0" || ch === answer[i]);

// the server's note on a puzzle with fewer givens than the model was trained on (usage.letterpress
// .harder_than_trained, as `letterpress sudoku` prints on stderr); "" hides it
function showNote(text) {
  $("sudoku-note").textContent = text;
  $("sudoku-note").hidden = !text;
}

async function solveSudoku() {
  const puzzle = readPuzzle();
  const bad = conflicts(puzzle);
  if (bad.length) {
    bad.forEach((i) => cells[i].classList.add("wrong"));
    $("sudoku-status").textContent = "These givens break a rule (the same digit twice in a row, column or box).";
    return;
  }
  setBusy(["sudoku-solve", "sudoku-example", "sudoku-clear"], true);
  cells.forEach((c) => { c.readOnly = true; }); // an edit now would be overwritten by the answer to the old puzzle
  $("sudoku-figures").textContent = "";
  showNote("");
  const givens = [...puzzle].filter((ch) => ch !== "0").length;
  const rules = $("sudoku-rules").checked;
  $("sudoku-status").textContent = `Solving (${givens} givens${rules ? ", with the rules" : ""})\u2026`;
  const prompt = [...puzzle].map((ch, i) => CELL_LETTERS[Math.floor(i / 9)] + CELL_LETTERS[i % 9] + ch).join(" ");
  const started = performance.now();
  let text = "", usage = null, previous = null, seconds = 0;
  // The model solves a puzzle in a few steps, faster than the eye: frames are drawn at most one per FRAME_MS
  let player = Promise.resolve();
  const blanks = [...puzzle].filter((ch) => ch === "0").length;
  const draw = (p) => {
    cells.forEach((input, i) => {
      if (puzzle[i] !== "0") return;
      const digit = /^[1-9]$/.test(p.tokens[i] || "") ? p.tokens[i] : "";
      input.value = digit;
      // with the rules the preview is the board: cells accepted by this pass, cells kept from before, blanks
      const state = !rules ? cellState(p, previous, i) : p.accepted_mask[i] ? "accepted" : digit ? "kept" : "";
      input.className = `c${i % 9} r${Math.floor(i / 9)} ` + state;
    });
    previous = p.token_ids;
    if (rules) {
      const filled = [...puzzle].filter((ch, i) => ch === "0" && /^[1-9]$/.test(p.tokens[i] || "")).length;
      $("sudoku-status").textContent = `Pass ${p.step}: ${filled} of ${blanks} blank cells filled`;
      return;
    }
    const accepted = [...puzzle].filter((ch, i) => ch === "0" && p.accepted_mask[i]).length;
    $("sudoku-status").textContent = `Step ${p.step}: ${accepted} of ${blanks} blank cells accepted`;
  };
  try {
    await stream("/v1/completions", { model: page.model, prompt, stream: true, temperature: 0, max_tokens: 81,
      ...(rules ? { rule_mask: "sudoku" } : {}),
      stream_options: { include_usage: true, denoising_preview: true } }, (name, chunk) => {
      if (name === "denoising_preview") {
        const p = chunk.denoising_preview;
        player = player.then(() => draw(p)).then(() => new Promise((done) => setTimeout(done, FRAME_MS)));
        return;
      }
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) text += choice.text || "";
    });
    seconds = (performance.now() - started) / 1000;
    await player;
    const answer = text.slice(0, 81);
    if (isSolution(answer, puzzle)) {
      setBoard(puzzle, answer);
      $("sudoku-status").textContent = `Solved (${givens} givens).`;
    } else { // never show an answer that breaks a rule or a given
      setBoard(puzzle);
      const search = usage && usage.letterpress && usage.letterpress.rule_mask;
      $("sudoku-status").textContent = "No valid solution found " + (!search ? "(the model's answer breaks a rule " +
        "or a given)." : search.forwards >= search.max_forwards ? `(the search ran out of its ${search.max_forwards} ` +
        "passes)." : "(the rules leave this puzzle no solution).");
    }
    $("sudoku-figures").textContent = figures(usage, seconds);
    const harder = usage && usage.letterpress && usage.letterpress.harder_than_trained;
    if (harder) {
      const message = harder.message[0].toUpperCase() + harder.message.slice(1);
      showNote(`Note: ${message}${rules ? "" : " (\u201cuse the Sudoku rules\u201d helps)"}.`);
    }
  } catch (e) {
    await player;
    setBoard(puzzle);
    $("sudoku-status").textContent = e.message + await recover(e);
  } finally {
    setBusy(["sudoku-solve", "sudoku-example", "sudoku-clear"], false);
    cells.forEach((c) => { c.readOnly = false; });
  }
}

// ---------------------------------------------------------------------------------------------- start
document.addEventListener("DOMContentLoaded", () => {
  buildBoard();
  setBoard(EXAMPLE);
  $("chat-form").addEventListener("submit", sendChat);
  $("chat-input").addEventListener("keydown", (e) => { // Enter sends, Shift+Enter is a new line
    // an Enter that confirms an IME composition (Japanese, Chinese, ...) is the IME's, not a send; some
    // browsers end the composition first and report it as keyCode 229 only
    if (e.isComposing || e.keyCode === 229) return;
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });
  $("chat-reset").addEventListener("click", resetChat);
  $("chat-stop").addEventListener("click", () => page.reply && page.reply.abort());
  $("infill-run").addEventListener("click", () => runInfillOrEdit("infill"));
  $("edit-run").addEventListener("click", () => runInfillOrEdit("edit"));
  const resetBoard = (puzzle) => { setBoard(puzzle); $("sudoku-status").textContent = ""; showNote(""); };
  $("sudoku-example").addEventListener("click", () => resetBoard(EXAMPLE));
  $("sudoku-clear").addEventListener("click", () => resetBoard("0".repeat(81)));
  $("sudoku-solve").addEventListener("click", solveSudoku);
  $("key-box").addEventListener("submit", (e) => { e.preventDefault(); loadModel(); });
  loadModel();
});
