"""veil-pii in a real gateway: the official SDK in front, ``veil mock-upstream``
behind, recording every body it receives."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from piitest import PiiGateway

from veil.testing import ADMIN_KEY, OTHER_KEY

ZOE = "Write to Zoe Young (zoe.young@acme.com, +44 20 7946 0958) about the renewal."
CARD = ZOE + " Charge card 4111 1111 1111 1111."


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def said(answer: str | None) -> str:
    """What the mock says the user said (it echoes the last user message)."""
    assert answer is not None
    return answer.split("You said: ", 1)[1]


def words(text: str) -> str:
    return " ".join(text.split())


# -- the example of the issue ------------------------------------------------------


def test_the_upstream_sees_placeholders_and_the_client_the_names(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway(actions={"CREDIT_CARD": "block"})
    with gw.client() as client:
        raw = client.chat.completions.with_raw_response.create(
            model="mock-model", messages=user(ZOE)
        )
    answer = raw.parse()
    assert raw.headers["x-veil-pii"] == "EMAIL_ADDRESS=1, PERSON=1, PHONE_NUMBER=1"
    assert said(answer.choices[0].message.content) == ZOE
    (body,) = gw.received
    sent = body["messages"][0]["content"]
    assert sent == "Write to <PERSON_1> (<EMAIL_ADDRESS_1>, <PHONE_NUMBER_1>) about the renewal."
    for value in ("Zoe", "Young", "zoe.young", "7946"):
        assert value not in gw.received_text()


@pytest.mark.parametrize("stream", [False, True])
def test_calls_sending_the_same_request_id_keep_their_own_values(
    pii_gateway, mock_upstream, stream: bool
) -> None:
    # the client chooses x-request-id; another caller's call with the same id in
    # flight at the same time must not have its names restored into this answer
    gw: PiiGateway = pii_gateway()
    mock_upstream.app.settings.latency_ms = 100
    people = [f"Write to {name} about the renewal." for name in ("Zoe Young", "Omar Haddad")]

    def ask(text: str) -> str:
        with gw.client(default_headers={"x-request-id": "same-id"}) as client:
            if not stream:
                answer = client.chat.completions.create(model="mock-model", messages=user(text))
                return said(answer.choices[0].message.content)
            parts = client.chat.completions.create(
                model="mock-model", messages=user(text), stream=True
            )
            return said("".join(c.choices[0].delta.content or "" for c in parts if c.choices))

    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(ask, people))
    assert answers == people


def test_a_blocked_type_refuses_the_call_before_the_upstream(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway(actions={"CREDIT_CARD": "block"})
    with gw.client() as client, pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mock-model", messages=user(CARD))
    assert e.value.status_code == 400
    error = e.value.body
    assert error["code"] == "pii_blocked"
    assert "CREDIT_CARD" in error["message"]
    assert "4111" not in json.dumps(error) and "Zoe" not in json.dumps(error)
    assert gw.upstream_requests == 0


def test_streaming_restores_names_and_never_sends_them(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway()
    with gw.client() as client:
        stream = client.chat.completions.create(
            model="mock-model",
            messages=user(ZOE),
            stream=True,
            stream_options={"include_usage": True},
        )
        text = "".join(
            c.choices[0].delta.content or "" for c in stream if c.choices and c.choices[0].delta
        )
    assert said(text) == ZOE
    assert "Zoe" not in gw.received_text()


def test_mask_is_irreversible_and_allow_leaves_the_value(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway(actions={"EMAIL_ADDRESS": "mask", "PHONE_NUMBER": "allow"})
    with gw.client() as client:
        answer = client.chat.completions.create(model="mock-model", messages=user(ZOE))
    sent = gw.received[0]["messages"][0]["content"]
    assert "<EMAIL_ADDRESS>" in sent and "zoe.young" not in sent
    assert "+44 20 7946 0958" in sent
    assert said(answer.choices[0].message.content) == ZOE.replace(
        "zoe.young@acme.com", "<EMAIL_ADDRESS>"
    )


# -- the labelled data, end to end --------------------------------------------------


PROTECTED = {
    "PERSON",
    "EMAIL_ADDRESS",
    "PHONE_NUMBER",
    "STREET_ADDRESS",
    "CREDIT_CARD",
    "US_SSN",
    "IBAN_CODE",
    "IP_ADDRESS",
}


def test_labelled_values_do_not_reach_the_upstream_and_come_back(pii_gateway, records) -> None:
    """Every record through the gateway: what the upstream received holds at
    most 5 % of the labelled values (the leak-rate target), and the client
    gets every text back exactly (the mock echoes it)."""
    gw: PiiGateway = pii_gateway()
    leaked = total = 0
    mismatched = []

    def send(record: dict[str, Any]) -> tuple[dict[str, Any], str]:
        with gw.client() as client:
            answer = client.chat.completions.create(
                model="mock-model", messages=user(record["text"]), user=record.get("id", "")
            )
        return record, said(answer.choices[0].message.content)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(send, records))
    upstream = {body["user"]: body["messages"][0]["content"] for body in gw.received}
    for record, back in results:
        if words(back) != words(record["text"]):
            mismatched.append(record.get("id"))
        sent = upstream[record.get("id", "")]
        for span in record["spans"]:
            if span["type"] not in PROTECTED:
                continue
            total += 1
            value = record["text"][span["start"] : span["end"]]
            # the value, or a distinctive piece of it (4+ characters: "CO",
            # "12" or "nan" also occur elsewhere in the text, in clear)
            pieces = [words(value)] + [p for p in re.split(r"\W+", value) if len(p) >= 4]
            if any(re.search(rf"(?<!\w){re.escape(p)}(?!\w)", words(sent)) for p in pieces):
                leaked += 1
    print(f"labelled values that reached the upstream: {leaked}/{total}")
    assert not mismatched, f"answers not restored exactly: {mismatched[:10]}"
    assert total > 100
    assert leaked / total <= 0.05, f"{leaked}/{total} labelled values reached the upstream"


# -- tools ---------------------------------------------------------------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "parameters": {
                "type": "object",
                "properties": {"to": {"type": "string"}, "body": {"type": "string"}},
            },
        },
    }
]


def _tool_conversation() -> list[dict[str, Any]]:
    arguments = json.dumps({"to": "zoe.young@acme.com", "body": 'Hi Zoe Young, "quoted"\nbye'})
    return [
        {"role": "system", "content": "You help Zoe Young with her mail."},
        {"role": "user", "content": ZOE},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "send_email", "arguments": arguments},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": "call_1",
            "content": json.dumps({"sent_to": "zoe.young@acme.com"}),
        },
        {"role": "user", "content": "Now tell Zoe Young on +44 20 7946 0958."},
    ]


def test_tool_arguments_and_results_are_redacted_as_valid_json(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway()
    with gw.client() as client:
        client.chat.completions.create(
            model="mock-model", messages=_tool_conversation(), tools=TOOLS, tool_choice="none"
        )
    (body,) = gw.received
    messages = body["messages"]
    assert messages[0]["content"] == "You help <PERSON_1> with her mail."
    arguments = json.loads(messages[2]["tool_calls"][0]["function"]["arguments"])
    assert arguments == {"to": "<EMAIL_ADDRESS_1>", "body": 'Hi <PERSON_1>, "quoted"\nbye'}
    assert json.loads(messages[3]["content"]) == {"sent_to": "<EMAIL_ADDRESS_1>"}
    assert "Zoe" not in gw.received_text() and "zoe.young" not in gw.received_text()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_call_arguments_in_the_answer_are_restored(pii_gateway, stream: bool) -> None:
    """The mock fills tool arguments with the last user text (split in pieces
    of 8 characters when streaming, so placeholders arrive cut in two)."""
    gw: PiiGateway = pii_gateway()
    text = "Mail zoe.young@acme.com and Zoe Young, tel. +44 20 7946 0958"
    with gw.client() as client:
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="mock-model", messages=user(text), tools=TOOLS, stream=True
                )
            )
            arguments = "".join(
                tc.function.arguments or ""
                for c in chunks
                if c.choices
                for tc in c.choices[0].delta.tool_calls or ()
                if tc.function
            )
        else:
            answer = client.chat.completions.create(
                model="mock-model", messages=user(text), tools=TOOLS
            )
            arguments = answer.choices[0].message.tool_calls[0].function.arguments
    assert json.loads(arguments) == {"to": text, "body": text}
    assert "Zoe" not in gw.received_text()


# -- failures ------------------------------------------------------------------------


def test_analysis_that_cannot_finish_in_time_refuses_the_call(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway(timeout_ms=1)
    long_text = (ZOE + " ") * 200
    with gw.client() as client, pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="mock-model", messages=user(long_text))
    assert e.value.status_code == 503
    assert e.value.body["code"] == "pii_unavailable"
    assert gw.upstream_requests == 0


def test_token_id_embeddings_are_refused_and_text_embeddings_redacted(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway()
    with gw.client() as client:
        client.embeddings.create(model="mock-embed", input=[ZOE, "nothing personal"])
        with pytest.raises(openai.BadRequestError) as e:
            client.embeddings.create(model="mock-embed", input=[[1, 2, 3]])
    assert e.value.body["code"] == "pii_unscannable"
    (body,) = gw.received
    assert body["input"][0].startswith("Write to <PERSON_1> (<EMAIL_ADDRESS_1>")
    assert body["input"][1] == "nothing personal"


def test_a_predicted_output_and_refusal_parts_are_redacted(pii_gateway) -> None:
    # Predicted Outputs send a draft upstream (a document being edited); it is
    # text like any message, as are the refusal parts of an assistant message
    gw: PiiGateway = pii_gateway()
    messages = [
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "Not for Zoe Young."}]},
        {"role": "user", "content": "Fix the typos in the draft."},
    ]
    with gw.client() as client:
        for content in (ZOE, [{"type": "text", "text": ZOE}]):
            client.chat.completions.create(
                model="mock-model",
                messages=messages,
                prediction={"type": "content", "content": content},
            )
    plain, parts = gw.received
    assert plain["prediction"]["content"].startswith("Write to <PERSON_1> (<EMAIL_ADDRESS_1>")
    assert parts["prediction"]["content"][0]["text"] == plain["prediction"]["content"]
    assert plain["messages"][0]["content"][0]["refusal"] == "Not for <PERSON_1>."
    assert "Zoe" not in gw.received_text() and "zoe.young" not in gw.received_text()


def test_every_field_that_may_carry_text_is_scanned_including_unknown_ones(pii_gateway) -> None:
    # stop sequences, ids, and a parameter veil does not know (one added to the
    # API later) are text the upstream sees; tool definitions are the
    # application's own and pass as written
    gw: PiiGateway = pii_gateway()
    tools = [
        {
            "type": "function",
            "function": {"name": "send", "description": "Send a mail.", "parameters": {}},
        }
    ]
    with gw.client() as client:
        client.chat.completions.create(
            model="mock-model",
            messages=user("Hello"),
            stop=["Zoe Young:"],
            tools=tools,
            extra_body={
                "safety_identifier": "zoe.young@acme.com",
                "future_parameter": {"notes": [ZOE]},
                "prediction": {"type": "content", "content": {"draft": ZOE}},
            },
        )
    (body,) = gw.received
    assert body["stop"] == ["<PERSON_1>:"]
    assert body["safety_identifier"] == "<EMAIL_ADDRESS_1>"
    assert body["future_parameter"]["notes"][0].startswith("Write to <PERSON_1> (<EMAIL_ADDRESS_1>")
    assert body["prediction"]["content"]["draft"] == body["future_parameter"]["notes"][0]
    assert body["tools"] == tools
    assert "Zoe" not in gw.received_text() and "zoe.young" not in gw.received_text()


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_a_part_that_cannot_be_scanned_is_refused(pii_gateway) -> None:
    # an image (a scanned ID card), audio or a file cannot be checked for
    # personal data: the call is refused, naming the part and the setting
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    strict: PiiGateway = pii_gateway()
    with strict.client() as client:
        for part, kind in ((IMAGE, "image_url"), (audio, "input_audio"), ({"type": "3D"}, None)):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(
                    model="mock-model",
                    messages=[{"role": "user", "content": [{"type": "text", "text": ZOE}, part]}],
                )
            assert e.value.body["code"] == "pii_unscannable"
            assert e.value.body["param"] == "messages[0].content[1]"
            if kind is not None:
                assert f'unscanned_parts = ["{kind}"]' in e.value.body["message"]
            else:
                assert "3D" not in e.value.body["message"]  # the client's own type is not echoed
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(
                model="mock-model",
                messages=user("Fix the draft."),
                prediction={"type": "content", "content": [IMAGE]},
            )
        assert e.value.body["param"] == "prediction.content[0]"
    assert strict.upstream_requests == 0


def test_a_part_type_the_policy_lets_pass_goes_unscanned(pii_gateway) -> None:
    message = {"role": "user", "content": [{"type": "text", "text": ZOE}, IMAGE]}
    audio = {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}
    lenient: PiiGateway = pii_gateway(unscanned_parts=["image_url"])
    with lenient.client() as client:
        client.chat.completions.create(model="mock-model", messages=[message])
        with pytest.raises(openai.BadRequestError):  # audio is still refused
            client.chat.completions.create(
                model="mock-model",
                messages=[{"role": "user", "content": [audio]}],
            )
    (body,) = lenient.received
    text, image = body["messages"][0]["content"]
    assert text["text"].startswith("Write to <PERSON_1>")
    assert image == IMAGE


def test_a_bad_conversation_header_is_refused(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway()
    headers = {"x-veil-conversation": "x" * 300}
    with gw.client(default_headers=headers) as client, pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="mock-model", messages=user("hello"))
    assert e.value.body["code"] == "invalid_conversation"
    assert gw.upstream_requests == 0


# -- isolation -------------------------------------------------------------------------

NAMES = [
    "Zoe Young", "Liam Carter", "Ava Novak", "Noah Fischer", "Mia Kowalski", "Ethan Brooks",
    "Isla Moreau", "Lucas Jensen", "Emma Rossi", "Oscar Lindqvist", "Chloe Dubois", "Leo Hartmann",
]  # fmt: skip


def test_concurrent_calls_never_see_each_others_values(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway()

    def ask(name: str) -> str:
        with gw.client() as client:
            answer = client.chat.completions.create(
                model="mock-model", messages=user(f"Please thank {name} for the flowers.")
            )
        return said(answer.choices[0].message.content)

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, NAMES * 3))
    for name, answer in zip(NAMES * 3, answers, strict=True):
        assert answer == f"Please thank {name} for the flowers."
    for body in gw.received:
        assert body["messages"][0]["content"] == "Please thank <PERSON_1> for the flowers."


def test_a_conversation_keeps_its_placeholders_across_calls(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway()
    headers = {"x-veil-conversation": "conv-42"}
    with gw.client(default_headers=headers) as client:
        client.chat.completions.create(model="mock-model", messages=user("I am Zoe Young."))
        client.chat.completions.create(
            model="mock-model", messages=user("My colleague Liam Carter and I, Zoe Young, agree.")
        )
        # the model may mention a placeholder of an earlier turn: it is restored
        gw.upstream.app.settings.reply = "Say hi to <PERSON_1> and <PERSON_2>."
        answer = client.chat.completions.create(model="mock-model", messages=user("ok"))
    first, second, _ = (b["messages"][0]["content"] for b in gw.received)
    assert first == "I am <PERSON_1>."
    assert second == "My colleague <PERSON_2> and I, <PERSON_1>, agree."
    assert said(answer.choices[0].message.content) == "Say hi to Zoe Young and Liam Carter."


@pytest.mark.parametrize("key", [OTHER_KEY, ADMIN_KEY], ids=["other-team", "same-team"])
def test_another_key_gets_nothing_from_a_conversation_id(pii_gateway, key: str) -> None:
    # conversation ids are client-chosen: one guessed by another caller, even of
    # the same team, must not restore this caller's values
    gw: PiiGateway = pii_gateway()
    headers = {"x-veil-conversation": "shared-id"}
    with gw.client(default_headers=headers) as client:
        client.chat.completions.create(model="mock-model", messages=user("I am Zoe Young."))
    gw.upstream.app.settings.reply = "Hello <PERSON_1>."
    with gw.client(key=key, default_headers=headers) as other:
        answer = other.chat.completions.create(model="mock-model", messages=user("who am I?"))
    assert said(answer.choices[0].message.content) == "Hello <PERSON_1>."
    with gw.client(default_headers=headers) as client:  # the owner still has its table
        answer = client.chat.completions.create(model="mock-model", messages=user("who am I?"))
    assert said(answer.choices[0].message.content) == "Hello Zoe Young."


# -- policy features -------------------------------------------------------------------


def test_custom_recognizers_and_allow_list(pii_gateway) -> None:
    gw: PiiGateway = pii_gateway(
        allow_list=["Acme Robotics"],
        recognizers=[
            {
                "entity": "EMPLOYEE_ID",
                "patterns": [r"\bEMP-\d{6}\b"],
                "context": ["employee"],
                "score": 0.6,
            }
        ],
        actions={"EMPLOYEE_ID": "redact"},
    )
    text = "Employee EMP-123456 of Acme Robotics, Zoe Young, asked about EMP-654321."
    with gw.client() as client:
        answer = client.chat.completions.create(model="mock-model", messages=user(text))
    sent = gw.received[0]["messages"][0]["content"]
    assert (
        sent
        == "Employee <EMPLOYEE_ID_1> of Acme Robotics, <PERSON_1>, asked about <EMPLOYEE_ID_2>."
    )
    assert said(answer.choices[0].message.content) == text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_output_scanning_masks_what_the_request_did_not_contain(pii_gateway, stream: bool) -> None:
    gw: PiiGateway = pii_gateway(output_scan=True)
    gw.upstream.app.settings.reply = (
        "Ask Zoe Young. Or call Marcus Oyelaran on +1 202 555 0143 today."
    )
    with gw.client() as client:
        if stream:
            text = "".join(
                c.choices[0].delta.content or ""
                for c in client.chat.completions.create(
                    model="mock-model", messages=user("Who can help Zoe Young?"), stream=True
                )
                if c.choices
            )
        else:
            text = (
                client.chat.completions.create(
                    model="mock-model", messages=user("Who can help Zoe Young?")
                )
                .choices[0]
                .message.content
            )
    assert said(text) == "Ask Zoe Young. Or call <PERSON> on <PHONE_NUMBER> today."


def test_fail_open_is_refused_at_start(policy_kit, mock_upstream) -> None:
    """``veil serve`` refuses a policy that lets the pii stage fail open (exit 4)."""
    from piitest import upstream_deployments

    from veil.testing import GatewayProcess, policy_toml

    path = policy_kit.write(
        policy_toml(
            pipeline=["pii"],
            plugins={"pii": {"fail": "open"}},
            deployments=upstream_deployments(mock_upstream.url),
        )
    )
    proc = GatewayProcess(path, policy_kit.public_key_path, state_dir=policy_kit.state_dir)
    try:
        assert proc.wait(timeout=60) == 4
        assert "must fail closed" in proc.output()
    finally:
        proc.stop()


# -- cost of a long conversation ------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_history_is_not_analysed_again_turn_after_turn(pii_gateway, stream: bool) -> None:
    """A chat client resends the whole history every turn; each turn must
    analyse only what is new: the user's message. The assistant answers
    (restored by veil) are known already."""
    from veil_pii.stage import PiiStage

    gw: PiiGateway = pii_gateway()
    runtime = gw.gateway.gateway.runtime
    (stage,) = [s.stage for s in runtime.stages if isinstance(s.stage, PiiStage)]
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You help Zoe Young."}]
    per_turn = []
    with gw.client() as client:
        for turn in range(10):
            messages.append(
                {"role": "user", "content": f"Turn {turn}: ask Liam Carter about {NAMES[turn]}."}
            )
            before = stage.pool.analysed
            if stream:
                answer = "".join(
                    c.choices[0].delta.content or ""
                    for c in client.chat.completions.create(
                        model="mock-model", messages=messages, stream=True
                    )
                    if c.choices
                )
            else:
                answer = (
                    client.chat.completions.create(model="mock-model", messages=messages)
                    .choices[0]
                    .message.content
                )
            per_turn.append(stage.pool.analysed - before)
            assert "Liam Carter" in answer and "<PERSON" not in answer
            messages.append({"role": "assistant", "content": answer})
    assert per_turn[0] == 2  # the system prompt and the first message
    assert per_turn[1:] == [1] * 9
