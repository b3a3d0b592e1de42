"""@capability: specs from signatures and docstrings, validation in and out, invocation."""

import asyncio
import contextvars
import importlib.util
import json
import sys
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, Field

from agentmesh.capability import Capability, capability, is_capability
from agentmesh.errors import ConfigurationError, InvalidInput, InvalidOutput
from agentmesh.mesh import Mesh
from agentmesh.models import CapabilitySpec


class Summary(BaseModel):
    text: str
    words: int


class Point(BaseModel):
    x: int
    y: int


@capability(version="1.2.0", tags=["nlp", "en"], idempotent=True, timeout=5)
async def summarize(text: str, max_words: int = 40) -> Summary:
    """Summarize a text in at most `max_words` words."""
    words = text.split()[:max_words]
    return Summary(text=" ".join(words), words=len(words))


@capability
def add(a: int, b: int = 2) -> int:
    """Add two numbers."""
    return a + b


# --------------------------------------------------------------------------------------
# Decoration and the spec
# --------------------------------------------------------------------------------------


def test_bare_decoration_keeps_the_function() -> None:
    assert isinstance(add, Capability)
    assert is_capability(add)
    assert add.name == add.spec.name == "add"
    assert add.spec.version == "0.1.0"
    assert add.spec.description == "Add two numbers."
    assert (add.spec.tags, add.spec.idempotent, add.spec.streaming, add.spec.timeout) == (
        (),
        False,
        False,
        None,
    )
    assert add.__name__ == "add"
    assert add.__doc__ == "Add two numbers."
    assert add.__wrapped__ is add.fn
    assert add(1) == 3
    assert add(1, b=5) == 6
    assert repr(add) == "<Capability 'add' version '0.1.0'>"


def test_decorating_a_capability_again_replaces_its_options() -> None:
    again = capability(version="2.0.0")(summarize)
    assert again.fn is summarize.fn
    assert again.spec.version == "2.0.0"
    assert again.spec.tags == ()
    assert again.spec.input_schema == summarize.spec.input_schema


def test_is_capability_only_for_decorated_objects() -> None:
    assert not is_capability(add.fn)
    assert not is_capability(len)
    assert not is_capability(None)


def test_decoration_with_arguments() -> None:
    spec = summarize.spec
    assert spec.name == "summarize"
    assert spec.version == "1.2.0"
    assert spec.tags == ("nlp", "en")
    assert spec.idempotent is True
    assert spec.timeout == 5
    assert spec.description == "Summarize a text in at most `max_words` words."


def test_empty_parentheses_and_name_override() -> None:
    @capability()
    def echo(text: str) -> str:
        return text

    @capability(name="nlp.summarize_v2")
    def other(text: str) -> str:
        return text

    assert echo.name == "echo"
    assert other.name == other.spec.name == "nlp.summarize_v2"
    assert other.__name__ == "other"
    assert other.spec.input_schema["title"] == "NlpSummarizeV2Input"


def test_input_schema_from_the_signature() -> None:
    schema = summarize.spec.input_schema
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["text"]
    assert schema["properties"]["text"]["type"] == "string"
    assert schema["properties"]["max_words"] == {
        "default": 40,
        "title": "Max Words",
        "type": "integer",
    }


def test_output_schema_from_the_return_annotation() -> None:
    assert summarize.spec.output_schema == Summary.model_json_schema(mode="serialization")
    assert add.spec.output_schema == {"type": "integer"}


def test_annotated_field_constraints_and_descriptions() -> None:
    @capability
    def pick(
        count: Annotated[int, Field(ge=1, le=10, description="How many to pick.")] = 3,
        label: Annotated[str, Field(max_length=5)] = "all",
    ) -> list[int]:
        """Pick numbers.

        Args:
            count: Ignored: the Field description wins.
            label: A short label.
        """
        return list(range(count))

    props = pick.spec.input_schema["properties"]
    assert props["count"]["description"] == "How many to pick."
    assert (props["count"]["minimum"], props["count"]["maximum"]) == (1, 10)
    assert props["label"]["description"] == "A short label."
    assert props["label"]["maxLength"] == 5
    with pytest.raises(InvalidInput) as caught:
        pick.parse_input(b'{"count": 0}')
    assert caught.value.errors is not None
    assert caught.value.errors[0]["type"] == "greater_than_equal"


