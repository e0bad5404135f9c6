"""LangChain's ChatOpenAI works with base_url pointing at veil."""

from __future__ import annotations

import pytest

from veil.testing import TEST_KEY, ServerThread

langchain_openai = pytest.importorskip("langchain_openai")


def test_langchain_plain_and_streaming(any_gateway: ServerThread) -> None:
    llm = langchain_openai.ChatOpenAI(
        model="mock-model", base_url=any_gateway.url + "/v1", api_key=TEST_KEY, max_retries=0
    )
    answer = llm.invoke("Hello from LangChain")
    assert answer.content.endswith("You said: Hello from LangChain")
    streamed = "".join(chunk.content for chunk in llm.stream("Stream from LangChain"))
    assert streamed.endswith("You said: Stream from LangChain")
