// The browsing page of `pixelrec serve`: plain DOM calls, no framework, nothing from other hosts.
// Every id, title and message from the server is put in the page with textContent (never as HTML).
//
// Actions can also be given in the URL's hash, run in order once the page has loaded (the headless
// browser test and the README screenshot use them):
//   #user=U  #history=a,b,c  #k=10  #click=ITEM  #upload-copy=ITEM&as=NEWID
// While they run <body data-state> is "busy"; then "done" (or "error" with the message shown).
// <body data-loaded-images> counts cover images that loaded with a non-zero natural size,
// data-failed-images those that did not (shown as placeholders), data-placeholders the placeholders.
"use strict";

const state = { run: null, k: 10 };
const body = document.body;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function bump(name) {
  body.dataset[name] = String(Number(body.dataset[name] || 0) + 1);
}

function say(text, isError) {
  const message = document.getElementById("message");
  message.textContent = text || "";
  message.className = isError ? "error" : "";
}

async function api(path, options) {
  const response = await fetch(path, options);
  let data = null;
  try {
    data = await response.json();
  } catch (e) {
    data = null;
  }
  if (!response.ok) {
    const detail = data && typeof data.detail === "string" ? data.detail : response.statusText;
    const error = new Error(detail + " (HTTP " + response.status + ")");
    error.status = response.status;
    throw error;
  }
  return data;
}

function coverUrl(itemId, size) {
  return "/items/" + encodeURIComponent(itemId) + "/cover?size=" + size;
}

function placeholder(itemId) {
  bump("placeholders");
  const box = el("div", "placeholder", "no cover");
  box.title = itemId;
  return box;
}

// One item: its cover (or a placeholder), then rank, id, score and warm / cold badge.
function card(itemId, details) {
  const figure = el("figure", "card");
  const img = el("img");
  img.alt = itemId;
  img.title = itemId;
  img.loading = "eager";
  img.addEventListener("load", () => {
    if (img.naturalWidth > 0) bump("loadedImages");
    else bump("failedImages");
  });
  img.addEventListener("error", () => {
    bump("failedImages");
    img.replaceWith(placeholder(itemId));
  });
  img.src = coverUrl(itemId, details.size || 160);
  const link = el("button", "cover");
  link.type = "button";
  link.title = "Items nearest to " + itemId;
  link.addEventListener("click", () => run(() => showSimilar(itemId)));
  link.appendChild(img);
  figure.appendChild(link);
  const caption = el("figcaption");
  if (details.rank !== undefined) caption.appendChild(el("span", "rank", "#" + details.rank));
  caption.appendChild(el("span", "id", itemId));
  if (details.score !== undefined) caption.appendChild(el("span", "score", details.score.toFixed(4)));
  if (details.warm !== undefined) {
    caption.appendChild(el("span", details.warm ? "badge warm" : "badge cold", details.warm ? "warm" : "cold"));
  }
  figure.appendChild(caption);
  return figure;
}

function fill(containerId, cards) {
  const container = document.getElementById(containerId);
  container.replaceChildren(...cards);
  container.closest("section").hidden = false;
}

// ------------------------------------------------------------------------------------ summary
function row(table, name, value) {
  const tr = el("tr");
  tr.appendChild(el("th", null, name));
  tr.appendChild(el("td", null, value === null || value === undefined ? "-" : value));
  table.appendChild(tr);
}

function metricsTable(test) {
  const table = el("table", "metrics");
  const groups = ["overall", "warm", "cold"].filter((g) => test[g] && typeof test[g] === "object");
  const names = [];
  for (const g of groups) {
    for (const [name, value] of Object.entries(test[g])) {
      if (typeof value === "number" && !names.includes(name)) names.push(name);
    }
  }
  const head = el("tr");
  head.appendChild(el("th", null, "test"));
  names.forEach((n) => head.appendChild(el("th", null, n)));
  table.appendChild(head);
  for (const g of groups) {
    const tr = el("tr");
    tr.appendChild(el("th", null, g));
    names.forEach((n) => {
      const v = test[g][n];
      tr.appendChild(el("td", null, typeof v === "number" ? (Number.isInteger(v) ? v : v.toFixed(4)) : "-"));
    });
    table.appendChild(tr);
  }
  return table;
}

async function loadSummary() {
  const run = await api("/run");
  state.run = run;
  const section = document.getElementById("summary");
  const table = el("table", "run");
  row(table, "run", run.run_dir);
  row(table, "model", run.model + " (dim " + run.dim + ", max length " + run.max_len + ")");
  row(table, "item tower", run.tower);
  row(table, "encoder", run.encoder);
  row(table, "users / items", run.users + " / " + run.items + " (" + run.trained_items + " in training)");
  row(table, "index version", run.index_version);
  row(table, "covers", run.covers);
  section.replaceChildren(table);
  if (run.test) section.appendChild(metricsTable(run.test));
  else section.appendChild(el("p", "muted", "No test metrics (pixelrec evaluate computes them)."));
  describeUploads(run);
}

