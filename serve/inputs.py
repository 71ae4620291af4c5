"""Request bodies to a `Job`: every check a request must pass before it reaches the engine.

    job = parse_chat(body, limits)        # POST /v1/chat/completions (OpenAI's shape)
    job = parse_native(body, limits)      # POST /v1/generate
    pixels = decode_images(job, limits)   # uint8 [H, W, 3] per image, or ApiError

Anything wrong raises `ApiError(status, type, message)`; the message names the field and the
problem, so that a client can fix it without reading the server's log. Sampling follows
PaliGemma's habits rather than OpenAI's defaults: no `temperature` (or 0) is greedy decoding.
"""

import base64
import binascii
import dataclasses
import json
import re

# Fields of a chat request that we read, or accept and ignore because they cannot change the answer.
CHAT_FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
               "stop", "stream", "stream_options", "n", "user", "logprobs", "frequency_penalty",
               "presence_penalty"}
NATIVE_FIELDS = {"model", "prompt", "image", "images", "max_tokens", "temperature", "top_p", "seed", "stop",
                 "stream"}
MAX_STOPS = 4  # OpenAI's limit on stop sequences
MAX_SEED = 2**31 - 1
_DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,(.*)", re.DOTALL)


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, an OpenAI-style error `type`, a `message`."""

    def __init__(self, status, type_, message, headers=None):
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers or {}

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "code": self.status}}


def bad(message, type_="invalid_request_error"):
    return ApiError(400, type_, message)


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for (the `paligemma serve` options of the same names)."""

    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 50_000_000  # above this a header is refused before decoding (bombs)
    max_images: int = 8
    max_tokens: int = 1024
    default_max_tokens: int = 64


@dataclasses.dataclass(frozen=True)
class Job:
    """One validated request. images: encoded bytes, in prompt order."""

    images: tuple
    prompt: str
    max_tokens: int
    sampler: str
    seed: int
    stop: tuple
    stream: bool
    model: str | None
    include_usage: bool = False


