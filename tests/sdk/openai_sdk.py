"""The official OpenAI Python SDK against Switchyard, unchanged: a plain and a streamed chat
completion. Checks the answer text and the usage the SDK parsed, and that Switchyard
served them. Exits non-zero, saying why, on the first failure. Run by tests/sdk.rs.

usage: openai_sdk.py BASE_URL API_KEY MODEL BACKEND CHUNKS
  BASE_URL  Switchyard's OpenAI base URL (http://127.0.0.1:PORT/v1)
  BACKEND   name of the mock backend expected to answer; its text is
            "Hello from BACKEND word1 word2 ..." with CHUNKS words (= completion tokens)
"""

import sys

from openai import OpenAI


def expected_text(backend: str, chunks: int) -> str:
    words = ["Hello", "from", backend] + [f"word{i}" for i in range(1, chunks - 2)]
    return " ".join(words[:chunks])


def check(ok: bool, what: str) -> None:
    if not ok:
        print(f"openai_sdk.py: FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    base_url, api_key, model, backend, chunks = sys.argv[1:6]
    chunks = int(chunks)
    want = expected_text(backend, chunks)
    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    messages = [{"role": "user", "content": "Say hello."}]

    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
    check(
        raw.headers.get("x-switchyard-backend") == backend,
        f"plain: served by {raw.headers.get('x-switchyard-backend')!r}, not {backend!r}",
    )
    plain = raw.parse()
    text = plain.choices[0].message.content
    check(text == want, f"plain: content {text!r}, expected {want!r}")
    check(plain.choices[0].finish_reason == "stop", f"plain: finish_reason {plain.choices[0].finish_reason!r}")
    usage = plain.usage
    check(usage is not None, "plain: no usage")
    check(usage.completion_tokens == chunks, f"plain: completion_tokens {usage.completion_tokens}, expected {chunks}")
    check(usage.prompt_tokens > 0, f"plain: prompt_tokens {usage.prompt_tokens}")
    check(usage.total_tokens == usage.prompt_tokens + usage.completion_tokens, "plain: total_tokens")

    # Streamed usage comes only when the client asks for it, as with OpenAI itself.
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, stream_usage, events = [], None, 0
    for chunk in stream:
        events += 1
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            stream_usage = chunk.usage
    text = "".join(parts)
    check(events >= chunks, f"stream: only {events} chunks")
    check(text == want, f"stream: content {text!r}, expected {want!r}")
    check(stream_usage is not None, "stream: no usage chunk")
    check(
        stream_usage.completion_tokens == chunks,
        f"stream: completion_tokens {stream_usage.completion_tokens}, expected {chunks}",
    )
    check(stream_usage.prompt_tokens > 0, f"stream: prompt_tokens {stream_usage.prompt_tokens}")
    print(f"openai_sdk.py: ok: plain and streamed via {backend}, {chunks} completion tokens each")


if __name__ == "__main__":
    main()
