// The page's script. It is a client of the server's public API and nothing else:
// POST /cls, POST /cls/jobs, the job's event stream, POST /jobs/{id}/cancel, GET /metadata
// and GET /openapi.json. Without /cls among the tasks served, it shows the tasks instead.
// No framework and nothing fetched from elsewhere; it runs offline like the server.
"use strict";

const TASK = "cls";
const TOP_K = 5;
const STATUS_EVERY_MS = 3000;

const $ = (id) => document.getElementById(id);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const percent = (score) => `${(100 * score).toFixed(1)}%`;

// Errors come as {"detail": "..."}; a validation error's detail is a list of problems.
async function problem(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = Array.isArray(body.detail) ? body.detail.map((item) => item.msg).join("; ") : body.detail;
  } catch {
    // Not JSON: a proxy's error page, say. The status alone will have to do.
  }
  const retry = response.headers.get("Retry-After");
  const again = retry ? ` Try again in ${retry} s.` : "";
  return `${detail || response.statusText || "The server gave no reason."} (HTTP ${response.status})${again}`;
}

function unreachable(error) {
  return `Could not reach the server (${error.message}). Is it running?`;
}

// ---- Try it: one image, its top classes as bars ---------------------------------------

function showBars(topK) {
  const rows = [];
  for (let i = 0; i < TOP_K; i++) {
    const entry = topK[i];
    const row = element("li", entry ? "" : "empty");
    const bar = element("span", "bar");
    bar.style.width = entry ? percent(entry.score) : "0";
    row.append(element("span", "label", entry ? entry.label : "—"), bar,
      element("span", "score", entry ? percent(entry.score) : ""));
    rows.push(row);
  }
  $("bars").replaceChildren(...rows);
}

let previewUrl = null;

function showPreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = file.type.startsWith("image/") ? URL.createObjectURL(file) : null;
  const preview = $("preview");
  preview.hidden = previewUrl === null;
  if (previewUrl) {
    preview.src = previewUrl;
    preview.alt = file.name;
  }
}

async function classify(file) {
  $("one-error").textContent = "";
  showPreview(file);
  showBars([]);
  $("timing").textContent = `Classifying ${file.name}…`;
  const form = new FormData();
  form.append("file", file, file.name);
  const started = performance.now();
  try {
    const response = await fetch(`/${TASK}?top_k=${TOP_K}`, { method: "POST", body: form });
    const ms = Math.round(performance.now() - started);
    if (!response.ok) {
      $("timing").textContent = "\u00a0";
      $("one-error").textContent = `${file.name}: ${await problem(response)}`;
      return;
    }
    const result = await response.json();
    showBars(result.top_k);
    $("timing").textContent = `${result.prediction.label}, answered in ${ms} ms`;
  } catch (error) {
    $("timing").textContent = "\u00a0";
    $("one-error").textContent = unreachable(error);
  }
}

function setUpTryIt() {
  showBars([]);
  $("preview").hidden = true;
  const input = $("one");
  input.addEventListener("change", () => {
    if (input.files.length) classify(input.files[0]);
    input.value = ""; // the same file chosen again is classified again
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    if (event.dataTransfer.files.length) classify(event.dataTransfer.files[0]);
  });
}

// ---- Many images: a job, its live progress and results --------------------------------

let running = null; // the job being watched: {id, events, note}
let jobsDisabled = null; // why the server runs no jobs (from /metadata), or null

function jobRow(index, file) {
  const row = element("tr");
  const thumb = element("img", "thumb");
  thumb.src = URL.createObjectURL(file);
  thumb.alt = file.name;
  const picture = element("td");
  picture.append(thumb);
  row.append(element("td", "index", String(index + 1)), picture,
    element("td", "label", "waiting"), element("td", "score"));
  return row;
}

function fillRow(index, result) {
  const row = $("rows").rows[index];
  if (!row) return;
  const [, , label, score] = row.cells;
  if (result.error) {
    label.textContent = `${result.error.detail} (HTTP ${result.error.status})`;
    label.className = "label failed";
    score.textContent = "";
  } else {
    label.textContent = result.prediction.label;
    label.className = "label";
    score.textContent = percent(result.prediction.score);
  }
}