def test_google_docstring() -> None:
    @capability
    def translate(text: str, target: str = "en", formal: bool = False) -> str:
        """Translate a text.

        The source language is detected.

        Args:
            text (str): The text to translate. It may
                span several lines.
            target: ISO 639-1 code of the target language.

        Returns:
            The translation.

        Raises:
            ValueError: never.
        """
        return text

    assert translate.spec.description == "Translate a text.\n\nThe source language is detected."
    props = translate.spec.input_schema["properties"]
    assert props["text"]["description"] == "The text to translate. It may span several lines."
    assert props["target"]["description"] == "ISO 639-1 code of the target language."
    assert "description" not in props["formal"]


def test_rest_docstring() -> None:
    @capability
    def classify(text: str, labels: list[str]) -> str:
        """Classify a text into one of the labels.

        :param text: The text to classify,
            in any language.
        :param list[str] labels: The candidate labels.
        :returns: The chosen label.
        """
        return labels[0]

    assert classify.spec.description == "Classify a text into one of the labels."
    props = classify.spec.input_schema["properties"]
    assert props["text"]["description"] == "The text to classify, in any language."
    assert props["labels"]["description"] == "The candidate labels."


def test_numpy_docstring() -> None:
    @capability
    def scale(value: float, factor: float = 2.0) -> float:
        """Scale a value.

        Parameters
        ----------
        value : float
            The value to scale.
        factor : float, optional
            The multiplier.

        Returns
        -------
        float
        """
        return value * factor

    assert scale.spec.description == "Scale a value."
    props = scale.spec.input_schema["properties"]
    assert props["value"]["description"] == "The value to scale."
    assert props["factor"]["description"] == "The multiplier."


def test_description_argument_overrides_the_docstring() -> None:
    @capability(description="Shout a text.")
    def shout(text: str) -> str:
        """Whatever.

        Args:
            text: What to shout.
        """
        return text.upper()

    @capability
    def undocumented(text: str) -> str:
        return text

    assert shout.spec.description == "Shout a text."
    assert shout.spec.input_schema["properties"]["text"]["description"] == "What to shout."
    assert undocumented.spec.description == ""


@pytest.mark.parametrize("cap", [summarize, add], ids=lambda c: c.name)
def test_spec_round_trips_through_json(cap: Capability[..., Any]) -> None:
    assert CapabilitySpec.model_validate_json(cap.spec.model_dump_json()) == cap.spec


def test_postponed_annotations_in_the_user_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = '''
from __future__ import annotations

from collections.abc import AsyncIterator

from pydantic import BaseModel

from agentmesh.capability import capability
from agentmesh.mesh import Mesh


class Reply(BaseModel):
    text: str


@capability
async def reply(text: str, mesh: Mesh | None = None, times: int = 1) -> Reply:
    """Reply to a text."""
    return Reply(text=text * times)


@capability
async def replies(text: str) -> AsyncIterator[Reply]:
    yield Reply(text=text)
'''
    path = tmp_path / "postponed_caps.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("postponed_caps", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "postponed_caps", module)
    spec.loader.exec_module(module)

    assert module.reply.injected == {"mesh": Mesh}
    assert module.reply.spec.input_schema["required"] == ["text"]
    assert set(module.reply.spec.input_schema["properties"]) == {"text", "times"}
    assert module.reply.spec.output_schema["title"] == "Reply"
    assert module.replies.spec.streaming is True
    assert module.replies.spec.output_schema["title"] == "Reply"


# --------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------


def test_parse_input_returns_keyword_arguments() -> None:
    assert summarize.parse_input(b'{"text": "a b c"}') == {"text": "a b c", "max_words": 40}
    assert summarize.parse_input(b'{"text": "a", "max_words": 2}') == {"text": "a", "max_words": 2}


