"""`index.html`: a static page (open the file, no server) to explore one explained answer.

The image (with the detected boxes / masks for `detect` / `segment` prompts) sits beside the
attention map of the answer token under the cursor; hovering, clicking or tabbing to a token
shows its map. The mask and the strip of all maps follow below. Pictures are the PNG files
beside the page, referenced by relative paths.
"""

import html

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #111; max-width: 1100px; }
.pictures { display: flex; gap: 1.5em; flex-wrap: wrap; align-items: flex-start; }
figure { margin: 0; }
figcaption { font-size: 0.85em; color: #444; margin-top: 0.3em; }
#answer { margin: 1em 0; line-height: 2.2; font-family: ui-monospace, monospace; }
.tok { padding: 0.25em 0.4em; margin-right: 0.15em; border: 1px solid #bbb; border-radius: 4px; cursor: pointer; }
.tok.on { background: #1f3b73; color: #fff; border-color: #1f3b73; }
.prompt { color: #555; }
img { image-rendering: pixelated; max-width: 100%; height: auto; }
"""

_SCRIPT = """
const tokens = document.querySelectorAll('.tok');
const map = document.getElementById('map');
const caption = document.getElementById('map-caption');
function show(tok) {
  tokens.forEach(t => t.classList.toggle('on', t === tok));
  map.src = tok.dataset.map;
  caption.textContent = tok.dataset.caption;
}
tokens.forEach(t => {
  t.addEventListener('mouseenter', () => show(t));
  t.addEventListener('click', () => show(t));
  t.addEventListener('focus', () => show(t));
});
if (tokens.length) show(tokens[0]);
"""


def write_page(path, prompt, answer_text, pieces, maps, base_image, what, notes=(), extras=()):
    """Writes the page.

    Args:
      path: where `index.html` goes.
      prompt: the prompt text; answer_text: the decoded answer.
      pieces: the answer tokens as text (one per map); maps: their picture files (relative).
      base_image: the picture shown beside the map (the image, or the image with objects drawn).
      what: a sentence naming the layer(s) and head shown.
      notes: further sentences (e.g. which query a map is).
      extras: `(file, caption)` pictures shown below.
    """
    spans = []
    for a, (piece, picture) in enumerate(zip(pieces, maps)):
        caption = f"answer token {a}: {piece!r}"
        spans.append(f'<span class="tok" tabindex="0" data-map="{html.escape(picture)}" '
                     f'data-caption="{html.escape(caption)}" id="tok-{a}">{html.escape(piece) or "&nbsp;"}</span>')
    figures = "\n".join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(c)}">'
                        f"<figcaption>{html.escape(c)}</figcaption></figure>" for f, c in extras)
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>paligemma explain: {html.escape(prompt)}</title>
<style>{_STYLE}</style></head>
<body>
<h1>Where each answer token looked</h1>
<p class="prompt">prompt: <b>{html.escape(prompt)}</b> &mdash; answer: <b id="answer-text">{html.escape(answer_text)}</b></p>
<div id="answer">{"".join(spans)}</div>
<div class="pictures">
<figure><img id="base" src="{html.escape(base_image)}" alt="the image"><figcaption>the image</figcaption></figure>
<figure><img id="map" src="{html.escape(maps[0]) if maps else ""}" alt="attention map">
<figcaption id="map-caption"></figcaption></figure>
</div>
<p>{html.escape(what)}</p>
{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}
<div class="pictures">{figures}</div>
<script>{_SCRIPT}</script>
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(body)
