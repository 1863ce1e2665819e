"""The official Anthropic Python SDK against Switchyard, unchanged: a plain and a streamed
Messages request. Checks the answer text and the usage the SDK parsed (input and output
tokens, cache reads), and that Switchyard served them. Exits non-zero, saying why, on the
first failure. Run by tests/sdk.rs.

usage: anthropic_sdk.py BASE_URL API_KEY MODEL BACKEND CHUNKS
  BASE_URL  Switchyard's root URL (http://127.0.0.1:PORT); the SDK adds /v1/messages
  BACKEND   name of the mock backend expected to answer; its text is
            "Hello from BACKEND word1 word2 ..." with CHUNKS words (= output tokens)
"""

import sys

from anthropic import Anthropic


def expected_text(backend: str, chunks: int) -> str:
    words = ["Hello", "from", backend] + [f"word{i}" for i in range(1, chunks - 2)]
    return " ".join(words[:chunks])


def check(ok: bool, what: str) -> None:
    if not ok:
        print(f"anthropic_sdk.py: FAILED: {what}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    base_url, api_key, model, backend, chunks = sys.argv[1:6]
    chunks = int(chunks)
    want = expected_text(backend, chunks)
    client = Anthropic(base_url=base_url, api_key=api_key, max_retries=0, timeout=30)
    request = dict(
        model=model,
        max_tokens=256,
        system="You are terse.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
    )

    raw = client.messages.with_raw_response.create(**request)
    check(
        raw.headers.get("x-switchyard-backend") == backend,
        f"plain: served by {raw.headers.get('x-switchyard-backend')!r}, not {backend!r}",
    )
    message = raw.parse()
    check(message.type == "message" and message.role == "assistant", f"plain: {message.type} {message.role}")
    text = "".join(block.text for block in message.content if block.type == "text")
    check(text == want, f"plain: content {text!r}, expected {want!r}")
    check(message.stop_reason == "end_turn", f"plain: stop_reason {message.stop_reason!r}")
    check(message.usage.output_tokens == chunks, f"plain: output_tokens {message.usage.output_tokens}, expected {chunks}")
    check(message.usage.input_tokens > 0, f"plain: input_tokens {message.usage.input_tokens}")

    # Streamed through the SDK's stream helper (SSE events: message_start ... message_stop);
    # the mock reports 3 of the prompt's tokens as read from its cache.
    with client.messages.stream(**request, extra_headers={"x-mock-cached-tokens": "3"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    check(text == want, f"stream: content {text!r}, expected {want!r}")
    check(final.stop_reason == "end_turn", f"stream: stop_reason {final.stop_reason!r}")
    check(final.usage.output_tokens == chunks, f"stream: output_tokens {final.usage.output_tokens}, expected {chunks}")
    check(final.usage.input_tokens > 0, f"stream: input_tokens {final.usage.input_tokens}")
    check(final.usage.cache_read_input_tokens == 3, f"stream: cache_read_input_tokens {final.usage.cache_read_input_tokens}")
    print(f"anthropic_sdk.py: ok: plain and streamed via {backend}, {chunks} output tokens each")


if __name__ == "__main__":
    main()
