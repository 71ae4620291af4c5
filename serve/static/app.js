// The page at /: choose or drop an image, run a prompt through POST /v1/generate (streamed),
// then draw the answer's boxes, labels and masks over the image. No framework, no build step.
"use strict";

const PALETTE = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00", "#cc79a7", "#ffffff"];
const VIEW = 384;  // the longer side of the drawing, in CSS pixels
const $ = (id) => document.getElementById(id);
let image = null;  // {url, element, width, height}

function setState(state) { document.body.dataset.state = state; }

function loadFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    const element = new Image();
    element.onload = () => {
      image = {url: reader.result, element, width: element.naturalWidth, height: element.naturalHeight};
      $("answer").textContent = "";
      $("objects").innerHTML = "";
      $("error").textContent = "";
      draw([]);
      setState("ready");
    };
    element.onerror = () => { $("error").textContent = "the browser cannot read this file as an image"; };
    element.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function scale() { return VIEW / Math.max(image.width, image.height); }

async function tint(maskUrl, colour, width, height) {
  // The server's mask PNG is white where the mask is; give it the object's colour.
  const mask = new Image();
  await new Promise((ok, fail) => { mask.onload = ok; mask.onerror = fail; mask.src = maskUrl; });
  const layer = document.createElement("canvas");
  layer.width = width; layer.height = height;
  const c = layer.getContext("2d");
  c.drawImage(mask, 0, 0, width, height);
  c.globalCompositeOperation = "source-in";
  c.fillStyle = colour;
  c.fillRect(0, 0, width, height);
  return layer;
}

async function draw(objects) {
  const canvas = $("canvas"), s = scale();
  canvas.width = Math.round(image.width * s);
  canvas.height = Math.round(image.height * s);
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(image.element, 0, 0, canvas.width, canvas.height);
  for (const [i, obj] of objects.entries()) {
    if (obj.mask && obj.mask.png) {
      ctx.globalAlpha = 0.45;
      ctx.drawImage(await tint(obj.mask.png, PALETTE[i % PALETTE.length], canvas.width, canvas.height), 0, 0);
      ctx.globalAlpha = 1;
    }
  }
  ctx.font = "bold 13px system-ui, sans-serif";
  ctx.textBaseline = "top";
  for (const [i, obj] of objects.entries()) {
    if (!obj.box) continue;
    const [y0, x0, y1, x1] = obj.box.map((v) => v * s), colour = PALETTE[i % PALETTE.length];
    ctx.strokeStyle = colour;
    ctx.lineWidth = 3;
    ctx.strokeRect(x0 + 1.5, y0 + 1.5, x1 - x0 - 3, y1 - y0 - 3);
    if (obj.label) {
      const w = ctx.measureText(obj.label).width + 6, top = y0 >= 17 ? y0 - 17 : y0;
      ctx.fillStyle = colour;
      ctx.fillRect(x0, top, w, 17);
      ctx.fillStyle = "#000";
      ctx.fillText(obj.label, x0 + 3, top + 2);
    }
  }
}

function listObjects(objects) {
  const list = $("objects");
  list.innerHTML = "";
  for (const [i, obj] of objects.entries()) {
    const item = document.createElement("li");
    item.className = "object";
    item.dataset.label = obj.label;
    item.dataset.box = obj.box ? obj.box.join(",") : "";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = PALETTE[i % PALETTE.length];
    item.append(swatch, `${obj.label || "(no label)"}  box ${obj.box ? obj.box.join(" ") : "none"}` +
                (obj.mask ? `  mask ${obj.mask.area} px` : "") + (obj.errors.length ? `  (${obj.errors.join("; ")})` : ""));
    list.append(item);
  }
}

async function run(prompt) {
  if (!image) { $("error").textContent = "choose an image first"; return; }
  $("prompt").value = prompt;
  $("answer").textContent = "";
  $("objects").innerHTML = "";
  $("error").textContent = "";
  $("status").textContent = "generating ...";
  setState("running");
  await draw([]);
  const started = performance.now();
  let response;
  try {
    response = await fetch("/v1/generate", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({image: image.url, prompt, max_tokens: 96, stream: true}),
    });
  } catch (e) {
    $("error").textContent = `the server did not answer (${e})`; setState("error"); return;
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({error: {message: response.statusText}}));
    $("error").textContent = `${response.status}: ${body.error.message}`;
    $("status").textContent = "";
    setState("error");
    return;
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "", final = null;
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/^data: /, "");
      buffer = buffer.slice(end + 2);
      if (line === "[DONE]") continue;
      const event = JSON.parse(line);
      if (event.done) final = event;
      else if (event.error) $("error").textContent = event.error.message;
      else $("answer").textContent += event.text;
    }
  }
  const seconds = ((performance.now() - started) / 1000).toFixed(2);
  if (!final) { $("error").textContent = "the answer stopped before its end"; setState("error"); return; }
  $("answer").textContent = final.text;
  $("status").textContent = `${final.usage.completion_tokens} tokens in ${seconds} s (${final.finish_reason})`;
  if (final.objects) {
    await draw(final.objects);
    listObjects(final.objects);
  }
  setState("done");
}

function taskPrompt(task) {
  if (task.startsWith("caption")) return task;
  return `${task} ${$("objectsText").value.trim() || "object"}`;
}

$("file").addEventListener("change", (e) => loadFile(e.target.files[0]));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); loadFile(e.dataTransfer.files[0]); });
$("run").addEventListener("click", () => run($("prompt").value));
$("prompt").addEventListener("keydown", (e) => { if (e.key === "Enter") run($("prompt").value); });
for (const button of document.querySelectorAll("button.task")) {
  button.addEventListener("click", () => run(taskPrompt(button.dataset.task)));
}
fetch("/v1/models").then((r) => r.json()).then((m) => { $("model").textContent = m.data[0].id; }).catch(() => {});
setState("empty");
