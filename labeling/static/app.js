// The labeling page: one pair at a time, chosen by button or key; the server records labels.
// Plain JS, no build step. The token comes from the page's URL and goes in an X-Token header.
"use strict";

const token = new URLSearchParams(location.search).get("token") || "";
const $ = (id) => document.getElementById(id);
let current = null;  // the pair on screen: {pair_id, prompt, left, right, a_shown_first}
let busy = false;    // a request is in flight: keys and clicks wait for its answer

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: {"X-Token": token, "Content-Type": "application/json"},
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) throw new Error(data.message || response.statusText);
  return data;
}

function show(state) {
  current = state.pair;
  $("progress").textContent = `${state.progress.done} / ${state.progress.total}`;
  const finished = current === null;
  $("labeling").hidden = finished;
  $("done").hidden = !finished;
  if (!finished) {
    $("prompt").textContent = current.prompt;
    $("left").textContent = current.left;
    $("right").textContent = current.right;
  }
  document.body.dataset.pairId = finished ? "" : current.pair_id;
  document.body.dataset.state = finished ? "done" : "ready";
}

async function act(method, path, body) {
  if (busy) return;
  busy = true;
  document.body.dataset.state = "busy";
  try {
    show(await api(method, path, body));
    $("message").textContent = "";
  } catch (error) {
    $("message").textContent = `error: ${error.message}`;
    document.body.dataset.state = "error";
  } finally {
    busy = false;
  }
}

function choose(side) {
  if (current !== null) act("POST", "/api/choice", {pair_id: current.pair_id, side});
}

const undo = () => act("POST", "/api/undo");

const KEYS = {"1": () => choose("left"), "ArrowLeft": () => choose("left"),
              "2": () => choose("right"), "ArrowRight": () => choose("right"),
              "u": undo, "Backspace": undo};

document.addEventListener("keydown", (event) => {
  const action = KEYS[event.key];
  if (!action || event.repeat || event.ctrlKey || event.metaKey || event.altKey) return;
  event.preventDefault();  // Backspace must not navigate back, arrows must not scroll
  action();
});
$("choose-left").addEventListener("click", () => choose("left"));
$("choose-right").addEventListener("click", () => choose("right"));
$("undo").addEventListener("click", undo);

act("GET", "/api/next");