def test_parse_input_keeps_nested_models() -> None:
    @capability
    def area(corner: Point, scale: float = 1.0) -> float:
        return corner.x * corner.y * scale

    arguments = area.parse_input(b'{"corner": {"x": 2, "y": 3}}')
    assert isinstance(arguments["corner"], Point)
    assert arguments == {"corner": Point(x=2, y=3), "scale": 1.0}


def test_empty_body_means_no_arguments() -> None:
    @capability
    def greet(name: str = "world", punctuation: str = "!") -> str:
        return f"hello {name}{punctuation}"

    assert greet.parse_input(b"") == {"name": "world", "punctuation": "!"}
    with pytest.raises(InvalidInput) as caught:
        summarize.parse_input(b"")
    assert caught.value.errors is not None
    assert caught.value.errors[0]["type"] == "missing"


@pytest.mark.parametrize(
    ("body", "error_type", "loc", "message"),
    [
        (b'{"text": ', "json_invalid", [], "body: Invalid JSON: EOF while parsing"),
        (b'{"max_words": 3}', "missing", ["text"], "text: Field required"),
        (
            b'{"text": "a", "max_words": "many"}',
            "int_parsing",
            ["max_words"],
            "max_words: Input should be a valid integer",
        ),
        (
            b'{"text": "a", "style": "terse"}',
            "extra_forbidden",
            ["style"],
            "style: Extra inputs are not permitted",
        ),
        (b'["a", "b"]', "model_type", [], "body: Input should be an object"),
    ],
    ids=["bad-json", "missing", "wrong-type", "unknown-field", "not-an-object"],
)
def test_invalid_input_carries_pydantic_errors(
    body: bytes, error_type: str, loc: list[str], message: str
) -> None:
    with pytest.raises(InvalidInput) as caught:
        summarize.parse_input(body)
    error = caught.value
    assert str(error).startswith(f"invalid input for capability 'summarize': {message}")
    assert error.status == 422
    assert error.errors is not None
    assert len(error.errors) == 1
    assert error.errors[0]["type"] == error_type
    assert error.errors[0]["loc"] == loc
    assert "url" not in error.errors[0]
    json.dumps(error.errors)  # JSON-safe: it travels in a problem document
    assert error.to_problem().errors == error.errors


def test_invalid_input_names_the_first_twenty_fields_of_many() -> None:
    @capability
    async def total(values: list[int]) -> int:
        return sum(values)

    body = json.dumps({"values": ["x"] * 500}).encode()
    with pytest.raises(InvalidInput) as caught:
        total.parse_input(body)
    message = str(caught.value)
    assert "values.0: Input should be a valid integer" in message
    assert "values.19:" in message
    assert "values.20:" not in message
    assert message.endswith("; and 480 more (see the error list)"), message
    assert caught.value.errors is not None
    assert len(caught.value.errors) == 500


def test_invalid_input_names_every_failing_field() -> None:
    with pytest.raises(InvalidInput) as caught:
        summarize.parse_input(b'{"max_words": "x", "style": 1}')
    assert str(caught.value) == (
        "invalid input for capability 'summarize': text: Field required; "
        "max_words: Input should be a valid integer, unable to parse string as an integer; "
        "style: Extra inputs are not permitted"
    )
    assert caught.value.errors is not None
    assert {e["type"] for e in caught.value.errors} == {
        "missing",
        "int_parsing",
        "extra_forbidden",
    }


def test_parameter_names_that_clash_with_pydantic() -> None:
    @capability
    def extract(
        text: str,
        schema: dict[str, Any],
        json: bool = False,
        model_config: int = 0,
        _hint: str = "",
        f_schema: int = 1,
    ) -> dict[str, Any]:
        return {"schema": schema, "json": json, "config": model_config, "hint": _hint}

    assert set(extract.spec.input_schema["properties"]) == {
        "text",
        "schema",
        "json",
        "model_config",
        "_hint",
        "f_schema",
    }
    arguments = extract.parse_input(
        b'{"text": "t", "schema": {"a": 1}, "json": true, "model_config": 3, "_hint": "h"}'
    )
    assert arguments == {
        "text": "t",
        "schema": {"a": 1},
        "json": True,
        "model_config": 3,
        "_hint": "h",
        "f_schema": 1,
    }
    assert extract(**arguments) == {"schema": {"a": 1}, "json": True, "config": 3, "hint": "h"}


