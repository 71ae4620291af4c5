"""Continuous batching: many requests at once, each answered exactly as if it ran alone.

    engine = Engine(params, config, slots=8, max_seq=512)        # or `fast.PaliGemma.engine(...)`
    engine.start()                                               # a background thread schedules
    stream = engine.submit(Request(pixels, prompt_ids, max_new_tokens=32, sampler="nucleus(0.9)", seed=7))
    for event in stream:                                         # or `async for event in stream.aiter()`
        print(event.token, event.logprob)
    stream.result()                                              # Completion(tokens, logprobs, finish_reason)

The pool: `slots` decode rows share one KV cache [L, B, S, K, H] (B = slots, S = max_seq). Each
iteration of the scheduler (`step`) first admits waiting requests into free slots (one prefill
for several arrivals that share a shape: the same number of images, the prompt length rounded up
to a bucket), then advances every active slot by one token with ONE compiled decode step. That
step takes out the active slots' cache rows, padded with free ones to the next of a few sizes
(`decode_sizes`: 1, 2, 4, ... slots), and puts them back: with 3 of 16 slots busy it computes 4
rows, not 16. A slot whose request ends (EOS, a stop id, max_new_tokens, a cancel) takes the next
waiting request at the next iteration, without recompiling and without waiting for the others.

Why batching never changes an answer:
- rows never meet: attention, masks, positions and sampling are all per row;
- admission overwrites a slot's whole cache row (keys, values, validity and positions of all S
  columns), so nothing of the previous request stays visible;
- a request's random stream is `PRNGKey(seed)` split once per token, as `fast.generate` does
  for that request alone: it depends on the request's seed only, never on its slot or neighbours;
- decode writes each row at its own length (`gemma.write_rows`), right after the prompt's real
  tokens: the bucket's padding columns are invalid until a generated token overwrites them.
What may differ is float rounding (a batch of 8 rows can sum in another order than a batch of
1), which `tests/test_engine.py` bounds with `parity/tolerances.py`. Beam search is not served
here: its beams would share one request's rows; use `fast.generate`.

Compiled programs (`fast.pool`; docs/serving.md): one decode step per size in `decode_sizes`; one
admission per (prefill batch size in `prefill_sizes`, image count, text bucket); one image encoder
per image count.

Axes: B slots, S cache columns, L layers, K kv heads, H head dim, V vocabulary, P image tokens,
T text tokens, D width.
"""

import collections
import dataclasses
import hashlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

from paligemma.ref.config import PaliGemmaConfig
from paligemma.ref.decode import check_context
from paligemma.ref.model import num_image_tokens

from . import layout, lockstep, pool, sharding
from .decode import CACHE_ALIGNMENT, KVCache
from .pool import SAMPLER_KINDS
from .policy import FLOAT32, Policy
from .request import AdmissionError, QueueFull, Request, checked
from .stream import Completion, Stream, Token

__all__ = ["Engine", "Request", "Stream", "Token", "Completion", "AdmissionError", "QueueFull"]

MIN_TEXT_BUCKET = 16
# Positions (image + text, times the padded batch) one admission prefills at most: bounds the
# prefill's activations. On the 3B-224 CPU harness XLA planned 0.49 GB of temporaries for
# 8 x 272 positions and 2.35 GB for 16 x 272; at 2048 (4 x 272) the 8-slot serving peak was 4.01
# GB against 4.24 at 4096, within weights + cache + 1 GB (bench/engine_speed.py, docs/serving.md).
MAX_PREFILL_TOKENS = 2048


class _Slot:
    """What the host knows of one active slot."""

    def __init__(self, request, stream):
        self.request, self.stream, self.generated = request, stream, 0