function setProgress(done, total) {
  $("job-progress").max = Math.max(total, 1);
  $("job-progress").value = done;
  $("job-count").textContent = `${done}/${total}`;
}

function setPicking(enabled) {
  const on = enabled && !jobsDisabled;
  $("many").disabled = !on;
  $("folder").disabled = !on;
}

function clearRows() {
  for (const thumb of $("rows").querySelectorAll("img")) URL.revokeObjectURL(thumb.src);
  $("rows").replaceChildren();
}

async function submitJob(chosen, fromFolder) {
  // A folder holds more than images, in no particular order; the other picker's own
  // filter keeps its picks to images.
  const files = fromFolder
    ? chosen.filter((file) => file.type.startsWith("image/"))
      .sort((a, b) => a.webkitRelativePath.localeCompare(b.webkitRelativePath))
    : chosen;
  const skipped = chosen.length - files.length;
  if (!files.length) return;
  $("job-error").textContent = "";
  clearRows();
  $("rows").append(...files.map((file, index) => jobRow(index, file)));
  setProgress(0, files.length);
  setPicking(false);
  const kind = skipped === 1 ? "file that is not an image" : "files that are not images";
  const note = skipped ? ` (left out ${skipped} ${kind})` : "";
  $("job-state").textContent = `Uploading ${files.length} images${note}…`;
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  try {
    const response = await fetch(`/${TASK}/jobs`, { method: "POST", body: form });
    if (!response.ok) {
      $("job-state").textContent = "\u00a0";
      $("job-error").textContent = `The job was not accepted: ${await problem(response)}`;
      setPicking(true);
      return;
    }
    const job = await response.json();
    $("job-state").textContent = `Job ${job.job_id}: running${note}`;
    follow(job.job_id, note);
  } catch (error) {
    $("job-state").textContent = "\u00a0";
    $("job-error").textContent = unreachable(error);
    setPicking(true);
  }
}

function finish(id, summary) {
  const note = running?.note ?? "";
  running = null;
  $("cancel").disabled = true;
  setPicking(true);
  setProgress(summary.done, summary.total);
  const failed = summary.failed ? `, ${summary.failed} of them failed` : "";
  const words = {
    succeeded: `finished: ${summary.done} of ${summary.total} images${failed}`,
    cancelled: `cancelled after ${summary.done} of ${summary.total} images`,
    failed: `failed after ${summary.done} of ${summary.total} images`,
  };
  $("job-state").textContent = `Job ${id} ${words[summary.status] || summary.status}${note}`;
}

// The event stream reconnects by itself (with Last-Event-ID) when the connection drops
// or a server that is stopping ends it; a job that is gone is read once by GET instead.
function follow(id, note) {
  const events = new EventSource(`/jobs/${id}/events`);
  running = { id, events, note };
  $("cancel").disabled = false;
  events.addEventListener("progress", (event) => {
    const data = JSON.parse(event.data);
    fillRow(data.index, data.result);
    setProgress(data.done, data.total);
  });
  for (const kind of ["done", "failed", "cancelled"]) {
    events.addEventListener(kind, (event) => {
      events.close();
      finish(id, JSON.parse(event.data));
    });
  }
  events.addEventListener("error", async () => {
    if (events.readyState !== EventSource.CLOSED || running?.events !== events) return;
    const response = await fetch(`/jobs/${id}`);
    if (!response.ok) {
      $("job-error").textContent = `Lost the job: ${await problem(response)}`;
      finish(id, { status: "lost", done: 0, total: 0 });
      return;
    }
    const job = await response.json();
    job.results.forEach((result, index) => result && fillRow(index, result));
    finish(id, { status: job.status, ...job.progress });
  });
}

async function cancelJob() {
  if (!running) return;
  $("cancel").disabled = true;
  try {
    const response = await fetch(`/jobs/${running.id}/cancel`, { method: "POST" });
    // 409: it ended first; its stream says how.
    if (!response.ok && response.status !== 409) {
      $("job-error").textContent = `Could not cancel: ${await problem(response)}`;
      $("cancel").disabled = false;
    }
  } catch (error) {
    $("job-error").textContent = unreachable(error);
    $("cancel").disabled = false;
  }
}