# --------------------------------------------------------------------------------------
# Invocation
# --------------------------------------------------------------------------------------


async def test_async_capability_invoke_and_dump() -> None:
    result = await summarize.invoke(summarize.parse_input(b'{"text": "a b c", "max_words": 2}'))
    assert result == Summary(text="a b", words=2)
    assert summarize.dump_output(result) == b'{"text":"a b","words":2}'


async def test_direct_call_of_an_async_capability() -> None:
    assert await summarize("one two three", max_words=1) == Summary(text="one", words=1)


async def test_sync_capability_runs_off_the_event_loop_thread() -> None:
    @capability
    def thread_id() -> int:
        return threading.get_ident()

    assert await thread_id.invoke({}) != threading.get_ident()
    assert await add.invoke({"a": 2, "b": 3}) == 5


async def test_sync_capability_does_not_block_the_loop() -> None:
    release = threading.Event()

    @capability
    def wait_for_release() -> str:
        return "released" if release.wait(timeout=5) else "timed out"

    call = asyncio.create_task(wait_for_release.invoke({}))
    await asyncio.sleep(0.05)  # the loop runs while the function blocks its thread
    release.set()
    assert await call == "released"


async def test_cancelled_sync_call_returns_at_once() -> None:
    release = threading.Event()

    @capability
    def stuck() -> None:
        release.wait(timeout=5)

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await stuck.invoke({})
    assert time.monotonic() - started < 2
    release.set()


async def test_sync_capability_sees_the_callers_context() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

    @capability
    def current_request() -> str:
        return request_id.get()

    request_id.set("req-42")
    assert await current_request.invoke({}) == "req-42"


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def test_dump_output_validates_and_coerces() -> None:
    assert summarize.dump_output({"text": "a", "words": "3"}) == b'{"text":"a","words":3}'
    assert summarize.dump_output(Summary(text="b", words=1)) == b'{"text":"b","words":1}'


def test_invalid_output() -> None:
    with pytest.raises(InvalidOutput) as caught:
        summarize.dump_output({"text": "a"})
    error = caught.value
    assert str(error) == "capability 'summarize' returned invalid output: words: Field required"
    assert "words" in str(error)
    assert error.code == "invalid_output"
    assert error.errors is not None
    assert error.errors[0]["type"] == "missing"
    assert error.errors[0]["loc"] == ["words"]
    json.dumps(error.errors)

    with pytest.raises(InvalidOutput):
        add.dump_output("not a number")


def test_return_annotation_none() -> None:
    @capability
    def fire(event: str) -> None:
        return None

    assert fire.spec.output_schema == {"type": "null"}
    assert fire.dump_output(None) == b"null"
    with pytest.raises(InvalidOutput):
        fire.dump_output("something")


def test_no_return_annotation_accepts_any_json_value() -> None:
    @capability
    def anything(kind: str):  # type: ignore[no-untyped-def]
        return kind

    assert anything.spec.output_schema == {}
    assert anything.dump_output({"a": [1, 2.5, None]}) == b'{"a":[1,2.5,null]}'
    assert anything.dump_output(Point(x=1, y=2)) == b'{"x":1,"y":2}'
    with pytest.raises(InvalidOutput) as caught:
        anything.dump_output(object())
    assert "returned invalid output" in str(caught.value)


def test_list_of_models_output() -> None:
    @capability
    def corners() -> list[Point]:
        return [Point(x=0, y=0)]

    assert corners.spec.output_schema["type"] == "array"
    assert corners.dump_output([Point(x=0, y=0), {"x": 1, "y": 1}]) == (
        b'[{"x":0,"y":0},{"x":1,"y":1}]'
    )