class Engine:
    """A pool of decode slots over one model; see the module docstring.

    Args:
      params: the parameter tree, either layout (run in this platform's: `layout.for_platform`).
      config: its `PaliGemmaConfig` (vocabulary fitted to the tokenizer).
      slots: decode rows in the pool (B).
      max_seq: cache columns per slot (S): the most image tokens + prompt + new tokens a request
        may use. Default: one image's tokens + 256. Rounded up to 128 for the Pallas kernels.
      policy: `fast.Policy` (dtypes, attention implementation); mesh: None, a `Mesh` or a
        description ("data=2,model=4"): slots over data, heads over model (`fast.sharding`).
      image_cache: how many images' encodings to keep (by content; least recently used out).
      max_queue: most waiting requests; `submit` raises `QueueFull` beyond. None: unbounded.
      prefill_sizes: batch sizes a prefill is padded to (several arrivals share one prefill).
      max_prefill_tokens: the most positions (padded batch x (image + text tokens)) one prefill
        computes; more arrivals of a shape wait for the next step. At least one request always fits.
      decode_sizes: row counts a decode step is padded to (the active slots plus free ones); `slots`
        is always one. Default: the prefill sizes below `slots`; on a mesh only `slots` (taking
        rows out would move them between devices). `(slots,)`: one decode program for every step.
    """

    def __init__(self, params, config: PaliGemmaConfig, slots=8, max_seq=None, policy: Policy = FLOAT32,
                 mesh=None, image_cache=64, max_queue=None, prefill_sizes=None,
                 max_prefill_tokens=MAX_PREFILL_TOKENS, decode_sizes=None):
        if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < 1:
            raise ValueError(f"Engine: slots must be an integer >= 1, got {slots!r}")
        one_image = num_image_tokens(config, (1, config.vision.image_size, config.vision.image_size, 3))
        max_seq = one_image + 256 if max_seq is None else int(max_seq)
        if policy.uses_kernels:  # whole kernel tiles
            max_seq = -(-max_seq // CACHE_ALIGNMENT) * CACHE_ALIGNMENT
        check_context(max_seq, "Engine: max_seq")
        self.config, self.slots, self.max_seq = config, int(slots), max_seq
        mesh = sharding.mesh_from(policy.mesh if mesh is None else mesh)
        self.policy = policy if mesh is None else dataclasses.replace(policy, mesh=mesh)
        self.params = layout.for_platform(params) if mesh is None else sharding.place_params(params, mesh)
        # On a mesh every batch (slots, a prefill, an image encoding) splits evenly over data x fsdp.
        self._multiple = 1 if self.policy.mesh is None else sharding.batch_multiple(self.policy.mesh)
        if self.slots % self._multiple:
            raise ValueError(f"Engine: slots {self.slots} must be a multiple of the mesh's data x fsdp size "
                             f"{self._multiple}")
        sizes = (prefill_sizes or (1, 2, 4, 8, 16))
        self.prefill_sizes = tuple(sorted({min(-(-s // self._multiple) * self._multiple, self.slots) for s in sizes}))
        self.max_queue, self.image_cache_size = max_queue, int(image_cache)
        if self.policy.mesh is not None:
            decode_sizes = ()
        elif decode_sizes is None:
            decode_sizes = self.prefill_sizes
        self.decode_sizes = tuple(sorted({int(s) for s in decode_sizes if 1 <= s < self.slots} | {self.slots}))
        self.max_prefill_tokens = int(max_prefill_tokens)
        self._cache = self._empty_cache()
        B = self.slots
        self._keys = np.zeros((B, 2), np.uint32)
        self._samplers = (np.zeros(B, np.int32), np.ones(B, np.float32), np.ones(B, np.int32), np.ones(B, np.float32))
        self._feed = np.zeros(B, np.int32)  # each active slot's last token, fed at the next step
        self._active = [None] * B  # `_Slot` or None
        self._waiting = collections.deque()
        self._images = collections.OrderedDict()  # content hash -> image tokens [1, F*P, D]
        self._lock = threading.Condition()
        self._thread, self._accepting, self._draining = None, True, False
        # Several JAX processes: process 0 schedules and sends each step's plan (`fast.lockstep`);
        # the others run `follow`.
        self.processes = jax.process_count()
        self.leader = jax.process_index() == 0
        self._released = False  # process 0 has sent STOP: the followers are gone, no collective may follow
        if self.processes > 1 and self.policy.mesh is None:
            raise ValueError(f"Engine: {self.processes} JAX processes need a mesh over their devices (mesh=...)")
        self.counters = collections.Counter()  # generated_tokens, image_cache_hits, image_cache_misses

    def _empty_cache(self):
        """The pool's KV cache, every column invalid, laid out over the mesh (slots over data)."""
        g, B, S, mesh = self.config.llm, self.slots, self.max_seq, self.policy.mesh

        def zeros(shape, dtype, spec):
            if mesh is None:
                return jnp.zeros(shape, dtype)
            return sharding.put_global(np.zeros(shape, dtype), jax.sharding.NamedSharding(mesh, spec))

        kv_spec = sharding.kv_cache_spec(mesh, g.num_kv_heads)
        kv_shape = (g.depth, B, S, g.num_kv_heads, g.head_dim)
        return KVCache(zeros(kv_shape, self.policy.kv_dtype, kv_spec), zeros(kv_shape, self.policy.kv_dtype, kv_spec),
                       zeros((B, S), bool, sharding.batch_spec(2)), zeros((B, S), np.int32, sharding.batch_spec(2)),
                       zeros((B,), np.int32, sharding.batch_spec(1)), zeros((B,), np.int32, sharding.batch_spec(1)))

    # --- Requests ---

    def submit(self, request: Request) -> Stream:
        """Queues a request; returns its `Stream`. Raises AdmissionError (both numbers for a
        request that cannot fit), QueueFull, or RuntimeError once the engine is stopping."""
        if not self.leader:
            raise RuntimeError("Engine: requests go to process 0; the other processes run `follow()`")
        request, sampler = checked(request, self.config, self.max_seq)
        stream = Stream()
        with self._lock:
            if not self._accepting:
                raise RuntimeError("Engine: stopping, no new requests")
            if self.max_queue is not None and len(self._waiting) >= self.max_queue:
                raise QueueFull(f"Engine: {len(self._waiting)} requests waiting (max_queue {self.max_queue})")
            self._waiting.append((request, sampler, stream))
            self._lock.notify_all()
        return stream

    # --- Scheduling ---

    def step(self):
        """One iteration: free cancelled slots, admit waiting requests, advance every active slot.
        Returns True while there is work left (waiting or active requests). On several processes
        only process 0 steps; it sends the others each step's plan (`follow`)."""
        if not self.leader:
            raise RuntimeError("Engine: process 0 steps; the other processes run `follow()`")
        if self._released:
            raise RuntimeError("Engine: stopped; the other processes have left")
        with self._lock:
            cancelled = [b for b, slot in enumerate(self._active) if slot is not None and slot.stream.cancelled]
            for b in cancelled:
                self._finish(b, "cancelled")
            while self._waiting and self._waiting[0][2].cancelled:
                self._waiting.popleft()[2]._finish_with("cancelled")
            group = self._take_group()
        if self.processes > 1:
            lockstep.send(lockstep.STEP, lockstep.encode_plan(cancelled, group))
        self._advance(group)
        with self._lock:
            return self._busy()

    def _advance(self, group):
        if group:
            self._admit_group(group)
        if any(s is not None for s in self._active):
            self._decode_step()

    def follow(self):
        """Processes 1..N-1 of several: runs process 0's steps (`fast.lockstep`) on this process's
        devices until process 0 stops its engine. Their answers are process 0's to hand out."""
        if self.leader:
            raise RuntimeError("Engine.follow: process 0 schedules (submit, step, start); the others follow")
        while True:
            kind, data = lockstep.receive()
            if kind == lockstep.STOP:
                return
            cancelled, group = lockstep.decode_plan(data, Request)
            for b in cancelled:
                self._finish(b, "cancelled")
            self._advance([(b, (request, sampler, Stream())) for b, (request, sampler) in group])

    def _busy(self):
        return bool(self._waiting) or any(s is not None for s in self._active)

    def _take_group(self):
        """The first waiting request and every later one of its shape, up to the free slots."""
        free = [b for b, s in enumerate(self._active) if s is None]
        if not free or not self._waiting:
            return []
        shape = self._shape(self._waiting[0][0])
        group = [w for w in self._waiting if self._shape(w[0]) == shape][: min(len(free), self._most_rows(shape))]
        taken = {id(w) for w in group}
        self._waiting = collections.deque(w for w in self._waiting if id(w) not in taken)
        return list(zip(free, group))

    def _most_rows(self, shape):
        """The largest prefill size whose positions fit `max_prefill_tokens` (else the smallest)."""
        images, T = shape
        N = num_image_tokens(self.config, (1,) + images) + T
        fits = [s for s in self.prefill_sizes if s * N <= self.max_prefill_tokens]
        return max(fits) if fits else self.prefill_sizes[0]

    def _shape(self, request):
        """(images shape, text bucket): requests of one shape share a prefill."""
        P = num_image_tokens(self.config, request.images[None].shape)
        bucket = max(MIN_TEXT_BUCKET, 1 << (len(request.tokens) - 1).bit_length())
        return request.images.shape, min(bucket, self.max_seq - P)

    def _admit_group(self, group):
        size = next(s for s in self.prefill_sizes + (self.slots,) if s >= len(group))
        _, T = self._shape(group[0][1][0])
        rows = np.full(size, self.slots, np.int32)  # padding rows: out of range, dropped
        tokens, mask_ar = np.zeros((size, T), np.int32), np.ones((size, T), np.int32)
        input_mask = np.zeros((size, T), bool)
        samplers = [np.zeros(size, a.dtype) + a[0] for a in self._samplers]
        keys, images = np.zeros((size, 2), np.uint32), []
        for i in range(size):
            b, (request, sampler, _) = group[min(i, len(group) - 1)]  # padding: copies of the last
            n = len(request.tokens)
            tokens[i, :n], mask_ar[i, :n], input_mask[i, :n] = request.tokens, request.mask_ar, True
            for array, value in zip(samplers, self._sampler_row(sampler)):
                array[i] = value
            keys[i] = jax.random.key_data(jax.random.PRNGKey(request.seed)) if i < len(group) else 0
            rows[i] = b if i < len(group) else self.slots
            images.append(self._image_tokens(request.images) if i < len(group) else images[-1])
        put = self._global
        cache, first, logp, keys = pool.admit(self.params, self._cache, put(rows), jnp.concatenate(images), put(tokens),
                                          put(mask_ar), put(input_mask), put(tuple(samplers)), put(keys),
                                          config=self.config, policy=self.policy)
        self._cache = cache
        first, logp, keys = sharding.to_host((first, logp, keys))
        for i, (b, (request, sampler, stream)) in enumerate(group):
            self._keys[b] = keys[i]
            for array, value in zip(self._samplers, self._sampler_row(sampler)):
                array[b] = value
            self._active[b] = _Slot(request, stream)
            self._emit(b, int(first[i]), float(logp[i]))

    def _decode_step(self):
        active = np.array([s is not None for s in self._active])
        live = np.flatnonzero(active)
        size = next(s for s in self.decode_sizes if s >= len(live))
        if size == self.slots:  # every slot, in slot order: no rows taken out and put back
            rows, put = np.arange(self.slots, dtype=np.int32), self._global
            cache, tokens, logp, keys = pool.decode(self.params, self._cache, put(self._feed), put(active),
                                                put(self._samplers), put(self._keys), config=self.config,
                                                policy=self.policy)
        else:  # the active slots, padded with free ones (left as garbage: an admission overwrites a whole row)
            rows = np.concatenate([live, np.flatnonzero(~active)[: size - len(live)]]).astype(np.int32)
            cache, tokens, logp, keys = pool.decode_rows(self.params, self._cache, rows, self._feed[rows],
                                                     active[rows], tuple(a[rows] for a in self._samplers),
                                                     self._keys[rows], config=self.config, policy=self.policy)
        self._cache = cache
        tokens, logp, keys = sharding.to_host((tokens, logp, keys))
        self._keys[rows] = keys
        for i, b in enumerate(rows):
            if active[b]:
                self._emit(b, int(tokens[i]), float(logp[i]))

    def _global(self, tree):
        """Host arrays as every process's same global (replicated) arrays; as they are on one."""
        if self.processes == 1:
            return tree
        replicated = jax.sharding.NamedSharding(self.policy.mesh, jax.sharding.PartitionSpec())
        return jax.tree_util.tree_map(lambda a: sharding.put_global(a, replicated), tree)

    @staticmethod
    def _sampler_row(sampler):
        return SAMPLER_KINDS[sampler.kind], sampler.temperature, sampler.top_k, sampler.top_p

    def _emit(self, b, token, logprob):
        slot = self._active[b]
        slot.generated += 1
        self.counters["generated_tokens"] += 1
        slot.stream._push(Token(token, logprob))
        self._feed[b] = token
        if token == self.config.eos_id:
            self._finish(b, "eos")
        elif token in slot.request.stop_ids:
            self._finish(b, "stop")
        elif slot.generated >= slot.request.max_new_tokens:
            self._finish(b, "length")

    def _finish(self, b, reason):
        self._active[b].stream._finish_with(reason)
        self._active[b] = None

    def _image_tokens(self, images):
        """The image tokens [1, F*P, D] of preprocessed pixels, encoded once per distinct content."""
        key = (images.shape, hashlib.sha256(images.tobytes()).hexdigest())
        if key in self._images:
            self.counters["image_cache_hits"] += 1
            self._images.move_to_end(key)
            return self._images[key]
        self.counters["image_cache_misses"] += 1
        batch = np.repeat(images[None], self._multiple, axis=0)  # [m, (F,) R, R, 3]: one copy per data shard
        tokens = pool.encode(self.params, self._global(batch), config=self.config, policy=self.policy)[:1]
        self._images[key] = tokens
        while len(self._images) > self.image_cache_size:
            self._images.popitem(last=False)
        return tokens

    # --- Running ---

    def run_until_idle(self):
        """Steps until no request is waiting or active (no background thread needed)."""
        while self.step():
            pass

    def start(self):
        """Runs the scheduler on a background thread until `stop`."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="paligemma-engine", daemon=True)
                self._thread.start()
        return self

    def _loop(self):
        idle = lockstep.IDLE_SECONDS if self.processes > 1 else None
        while True:
            with self._lock:
                while not (self._busy() or not self._accepting):
                    if not self._lock.wait(idle) and idle:  # an empty step keeps the followers' collective short
                        break
                if not self._accepting and not (self._draining and self._busy()):
                    break
            try:
                self.step()
            except Exception as error:  # a failed program: every request in flight learns why
                self._fail_all(error)
        self._release_followers()

    def _release_followers(self):
        if self.processes > 1 and self.leader and not self._released:
            lockstep.send(lockstep.STOP)
            self._released = True

    def _fail_all(self, error):
        with self._lock:
            for b, slot in enumerate(self._active):
                if slot is not None:
                    slot.stream._fail(error)
                    self._active[b] = None
            while self._waiting:
                self._waiting.popleft()[2]._fail(error)

    def stop(self, drain=True, timeout=None):
        """Stops admitting; with `drain` finishes the requests in flight first, else cancels them."""
        if self._released:  # stopped before: a second STOP would wait for followers that have left
            return
        with self._lock:
            self._accepting, self._draining = False, drain
            if not drain:
                for _, _, stream in self._waiting:
                    stream.cancel()
                for slot in self._active:
                    if slot is not None:
                        slot.stream.cancel()
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            return
        if drain:
            self.run_until_idle()
        else:
            self.step()
        self._release_followers()

    def stats(self):
        """Queue and slot occupancy and counters (for `/metrics`)."""
        with self._lock:
            active = sum(s is not None for s in self._active)
            return {"queued": len(self._waiting), "active": active, "slots": self.slots,
                    "free": self.slots - active, "generated_tokens": self.counters["generated_tokens"],
                    "image_cache_hits": self.counters["image_cache_hits"],
                    "image_cache_misses": self.counters["image_cache_misses"]}
