"""The backend simulator: one aiohttp server that answers like vLLM, llama.cpp, LM Studio, Ollama,
OpenRouter or Venice (`shared/reference/backend-apis.md`), for tests, benchmarks and the demo.

    async with SimBackend("ollama", models=["llama3.2:latest"], tokens=8) as sim:
        ...  # point a [[backends]] entry at sim.base_url
        sim.fault = Fault(kind="http", status=503, count=1)  # the next completion gets a 503
        await sim.wait_for(lambda s: s.served)  # wakes on every request event, never sleeps

What it speaks, per kind, in the shapes of the recorded fixtures (the tests compare them):
discovery (health, model listings with context windows, `/props`, `/slots`, `/api/tags`,
`/api/show`, `/api/ps`, `/api/version`, `/openapi.json`, `/metrics`, the BYOK listings with their
prices, OpenRouter's `/key`), `POST /v1/chat/completions` (OpenAI SSE in the kind's flavour: the
final usage chunk when `stream_options.include_usage` is set, always for OpenRouter and Venice,
llama.cpp's `timings`, OpenRouter's keepalive comment, `data: [DONE]`) and `POST /v1/messages`
(the Anthropic event stream, `message_start` … `message_stop`; not on Venice). The BYOK kinds
serve under `/api/v1`, so `base_url` (what a `[[backends]]` url is) is `url` + `/api/v1` there.

Knobs: models and their context windows, tokens per response (capped by the request's
`max_tokens`), tokens per second (0: as fast as possible), time to first token, a required API
key, list prices for the BYOK listings. Saturation, as a real server has it: `slots`, how many
completions generate at once across all models (None, the default: no limit); the others wait
in arrival order before any byte of their answer, so the wait is in their time to first byte.
`prefill_s_per_1k` adds prefill, seconds per 1,000 prompt tokens (the body's bytes ÷ 4), to the
time to first token, in the slot. `sim.slots`, `sim.prefill_s_per_1k` and `sim.ttft_s` can change
at any time; a raised slot count starts waiting requests at once, a lowered one preempts none.
llama.cpp's `/props` (`total_slots`) and `/slots` report a set slot count; the queue shows in
llama.cpp's `requests_deferred` and vLLM's `num_requests_waiting`.

Faults (`faults.Fault`, which lists them), settable at any time with `sim.fault`, for every
matching request or the next `count` ones; `sim.fault_queue` holds the faults that follow.

Records, for assertions and benchmarks: `requests` (each `SimRequest`: method, path, headers,
body, status, outcome, tokens sent, whether the client went away first, the monotonic and
wall-clock times of receipt and of the stream's first write — OpenRouter's is its keepalive
comment — and the monotonic time it got its slot), `served` and `completed` (`Counter`s of
completions accepted, i.e. given a slot and answered 200 even if a fault cuts them later /
finished with their end marker, by `job_key`: the `X-Request-Id` header, else the body's
`metadata.job`, `user`, `metadata.user_id`, else `sha256:` of the raw body — so a chaos bench
puts its job id in `metadata.job` or `user` and asserts no key was served twice).

An out-of-process sim shows the same through `GET /__sim/state` and takes faults at
`POST /__sim/fault` (a `Fault` as JSON, a list of them — the first is the fault, the rest its
queue — or `null`), a slot count at `POST /__sim/slots` (`{"slots": 8}`, or null for no limit)
and prefill at `POST /__sim/prefill` (`{"prefill_s_per_1k": 0.2}`, `ttft_s` too, either or
both); both answer, and the state shows, `slots`, `busy`, `queued`, `prefill_s_per_1k`, `ttft_s`.

The modules, each importing only those above it in this list:

    faults       what goes wrong on purpose: `Fault`, and how a `usage` fault rewrites counts
    records      the kinds, `SimModel`, `SimRequest`, `job_key`; `Job` and the figures on one
    sse          a stream's bytes, encoded once when it starts (`StreamFrames`, `Job`)
    answers      whole answers: JSON, each kind's error bodies, Prometheus text
    pacer        every paced stream's next token, written from one timer
    slots        the FIFO gate that saturates: at most `slots` completions at once
    state        `SimState`: the knobs, records and fault that every part below shares
    lmstudio, ollama, vllm, llamacpp, openrouter, venice
                 one kind each: its routes, its discovery answers, its OpenAI stream
    anthropic    the `/v1/messages` event stream, in each kind's flavour
    completions  a completion from request body to last byte, and the faults that cut it
    core         `SimBackend`: the server, its lifecycle, dispatch and the `/__sim/` control API
    command      `provider-agent sim-backend`
"""