# --------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "annotation",
    [AsyncIterator[Point], AsyncIterable[Point], AsyncGenerator[Point, None]],
    ids=["AsyncIterator", "AsyncIterable", "AsyncGenerator"],
)
async def test_async_generator_streams_items(annotation: Any) -> None:
    async def points(n: int):  # type: ignore[no-untyped-def]
        for i in range(n):
            yield {"x": i, "y": -i}

    points.__annotations__["return"] = annotation
    cap = capability(points)

    assert cap.streaming is True
    assert cap.spec.streaming is True
    assert cap.spec.output_schema == Point.model_json_schema(mode="serialization")
    chunks = [chunk async for chunk in cap.stream(cap.parse_input(b'{"n": 3}'))]
    assert chunks == [b'{"x":0,"y":0}', b'{"x":1,"y":-1}', b'{"x":2,"y":-2}']
    assert CapabilitySpec.model_validate_json(cap.spec.model_dump_json()) == cap.spec


async def test_bad_stream_item_raises_and_closes_the_generator() -> None:
    closed = asyncio.Event()

    @capability
    async def numbers() -> AsyncIterator[int]:
        try:
            yield 1
            yield "two"  # type: ignore[misc]
            yield 3
        finally:
            closed.set()

    received: list[bytes] = []

    async def drain() -> None:
        async for chunk in numbers.stream({}):
            received.append(chunk)

    with pytest.raises(InvalidOutput) as caught:
        await drain()
    assert received == [b"1"]
    assert str(caught.value).startswith("capability 'numbers' yielded an invalid item")
    assert closed.is_set()


async def test_closing_the_stream_closes_the_capability() -> None:
    closed = asyncio.Event()

    @capability
    async def forever() -> AsyncIterator[int]:
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    stream = forever.stream({})
    assert await anext(stream) == b"0"
    await stream.aclose()
    assert closed.is_set()


async def test_unannotated_async_generator_streams_any_json() -> None:
    @capability
    async def words(text: str):  # type: ignore[no-untyped-def]
        for word in text.split():
            yield {"word": word}

    assert words.spec.output_schema == {}
    assert [c async for c in words.stream({"text": "a b"})] == [b'{"word":"a"}', b'{"word":"b"}']


async def test_invoke_and_stream_refuse_the_other_kind() -> None:
    @capability
    async def ticks() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(ConfigurationError, match="use stream"):
        await ticks.invoke({})
    with pytest.raises(ConfigurationError, match="use invoke"):
        summarize.stream({"text": "a"})


# --------------------------------------------------------------------------------------
# Mesh injection
# --------------------------------------------------------------------------------------


async def test_mesh_parameter_is_injected_not_an_input() -> None:
    seen: list[object] = []

    @capability
    async def relay(topic: str, mesh: Mesh) -> str:
        """Relay a topic.

        Args:
            topic: What to relay.
            mesh: The agent's mesh handle.
        """
        seen.append(mesh)
        return topic

    assert relay.injected == {"mesh": Mesh}
    assert set(relay.spec.input_schema["properties"]) == {"topic"}
    with pytest.raises(InvalidInput):
        relay.parse_input(b'{"topic": "t", "mesh": {}}')

    handle = object()  # the runtime's Mesh; invoke passes whatever it is given through
    arguments = relay.parse_input(b'{"topic": "t"}')
    assert await relay.invoke(arguments, injected={"mesh": handle, "unrelated": 1}) == "t"
    assert seen == [handle]
    assert arguments == {"topic": "t"}  # the caller's dict is left alone


@pytest.mark.parametrize(
    "annotation",
    [Mesh | None, Annotated[Mesh, "injected"]],
    ids=["optional", "annotated"],
)
async def test_mesh_annotation_variants(annotation: Any) -> None:
    def lookup(key: str, client=None) -> str:  # type: ignore[no-untyped-def]
        return f"{key}:{client is None}"

    lookup.__annotations__["client"] = annotation
    cap = capability(lookup)

    assert cap.injected == {"client": Mesh}
    assert set(cap.spec.input_schema["properties"]) == {"key"}
    assert cap("k") == "k:True"
    assert await cap.invoke({"key": "k"}, injected={"client": object()}) == "k:False"


def test_capability_without_mesh_ignores_injected_values() -> None:
    assert add.injected == {}
    assert asyncio.run(add.invoke({"a": 1}, injected={"mesh": object()})) == 3


# --------------------------------------------------------------------------------------
# Unsupported signatures fail at decoration time
# --------------------------------------------------------------------------------------