def load_json(raw):
    """The body as a JSON object, or ApiError."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})", "invalid_json") from None
    except RecursionError:
        raise bad("the request body is JSON nested too deeply", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}", "invalid_json")
    return body


def _int(body, name, default, low, high):
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(f"{name}: expected an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise bad(f"{name}: {value} is out of range; expected {low} <= {name} <= {high}")
    return value


def _number(body, name, low, high, low_open=False):
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(f"{name}: expected a number, got {json.dumps(value)}")
    if not (low < value if low_open else low <= value) or value > high:
        raise bad(f"{name}: {value} is out of range; expected {low} {'<' if low_open else '<='} {name} <= {high}")
    return float(value)


def sampler_spec(body):
    """`paligemma.ref.parse_sampler` spelling of temperature / top_p: no temperature or 0 is greedy."""
    t = _number(body, "temperature", 0.0, 2.0)
    p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if not t:  # absent or 0: greedy whatever top_p says (as OpenAI's temperature 0)
        return "greedy" if p is None or p == 1.0 else f"nucleus({p!r})"
    return f"temperature({t!r})" if p is None or p == 1.0 else f"nucleus({p!r}, {t!r})"


def _stops(body):
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop: expected a non-empty string or a list of them")
    if len(stops) > MAX_STOPS:
        raise bad(f"stop: at most {MAX_STOPS} stop sequences, got {len(stops)}")
    return tuple(stops)


def _check_fields(body, known, where):
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"{where}: unsupported field {unknown[0]!r} (this server reads {sorted(known)})")


def image_bytes(url, limits, where):
    """The encoded image of a data URL (or of bare base64), or ApiError."""
    if not isinstance(url, str):
        raise bad(f"{where}: expected a data URL string, got {json.dumps(url)[:40]}")
    if url.startswith(("http://", "https://", "file:")):
        raise bad(f"{where}: only data URLs (data:image/png;base64,...) are accepted; this server fetches nothing")
    match = _DATA_URL.fullmatch(url)
    payload = match.group(3) if match else url
    if url.startswith("data:") and not match:
        raise bad(f"{where}: expected a base64 data URL such as data:image/png;base64,..., got {url[:40]!r}")
    # Refuse before decoding: base64 is 4/3 of the bytes it carries.
    if len(payload) * 3 // 4 > limits.max_image_bytes + 3:
        raise ApiError(413, "image_too_large", f"{where}: the image is about {len(payload) * 3 // 4} bytes, "
                       f"more than the server's --max-image-bytes {limits.max_image_bytes}")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"{where}: invalid base64 ({e})", "invalid_image") from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(413, "image_too_large", f"{where}: the image is {len(data)} bytes, more than the "
                       f"server's --max-image-bytes {limits.max_image_bytes}")
    if not data:
        raise bad(f"{where}: the image is empty", "invalid_image")
    return data


def _common(body, images, prompt, limits, where):
    if not images:
        raise bad(f"{where}: no image; PaliGemma needs at least one (a data URL with base64 PNG, JPEG or WebP)",
                  "missing_image")
    if len(images) > limits.max_images:
        raise bad(f"{where}: {len(images)} images, more than the server's --max-images {limits.max_images}",
                  "too_many_images")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad(f"{where}: no prompt; give one text part such as \"caption en\" or \"detect cat\"",
                  "missing_prompt")
    if "max_completion_tokens" in body and body.get("max_tokens") is None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad(f"stream: expected true or false, got {json.dumps(stream)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model: expected a string, got {json.dumps(model)}")
    return Job(images=tuple(images), prompt=prompt, model=model, stream=stream, stop=_stops(body),
               max_tokens=_int(body, "max_tokens", limits.default_max_tokens, 1, limits.max_tokens),
               sampler=sampler_spec(body), seed=_int(body, "seed", 0, 0, MAX_SEED))


def parse_chat(body, limits):
    """A `Job` from an OpenAI chat-completions body: one user message with image_url parts and one text part."""
    _check_fields(body, CHAT_FIELDS, "chat.completions")
    n = body.get("n", 1)
    if n not in (1, None):
        raise bad(f"n: {json.dumps(n)} answers asked for; this server gives exactly one (n = 1)")
    if body.get("logprobs"):
        raise bad("logprobs: not supported by this server's chat endpoint; /v1/generate returns them")
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise bad(f"{name}: not supported (only 0)")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages: expected a list with one user message")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise bad("messages: expected exactly one message, with role \"user\" (PaliGemma takes no "
                  "system prompt or history)")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise bad("messages[0].content: expected a string or a list of parts")
    images, texts = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        where = f"messages[0].content[{i}]"
        if kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            images.append(image_bytes(url, limits, f"{where}.image_url"))
        elif kind == "text":
            texts.append(part.get("text"))
        else:
            raise bad(f"{where}: unsupported part type {json.dumps(kind)}; expected \"image_url\" or \"text\"")
    if len(texts) > 1:
        raise bad(f"messages[0].content: {len(texts)} text parts; expected one, the PaliGemma prompt")
    job = _common(body, images, texts[0] if texts else None, limits, "messages[0].content")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options: expected an object")
    return dataclasses.replace(job, include_usage=bool(options.get("include_usage")))


def parse_native(body, limits):
    """A `Job` from a /v1/generate body: {"prompt": ..., "images": [data URL or base64, ...], ...}."""
    _check_fields(body, NATIVE_FIELDS, "generate")
    if "image" in body and "images" in body:
        raise bad("give \"image\" or \"images\", not both")
    given = body.get("images", [body["image"]] if "image" in body else [])
    if not isinstance(given, list):
        raise bad("images: expected a list of data URLs")
    images = [image_bytes(url, limits, f"images[{i}]") for i, url in enumerate(given)]
    return _common(body, images, body.get("prompt"), limits, "generate")


def decode_images(job, limits):
    """uint8 [H, W, 3] per image of `job` (decoded with the model's loader), or ApiError."""
    from paligemma.ref.inputs.image import ImageError, load_image

    out = []
    for i, data in enumerate(job.images):
        try:
            out.append(load_image(data, max_pixels=limits.max_image_pixels))
        except ImageError as e:
            bomb = "decompression bomb" in str(e)
            raise bad(f"image {i}: {e}" + (f" (the server's --max-image-pixels is {limits.max_image_pixels})"
                                          if bomb else ""), "invalid_image") from None
    return out