function describeUploads(run) {
  const note = document.getElementById("upload-note");
  const form = document.getElementById("upload-form");
  document.getElementById("key-label").hidden = run.ingestion !== "api-key";
  if (run.ingestion === "off") {
    note.textContent = "This server does not take new covers (read-only, or beyond loopback without --api-key).";
    form.hidden = true;
  } else if (!run.image_tower) {
    note.textContent = "This is an id run: it has no image tower to encode new covers with.";
    form.hidden = true;
  } else if (run.ingestion === "api-key") {
    note.textContent = "This server needs its API key to add covers.";
  } else {
    note.textContent = "The cover is encoded through the run's item tower and added to its index.";
  }
}

// ------------------------------------------------------------------------------------ queries
async function recommend(query) {
  say("Recommending…");
  const answer = await api("/recommend", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(Object.assign({ k: state.k }, query)),
  });
  fill("history-covers", answer.history.map((id, i) => card(id, { rank: i + 1, size: 96 })));
  const note = answer.history_truncated ? " (the model read the last " + answer.history_used + ")" : "";
  document.getElementById("history-note").textContent = answer.history.length + " items, oldest first" + note;
  fill("results", answer.items.map((id, i) => card(id, { rank: i + 1, score: answer.scores[i], warm: answer.warm[i] })));
  const who = answer.user_id !== null ? "user " + answer.user_id : "the history";
  say("Top " + answer.items.length + " for " + who + ".");
}

async function showSimilar(itemId) {
  say("Finding the items nearest to " + itemId + "…");
  const answer = await api("/items/" + encodeURIComponent(itemId) + "/similar?k=" + state.k);
  document.getElementById("similar-of").textContent = itemId + (answer.item_warm ? " (warm)" : " (cold)");
  const first = card(itemId, { warm: answer.item_warm });
  first.classList.add("query");
  const cards = answer.items.map((id, i) => card(id, { rank: i + 1, score: answer.scores[i], warm: answer.warm[i] }));
  fill("similar", [first, ...cards]);
  say("The " + answer.items.length + " items nearest to " + itemId + " by cosine.");
}

async function upload(file, itemId) {
  const form = new FormData();
  form.append("covers", file, file.name || "cover");
  if (itemId) form.append("ids", itemId);
  const headers = {};
  const key = document.getElementById("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  say("Encoding the cover…");
  const answer = await api("/items", { method: "POST", body: form, headers });
  const failed = Object.entries(answer.failed || {});
  if (failed.length) throw new Error("not added: " + failed.map(([i, why]) => i + ": " + why).join("; "));
  if (answer.skipped.length) {
    say("The run already has " + answer.skipped.join(", ") + ": nothing added.");
    return answer.skipped[0];
  }
  const added = answer.added[0].item_id;
  await showSimilar(added);
  say("Added " + added + " (index version " + answer.index_version + ", " + answer.items + " items).");
  return added;
}

async function uploadCopyOf(itemId, newId) {
  const response = await fetch("/items/" + encodeURIComponent(itemId) + "/cover");
  if (!response.ok) throw new Error("item " + itemId + " has no cover to copy (HTTP " + response.status + ")");
  const blob = await response.blob();
  return upload(new File([blob], newId + ".jpg", { type: blob.type }), newId);
}

// -------------------------------------------------------------------------------------- wiring
async function run(action) {
  body.dataset.state = "busy";
  try {
    await action();
    body.dataset.state = "done";
  } catch (error) {
    say(error.message, true);
    body.dataset.state = "error";
  }
}

function parseHistory(text) {
  return text.split(/[\n,]/).map((s) => s.trim()).filter((s) => s.length > 0);
}

function readK() {
  const k = Number(document.getElementById("k").value);
  state.k = Number.isInteger(k) && k > 0 ? k : 10;
}

document.getElementById("user-form").addEventListener("submit", (event) => {
  event.preventDefault();
  readK();
  run(() => recommend({ user_id: document.getElementById("user").value.trim() }));
});

document.getElementById("history-form").addEventListener("submit", (event) => {
  event.preventDefault();
  readK();
  run(() => recommend({ history: parseHistory(document.getElementById("history").value) }));
});

document.getElementById("upload-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = document.getElementById("upload-file").files[0];
  run(() => upload(file, document.getElementById("upload-id").value.trim()));
});

async function hashActions() {
  const params = new URLSearchParams(window.location.hash.replace(/^#/, ""));
  if (params.has("k")) {
    document.getElementById("k").value = params.get("k");
    readK();
  }
  if (params.has("user")) {
    document.getElementById("user").value = params.get("user");
    await recommend({ user_id: params.get("user") });
  }
  if (params.has("history")) {
    document.getElementById("history").value = params.get("history");
    await recommend({ history: parseHistory(params.get("history")) });
  }
  if (params.has("click")) await showSimilar(params.get("click"));
  if (params.has("upload-copy")) await uploadCopyOf(params.get("upload-copy"), params.get("as") || "uploaded");
}

run(async () => {
  await loadSummary();
  await hashActions();
  if (!window.location.hash) say("Pick a user or paste a history.");
});