class Opaque:
    """A type pydantic cannot describe as JSON."""


def _ok(text: str) -> str:
    return text


def _varargs(*texts: str) -> str:
    return "".join(texts)


def _varkw(**options: str) -> str:
    return str(options)


def _posonly(text: str, /) -> str:
    return text


def _unannotated(text, n: int = 1) -> str:  # type: ignore[no-untyped-def]
    return str(text) * n


def _sync_generator(n: int) -> Iterator[int]:
    yield n


def _opaque_input(thing: Opaque) -> str:
    return repr(thing)


def _opaque_output(text: str) -> Opaque:
    return Opaque()


async def _not_a_generator(text: str) -> AsyncIterator[str]:
    raise NotImplementedError


async def _wrong_stream_annotation(text: str) -> str:  # type: ignore[misc]
    yield text


def _unresolvable(text: str) -> str:
    return text


_unresolvable.__annotations__["text"] = "NoSuchType"


@pytest.mark.parametrize(
    ("fn", "options", "fragments"),
    [
        (_varargs, {}, ["capability '_varargs'", "parameter 'texts'", "*args"]),
        (_varkw, {}, ["capability '_varkw'", "parameter 'options'", "**kwargs"]),
        (_posonly, {}, ["capability '_posonly'", "parameter 'text'", "positional-only"]),
        (
            _unannotated,
            {},
            [
                "capability '_unannotated': parameter 'text' has no type annotation; "
                "annotate it (e.g. text: str)"
            ],
        ),
        (_ok, {"name": "not a name"}, ["'_ok'", "'not a name'", "not a valid capability name"]),
        (_ok, {"name": "x" * 129}, ["not a valid capability name"]),
        (_ok, {"version": "one"}, ["capability '_ok'", "'one'", "PEP 440"]),
        (_ok, {"timeout": 0}, ["capability '_ok'", "timeout 0 "]),
        (_ok, {"timeout": -1.5}, ["timeout -1.5 "]),
        (_ok, {"timeout": float("nan")}, ["timeout nan "]),
        (_ok, {"timeout": float("inf")}, ["timeout inf "]),
        (_ok, {"tags": "nlp"}, ["capability '_ok'", "tags=['nlp']"]),
        (_ok, {"tags": ["two words"]}, ["capability '_ok'", "tags"]),
        (_ok, {"description": "x" * 9000}, ["capability '_ok'", "description"]),
        (_sync_generator, {}, ["'_sync_generator'", "use an async generator for streaming"]),
        (_opaque_input, {}, ["capability '_opaque_input'", "parameter 'thing'", "Opaque"]),
        (_opaque_output, {}, ["capability '_opaque_output'", "return annotation"]),
        (_not_a_generator, {}, ["'_not_a_generator'", "not an async generator function"]),
        (_wrong_stream_annotation, {}, ["'_wrong_stream_annotation'", "AsyncIterator[Item]"]),
        (_unresolvable, {}, ["capability '_unresolvable'", "NoSuchType"]),
    ],
    ids=[
        "varargs",
        "varkw",
        "positional-only",
        "unannotated",
        "bad-name",
        "long-name",
        "bad-version",
        "zero-timeout",
        "negative-timeout",
        "nan-timeout",
        "infinite-timeout",
        "tags-string",
        "bad-tag",
        "long-description",
        "sync-generator",
        "opaque-input",
        "opaque-output",
        "iterator-not-generator",
        "generator-wrong-annotation",
        "unresolvable-annotation",
    ],
)
def test_unsupported_signatures_fail_at_decoration(
    fn: Callable[..., Any], options: dict[str, Any], fragments: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        capability(**options)(fn)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_lambda_needs_a_name() -> None:
    with pytest.raises(ConfigurationError, match="'<lambda>'"):
        capability(lambda text: text)
    constant = capability(name="constant")(lambda: 42)
    assert constant.name == "constant"
    assert constant() == 42


def test_options_must_be_passed_by_keyword() -> None:
    with pytest.raises(ConfigurationError, match="pass options by keyword"):
        capability("summarize")  # type: ignore[call-overload]