function setUpMany() {
  for (const [id, fromFolder] of [["many", false], ["folder", true]]) {
    const input = $(id);
    input.addEventListener("change", () => {
      submitJob([...input.files], fromFolder);
      input.value = "";
    });
  }
  $("cancel").addEventListener("click", cancelJob);
}

// ---- The tasks served: routes and an example request, from /openapi.json ----------------

// A value of the schema's type, to show the shape of a JSON body.
function exampleValue(schema) {
  switch (schema?.type) {
    case "string": return "...";
    case "integer": case "number": return 0;
    case "boolean": return false;
    case "array": return [];
    case "object": return Object.fromEntries(
      Object.entries(schema.properties ?? {}).map(([key, value]) => [key, exampleValue(value)]));
    default: return null;
  }
}

function exampleCommand(name, operation) {
  const url = `${location.origin}/${name}`;
  const json = operation?.requestBody?.content?.["application/json"]?.schema;
  if (json?.properties) {
    const body = JSON.stringify(exampleValue(json));
    return `curl -s ${url} -H 'content-type: application/json' -d '${body}'`;
  }
  return `curl -s ${url} -F file=@input`;
}

async function showTasks(names) {
  let paths = {};
  try {
    const response = await fetch("/openapi.json");
    if (response.ok) paths = (await response.json()).paths ?? {};
  } catch {
    // The routes alone will have to do.
  }
  $("tasks").replaceChildren(...names.map((name) => {
    const operation = paths[`/${name}`]?.post;
    const block = element("div", "task");
    block.append(element("h3", "", name));
    const about = (operation?.description ?? "").split("\n\n")[0];
    if (about) block.append(element("p", "", about));
    block.append(element("p", "note", `POST /${name}, POST /${name}/jobs`));
    const code = element("pre");
    code.append(element("code", "", exampleCommand(name, operation)));
    block.append(code);
    return block;
  }));
}

// The first /metadata says which tasks are served; a page without its own task's routes
// hides its forms rather than call routes that answer 404.
let tasksShown = false;

function showTasksOnce(metadata) {
  if (tasksShown) return;
  tasksShown = true;
  const names = Object.keys(metadata.tasks ?? {});
  if (!names.includes(TASK)) {
    $("try").hidden = true;
    $("many-images").hidden = true;
    $("title").textContent = "Inference server";
    document.title = "Inference server";
    const docs = element("a", "", "API documentation");
    docs.href = "/docs";
    $("about").replaceChildren("The tasks this server runs, and its status. ", docs);
  }
  showTasks(names);
}

// ---- Status, from /metadata every few seconds ------------------------------------------

function showStatus(metadata) {
  showTasksOnce(metadata);
  const task = metadata.tasks?.[TASK] ?? metadata;
  $("s-ready").textContent = task.ready ? "Ready" : "Not ready: warming up or stopping";
  $("s-ready").className = task.ready ? "ok" : "bad";
  $("s-model").textContent = task.model?.name ?? "—";
  $("s-backend").textContent = task.model?.backend ?? "—";
  $("s-device").textContent = task.model?.device ?? "—";
  const setting = task.batching.max_batch_size_setting;
  const chosen = setting === "auto" ? " (chosen at warm-up)" : "";
  $("s-batch").textContent = `up to ${task.batching.max_batch_size}${chosen}`;
  $("s-queue").textContent = `${task.stats.queue_depth} waiting`;
  const disabled = metadata.jobs?.disabled ?? null;
  if (disabled !== jobsDisabled) {
    jobsDisabled = disabled;
    if (disabled) $("job-error").textContent = disabled;
    if (!running) setPicking(true);
  }
}

async function refreshStatus() {
  try {
    const response = await fetch("/metadata");
    if (!response.ok) throw new Error(await problem(response));
    showStatus(await response.json());
  } catch (error) {
    $("s-ready").textContent = unreachable(error);
    $("s-ready").className = "bad";
  }
  setTimeout(refreshStatus, STATUS_EVERY_MS);
}

setUpTryIt();
setUpMany();
refreshStatus();
